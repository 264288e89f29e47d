"""Job-runner pieces around real training: checkpoints synced to S3 (moto) and restored, spot notices,
the Young/Daly interval."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest

from tests.helpers import SMALL, FakeIMDS, fake_imds, merge, privlm, read_losses, start_run, wait_for_step, write_recipe

pytestmark = pytest.mark.integration


def recipe_for(tmp_path: Path, data: Path, name: str, **extra) -> Path:
    run = tmp_path / name
    base = merge(SMALL, {"name": name, "run_dir": str(run), "data": {"output_dir": str(data)},
                         "checkpoint": {"directory": str(run / "ckpt")}, "training": {"max_steps": 40}})
    return write_recipe(tmp_path / f"{name}.yaml", merge(base, extra))


def test_checkpoints_sync_to_s3_and_a_job_resumes_from_there(tmp_path: Path, small_data: Path, moto_server) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_server)
    s3.create_bucket(Bucket="ckpts")
    recipe = recipe_for(tmp_path, small_data, "s3", checkpoint={"s3_uri": "s3://ckpts/runs/s3",
                                                                 "s3_endpoint_url": moto_server, "interval": 4})
    proc = start_run(recipe)
    wait_for_step(tmp_path / "s3", 6, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 143
    stopped = max(read_losses(tmp_path / "s3"))
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="ckpts")["Contents"]}
    assert f"runs/s3/step-{stopped:08d}/_COMPLETE.json" in keys and "runs/s3/step-00000004/meta.json" in keys
    shutil.rmtree(tmp_path / "s3" / "ckpt")  # the local copy is lost
    out = privlm("train", "run", str(recipe)).stdout
    assert f"restored step-{stopped:08d} from s3://ckpts/runs/s3" in out and f"at step {stopped}" in out
    assert max(read_losses(tmp_path / "s3")) == 40


def test_spot_notice_checkpoints_and_stops_with_auto_interval(tmp_path: Path, small_data: Path) -> None:
    with fake_imds() as url:
        recipe = recipe_for(tmp_path, small_data, "spot", spot={"watch": True, "metadata_url": url, "poll_s": 0.1},
                            checkpoint={"interval": "auto", "interruptions_per_hour": 120},
                            training={"max_steps": 400})
        proc = start_run(recipe)
        wait_for_step(tmp_path / "spot", 15, proc)
        FakeIMDS.notices["spot/instance-action"] = {"action": "terminate", "time": "2026-11-22T12:02:00Z"}
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGUSR2, out[-2000:]
    assert "spot instance-action notice" in out and "checkpoint interval auto:" in out and "MTBF" in out
    stopped = max(read_losses(tmp_path / "spot"))
    assert (tmp_path / "spot" / "ckpt" / "latest").read_text() == f"step-{stopped:08d}"
    events = [json.loads(x) for x in (tmp_path / "spot" / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "stopped" and e["signal"] == signal.SIGUSR2 for e in events)
