"""When the trainer writes a checkpoint: the one owner of the cadence (torchtitan's `_should_save`).

A checkpoint is due after every `interval` steps, at the last step, when a stop signal was agreed, when
validation found a new best model and when early stopping ends the run. `checkpoint.interval: auto` starts
with a provisional interval, measures the first write and the step time, then switches to Young/Daly's
optimum for the recipe's interruption rate (also what `privlm cost` assumes a spot job pays).
Pure Python: `cost/` imports the formula from here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


def young_daly_interval(checkpoint_s: float, mtbf_s: float) -> float:
    """The checkpoint interval that minimises lost work: sqrt(2·δ·M) (Young 1974, Daly 2006)."""
    return math.sqrt(2.0 * checkpoint_s * mtbf_s)


@dataclass
class CheckpointSchedule:
    """The checkpoint cadence of one run; every rank holds one and must reach the same decisions."""

    interval: int
    total_steps: int
    interruptions_per_hour: float | None = None  # set: `auto`, the interval is provisional until `measured`

    @classmethod
    def of(cls, checkpoint: object, total_steps: int) -> CheckpointSchedule:
        """From the recipe's `checkpoint` section: a fixed interval, or `auto` (first interval provisional)."""
        interval = checkpoint.interval  # type: ignore[attr-defined]
        if interval == "auto":
            return cls(max(1, min(10, total_steps // 10)), total_steps,
                       checkpoint.interruptions_per_hour)  # type: ignore[attr-defined]
        return cls(int(interval), total_steps)

    @property
    def provisional(self) -> bool:
        return self.interruptions_per_hour is not None

    def due(self, step: int, *, stopping: bool = False, improved: bool = False, ending: bool = False) -> bool:
        """Whether to checkpoint after `step`: on the cadence, at the last step, on a stop signal, for a new
        best validation loss, or when the run ends early."""
        return step % self.interval == 0 or step >= self.total_steps or stopping or improved or ending

    def measured(self, write_s: float, step_s: float, log: Callable[[str], None]) -> None:
        """After the first write under `auto`: every rank passes the slowest rank's write and step seconds
        (so all pick the same interval); the chosen interval is logged with its inputs."""
        if not self.provisional:
            return
        rate = self.interruptions_per_hour
        mtbf = 3600.0 / rate
        tau = young_daly_interval(write_s, mtbf)
        self.interval = max(1, round(tau / max(step_s, 1e-6)))
        self.interruptions_per_hour = None
        log(f"checkpoint interval auto: {self.interval} steps = sqrt(2 x {write_s:.2f}s write x {mtbf:.0f}s MTBF) = "
            f"{tau:.0f}s at {step_s:.2f}s/step ({rate}/h interruptions)")
