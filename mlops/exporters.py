"""Prometheus exporters of ours, each `python -m mlops.exporters KIND --port P`:

jobs    training runs: step time, tokens/s, MFU, loss, checkpoint age, from each run directory's
        metrics.jsonl and checkpoint `latest` pointer (read through jobs/run_dir.py): no change
        to the training code, and it works for jobs on any executor.
slurm   queue length by state and partition, node states, drained nodes with their reason, GPUs
        allocated per node, from `squeue`/`sinfo` (Debian 12 packages no Slurm exporter).
health  privlm-node-health (playbooks/roles/node_health): its exit status 0/1/2 and each check.
gpu     GPU utilisation, temperature, memory and power through nvidia-ml-py, under DCGM exporter's
        metric names so alert rules and dashboards read either (used where NVIDIA's DCGM exporter
        package is not available).

Each is a prometheus_client custom collector: jobs and gpu read at scrape time; slurm and health
sample in a background thread (their commands may hang) and a scrape serves the latest sample.
Only the standard library, prometheus_client and our run-directory reader are imported (nvidia-ml-py lazily).
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import statistics
import subprocess
import time
from abc import abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from jobs.launch.slurm import gpus_in_gres
from jobs.run_dir import RunDir

FINAL_EVENTS = {"finished", "stopped"}
# DCGM exporter's names for what GpuCollector exports.
GPU_METRICS = {"util": "DCGM_FI_DEV_GPU_UTIL", "temp": "DCGM_FI_DEV_GPU_TEMP", "used": "DCGM_FI_DEV_FB_USED",
               "free": "DCGM_FI_DEV_FB_FREE", "power": "DCGM_FI_DEV_POWER_USAGE"}


@dataclass
class RunState:
    """What a run directory says about its job, as of its last metrics record."""

    run: str
    running: bool = False
    step: int = 0
    step_seconds: float | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    loss: float | None = None
    last_record_time: float | None = None
    checkpoint_step: int | None = None
    checkpoint_time: float | None = None
    checkpoint_interval_s: float | None = None
    started: float | None = None
    checkpoint_times: list[float] = field(default_factory=list)


def read_run(run_dir: Path, checkpoint_dir: str = "checkpoints") -> RunState:
    """Fold metrics.jsonl (from its last `start` record: the current attempt) and the `latest` pointer."""
    state = RunState(run=run_dir.name)
    previous: dict | None = None
    run = RunDir.at(run_dir, checkpoint_dir)
    for rec in run.records():
        event = rec.get("event")
        state.last_record_time = rec.get("time", state.last_record_time)
        if event == "start":
            state.started, state.running, state.checkpoint_times, previous = rec.get("time"), True, [], None
        elif event in FINAL_EVENTS:
            state.running = False
        elif event == "checkpoint":
            state.checkpoint_times.append(rec["time"])
        elif "loss" in rec:
            state.step, state.loss = rec["step"], rec["loss"]
            state.tokens_per_s, state.mfu = rec.get("tokens_per_s"), rec.get("mfu")
            if previous is not None and rec["step"] > previous["step"]:
                state.step_seconds = (rec["time"] - previous["time"]) / (rec["step"] - previous["step"])
            previous = rec
    # The interval between checkpoints as this attempt has seen it (start, then each checkpoint).
    marks = ([state.started] if state.started else []) + state.checkpoint_times
    gaps = [b - a for a, b in itertools.pairwise(marks) if b > a]
    state.checkpoint_interval_s = statistics.median(gaps) if gaps else None
    if (found := run.last_checkpoint()) is not None:
        state.checkpoint_step, state.checkpoint_time = found
    return state


class JobsCollector(Collector):
    """One set of `privlm_train_*` gauges per run directory matched by the globs."""

    def __init__(self, run_globs: list[str], checkpoint_dir: str = "checkpoints") -> None:
        self.run_globs = run_globs
        self.checkpoint_dir = checkpoint_dir

    def run_dirs(self) -> list[Path]:
        found = {Path(p) for g in self.run_globs for p in glob.glob(g) if RunDir.at(p).metrics_file.is_file()}
        return sorted(found)

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        gauges = {
            "running": ("1 while the run's last attempt has started and neither finished nor stopped", None),
            "step": ("Last logged optimizer step", "step"),
            "step_seconds": ("Seconds per optimizer step over the last logging interval", "step_seconds"),
            "tokens_per_second": ("Training tokens per second (all ranks)", "tokens_per_s"),
            "mfu": ("Model FLOPs utilisation (0-1) against the devices' peak", "mfu"),
            "loss": ("Training loss of the last logging interval", "loss"),
            "last_record_age_seconds": ("Seconds since the run's last metrics record", None),
            "checkpoint_step": ("Step of the checkpoint `latest` points at", "checkpoint_step"),
            "checkpoint_age_seconds": ("Seconds since the last checkpoint was published (or the attempt began)",
                                       None),
            "checkpoint_interval_seconds": ("Median seconds between checkpoints in this attempt", None),
        }
        families = {k: GaugeMetricFamily(f"privlm_train_{k}", h, labels=["run"]) for k, (h, _) in gauges.items()}
        for run_dir in self.run_dirs():
            try:
                s = read_run(run_dir, self.checkpoint_dir)
            except OSError:
                continue
            values = {key: getattr(s, attr) for key, (_, attr) in gauges.items() if attr}
            values["running"] = float(s.running)
            if s.last_record_time is not None:
                values["last_record_age_seconds"] = now - s.last_record_time
            marks = [t for t in (s.checkpoint_time, s.started) if t is not None]
            if marks:  # a checkpoint of an earlier attempt counts from this attempt's start
                values["checkpoint_age_seconds"] = now - max(marks)
            values["checkpoint_interval_seconds"] = s.checkpoint_interval_s
            for key, value in values.items():
                if value is not None:
                    families[key].add_metric([s.run], float(value))
        yield from families.values()


def run_command(cmd: list[str], timeout: float = 20) -> str | None:
    """stdout of a command, or None when it is missing, fails or hangs."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


