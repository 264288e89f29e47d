"""`privlm train submit` on a real Slurm cluster (brought up by our playbook): finish and export, preemption
by a higher-priority job and by submitit's `_interrupt()`, time limits, spot notices, two nodes, refusals,
and `privlm jobs`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import SMALL, FakeIMDS, fake_imds, merge, privlm, read_losses, read_samples, run_env, write_recipe
from tests.integration.slurm_fixture import SlurmCluster

pytestmark = pytest.mark.integration


def wait_for(predicate: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    return None


@pytest.fixture
def submit_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[[SlurmCluster], dict[str, str]]:
    """Point Slurm clients (and the jobs' environment, which sbatch exports) at a cluster."""

    def use(cluster: SlurmCluster) -> dict[str, str]:
        env = {**run_env(), "SLURM_CONF": str(cluster.slurm_conf), "PRIVLM_JOBS_DIR": str(tmp_path / "jobs"),
               "COLUMNS": "200"}
        for key in ("SLURM_CONF", "PRIVLM_JOBS_DIR", "MLFLOW_TRACKING_URI", "TORCH_EXTENSIONS_DIR"):
            monkeypatch.setenv(key, env[key])
        return env

    return use


def recipe(tmp_path: Path, data: Path, name: str, **extra: Any) -> Any:
    from jobs.recipe import parse_recipe

    run = tmp_path / name
    base = merge(SMALL, {"name": name, "run_dir": str(run), "data": {"output_dir": str(data)},
                         "checkpoint": {"directory": str(run / "ckpt")}, "training": {"max_steps": 40},
                         "slurm": {"time_limit_min": 30}})
    data_ = merge(base, extra)
    write_recipe(tmp_path / f"{name}.yaml", data_)
    return parse_recipe(data_)


def step_reached(run: Path, step: int) -> bool:
    return (run / "metrics.jsonl").exists() and max(read_losses(run) or {0: 0}) >= step


def start_and_reach(tmp_path: Path, data: Path, name: str, step: int, **extra: Any) -> tuple[Any, Path]:
    """Submit a SMALL job to Slurm and wait until it has trained to STEP; the job and its run directory."""
    from jobs.launch.submit import submit_training

    job = submit_training(recipe(tmp_path, data, name, **extra), "slurm")
    assert wait_for(lambda: step_reached(tmp_path / name, step), 180), job.stdout()
    return job, tmp_path / name


def final_loss(run: Path, step: int) -> float:
    return read_losses(run)[step]


@pytest.fixture(scope="module")
def reference(slurm_cluster: SlurmCluster, small_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An uninterrupted 40-step job on Slurm: its result, losses and samples, for the interrupted runs to match."""
    import os

    from jobs.launch.submit import submit_training

    tmp = tmp_path_factory.mktemp("reference")
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "PRIVLM_JOBS_DIR", "MLFLOW_TRACKING_URI")}
    os.environ.update(SLURM_CONF=str(slurm_cluster.slurm_conf), PRIVLM_JOBS_DIR=str(tmp / "jobs"),
                      MLFLOW_TRACKING_URI=run_env()["MLFLOW_TRACKING_URI"])
    try:
        job = submit_training(recipe(tmp, small_data, "reference", training={"record_samples": True}), "slurm")
        results = job.results()
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    from jobs.run_dir import RunDir

    return {"result": results[0], "losses": read_losses(tmp / "reference"), "job": job.job_id,
            "samples": read_samples(tmp / "reference"),
            "step_s": RunDir.at(tmp / "reference").step_seconds()}


def test_a_deepspeed_job_on_slurm_finishes_and_exports_its_model(reference: dict) -> None:
    result = reference["result"]
    assert result["step"] == 40 and result["resumes"] == 0
    model = Path(result["model_dir"])
    assert (model / "config.json").is_file() and any(model.glob("*.safetensors"))
    assert reference["losses"][40] < reference["losses"][1] - 0.5  # it learned


def test_preempted_by_a_higher_priority_job_checkpoints_requeues_and_matches(
        slurm_cluster: SlurmCluster, small_data: Path, tmp_path: Path, submit_env, reference: dict) -> None:
    submit_env(slurm_cluster)
    job, run = start_and_reach(tmp_path, small_data, "preempt", 12)
    high = slurm_cluster.sbatch("-p", slurm_cluster.high_partition, "--exclusive", "-o", "/dev/null",
                                "--wrap", "sleep 2")
    assert wait_for(lambda: int(slurm_cluster.job_field(job.job_id, "Restarts") or 0) >= 1, 90), \
        slurm_cluster.job_field(job.job_id, "JobState")
    assert wait_for(lambda: slurm_cluster.job_field(high, "JobState") == "COMPLETED", 120)
    result = job.results()[0]
    log = job.stdout() or ""
    assert "stopping on SIGUSR2" in log and "requeueing" in log, log[-3000:]
    assert result["resumes"] >= 1 and result["step"] == 40
    assert final_loss(run, 40) == pytest.approx(reference["losses"][40], rel=1e-5)


def test_interrupt_checkpoints_requeues_and_resumes_exactly(
        slurm_cluster: SlurmCluster, small_data: Path, tmp_path: Path, submit_env, reference: dict) -> None:
    submit_env(slurm_cluster)
    job, run = start_and_reach(tmp_path, small_data, "interrupt", 10)
    job._interrupt()  # submitit's simulated preemption: TERM, then its preemption signal
    result = job.results()[0]
    assert result["resumes"] == 1, job.stdout()[-3000:]
    assert final_loss(run, 40) == pytest.approx(reference["losses"][40], rel=1e-5)
    assert int(slurm_cluster.job_field(job.job_id, "Restarts") or 0) == 1


def test_a_plain_scontrol_requeue_loses_at_most_one_checkpoint_interval(
        slurm_cluster: SlurmCluster, small_data: Path, tmp_path: Path, submit_env, reference: dict) -> None:
    submit_env(slurm_cluster)
    job, run = start_and_reach(tmp_path, small_data, "requeue", 10)
    at_requeue = max(read_losses(run))
    slurm_cluster.run("scontrol", "requeue", job.job_id, check=True)  # SIGTERM, KillWait, then requeued
    result = job.results()[0]
    starts = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
              if '"event": "start"' in line]
    assert [s["resumed"] for s in starts] == [False, True], job.stdout()[-3000:]
    assert starts[1]["step"] >= at_requeue - 4  # checkpoint.interval is 4 steps
    assert result["step"] == 40 and final_loss(run, 40) == pytest.approx(reference["losses"][40], rel=1e-5)


def test_a_job_longer_than_its_time_limit_completes_over_requeues(
        slurm_cluster: SlurmCluster, small_data: Path, tmp_path: Path, submit_env, reference: dict) -> None:
    from jobs.launch.submit import submit_training

    submit_env(slurm_cluster)
    # ~150 s of steps at the speed the reference job measured: a 2-minute run gets its signal 60-90 s in
    # (Slurm checks limits every 30 s), so even at twice that speed the work needs a second run
    steps = int(max(1000, round(150 / reference["step_s"], -2)))
    rec = recipe(tmp_path, small_data, "timelimit", training={"max_steps": steps, "log_every": 50},
                 checkpoint={"interval": 100}, slurm={"time_limit_min": 2, "signal_delay_s": 60})
    job = submit_training(rec, "slurm")
    result = job.results()[0]
    assert result["step"] == steps and result["resumes"] >= 1, job.stdout()[-3000:]
    assert "timed-out" in (job.stderr() or "") + (job.stdout() or "")


def test_a_spot_notice_checkpoints_and_requeues(
        slurm_cluster: SlurmCluster, small_data: Path, tmp_path: Path, submit_env, reference: dict) -> None:
    submit_env(slurm_cluster)
    with fake_imds() as url:
        job, run = start_and_reach(tmp_path, small_data, "spot", 10,
                                   spot={"watch": True, "metadata_url": url, "poll_s": 0.2})
        FakeIMDS.notices["spot/instance-action"] = {"action": "terminate", "time": "2026-11-29T12:02:00Z"}
        assert wait_for(lambda: int(slurm_cluster.job_field(job.job_id, "Restarts") or 0) >= 1, 60)
        FakeIMDS.notices.clear()  # the replacement instance gets no notice
        result = job.results()[0]
    assert "spot instance-action notice" in job.stdout()
    assert result["resumes"] == 1 and final_loss(run, 40) == pytest.approx(reference["losses"][40], rel=1e-5)


def test_two_nodes_get_ranks_and_world_size_and_train_like_one(
        slurm_cluster_2node: SlurmCluster, small_data: Path, tmp_path: Path, submit_env, reference: dict) -> None:
    from jobs.launch.submit import submit_training

    submit_env(slurm_cluster_2node)
    job = submit_training(recipe(tmp_path, small_data, "twonode",
                                 training={"nodes": 2, "processes_per_node": 1}), "slurm")
    results = job.results()
    assert len(results) == 2 and results[0]["step"] == 40
    for rank in (0, 1):  # each task is one rank, on its own node
        assert f"node={rank}(2), global_rank={rank}(2)" in job.task(rank).stdout()
    starts = [json.loads(line) for line in (tmp_path / "twonode" / "metrics.jsonl").read_text().splitlines()
              if '"event": "start"' in line]
    assert [s["world_size"] for s in starts] == [2]
    nodelist = slurm_cluster_2node.job_field(job.job_id, "NodeList")
    hosts = slurm_cluster_2node.run("scontrol", "show", "hostnames", nodelist).stdout.split()
    assert sorted(hosts) == slurm_cluster_2node.nodes
    assert final_loss(tmp_path / "twonode", 40) == pytest.approx(reference["losses"][40], rel=1e-3)


def test_a_requeue_onto_fewer_nodes_resumes_on_one_rank_with_the_same_samples(
        slurm_cluster_2node: SlurmCluster, small_data: Path, tmp_path: Path, submit_env, reference: dict) -> None:
    """2 nodes x 1 rank with slurm.min_nodes=1: once a checkpoint exists one node is drained and the job
    preempted; the requeued job runs on the node left, reshaped to 1 rank, and trains every sample once."""
    from jobs.launch.submit import job_results

    cluster = slurm_cluster_2node
    submit_env(cluster)
    job, run = start_and_reach(tmp_path, small_data, "fewer", 10, slurm={"min_nodes": 1},
                               training={"nodes": 2, "processes_per_node": 1, "record_samples": True})
    script = job.paths.submission_file.read_text()
    assert "#SBATCH --nodes=1-2" in script and script.count("--nodes") == 1, script
    assert "--ntasks-per-node" not in script  # with it, Slurm would start the range on its minimum
    assert (run / "ckpt" / "latest").is_file()  # checkpoint.interval is 4 steps
    first = cluster.run("scontrol", "show", "hostnames", cluster.job_field(job.job_id, "NodeList")).stdout.split()
    assert sorted(first) == cluster.nodes
    gone, left = first[1], first[0]  # rank 1's node goes; rank 0's stays
    try:
        cluster.run("scontrol", "update", f"nodename={gone}", "state=drain", "reason=test", check=True)
        job._interrupt()  # TERM, then submitit's preemption signal: checkpoint and requeue
        ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")
        state = wait_for(lambda: (s := cluster.job_field(job.job_id, "JobState")) in ended and s, 300, every=2)
        assert state == "COMPLETED", (state, (job.task(0).stdout() or "")[-3000:])
    finally:
        cluster.run("scontrol", "update", f"nodename={gone}", "state=resume", check=True)
    assert int(cluster.job_field(job.job_id, "Restarts") or 0) == 1
    assert cluster.job_field(job.job_id, "NumNodes") == "1" and cluster.job_field(job.job_id, "NodeList") == left
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 40 and summary["samples"] == 40 * 16
    results = job_results(job)  # submitit counts 2 tasks; the last run had 1
    assert len(results) == 1 and results[0]["world_size"] == 1 and results[0]["step"] == 40, results
    assert results[0]["resumes"] == 1
    starts = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
              if '"event": "start"' in line]
    assert [(s["world_size"], s["resumed"], s["reshaped"]) for s in starts] == [(2, False, False), (1, True, True)]
    assert "reshaped from 2 ranks" in (job.task(0).stdout() or "")
    assert read_samples(run) == reference["samples"]  # nothing skipped or repeated across the change
    assert sorted(read_losses(run)) == list(range(1, 41))
    assert final_loss(run, 40) == pytest.approx(reference["losses"][40], rel=1e-3)


def test_bad_requests_are_refused_before_submission(
        slurm_cluster: SlurmCluster, small_data: Path, tmp_path: Path, submit_env) -> None:
    env = submit_env(slurm_cluster)
    cases = {
        "gpus": ({"slurm": {"gpus_per_node": 8}}, "has 0 per node"),
        "partition": ({"slurm": {"partition": "gpu-a100"}}, "slurm.partition='gpu-a100' is not a partition"),
        "timelimit": ({"slurm": {"time_limit_min": 3, "expected_step_s": 2.0}, "checkpoint": {"interval": 60}},
                      "slurm.time_limit_min=3 is below one checkpoint interval"),
    }
    for name, (extra, message) in cases.items():
        recipe(tmp_path, small_data, name, **extra)
        out = privlm("train", "submit", str(tmp_path / f"{name}.yaml"), "--executor", "slurm", env=env,
                     check=False)
        assert out.returncode == 2 and message in out.stderr, (name, out.stderr)
    assert not (tmp_path / "jobs").exists()  # nothing was submitted
    queued = slurm_cluster.run("squeue", "-h", "-o", "%j").stdout.split()
    assert not set(queued) & {f"privlm-{name}" for name in cases}, queued


def test_jobs_commands_show_state_checkpoint_and_log_then_cancel(
        slurm_cluster: SlurmCluster, small_data: Path, tmp_path: Path, submit_env) -> None:
    env = submit_env(slurm_cluster)
    recipe(tmp_path, small_data, "listed", training={"max_steps": 2000})
    out = privlm("train", "submit", str(tmp_path / "listed.yaml"), "--executor", "slurm", env=env).stdout
    job_id = out.split("submitted job ")[1].split()[0]
    assert wait_for(lambda: step_reached(tmp_path / "listed", 9), 180)
    listing = privlm("jobs", "list", env=env).stdout
    assert job_id in listing and "RUNNING" in listing and "listed" in listing
    status = wait_for(lambda: (s := privlm("jobs", "status", job_id, env=env).stdout)
                      and "last_checkpoint: None" not in s and s, 60)
    assert "state: RUNNING" in status and "[privlm] step" in status
    assert "step" in privlm("jobs", "logs", job_id, "-n", "5", env=env).stdout
    privlm("jobs", "preempt", job_id, env=env)  # checkpoint, requeue, resume
    assert wait_for(lambda: "resumed from" in (privlm("jobs", "logs", job_id, "-n", "400", env=env).stdout), 120)
    assert int(slurm_cluster.job_field(job_id, "Restarts") or 0) == 1
    privlm("jobs", "cancel", job_id, env=env)
    assert wait_for(lambda: slurm_cluster.job_field(job_id, "JobState") in ("CANCELLED", ""), 60)
    assert job_id not in privlm("jobs", "list", env=env).stdout  # ended jobs only with --all
    assert job_id in privlm("jobs", "list", "--all", env=env).stdout


def test_data_preparation_runs_as_an_array_then_the_global_pass(
        slurm_cluster: SlurmCluster, small_data: Path, tmp_path: Path, submit_env) -> None:
    import hashlib

    from jobs.launch.data_array import submit_data
    from jobs.recipe import parse_recipe

    env = submit_env(slurm_cluster)
    data = merge(SMALL, {"name": "arr", "run_dir": str(tmp_path / "arr"), "data": {"output_dir": str(tmp_path / "d")}})
    sub = submit_data(parse_recipe(data), "slurm")
    assert [job.job_id.split("_")[1] for job in sub.shards] == ["0", "1"]  # one array task per shard
    assert [job.job_id.split("_")[1] for job in sub.buckets] == ["0", "1"]  # one per bucket of LSH bands
    shards, buckets = (jobs[0].job_id.split("_")[0] for jobs in (sub.shards, sub.buckets))
    script = sub.finalize.paths.submission_file.read_text()
    assert f"--dependency=afterok:{shards}:{buckets}" in script  # waits for every shard and bucket
    report = sub.finalize.result()
    assert report["splits"]["train"]["tokens"] > 0

    def digest(folder: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.bin"))}

    # the same shards, byte for byte, as the one-machine pipeline made from the same corpus and settings
    assert digest(tmp_path / "d") == digest(small_data) and digest(small_data)
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["fingerprint"] == \
        json.loads((small_data / "manifest.json").read_text())["fingerprint"]
    write_recipe(tmp_path / "arr.yaml", data)
    again = privlm("data", "submit", str(tmp_path / "arr.yaml"), "--executor", "slurm", env=env).stdout
    assert "is up to date: nothing submitted" in again


def test_job_state_restarts_and_nodes_come_from_slurms_json(slurm_cluster_2node: SlurmCluster, submit_env,
                                                             tmp_path: Path) -> None:
    """slurmctld's JSON (`squeue --json`) while it knows the job, a requeue counting as a restart; `sacct --json`
    from the accounting database, the same answers."""
    from jobs.launch.records import JobRecord, sacct_state, slurmctld_state

    cluster = slurm_cluster_2node
    submit_env(cluster)
    job_id = cluster.sbatch("-p", cluster.low_partition, "-o", str(tmp_path / "slurm-%j.out"), "--wrap", "sleep 120")
    rec = JobRecord(job_id, "slurm", "train", "sleeper", str(tmp_path / "run"), str(tmp_path), time.time(),
                    str(cluster.slurm_conf))
    running = wait_for(lambda: (s := slurmctld_state(rec)) and s["state"] == "RUNNING" and s, 60)
    assert running and running["restarts"] == 0 and running["nodes"] in cluster.nodes
    assert running["nodes"] == cluster.job_field(job_id, "NodeList")
    cluster.run("scontrol", "requeue", job_id, check=True)
    requeued = wait_for(lambda: (s := slurmctld_state(rec)) and s["state"] in ("PENDING", "RUNNING") and s, 30)
    assert requeued and requeued["restarts"] == 1
    cluster.run("scancel", job_id, check=True)
    assert wait_for(lambda: (s := slurmctld_state(rec)) and s["state"] == "CANCELLED", 30)
    assert cluster.accounting
    accounted = wait_for(lambda: (s := sacct_state(rec)) and s["state"] == "CANCELLED" and s, 30)
    assert accounted and accounted["nodes"] == running["nodes"] and accounted["restarts"] == 1
