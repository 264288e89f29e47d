"""What `privlm jobs` knows about submitted jobs: one JSON record per job, and its live state.

Records live in `$PRIVLM_JOBS_DIR` (default `runs/.jobs`): job id, executor, kind (train, data), recipe
name, run directory and submitit folder. State comes from Slurm's JSON (slurmctld's through `squeue --json`, then
`sacct --json` once the job has left slurmctld's memory) or, for the local executor, from the controller process
and submitit's job object; resumes and the last checkpoint come from the run directory, so they are right
whichever scheduler ran the job.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from jobs.files import atomic_write_text
from jobs.launch.preemption import REQUEUE_SIGNAL
from jobs.recipe import Recipe
from jobs.run_dir import RunDir

ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "REQUEUE_HOLD"}


def jobs_dir() -> Path:
    return Path(os.environ.get("PRIVLM_JOBS_DIR", "runs/.jobs"))


@dataclass
class JobRecord:
    """A submitted job as `privlm jobs` lists it."""

    job_id: str
    executor: str  # slurm or local
    kind: str  # train or data
    name: str
    run_dir: str
    folder: str  # submitit's logs and pickles
    submitted_at: float
    slurm_conf: str | None = None

    @property
    def path(self) -> Path:
        return jobs_dir() / f"{self.job_id}.json"


def record_job(job: Any, executor: str, kind: str, recipe: Recipe, folder: Path) -> JobRecord:
    """Save a record of a just-submitted submitit job."""
    rec = JobRecord(str(job.job_id), executor, kind, recipe.name, str(recipe.run_path.resolve()), str(folder),
                    time.time(), os.environ.get("SLURM_CONF"))
    rec.path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(rec.path, json.dumps(asdict(rec), indent=1))
    return rec


def load_records() -> list[JobRecord]:
    """Every recorded job, newest first."""
    records = [JobRecord(**json.loads(p.read_text())) for p in jobs_dir().glob("*.json")]
    return sorted(records, key=lambda r: r.submitted_at, reverse=True)


def find(job_id: str) -> JobRecord:
    """The record of JOB_ID (a Slurm job id or the local executor's controller pid)."""
    path = jobs_dir() / f"{job_id}.json"
    if not path.is_file():
        known = ", ".join(r.job_id for r in load_records()[:10]) or "none"
        raise KeyError(f"no submitted job {job_id} in {jobs_dir()} (recent: {known})")
    return JobRecord(**json.loads(path.read_text()))


def _slurm_env(rec: JobRecord) -> dict[str, str]:
    return {**os.environ, **({"SLURM_CONF": rec.slurm_conf} if rec.slurm_conf else {})}


def _slurm_json(rec: JobRecord, *argv: str) -> list[dict[str, Any]]:
    """The `jobs` list of a Slurm client's `--json` output ([] when the client fails or knows no such job)."""
    out = subprocess.run(argv, capture_output=True, text=True, env=_slurm_env(rec), timeout=30)
    if out.returncode != 0 or not out.stdout.strip():
        return []
    return list(json.loads(out.stdout).get("jobs", []))


def _state_name(value: Any) -> str:
    """A job state as Slurm's JSON gives it: a string (22.05), a list of flags or {"current": ...} (23.02+)."""
    if isinstance(value, dict):
        value = value.get("current", "UNKNOWN")
    if isinstance(value, list):
        value = value[0] if value else "UNKNOWN"
    return str(value)


def _is_job(job: dict[str, Any], job_id: str) -> bool:
    """Whether a JSON job entry is JOB_ID (a plain id, or ARRAY_TASK of an array)."""
    array_id, _, task = job_id.partition("_")
    if task:
        return str(job.get("array_job_id")) == array_id and str(job.get("array_task_id")) == task
    return str(job.get("job_id")) == job_id


def slurmctld_state(rec: JobRecord) -> dict[str, Any] | None:
    """State, restarts and nodes from slurmctld's JSON (`squeue --json`: 22.05's `scontrol` has no `--json`,
    `scontrol show job --json` needs 23.02); None once slurmctld has forgotten the job."""
    jobs = [j for j in _slurm_json(rec, "squeue", "--json", "--states=all", "--jobs", rec.job_id)
            if _is_job(j, rec.job_id)]
    if not jobs:
        return None
    job = jobs[0]
    return {"state": _state_name(job.get("job_state")), "restarts": int(job.get("restart_cnt", 0)),
            "nodes": job.get("nodes") or None}


def sacct_state(rec: JobRecord) -> dict[str, Any] | None:
    """State, restarts and nodes from `sacct --json` (the accounting database: one record per start of the job,
    a requeued one marked REQUEUED; nodes: where it last ran); None without accounting."""
    jobs = _slurm_json(rec, "sacct", "--json", "-X", "-j", rec.job_id)
    if not jobs:
        return None
    last = jobs[-1]
    restarts = sum(_state_name(j.get("state")) == "REQUEUED" for j in jobs)
    ran_on = [j["nodes"] for j in jobs if j.get("nodes") and j["nodes"] != "None assigned"]
    return {"state": _state_name(last.get("state")), "restarts": restarts, "nodes": ran_on[-1] if ran_on else None}


def _local_state(rec: JobRecord) -> str:
    """RUNNING while the controller lives; then what submitit's job object says of its result."""
    try:
        os.kill(int(rec.job_id), 0)
        return "RUNNING"
    except ProcessLookupError:
        pass
    except PermissionError:
        return "RUNNING"
    from submitit.local.local import LocalJob

    job: LocalJob[Any] = LocalJob(rec.folder, rec.job_id)
    if job.state != "FINISHED":  # no process and no result: stopped before it could write one
        return "STOPPED"
    return "COMPLETED" if job.exception() is None else "FAILED"


def state(rec: JobRecord) -> dict[str, Any]:
    """Live state: scheduler state, Slurm restarts, resumes seen by the trainer, last checkpoint, nodes."""
    info: dict[str, Any] = {"state": "UNKNOWN", "restarts": None, "nodes": None}
    if rec.executor == "slurm":
        info.update(slurmctld_state(rec) or sacct_state(rec) or {"state": "UNKNOWN (purged; no accounting)"})
    else:
        info["state"] = _local_state(rec)
    run = RunDir.at(rec.run_dir)
    info["resumes"] = run.progress()[2]
    info["last_checkpoint"] = run.last_checkpoint_step()
    return info


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def log_files(rec: JobRecord) -> list[Path]:
    """The job's submitit logs (task 0 first), most recent run last."""
    folder = Path(rec.folder)
    return sorted(folder.glob(f"{rec.job_id}_*_log.out")) + sorted(folder.glob(f"{rec.job_id}_*_log.err"))


def tail(rec: JobRecord, lines: int = 40) -> str:
    """The last LINES lines of task 0's log."""
    files = log_files(rec)
    if not files:
        return f"(no log yet in {rec.folder})"
    return "\n".join(_lines(files[0])[-lines:])


def cancel(rec: JobRecord) -> None:
    """scancel a Slurm job; stop the local executor's controller (its ranks checkpoint on the signal)."""
    if rec.executor == "slurm":
        subprocess.run(["scancel", rec.job_id], check=True, env=_slurm_env(rec), timeout=30)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(rec.job_id), signal.SIGTERM)


def preempt(rec: JobRecord) -> int:
    """Send the job's ranks the preemption signal (checkpoint, requeue, resume); how many were signalled.

    Slurm: `scancel --signal=USR2` reaches the job's steps (the ranks), not the batch shell. Local: the
    controller's children, which are the ranks (the controller itself would die of the signal).
    """
    if rec.executor == "slurm":
        signal_name = REQUEUE_SIGNAL.name.removeprefix("SIG")
        subprocess.run(["scancel", f"--signal={signal_name}", rec.job_id], check=True, env=_slurm_env(rec), timeout=30)
        return 1
    import psutil

    try:
        ranks = psutil.Process(int(rec.job_id)).children()
    except psutil.NoSuchProcess:
        return 0
    for rank in ranks:
        rank.send_signal(REQUEUE_SIGNAL)
    return len(ranks)
