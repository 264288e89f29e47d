"""What a Slurm cluster offers (sinfo) and whether a recipe's job fits it, checked before submission.

Every refusal names the recipe field, the value, what the cluster has, and the fix, so a job never sits
pending forever on a partition that cannot run it, or dies at its time limit without a checkpoint.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from jobs.recipe import Recipe
from jobs.run_dir import RunDir


class SubmitError(ValueError):
    """A job that must not be submitted; the message says why and what to change."""


@dataclass(frozen=True)
class Partition:
    """One partition as sinfo reports it (the smallest node when nodes differ)."""

    name: str
    default: bool
    nodes: int
    cpus_per_node: int
    gpus_per_node: int
    max_time_min: int | None  # None: no limit


def slurm_available() -> bool:
    """True when Slurm's client commands are installed and slurmctld answers."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def parse_time_min(text: str) -> int | None:
    """Slurm time ([days-]hours:minutes:seconds, minutes, INFINITE) in whole minutes; None for no limit."""
    text = text.strip()
    if text in ("infinite", "INFINITE", "UNLIMITED", "n/a", ""):
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if len(parts) == 1:  # minutes
        minutes, seconds, hours = parts[0], 0, 0
    elif len(parts) == 2:
        (minutes, seconds), hours = parts, 0
    else:
        hours, minutes, seconds = parts[-3:]
    return (int(days or 0) * 24 + hours) * 60 + minutes + (1 if seconds else 0)


def gpus_in_gres(gres: str) -> int:
    """GPUs per node in sinfo's GRES column, e.g. 'gpu:h100:8(S:0-1)' -> 8, '(null)' -> 0."""
    total = 0
    for item in gres.split(","):
        m = re.match(r"gpu(?::[^:(]+)?:(\d+)", item.strip())
        if m:
            total += int(m.group(1))
    return total


