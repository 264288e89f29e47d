"""The CLI for scripts: `--json` outputs parse and carry the real fields, `--version`, `python -m privlm`,
options from the environment, `jobs logs --follow`, and the fix printed for a missing extra."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from infra.offline import run, stack_config
from privlm.cli import app, main, missing_extra_message
from tests.helpers import REPO

runner = CliRunner()


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = runner.invoke(app, list(args), env={"COLUMNS": "200", **(env or {})})
    return result.exit_code, result.stdout


def test_version_comes_from_the_package_metadata_and_python_m_privlm_runs() -> None:
    code, out = invoke("--version")
    assert code == 0 and out.strip() == f"privlm {md.version('privlm')}"
    proc = subprocess.run([sys.executable, "-m", "privlm", "--version"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == out.strip()


def test_doctor_json_lists_each_finding_and_blocks_on_an_unreachable_tracking_server() -> None:
    code, out = invoke("doctor", "--json", env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    doc = json.loads(out)
    assert code == 1 and doc["ok"] is False and doc["blocking"] >= 1
    server = next(f for f in doc["findings"] if f["check"] == "tracking server")
    assert server["ok"] is False and server["detail"].startswith("http://127.0.0.1:9")
    assert "mlflow server" in server["fix"]
    python = next(f for f in doc["findings"] if f["check"] == "python")
    assert python["ok"] is True and python["detail"] == sys.version.split()[0]


def test_tracking_uri_option_reaches_the_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _, out = invoke("--tracking-uri", "sqlite:////tmp/elsewhere.db", "doctor", "--json")
    uri = next(f for f in json.loads(out)["findings"] if f["check"] == "tracking URI")
    assert uri["detail"] == "sqlite:////tmp/elsewhere.db"
    _, out = invoke("doctor", "--json", env={"MLFLOW_TRACKING_URI": "sqlite:////tmp/from-env.db"})
    assert "sqlite:////tmp/from-env.db" in [f["detail"] for f in json.loads(out)["findings"]]


def test_cluster_from_privlm_cluster_sets_slurm_conf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SLURM_CONF", raising=False)
    monkeypatch.setenv("PRIVLM_JOBS_DIR", str(tmp_path / "jobs"))
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=lab\n")
    code, out = invoke("jobs", "list", "--json", env={"PRIVLM_CLUSTER": str(conf)})
    assert code == 0 and json.loads(out) == [] and os.environ["SLURM_CONF"] == str(conf.resolve())
    result = runner.invoke(app, ["--cluster", str(tmp_path / "nope.conf"), "jobs", "list"])
    assert result.exit_code == 2
    assert f"--cluster (PRIVLM_CLUSTER) '{tmp_path / 'nope.conf'}': no such file" in result.output
    assert "slurm.conf" in result.output


@pytest.fixture
def jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A jobs directory with a running local job (a live process) and a finished one (submitit's result)."""
    monkeypatch.setenv("PRIVLM_JOBS_DIR", str(tmp_path / "jobs"))
    (tmp_path / "jobs").mkdir()
    folder = tmp_path / "submitit"
    folder.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    (folder / f"{done.pid}_0_result.pkl").write_bytes(pickle.dumps(("success", None)))
    for i, (pid, name) in enumerate(((live.pid, "tiny-a"), (done.pid, "tiny-b"))):
        run_dir = tmp_path / name
        run_dir.mkdir()
        (run_dir / "metrics.jsonl").write_text(
            "\n".join(json.dumps(r) for r in ({"event": "start", "resumed": False}, {"step": 10, "loss": 3.2},
                                              {"event": "start", "resumed": True}, {"step": 20, "loss": 2.9})) + "\n")
        (folder / f"{pid}_0_log.out").write_text("".join(f"{name} line {n}\n" for n in range(1, 16)))
        record = {"job_id": str(pid), "executor": "local", "kind": "train", "name": name, "run_dir": str(run_dir),
                  "folder": str(folder), "submitted_at": 1000.0 + i}
        (tmp_path / "jobs" / f"{pid}.json").write_text(json.dumps(record))
    yield {"live": str(live.pid), "done": str(done.pid), "folder": folder}
    live.kill()
    live.wait()