class SampledCollector(Collector):
    """A collector whose reading is slow or may hang (a Slurm controller that is down, a stuck nvidia-smi):
    a background thread takes a sample every `interval` seconds and a scrape serves the latest one, so
    scrapes stay fast and a hung command shows as a stale sample, not as a failed scrape."""

    def __init__(self, interval: float) -> None:
        import threading

        self.interval = interval
        self._latest: Any = None
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            started = time.monotonic()
            self._latest = self.sample()
            time.sleep(max(self.interval - (time.monotonic() - started), 0.1))

    @abstractmethod
    def sample(self) -> Any:
        """One reading (runs in the background thread)."""

    def collect(self) -> Iterator[Metric]:
        yield from self.families(self._latest)

    @abstractmethod
    def families(self, sample: Any) -> Iterator[Metric]:
        """The metric families of a reading (None before the first one)."""


class SlurmCollector(SampledCollector):
    """Queue and node state from `squeue` and `sinfo` (SLURM_CONF in the environment picks the cluster)."""

    def sample(self) -> tuple[str | None, str | None]:
        return (run_command(["squeue", "-h", "-a", "-o", "%T|%P"]),
                run_command(["sinfo", "-h", "-N", "-O", "NodeList:256|,StateLong:64|,GresUsed:256|,Reason:512"]))

    def families(self, sample: tuple[str | None, str | None] | None) -> Iterator[Metric]:
        squeue, sinfo = sample or (None, None)
        up = GaugeMetricFamily("privlm_slurm_up", "1 when squeue and sinfo answered")
        jobs = GaugeMetricFamily("privlm_slurm_jobs", "Jobs by state and partition", labels=["state", "partition"])
        pending = GaugeMetricFamily("privlm_slurm_queue_pending", "Jobs waiting in the queue")
        nodes = GaugeMetricFamily("privlm_slurm_node_state", "1 for each node's current state",
                                  labels=["node", "state"])
        drained = GaugeMetricFamily("privlm_slurm_node_drained", "1 when a node is drained or draining",
                                    labels=["node", "reason"])
        gpus = GaugeMetricFamily("privlm_slurm_node_gpus_allocated", "GPUs allocated to jobs on a node",
                                 labels=["node"])
        up.add_metric([], float(squeue is not None and sinfo is not None))
        counts: dict[tuple[str, str], int] = {}
        for line in (squeue or "").splitlines():
            state, _, partition = line.partition("|")
            counts[state.lower(), partition] = counts.get((state.lower(), partition), 0) + 1
        for (state, partition), n in sorted(counts.items()):
            jobs.add_metric([state, partition], n)
        if squeue is not None:
            pending.add_metric([], sum(n for (state, _), n in counts.items() if state == "pending"))
        seen: set[str] = set()
        for line in (sinfo or "").splitlines():
            parts = [p.strip() for p in line.split("|")]
            if len(parts) < 4 or parts[0] in seen:
                continue  # a node in two partitions is listed twice
            node, state, gres, reason = parts[:4]
            seen.add(node)
            state = state.lower().rstrip("*~#$@")
            nodes.add_metric([node, state], 1)
            if "drain" in state:
                drained.add_metric([node, reason], 1)
            gpus.add_metric([node], gpus_in_gres(gres))
        yield from (up, jobs, pending, nodes, drained, gpus)


