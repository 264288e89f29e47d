"""Local jobs' state from submitit's job objects: running, completed, failed, stopped without a result."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from jobs.launch.records import JobRecord, state


def record(job_id: str, folder: Path) -> JobRecord:
    return JobRecord(job_id, "local", "train", "tiny", str(folder / "run"), str(folder), time.time())


@pytest.mark.parametrize(("argument", "expected"), [("3", "COMPLETED"), ("three", "FAILED")])
def test_a_finished_local_job_reports_its_outcome(tmp_path: Path, argument: str, expected: str) -> None:
    import submitit

    job = submitit.LocalExecutor(folder=tmp_path).submit(int, argument)  # int("three") raises
    job.exception()  # waits for the end
    assert state(record(job.job_id, tmp_path))["state"] == expected


def test_a_running_local_job_then_one_stopped_before_its_result(tmp_path: Path) -> None:
    import submitit

    job = submitit.LocalExecutor(folder=tmp_path).submit(time.sleep, 30)
    try:
        assert state(record(job.job_id, tmp_path))["state"] == "RUNNING"
    finally:
        job.cancel()
    deadline = time.monotonic() + 20
    while not job.done() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert state(record(job.job_id, tmp_path))["state"] == "STOPPED"