def test_jobs_list_json_holds_state_resumes_and_run(jobs: dict) -> None:
    code, out = invoke("jobs", "list", "--json")
    active = json.loads(out)
    assert code == 0 and [j["job"] for j in active] == [jobs["live"]]
    assert active[0]["state"] == "RUNNING" and active[0]["resumes"] == 1 and active[0]["recipe"] == "tiny-a"
    assert active[0]["executor"] == "local" and active[0]["run"].endswith("tiny-a")
    everything = json.loads(invoke("jobs", "list", "--all", "--json")[1])
    assert [(j["job"], j["state"]) for j in everything] == [(jobs["done"], "COMPLETED"), (jobs["live"], "RUNNING")]


def test_jobs_status_json_holds_the_log_tail(jobs: dict) -> None:
    code, out = invoke("jobs", "status", jobs["done"], "--json", "--lines", "3")
    doc = json.loads(out)
    assert code == 0 and doc["job"] == jobs["done"] and doc["state"] == "COMPLETED" and doc["kind"] == "train"
    assert doc["log"] == ["tiny-b line 13", "tiny-b line 14", "tiny-b line 15"]
    missing = runner.invoke(app, ["jobs", "status", "12345678", "--json"])
    assert missing.exit_code == 2 and "no submitted job 12345678" in missing.output


