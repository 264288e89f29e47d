"""Job-runner pieces around real training: checkpoints synced to S3 (moto) and restored, spot notices,
the Young/Daly interval."""

from __future__ import annotations

import json
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

from jobs.train.schedule import young_daly_interval
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


def checkpoint_events(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    return [e for e in map(json.loads, lines) if e.get("event") == "checkpoint"]


def test_spot_notice_checkpoints_and_stops_with_auto_interval(tmp_path: Path, small_data: Path) -> None:
    """`auto` picks round(sqrt(2 x write x MTBF) / step time) from its first write, then checkpoints on it."""
    rate = 120  # interruptions per hour: MTBF 30 s
    run = tmp_path / "spot"
    with fake_imds() as url:
        recipe = recipe_for(tmp_path, small_data, "spot", spot={"watch": True, "metadata_url": url, "poll_s": 0.1},
                            checkpoint={"interval": "auto", "interruptions_per_hour": rate},
                            training={"max_steps": 400})
        proc = start_run(recipe)
        wait_for_step(run, 12, proc)
        deadline = time.monotonic() + 240  # two checkpoints on the chosen interval, after the provisional one
        while len(checkpoint_events(run)) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        FakeIMDS.notices["spot/instance-action"] = {"action": "terminate", "time": "2026-11-22T12:02:00Z"}
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGUSR2, out[-2000:]
    assert "spot instance-action notice" in out
    chosen = re.search(r"checkpoint interval auto: (\d+) steps = sqrt\(2 x ([\d.]+)s write x (\d+)s MTBF\) = \d+s "
                       r"at ([\d.]+)s/step", out)
    assert chosen, out[-2000:]
    interval, write_s, mtbf_s, step_s = int(chosen[1]), float(chosen[2]), float(chosen[3]), float(chosen[4])
    assert mtbf_s == 3600 / rate
    # the log rounds its inputs to 0.01 s: the interval from the exact ones lies between these two
    low = max(1, round(young_daly_interval(write_s - 0.005, mtbf_s) / (step_s + 0.005)))
    high = max(1, round(young_daly_interval(write_s + 0.005, mtbf_s) / max(step_s - 0.005, 1e-6)))
    assert low <= interval <= high, (interval, low, high)
    events = checkpoint_events(run)
    first, *rest = events
    assert first["step"] == 10  # the provisional interval: min(10, max_steps // 10)
    assert write_s >= round(first["seconds"], 2) - 0.01  # the slowest rank's write: at least rank 0's
    stopped = max(read_losses(run))
    on_interval = [e["step"] for e in rest if e["step"] != stopped]
    assert on_interval == [s for s in range(first["step"] + 1, stopped) if s % interval == 0]
    assert len(on_interval) >= 2
    assert rest[-1]["step"] == stopped and (run / "ckpt" / "latest").read_text() == f"step-{stopped:08d}"
    stops = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "stopped" and e["signal"] == signal.SIGUSR2 for e in stops)
