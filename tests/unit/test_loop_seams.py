"""The training loop's seams on their own: the checkpoint schedule, the preemption contract, the run directory."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from jobs.launch.preemption import REQUEUE, STOPPED, shell_code, stopped_code, strongest
from jobs.run_dir import RunDir
from jobs.train.schedule import CheckpointSchedule, young_daly_interval


def test_fixed_schedule_is_due_on_the_cadence_the_last_step_a_stop_and_a_new_best() -> None:
    s = CheckpointSchedule.of(SimpleNamespace(interval=5, interruptions_per_hour=1.0), total_steps=12)
    assert [step for step in range(1, 13) if s.due(step)] == [5, 10, 12]
    assert s.due(3, stopping=True) and s.due(3, improved=True) and s.due(3, ending=True)
    assert not s.due(3) and not s.provisional


def test_auto_schedule_switches_to_young_daly_from_the_measured_write_and_step() -> None:
    lines: list[str] = []
    s = CheckpointSchedule.of(SimpleNamespace(interval="auto", interruptions_per_hour=2.0), total_steps=200)
    assert s.provisional and s.interval == 10  # provisional: a tenth of the run, at most 10 steps
    s.measured(write_s=4.0, step_s=0.5, log=lines.append)
    tau = math.sqrt(2 * 4.0 * 1800.0)  # MTBF = 3600 s / 2 interruptions per hour
    assert s.interval == round(tau / 0.5) == 240 and not s.provisional
    assert "240 steps" in lines[0] and "1800s MTBF" in lines[0]
    s.measured(write_s=100.0, step_s=0.01, log=lines.append)  # decided once: later writes change nothing
    assert s.interval == 240 and len(lines) == 1
    assert young_daly_interval(60, 3600) == pytest.approx(math.sqrt(2 * 60 * 3600))


def test_requeue_wins_over_every_other_stop_signal_and_codes_are_the_shells() -> None:
    for other in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, 0):
        assert strongest(signal.SIGUSR2, other) == strongest(other, signal.SIGUSR2) == signal.SIGUSR2
    assert strongest(signal.SIGTERM, signal.SIGINT) == signal.SIGTERM
    assert REQUEUE == 140 and stopped_code(signal.SIGTERM) == 143 and set(STOPPED) == {130, 138, 140, 143}
    assert shell_code(-9) == 137 and shell_code(3) == 3


def test_a_stopped_rank_exits_with_the_strongest_signal_it_received(tmp_path: Path) -> None:
    """The real handlers in a child process: TERM then USR2 (Slurm's preemption order) asks for a requeue."""
    script = ("import os, signal, sys\n"
              "from jobs.launch.preemption import StopRequest, stopped_code\n"
              "stop = StopRequest()\n"
              "os.kill(os.getpid(), signal.SIGTERM); os.kill(os.getpid(), signal.SIGUSR2)\n"
              "os.kill(os.getpid(), signal.SIGINT)\n"
              "sys.exit(stopped_code(stop.signum))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[2], timeout=60)
    assert done.returncode == REQUEUE


def test_run_dir_finds_checkpoints_outside_the_run_and_reads_progress(tmp_path: Path) -> None:
    run_path, elsewhere = tmp_path / "runs" / "r1", tmp_path / "scratch" / "ckpt"
    RunDir(run_path, elsewhere).publish()
    (elsewhere / "step-00000040").mkdir(parents=True)
    (elsewhere / "latest").write_text("step-00000040")
    records = [{"event": "start", "resumed": False}, {"step": 10, "loss": 3.0, "tokens": 640, "tokens_per_s": 320.0},
               {"event": "start", "resumed": True}, {"step": 20, "loss": 2.5, "tokens": 1280, "tokens_per_s": 640.0}]
    (run_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + '\n{"step": 2')
    run = RunDir.at(run_path)  # a reader that only knows the run directory
    assert run.checkpoints == elsewhere.resolve() and run.last_checkpoint_step() == 40
    assert run.progress() == (20, 2.5, 1)  # the half-written last line is skipped
    assert run.step_seconds() == pytest.approx(1280 / 20 / 640)
    assert run.summary() is None and run.lineage() is None
    run.write_summary({"eval_loss": 2.4})
    assert RunDir.at(run_path).summary() == {"eval_loss": 2.4}


def test_run_dir_of_an_older_run_uses_the_default_checkpoint_folder(tmp_path: Path) -> None:
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "latest").write_text("step-00000007")
    assert RunDir.at(tmp_path, "ck").last_checkpoint_step() == 7
    assert RunDir.at(tmp_path).last_checkpoint() is None
