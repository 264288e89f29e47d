"""Start N training ranks on this machine, forward stop signals to them, and reap them.

Event sequence it handles:
1. SIGTERM/SIGUSR1/SIGUSR2/SIGINT reach the launcher -> forwarded to every rank; the ranks agree at
   the next step boundary, write a checkpoint and exit 128+signal; the launcher exits with that code
   (jobs/launch/preemption.py: signals, precedence, exit codes).
2. A rank dies (OOM, SIGKILL, exception) -> its peers would hang in a collective, so the launcher
   asks them to stop, waits `grace_s`, kills what is left, and exits non-zero. The next run resumes
   from the last *published* checkpoint.
3. The launcher itself is SIGKILLed -> the kernel kills the ranks (PR_SET_PDEATHSIG).
Under torchrun, Slurm or submitit (RANK and WORLD_SIZE already set) the rank runs in this process.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

from jobs.launch.preemption import STOP_SIGNALS, STOPPED, shell_code
from jobs.recipe import Recipe, dump_recipe
from jobs.run_dir import RunDir
from jobs.train.distributed import accelerator_env, has_cuda, rank_env_present


def free_port() -> int:
    """A free TCP port on loopback for the rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child: receive SIGKILL when the launcher dies (Linux prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def write_resolved_recipe(recipe: Recipe) -> Path:
    """Save the validated recipe in the run directory; the ranks read this exact file."""
    target = RunDir.of(recipe).recipe_file
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".yaml.tmp")
    tmp.write_text(dump_recipe(recipe))
    os.replace(tmp, target)
    return target


def check_resources(recipe: Recipe) -> None:
    """Refuse, before starting anything, a layout this machine cannot run."""
    t = recipe.training
    if t.nodes > 1:
        raise SystemExit(
            f"training.nodes={t.nodes}: a multi-node job needs a scheduler; use `privlm train submit` "
            "(Slurm), or run under torchrun with RANK/WORLD_SIZE set on each node"
        )
    if has_cuda():
        import torch

        found = torch.cuda.device_count()
        if t.processes_per_node > found:
            raise SystemExit(
                f"training.processes_per_node={t.processes_per_node} but this machine has {found} GPU(s); "
                f"set training.processes_per_node<={found}"
            )


def launch_local(recipe: Recipe, recipe_path: Path | None = None, overrides: list[str] | None = None,
                 grace_s: float = 10.0) -> int:
    """Run the recipe with N local ranks (or this one rank under an external launcher); return the exit code."""
    from jobs.train.engine import train

    if rank_env_present():
        return train(recipe)
    check_resources(recipe)
    lock = hold_run_lock(recipe.run_path)
    resolved = write_resolved_recipe(recipe)
    n = recipe.training.processes_per_node
    threads = recipe.training.threads_per_process or (1 if not has_cuda() else 4)
    base_env = {**os.environ, **accelerator_env(threads), "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n)}
    cmd = [sys.executable, "-m", "jobs.train.engine", str(resolved)]
    procs = [
        subprocess.Popen(cmd, env={**base_env, "RANK": str(r), "LOCAL_RANK": str(r)}, preexec_fn=_die_with_parent)
        for r in range(n)
    ]
    try:
        return supervise(procs, grace_s)
    finally:
        lock.close()


def hold_run_lock(run_dir: Path) -> TextIO:
    """Refuse a second launch on the same run directory while one is running (flock, released on exit)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fh = open(run_dir / ".lock", "a+")  # noqa: SIM115 - held for the run's lifetime
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        owner = fh.read().strip() or "another process"
        fh.close()
        raise SystemExit(f"{run_dir} is in use by a running job (pid {owner}); wait for it or stop it first") from None
    fh.truncate(0)
    fh.write(str(os.getpid()))
    fh.flush()
    return fh


def supervise(procs: list[subprocess.Popen], grace_s: float) -> int:
    """Forward stop signals, wait for all ranks, stop the rest when one fails; return the exit code."""
    received: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
    failed_at: float | None = None
    try:
        while any(p.poll() is None for p in procs):
            codes = [p.poll() for p in procs]
            # 128+signal is a rank that checkpointed and stopped (its peers stop at the same step): not a failure
            if failed_at is None and any(c not in (None, 0, *STOPPED) for c in codes) and not received:
                failed_at = time.monotonic()
                bad = [i for i, c in enumerate(codes) if c not in (None, 0)]
                print(f"[privlm] rank(s) {bad} exited with {[codes[i] for i in bad]}; stopping the others",
                      file=sys.stderr, flush=True)
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
            if failed_at is not None and time.monotonic() - failed_at > grace_s:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.1)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    codes = [p.returncode for p in procs]
    failures = [c for c in codes if c != 0]
    if not failures:
        return 0
    return max(shell_code(c) for c in failures)
