"""The hardware catalog (instances, servers, GPUs: data with a source and a date) and live spot prices."""

from __future__ import annotations

import csv
import difflib
import functools
from dataclasses import dataclass
from pathlib import Path

CATALOG = Path(__file__).resolve().parents[1] / "infra" / "catalog"


class CatalogError(ValueError):
    """An unknown name, with the nearest names in the catalog."""


@dataclass(frozen=True)
class Instance:
    instance_type: str
    region: str
    gpus: int
    gpu: str
    gpu_memory_gib: float
    on_demand_usd_per_hour: float
    efa_interfaces: int
    source: str
    date: str


@dataclass(frozen=True)
class Server:
    server: str
    gpus: int
    gpu: str
    capex_usd: float
    power_kw: float
    source: str
    date: str


@dataclass(frozen=True)
class Gpu:
    short: str
    bf16_dense_tflops: float
    memory_gib: float
    source: str


def _rows(name: str) -> list[dict[str, str]]:
    with open(CATALOG / name) as fh:
        return list(csv.DictReader(fh))


@functools.cache
def instances() -> dict[str, Instance]:
    return {r["instance_type"]: Instance(r["instance_type"], r["region"], int(r["gpus"]), r["gpu"],
                                         float(r["gpu_memory_gib"]), float(r["on_demand_usd_per_hour"]),
                                         int(r["efa_interfaces"]), r["source"], r["date"])
            for r in _rows("instances.csv")}


@functools.cache
def servers() -> dict[str, Server]:
    return {r["server"]: Server(r["server"], int(r["gpus"]), r["gpu"], float(r["capex_usd"]), float(r["power_kw"]),
                                r["source"], r["date"]) for r in _rows("servers.csv")}


@functools.cache
def gpus() -> dict[str, Gpu]:
    return {r["short"]: Gpu(r["short"], float(r["bf16_dense_tflops"]), float(r["memory_gib"]), r["source"])
            for r in _rows("gpus.csv")}


def lookup(table: dict, name: str, field: str) -> object:
    """A catalog entry, or CatalogError naming the field and the nearest known names."""
    if name in table:
        return table[name]
    near = difflib.get_close_matches(name, list(table), n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(near)}?" if near else f"; known: {', '.join(sorted(table))}"
    raise CatalogError(f"{field}={name!r} is not in the catalog (infra/catalog){hint}")


def gpu_for(name: str) -> Gpu:
    """GPU figures for a catalog GPU name such as H100 or A100-80GB."""
    return lookup(gpus(), name, "gpu")  # type: ignore[return-value]


def live_spot_price(instance_type: str, region: str, endpoint_url: str | None = None) -> float | None:
    """The latest Linux spot price through boto3, or None without credentials or data."""
    try:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
    except ImportError:
        return None
    try:
        ec2 = boto3.client("ec2", region_name=region, endpoint_url=endpoint_url)
        history = ec2.describe_spot_price_history(InstanceTypes=[instance_type], MaxResults=20,
                                                  ProductDescriptions=["Linux/UNIX"])["SpotPriceHistory"]
    except (NoCredentialsError, BotoCoreError, ClientError):
        return None
    if not history:
        return None
    latest = max(history, key=lambda h: h["Timestamp"])
    return float(latest["SpotPrice"])
