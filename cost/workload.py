"""From tokens to GPU-hours: 6·N·D for training, 2·N per generated token for inference, and the work
that interruptions cost (Young/Daly), the same model the job runner uses to pick checkpoint intervals."""

from __future__ import annotations

import math
from dataclasses import dataclass

from jobs.train.schedule import young_daly_interval


def training_flops(params: float, tokens: float) -> float:
    """Dense transformer training compute: 6 FLOPs per parameter per token (forward 2, backward 4)."""
    return 6.0 * params * tokens


def inference_flops(params: float, tokens: float) -> float:
    """Generation compute: 2 FLOPs per parameter per generated token."""
    return 2.0 * params * tokens


def gpu_hours(flops: float, peak_tflops: float, mfu: float) -> float:
    """GPU-hours to do `flops` at `mfu` of a GPU's dense peak."""
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu={mfu} must be in (0, 1]")
    return flops / (peak_tflops * 1e12 * mfu) / 3600.0


def gpu_hours_from_throughput(tokens: float, tokens_per_s_per_gpu: float) -> float:
    """GPU-hours from a measured throughput (the calibrated path)."""
    return tokens / tokens_per_s_per_gpu / 3600.0


@dataclass(frozen=True)
class Interruptions:
    """What preemptions cost a job that checkpoints at the Young/Daly interval."""

    interval_s: float
    overhead_fraction: float  # of wall time spent on checkpoints, lost work and restarts

    @property
    def slowdown(self) -> float:
        """Wall time per unit of useful work."""
        return 1.0 / (1.0 - self.overhead_fraction)


def interruption_cost(rate_per_hour: float, checkpoint_s: float, restart_s: float) -> Interruptions:
    """Overhead = checkpoint writes (δ/τ) + half an interval lost per interruption (τ/2M) + restarts (R/M)."""
    if rate_per_hour < 1e-9:  # fewer than one interruption in 100,000 years: none
        return Interruptions(math.inf, 0.0)
    mtbf = 3600.0 / rate_per_hour
    tau = young_daly_interval(checkpoint_s, mtbf)
    overhead = checkpoint_s / tau + tau / (2 * mtbf) + restart_s / mtbf
    if overhead >= 1:
        raise ValueError(f"interruptions every {mtbf / 60:.0f} min leave no useful work (checkpoint {checkpoint_s}s,"
                         f" restart {restart_s}s); lower cloud.spot_interruptions_per_hour or use on-demand")
    return Interruptions(tau, overhead)
