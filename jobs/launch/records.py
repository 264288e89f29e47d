"""What `privlm jobs` knows about submitted jobs: one JSON record per job, and its live state.

Records live in `$PRIVLM_JOBS_DIR` (default `runs/.jobs`): job id, executor, kind (train, data), recipe
name, run directory and submitit folder. State comes from Slurm (`scontrol`, then `sacct` once the job has
left slurmctld's memory) or, for the local executor, from the controller process; restarts and the last
checkpoint come from the run directory, so they are right whichever scheduler ran the job.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
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


def _scontrol_fields(rec: JobRecord) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", rec.job_id], capture_output=True, text=True,
                         env=_slurm_env(rec), timeout=30)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout)) if out.returncode == 0 else {}


def _sacct_state(rec: JobRecord) -> str | None:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", rec.job_id, "-o", "State"], capture_output=True,
                         text=True, env=_slurm_env(rec), timeout=30)
    states = out.stdout.split()
    return states[-1].split()[0] if out.returncode == 0 and states else None


def _local_state(rec: JobRecord) -> str:
    try:
        os.kill(int(rec.job_id), 0)
        return "RUNNING"
    except ProcessLookupError:
        result = Path(rec.folder) / f"{rec.job_id}_0_result.pkl"
        if not result.is_file():
            return "STOPPED"
        import pickle

        outcome, _ = pickle.loads(result.read_bytes())
        return "COMPLETED" if outcome == "success" else "FAILED"
    except PermissionError:
        return "RUNNING"


def state(rec: JobRecord) -> dict[str, Any]:
    """Live state: scheduler state, Slurm restarts, resumes seen by the trainer, last checkpoint, nodes."""
    info: dict[str, Any] = {"state": "UNKNOWN", "restarts": None, "nodes": None}
    if rec.executor == "slurm":
        fields = _scontrol_fields(rec)
        if fields:
            info.update(state=fields.get("JobState", "UNKNOWN"), restarts=int(fields.get("Restarts", 0)),
                        nodes=fields.get("NodeList"))
        else:
            info["state"] = _sacct_state(rec) or "UNKNOWN (purged; no accounting)"
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
