"""The stop signals, their precedence and the exit codes of a training run: the one contract that the
trainer (engine.py), the local launcher (launcher.py) and the submitit job (submit.py) share.

    signal         sent by                                            the run            exit code
    SIGUSR2        Slurm's --signal before the time limit or          checkpoint, stop   140 (128+12): requeue
                   preemption, submitit's _interrupt, a spot notice
    SIGUSR1        the user (checkpoint and stop, no requeue)         checkpoint, stop   138 (128+10)
    SIGTERM        `scancel`, `scontrol requeue`, the launcher        checkpoint, stop   143 (128+15)
                   stopping peers of a failed rank
    SIGINT         Ctrl-C                                             checkpoint, stop   130 (128+2)

Other exit codes: 0 finished, 2 the checkpoint cannot be resumed by this recipe (REFUSED), 3 the divergence
guard gave up (DIVERGED). When several signals arrive (Slurm preemption: USR2 then TERM; submitit's
_interrupt: TERM then USR2) the one asking for a requeue wins, so every rank agrees whatever order each saw.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)
REQUEUE_SIGNAL = signal.SIGUSR2  # submitit's preemption signal (SUBMITIT_PREEMPT_SIGNAL)
PRECEDENCE = {0: 0, signal.SIGINT: 1, signal.SIGTERM: 2, signal.SIGUSR1: 3, signal.SIGUSR2: 4}
BY_PRECEDENCE = {v: k for k, v in PRECEDENCE.items()}

FINISHED = 0
REFUSED = 2
DIVERGED = 3


def stopped_code(signum: int) -> int:
    """The exit code of a run that checkpointed and stopped on `signum`."""
    return 128 + signum


STOPPED = tuple(stopped_code(s) for s in STOP_SIGNALS)
REQUEUE = stopped_code(REQUEUE_SIGNAL)


def shell_code(returncode: int) -> int:
    """A process's return code the shell's way: killed by signal N (-N) becomes 128+N."""
    return 128 - returncode if returncode < 0 else returncode


def strongest(a: int, b: int) -> int:
    """Of two signals (0: none), the one that wins by precedence."""
    return a if PRECEDENCE[a] >= PRECEDENCE[b] else b


class StopRequest:
    """Installs the handlers and remembers the strongest stop signal seen; the loop acts on it at the next
    step boundary, after every rank agreed on it (`agreed`)."""

    def __init__(self) -> None:
        self.signum = 0
        for s in STOP_SIGNALS:
            signal.signal(s, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        self.signum = strongest(signum, self.signum)

    def request(self, signum: int) -> None:
        """Ask for a stop from inside the process (a spot notice asks for a requeue)."""
        self.signum = strongest(signum, self.signum)

    def agreed(self, bad: bool) -> tuple[int, bool]:
        """(strongest stop signal any rank has seen, whether any rank's step diverged): one collective that
        every rank calls each step."""
        from jobs.train.distributed import all_reduce_max_many

        precedence, diverged = all_reduce_max_many([PRECEDENCE[self.signum], float(bad)])
        return int(BY_PRECEDENCE[int(precedence)]), diverged > 0

    @staticmethod
    def restore(handlers: dict[int, object]) -> None:
        """Put back the handlers that were installed before (submitit's own, after the trainer returns)."""
        for s, handler in handlers.items():
            signal.signal(s, handler)  # type: ignore[arg-type]

    @staticmethod
    def current() -> dict[int, object]:
        """The handlers installed now for every stop signal."""
        return {s: signal.getsignal(s) for s in STOP_SIGNALS}
