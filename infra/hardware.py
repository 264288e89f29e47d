"""The one reader of the hardware catalog (infra/catalog/*.csv): instance types, their regional prices, servers, GPUs.

Data, not code: every row has a source and a date. Each fact is stored once: an instance type's hardware in
instances.csv, its on-demand price per region in regions.csv, a server's price and power in servers.csv, a GPU's
peak FLOPs and memory in gpus.csv. The spec validators, the policies, the cost model and the trainer's MFU all
read them through here.
"""

from __future__ import annotations

import csv
import difflib
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

CATALOG = Path(__file__).resolve().parent / "catalog"
REFERENCE_REGION = "us-east-1"  # the region whose price the cost model uses

T = TypeVar("T")


class CatalogError(ValueError):
    """An unknown name, with the nearest names in the catalog."""


@dataclass(frozen=True)
class Price:
    """An on-demand Linux price of one instance type in one region, with where it came from."""

    region: str
    usd_per_hour: float
    source: str
    date: str


@dataclass(frozen=True)
class InstanceType:
    """One EC2 instance type as the catalog describes it."""

    name: str
    gpus: int
    gpu: str
    gpu_memory_gib: float
    vcpus: int
    memory_gib: float
    efa_interfaces: int
    network_cards: int
    prices: dict[str, Price] = field(default_factory=dict)  # region -> price

    @property
    def instance_type(self) -> str:
        return self.name

    @property
    def regions(self) -> list[str]:
        return sorted(self.prices)

    @property
    def region(self) -> str:
        """The region the cost model prices this type in: REFERENCE_REGION, else the first one listed."""
        return REFERENCE_REGION if REFERENCE_REGION in self.prices else next(iter(self.prices))

    @property
    def on_demand_usd_per_hour(self) -> float:
        """The on-demand price in `region`."""
        return self.prices[self.region].usd_per_hour


@dataclass(frozen=True)
class Server:
    """A GPU server to buy: price and power draw."""

    server: str
    gpus: int
    gpu: str
    capex_usd: float
    power_kw: float
    source: str
    date: str


@dataclass(frozen=True)
class Gpu:
    """A GPU's dense peak throughput and memory; `match` is a substring of its CUDA device name."""

    short: str
    name: str
    match: str
    bf16_dense_tflops: float
    tf32_dense_tflops: float
    memory_gib: float
    source: str


def _rows(name: str) -> list[dict[str, str]]:
    with open(CATALOG / name, newline="") as fh:
        return list(csv.DictReader(fh))


@functools.cache
def instance_types() -> dict[str, InstanceType]:
    """Every instance type of instances.csv with its per-region on-demand prices from regions.csv."""
    prices: dict[str, dict[str, Price]] = {}
    for r in _rows("regions.csv"):
        prices.setdefault(r["instance_type"], {})[r["region"]] = Price(
            r["region"], float(r["on_demand_usd_per_hour"]), r["source"], r["date"])
    return {r["instance_type"]: InstanceType(r["instance_type"], int(r["gpus"]), r["gpu"], float(r["gpu_memory_gib"]),
                                             int(r["vcpus"]), float(r["memory_gib"]), int(r["efa_interfaces"]),
                                             int(r["network_cards"]), prices.get(r["instance_type"], {}))
            for r in _rows("instances.csv")}


@functools.cache
def servers() -> dict[str, Server]:
    """Every server of servers.csv."""
    return {r["server"]: Server(r["server"], int(r["gpus"]), r["gpu"], float(r["capex_usd"]), float(r["power_kw"]),
                                r["source"], r["date"]) for r in _rows("servers.csv")}


@functools.cache
def gpus() -> dict[str, Gpu]:
    """Every GPU of gpus.csv, by short name (H100, A100-80GB)."""
    return {r["short"]: Gpu(r["short"], r["gpu"], r["match"], float(r["bf16_dense_tflops"]),
                            float(r["tf32_dense_tflops"]), float(r["memory_gib"]), r["source"])
            for r in _rows("gpus.csv")}


def lookup(table: dict[str, T], name: str, field: str) -> T:
    """A catalog entry, or CatalogError naming the field and the nearest known names."""
    if name in table:
        return table[name]
    near = difflib.get_close_matches(name, list(table), n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(near)}?" if near else f"; known: {', '.join(sorted(table))}"
    raise CatalogError(f"{field}={name!r} is not in the catalog (infra/catalog){hint}")


def gpu_for(name: str) -> Gpu:
    """GPU figures for a catalog GPU name such as H100 or A100-80GB."""
    return lookup(gpus(), name, "gpu")


def gpu_by_device_name(device_name: str) -> Gpu | None:
    """The catalog GPU whose `match` occurs in a CUDA device name (longest match first), or None."""
    for gpu in sorted(gpus().values(), key=lambda g: -len(g.match)):
        if gpu.match.lower() in device_name.lower():
            return gpu
    return None