def partitions() -> dict[str, Partition]:
    """The cluster's partitions from `sinfo` (SLURM_CONF picks the cluster)."""
    out = subprocess.run(["sinfo", "-h", "-o", "%P|%D|%c|%G|%l"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise SubmitError(f"sinfo failed ({out.stderr.strip()}); is slurmctld up and SLURM_CONF set?")
    found: dict[str, Partition] = {}
    for line in out.stdout.splitlines():
        name, nodes, cpus, gres, limit = line.split("|")
        default = name.endswith("*")
        name = name.rstrip("*")
        new = Partition(name, default, int(nodes), int(cpus.rstrip("+")), gpus_in_gres(gres), parse_time_min(limit))
        old = found.get(name)
        if old is not None:  # node lines with different hardware: count all nodes, promise the smallest
            new = Partition(name, default or old.default, old.nodes + new.nodes,
                            min(old.cpus_per_node, new.cpus_per_node),
                            min(old.gpus_per_node, new.gpus_per_node), new.max_time_min)
        found[name] = new
    return found


def gpus_per_node(recipe: Recipe, partition: Partition | None) -> int:
    """--gres=gpu:N: the recipe's value, else one per rank on a GPU partition and none on a CPU one."""
    if recipe.slurm.gpus_per_node is not None:
        return recipe.slurm.gpus_per_node
    return recipe.training.processes_per_node if partition is not None and partition.gpus_per_node else 0


def choose_partition(recipe: Recipe, found: dict[str, Partition]) -> Partition:
    """The recipe's partition, or the cluster's default; refuse one that does not exist."""
    wanted = recipe.slurm.partition
    if wanted is None:
        default = next((p for p in found.values() if p.default), None)
        if default is None:
            raise SubmitError(f"slurm.partition is not set and the cluster has no default partition; "
                              f"set slurm.partition to one of {sorted(found)}")
        return default
    if wanted not in found:
        raise SubmitError(f"slurm.partition={wanted!r} is not a partition of this cluster; "
                          f"use one of {sorted(found)}")
    return found[wanted]


def check_fits(recipe: Recipe, partition: Partition) -> list[str]:
    """Every reason the job cannot run on the partition as asked (empty when it fits)."""
    t, s = recipe.training, recipe.slurm
    problems = []
    if (s.min_nodes or t.nodes) > partition.nodes:
        asked = f"slurm.min_nodes={s.min_nodes}" if s.min_nodes else f"training.nodes={t.nodes}"
        problems.append(f"{asked} but partition {partition.name} has {partition.nodes} node(s); "
                        f"set {asked.split('=')[0]}<={partition.nodes}")
    gpus = gpus_per_node(recipe, partition)
    if gpus > partition.gpus_per_node:
        problems.append(f"the job asks for {gpus} GPU(s) per node (slurm.gpus_per_node or "
                        f"training.processes_per_node) but partition {partition.name} has "
                        f"{partition.gpus_per_node} per node; lower it or pick a GPU partition")
    cpus = t.processes_per_node * (s.cpus_per_task or t.threads_per_process or 1)
    if cpus > partition.cpus_per_node:
        problems.append(f"training.processes_per_node={t.processes_per_node} x slurm.cpus_per_task="
                        f"{s.cpus_per_task or t.threads_per_process or 1} = {cpus} CPUs, but partition "
                        f"{partition.name} has {partition.cpus_per_node} per node; lower either")
    if partition.max_time_min is not None and s.time_limit_min > partition.max_time_min:
        problems.append(f"slurm.time_limit_min={s.time_limit_min} is above partition {partition.name}'s "
                        f"MaxTime of {partition.max_time_min} min; set slurm.time_limit_min<={partition.max_time_min}")
    problems.extend(check_time_limit(recipe))
    return problems


def check_time_limit(recipe: Recipe) -> list[str]:
    """A run must get past its first checkpoint before the time-limit signal, or it never makes progress."""
    s = recipe.slurm
    usable_s = s.time_limit_min * 60 - s.signal_delay_s
    if usable_s <= 0:
        return [f"slurm.time_limit_min={s.time_limit_min} leaves no time before the checkpoint signal, which comes "
                f"slurm.signal_delay_s={s.signal_delay_s}s before the limit; raise the limit or lower the delay"]
    if recipe.checkpoint.interval == "auto":
        return []
    step_s = RunDir.of(recipe).step_seconds() or s.expected_step_s
    if step_s is None:
        return []
    interval_s = recipe.checkpoint.interval * step_s
    if interval_s >= usable_s:
        return [f"slurm.time_limit_min={s.time_limit_min} is below one checkpoint interval: "
                f"checkpoint.interval={recipe.checkpoint.interval} steps x {step_s:.2f} s/step = {interval_s:.0f} s, "
                f"but only {usable_s} s run before the time-limit signal; lower checkpoint.interval to at most "
                f"{max(1, int(usable_s / step_s) - 1)}, use interval: auto, or raise slurm.time_limit_min"]
    return []


def sbatch_options(recipe: Recipe) -> dict[str, object]:
    """Extra #SBATCH options of the recipe: account, QoS, constraint, requeue, the node range of
    `slurm.min_nodes`, and its own `slurm.sbatch`. submitit writes these over its own parameters, so
    `nodes: "MIN-MAX"` replaces its `--nodes=MAX` line."""
    s, t = recipe.slurm, recipe.training
    extra: dict[str, object] = {k: v for k, v in {"account": s.account, "qos": s.qos,
                                                  "constraint": s.constraint}.items() if v}
    extra["requeue"] = True
    if s.min_nodes is not None and s.min_nodes < t.nodes:
        extra["nodes"] = f"{s.min_nodes}-{t.nodes}"
    extra.update({k.replace("-", "_"): (True if v == "" else v) for k, v in s.sbatch.items()})
    return extra


def node_address(hostname: str) -> str:
    """The address other nodes reach HOSTNAME on: DNS first, else the NodeAddr slurm.conf gives it."""
    import socket

    try:
        return socket.gethostbyname(hostname)
    except OSError:
        pass
    out = subprocess.run(["scontrol", "show", "node", "-o", hostname], capture_output=True, text=True, timeout=30)
    m = re.search(r"\bNodeAddr=(\S+)", out.stdout)
    if not m:
        raise SubmitError(f"cannot resolve node {hostname} (no DNS entry, no NodeAddr in scontrol)")
    return m.group(1)
