"""Training metrics: tokens/s, model FLOPs utilisation against the device's peak, JSONL output."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def measure_cpu_peak_flops(size: int = 512, repeats: int = 5) -> float:
    """FLOP/s of this rank's threads on an fp32 matmul: the CPU's practical peak, measured."""
    import torch

    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2.0 * size**3 / best


def gpu_peak_flops(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of a GPU from the hardware catalog (matched on its marketing name)."""
    from infra.hardware import gpu_by_device_name

    gpu = gpu_by_device_name(device_name)
    if gpu is None:
        return None
    return (gpu.bf16_dense_tflops if precision in ("bf16", "fp16") else gpu.tf32_dense_tflops) * 1e12


def peak_flops(device: str, precision: str) -> tuple[float, str]:
    """(peak FLOP/s of one rank's device, where the number came from)."""
    if device == "cuda":
        import torch

        name = torch.cuda.get_device_name()
        peak = gpu_peak_flops(name, precision)
        if peak is not None:
            return peak, f"catalog: {name}"
        return measure_cuda_peak_flops(), f"measured matmul on {name} (not in infra/catalog/gpus.csv)"
    return measure_cpu_peak_flops(), "measured fp32 matmul on this CPU"


def measure_cuda_peak_flops(size: int = 8192) -> float:
    """bf16 matmul FLOP/s on the current GPU, for devices missing from the catalog."""
    import torch

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    torch.mm(a, a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        torch.mm(a, a)
    torch.cuda.synchronize()
    return 2.0 * size**3 * 10 / (time.perf_counter() - t0)


@dataclass
class ThroughputMeter:
    """Tokens and time since the last report."""

    flops_per_token: float
    peak_flops_total: float
    _tokens: int = 0
    _since: float = field(default_factory=time.perf_counter)

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    def report(self) -> dict[str, float]:
        """tokens/s and MFU over the interval; resets the interval."""
        now = time.perf_counter()
        elapsed = max(now - self._since, 1e-9)
        tps = self._tokens / elapsed
        self._tokens, self._since = 0, now
        return {"tokens_per_s": tps, "mfu": tps * self.flops_per_token / self.peak_flops_total}


class MetricsWriter:
    """The one owner of what a run reports: appends one JSON object per record to metrics.jsonl (rank 0
    only) and passes the same records to MLflow (mlops/tracking.py's outbox): step and eval metrics as
    metrics, checkpoints as pointers; nothing else in the loop talks to the tracker."""

    def __init__(self, path: Path, enabled: bool, tracker: Any = None) -> None:
        self.enabled = enabled
        self.path = path
        self.tracker = tracker if enabled else None
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(path, "a", buffering=1)  # noqa: SIM115 - kept open for the run

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._fh.write(json.dumps({"time": time.time(), **record}) + "\n")
        if self.tracker is None:
            return
        event = record.get("event")
        if event == "checkpoint":
            self.tracker.checkpoint(record["step"], Path(record["path"]), record["bytes"])
        elif event == "eval":
            self.tracker.metrics(record["step"], {"eval_loss": record["eval_loss"]})
        elif "loss" in record and event is None:
            self.tracker.metrics(record["step"], {k: v for k, v in record.items() if k != "step"})

    def close(self, status: str, summary: dict[str, Any] | None = None) -> None:
        """Close the file; tell MLflow the run's outcome (delivered now, or later from the outbox)."""
        if not self.enabled:
            return
        self._fh.close()
        # A stopping job has a deadline (preemption, spot): the outbox keeps what is not delivered in 5 s.
        timeout_s = 5.0 if status == "KILLED" else 30.0
        if self.tracker is not None and not self.tracker.finish(status, summary or {}, timeout_s):
            why = self.tracker.outbox.last_error or "delivery still in progress"
            print(f"[privlm] MLflow not reached ({why}); metrics kept in "
                  f"{self.tracker.outbox.path}, delivered by the next run or `privlm model sync`", flush=True)


def format_step(record: dict[str, Any], total_steps: int) -> str:
    """One human line per logged step."""
    return (
        f"step {record['step']:>6}/{total_steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
        f"grad_norm {record['grad_norm']:.3f}  tok/s {record['tokens_per_s']:,.0f}  mfu {record['mfu']:.1%}"
    )


class StepProgress:
    """A rich progress bar over optimizer steps on rank 0; log lines print above it."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[status]}"), TimeRemainingColumn())
        self._task = self._progress.add_task("train", total=total, completed=start, status="")
        self._progress.start()

    def advance(self, step: int, status: str = "") -> None:
        if self.enabled:
            self._progress.update(self._task, completed=step, **({"status": status} if status else {}))

    def log(self, message: str) -> None:
        if self.enabled:
            self._progress.console.print(f"[privlm] {message}", highlight=False, markup=False, soft_wrap=True)

    def stop(self) -> None:
        if self.enabled:
            self._progress.stop()