def test_jobs_logs_follow_prints_each_new_line_once_until_the_job_ends(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRIVLM_JOBS_DIR", str(tmp_path / "jobs"))
    (tmp_path / "jobs").mkdir()
    log = tmp_path / "log.out"
    writer = subprocess.Popen([sys.executable, "-c", f"""
import time
with open({str(log)!r}, "a", buffering=1) as f:
    f.write("before 1\\nbefore 2\\n")
    time.sleep(1.0)
    for n in range(1, 6):
        f.write(f"step {{n}}\\n")
        time.sleep(0.2)
    f.write("no newline at the end")
"""])
    threading.Thread(target=writer.wait, daemon=True).start()  # reaped at once: a zombie would look alive
    time.sleep(0.3)
    log.rename(log.with_name(f"{writer.pid}_0_log.out"))  # the open file keeps being written under its new name
    (tmp_path / "jobs" / f"{writer.pid}.json").write_text(json.dumps(
        {"job_id": str(writer.pid), "executor": "local", "kind": "train", "name": "follow", "folder": str(tmp_path),
         "run_dir": str(tmp_path / "run"), "submitted_at": 1.0}))
    started = time.monotonic()
    result = runner.invoke(app, ["jobs", "logs", str(writer.pid), "--follow", "--lines", "1", "--interval", "0.1"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["before 2", "step 1", "step 2", "step 3", "step 4", "step 5",
                                          "no newline at the end"]
    assert f"job {writer.pid} ended: STOPPED" in result.stderr
    assert time.monotonic() - started < 15


def test_infra_validate_json_names_each_finding(tmp_path: Path) -> None:
    code, out = invoke("infra", "validate", "p5-spot", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["errors"] == 0 and doc["cluster"] == stack_config("p5-spot")["privlm:cluster"]["name"]
    config = stack_config("p4d-ondemand")
    config["privlm:cluster"]["fsx"]["capacity_gib"] = 5000
    bad = tmp_path / "Pulumi.bad.yaml"
    bad.write_text(yaml.safe_dump({"config": config}))
    code, out = invoke("infra", "validate", str(bad), "--json")
    doc = json.loads(out)
    assert code == 2 and doc["errors"] == 1
    assert doc["findings"][0]["level"] == "error" and doc["findings"][0]["field"] == "fsx.capacity_gib"
    assert "5000 GiB" in doc["findings"][0]["message"]


def test_infra_check_json_counts_the_resources_and_the_policies() -> None:
    code, out = invoke("infra", "check", "p5-spot", "--json")
    doc = json.loads(out)
    graph = run(stack_config("p5-spot"))
    assert code == 0 and doc["errors"] == 0 and doc["findings"] == []
    assert doc["resources"] == graph.count() and doc["resource_types"]["autoscaling/group"] == 1
    assert doc["policies"] == ["placement", "efa", "security-groups", "encryption", "imdsv2", "secrets", "tags"]


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A sqlite MLflow registry with two versions of `tiny`: v1 champion, v2 challenger with eval tags."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("tiny")
    recipe = yaml.safe_dump({"registry": {"promotion": {"ab": {"alpha": 0.01, "min_effect": 2.0}}}})
    for version, perplexity in (("1", "12.5"), ("2", "9.75")):
        client.create_model_version("tiny", source=str(tmp_path / f"m{version}"), tags={
            "eval.eval_perplexity": perplexity, "privlm.recipe": "tiny-cpu", "privlm.step": "40",
            "privlm.git_commit": "abc123", "privlm.recipe_yaml": recipe})
    client.set_registered_model_alias("tiny", "champion", "1")
    client.set_registered_model_alias("tiny", "challenger", "2")
    return uri


def test_model_show_json_lists_versions_with_aliases_and_eval(registry: str) -> None:
    code, out = invoke("model", "show", "tiny", "--json")
    rows = json.loads(out)
    assert code == 0 and [r["version"] for r in rows] == ["1", "2"]
    assert rows[0]["aliases"] == ["champion"] and rows[1]["aliases"] == ["challenger"]
    assert rows[1]["eval"]["eval_perplexity"] == "9.75" and rows[1]["recipe"] == "tiny-cpu"
    assert rows[0]["commit"] == "abc123"


def test_model_compare_json_holds_both_arms_and_the_verdict(registry: str, tmp_path: Path) -> None:
    from mlops.feedback import FeedbackStore

    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    store = FeedbackStore(url)
    for i in range(12):
        version, score = ("tiny/v1", 0.2 + 0.01 * (i % 3)) if i % 2 else ("tiny/v2", 0.9 - 0.01 * (i % 3))
        store.record(id=f"r{i}", model="tiny", version=version, arm="a", endpoint="completions", caller="c",
                     prompt="p", completion="x")
        store.rate(f"r{i}", score, "c")
    result = runner.invoke(app, ["model", "compare", "tiny", "--json", "--feedback", url])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["champion"]["version"] == "tiny/v1" and doc["champion"]["n"] == 6
    assert doc["challenger"]["version"] == "tiny/v2" and doc["challenger"]["mean"] > doc["champion"]["mean"]
    assert doc["alpha"] == 0.01 and doc["min_n"] <= 6 and doc["p_value"] < 0.01
    assert doc["challenger_wins"] is True and "the challenger is significantly better" in doc["verdict"]


def test_a_missing_extra_names_the_pip_install(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    assert missing_extra_message(ModuleNotFoundError("No module named 'torch'", name="torch")) == (
        'this command needs torch, which is not installed: pip install "privlm[train]" (or "privlm[all]" for every '
        'station)')
    assert "privlm[infra]" in missing_extra_message(ModuleNotFoundError(name="pulumi_aws.ec2"))
    assert missing_extra_message(ModuleNotFoundError(name="not_ours")) is None

    def needs_ray(*_: object, **__: object) -> None:
        raise ModuleNotFoundError("No module named 'ray'", name="ray")

    monkeypatch.setattr("privlm.cli.app", needs_ray)
    with pytest.raises(SystemExit) as stopped:
        main()
    assert stopped.value.code == 5 and 'pip install "privlm[serve]"' in capsys.readouterr().err


def test_serve_api_key_is_added_to_the_keys_the_gateway_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    from serving.auth import env_key_hashes, hash_key
    from serving.cli import add_api_key

    monkeypatch.setenv("PRIVLM_API_KEYS", "sk-a")
    add_api_key("PRIVLM_API_KEYS", " sk-b ")
    add_api_key("PRIVLM_API_KEYS", "sk-a")
    assert os.environ["PRIVLM_API_KEYS"] == "sk-a,sk-b"
    assert env_key_hashes("PRIVLM_API_KEYS") == {hash_key("sk-a"), hash_key("sk-b")}
