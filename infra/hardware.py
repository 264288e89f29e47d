"""What the hardware catalog (infra/catalog/*.csv) says about an instance type: GPUs, EFA, regions, prices.

Data, not code: every number has a source and a date in the CSV. The spec validators and the policies
read it through here; the cost model reads the same files through cost/prices.py.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass, field
from pathlib import Path

CATALOG = Path(__file__).resolve().parent / "catalog"


@dataclass(frozen=True)
class InstanceType:
    """One EC2 instance type as the catalog describes it."""

    name: str
    gpus: int
    gpu: str
    vcpus: int
    memory_gib: float
    efa_interfaces: int
    network_cards: int
    on_demand_usd_per_hour: dict[str, float] = field(default_factory=dict)  # region -> price

    @property
    def regions(self) -> list[str]:
        return sorted(self.on_demand_usd_per_hour)


def _rows(name: str) -> list[dict[str, str]]:
    with open(CATALOG / name, newline="") as fh:
        return list(csv.DictReader(fh))


@functools.cache
def instance_types() -> dict[str, InstanceType]:
    """Every instance type of instances.csv with its per-region on-demand prices from regions.csv."""
    prices: dict[str, dict[str, float]] = {}
    for r in _rows("regions.csv"):
        prices.setdefault(r["instance_type"], {})[r["region"]] = float(r["on_demand_usd_per_hour"])
    return {r["instance_type"]: InstanceType(r["instance_type"], int(r["gpus"]), r["gpu"], int(r["vcpus"]),
                                             float(r["memory_gib"]), int(r["efa_interfaces"]),
                                             int(r["network_cards"]), prices.get(r["instance_type"], {}))
            for r in _rows("instances.csv")}