class HealthCollector(SampledCollector):
    """privlm-node-health every `interval` seconds: its exit status and each check."""

    LEVEL: ClassVar[dict[str, int]] = {"ok": 0, "degraded": 1, "fail": 2}

    def __init__(self, program: str, interval: float = 30) -> None:
        self.program = program
        super().__init__(interval)

    def sample(self) -> tuple[int, list[dict]]:
        try:
            proc = subprocess.run([self.program], capture_output=True, text=True, timeout=120)
            return proc.returncode, json.loads(proc.stdout).get("checks", [])
        except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError):
            return -1, []

    def families(self, sample: tuple[int, list[dict]] | None) -> Iterator[Metric]:
        rc, checks = sample or (-1, [])
        status = GaugeMetricFamily("privlm_node_health_status",
                                   "Exit status of privlm-node-health: 0 healthy, 1 degraded, 2 unusable, -1 not run")
        status.add_metric([], rc)
        per_check = GaugeMetricFamily("privlm_node_health_check", "Each check: 0 ok, 1 degraded, 2 fail",
                                      labels=["check"])
        for c in checks:
            per_check.add_metric([c.get("check", "?")], self.LEVEL.get(c.get("status"), 2))
        yield from (status, per_check)


class GpuCollector(Collector):
    """Per-GPU telemetry through NVML, named as DCGM exporter names it (DCGM_FI_DEV_*)."""

    def __init__(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
        except ImportError as exc:
            raise SystemExit("gpu exporter: nvidia-ml-py is not installed: pip install 'nvidia-ml-py>=12,<14'") from exc
        except pynvml.NVMLError as exc:
            raise SystemExit(f"gpu exporter: NVML does not answer ({exc}); is the NVIDIA driver loaded? "
                             "(nvidia-smi must work)") from exc
        self.nvml = pynvml
        self.hostname = os.uname().nodename

    def collect(self) -> Iterator[Metric]:
        nv = self.nvml
        labels = ["gpu", "UUID", "modelName", "Hostname"]
        helps = {"util": "GPU utilization (in %).", "temp": "GPU temperature (in C).",
                 "used": "Framebuffer memory used (in MiB).", "free": "Framebuffer memory free (in MiB).",
                 "power": "Power draw (in W)."}
        fams = {k: GaugeMetricFamily(GPU_METRICS[k], h, labels=labels) for k, h in helps.items()}
        for i in range(nv.nvmlDeviceGetCount()):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            name = nv.nvmlDeviceGetName(h)
            uuid = nv.nvmlDeviceGetUUID(h)
            lv = [str(i), uuid if isinstance(uuid, str) else uuid.decode(),
                  name if isinstance(name, str) else name.decode(), self.hostname]
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            fams["util"].add_metric(lv, nv.nvmlDeviceGetUtilizationRates(h).gpu)
            fams["temp"].add_metric(lv, nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))
            fams["used"].add_metric(lv, mem.used / 2**20)
            fams["free"].add_metric(lv, mem.free / 2**20)
            fams["power"].add_metric(lv, nv.nvmlDeviceGetPowerUsage(h) / 1000)
        yield from fams.values()


def make_collector(kind: str, args: argparse.Namespace) -> Collector:
    if kind == "jobs":
        return JobsCollector(args.runs, args.checkpoint_dir)
    if kind == "slurm":
        return SlurmCollector(args.interval)
    if kind == "health":
        return HealthCollector(args.program, args.interval)
    return GpuCollector()


def serve(collector: Collector, address: str, port: int) -> None:
    """Serve the collector's metrics (and only them) at http://ADDRESS:PORT/metrics until killed."""
    import signal

    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(collector)
    server, thread = start_http_server(port, addr=address, registry=registry)
    signal.signal(signal.SIGTERM, lambda *_: server.shutdown())
    thread.join()


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mlops.exporters", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["jobs", "slurm", "health", "gpu"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--runs", action="append", default=[], help="glob of run directories (jobs; repeatable)")
    parser.add_argument("--checkpoint-dir", default="checkpoints", help="checkpoint folder inside a run (jobs)")
    parser.add_argument("--program", default="/usr/local/sbin/privlm-node-health", help="health check (health)")
    parser.add_argument("--interval", type=float, default=None,
                        help="seconds between samples (slurm: 5, health: 30)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    args.interval = args.interval or {"slurm": 5.0, "health": 30.0}.get(args.kind, 0.0)
    if args.kind == "jobs" and not args.runs:
        parser.error("jobs needs --runs GLOB (e.g. --runs '/shared/runs/*')")
    serve(make_collector(args.kind, args), args.address, args.port)


if __name__ == "__main__":
    main()
