"""Cloud versus own hardware: validated scenarios and their TCO, break-even, NPV and unit costs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from cost import workload as wl
from infra.hardware import gpu_for, instance_types, lookup, servers
from privlm.validation import Strict, render

HOURS_PER_YEAR = 8760.0






class Workload(Strict):
    """What must be computed each year."""

    params: float = Field(gt=0, description="model parameters")
    pretrain_tokens_per_year: float = Field(0.0, ge=0)
    finetune_runs_per_year: float = Field(0.0, ge=0)
    finetune_tokens_per_run: float = Field(0.0, ge=0)
    requests_per_year: float = Field(0.0, ge=0)
    tokens_per_request: float = Field(500.0, ge=0, description="generated tokens per request")
    train_mfu: float = Field(0.40, gt=0, le=1)
    serve_mfu: float = Field(0.10, gt=0, le=1, description="decode is memory-bound: a low MFU is realistic")
    measured_train_tokens_per_s_per_gpu: float | None = Field(None, gt=0, description="calibrated from a run")

    @property
    def train_tokens(self) -> float:
        return self.pretrain_tokens_per_year + self.finetune_runs_per_year * self.finetune_tokens_per_run

    def gpu_hours(self, gpu: str) -> tuple[float, float]:
        """(training, inference) GPU-hours per year on this GPU type."""
        peak = gpu_for(gpu).bf16_dense_tflops
        if self.measured_train_tokens_per_s_per_gpu:
            train = wl.gpu_hours_from_throughput(self.train_tokens, self.measured_train_tokens_per_s_per_gpu)
        else:
            train = wl.gpu_hours(wl.training_flops(self.params, self.train_tokens), peak, self.train_mfu)
        infer = wl.gpu_hours(wl.inference_flops(self.params, self.requests_per_year * self.tokens_per_request),
                             peak, self.serve_mfu)
        return train, infer


class Cloud(Strict):
    """Renting: either fixed figures (as a guide quotes them) or computed from an instance type."""

    label: str = "cloud"
    upfront_usd: float = Field(0.0, ge=0)
    fixed_annual_usd: float | None = Field(None, ge=0, description="skip the computation: a quoted yearly bill")
    usd_per_request: float | None = Field(None, ge=0, description="a hosted API's price per request")
    instance_type: str = "p5.48xlarge"
    pricing: Literal["on_demand", "spot", "reserved"] = "on_demand"
    reserved_discount: float = Field(0.40, ge=0, lt=1, description="reserved instances or savings plan")
    spot_discount: float = Field(0.60, ge=0, lt=1, description="spot price below on-demand")
    spot_interruptions_per_hour: float = Field(0.05, ge=0)
    checkpoint_write_s: float = Field(60.0, ge=0)
    restart_s: float = Field(600.0, ge=0)
    storage_tb: dict[str, float] = Field(default_factory=lambda: {"fsx": 0.0, "s3": 0.0, "ebs": 0.0})
    storage_usd_per_tb_month: dict[str, float] = Field(
        default_factory=lambda: {"fsx": 145.0, "s3": 23.0, "ebs": 80.0})
    egress_tb_per_year: float = Field(0.0, ge=0)
    egress_usd_per_gb: float = Field(0.09, ge=0)
    support_pct: float = Field(0.10, ge=0, le=1)

    @model_validator(mode="after")
    def _known(self) -> Cloud:
        if self.fixed_annual_usd is None and self.usd_per_request is None:
            lookup(instance_types(), self.instance_type, "cloud.instance_type")
        unknown = set(self.storage_tb) - set(self.storage_usd_per_tb_month)
        if unknown:
            raise ValueError(f"cloud.storage_tb has {sorted(unknown)} without a price in storage_usd_per_tb_month")
        return self


class Own(Strict):
    """Buying: fixed figures, or servers from the catalog with power, colocation, staff and maintenance."""

    label: str = "own hardware"
    fixed_upfront_usd: float | None = Field(None, ge=0)
    fixed_annual_usd: float | None = Field(None, ge=0)
    server: str = "hgx-h100-8gpu"
    servers: int | None = Field(None, gt=0, description="default: enough for the workload at this utilisation")
    capex_per_server_usd: float | None = Field(None, gt=0, description="default: the catalog's price")
    network_capex_per_node_usd: float = Field(25_000.0, ge=0)
    storage_capex_per_node_usd: float = Field(10_000.0, ge=0)
    depreciation_years: float = Field(4.0, gt=0)
    residual_pct: float = Field(0.10, ge=0, le=1)
    power_kw_per_node: float | None = Field(None, gt=0, description="default: the catalog's draw")
    pue: float = Field(1.4, ge=1, le=3)
    usd_per_kwh: float = Field(0.12, ge=0)
    colo_usd_per_kw_month: float = Field(150.0, ge=0)
    staff_fte: float = Field(0.5, ge=0)
    staff_usd_per_fte: float = Field(200_000.0, ge=0)
    maintenance_pct: float = Field(0.08, ge=0, le=1, description="of capex per year")
    utilisation: float = Field(0.6, gt=0, le=1)

    @model_validator(mode="after")
    def _known(self) -> Own:
        if (self.fixed_upfront_usd is None) != (self.fixed_annual_usd is None):
            raise ValueError("own: give both fixed_upfront_usd and fixed_annual_usd, or neither")
        if self.fixed_annual_usd is None:
            lookup(servers(), self.server, "own.server")
        return self


class Scenario(Strict):
    """A planning question: this workload, rented or bought, over `years`."""

    name: str
    description: str = ""
    years: int = Field(3, gt=0, le=10)
    cost_of_capital: float = Field(0.08, ge=0, lt=1)
    workload: Workload
    cloud: Cloud = Field(default_factory=Cloud)
    own: Own = Field(default_factory=Own)


class ScenarioError(ValueError):
    """A scenario that cannot be costed; one line per problem with the field."""


def load_scenario(path: str | Path, overrides: dict[str, Any] | None = None) -> Scenario:
    """Read and validate a YAML scenario."""
    path = Path(path)
    if not path.is_file():
        raise ScenarioError(f"scenario {path} does not exist (recipes/cost/ has the shipped ones)")
    data = yaml.safe_load(path.read_text()) or {}
    for key, value in (overrides or {}).items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError(render(exc, str(path), "scenario")) from None


def cloud_costs(s: Scenario) -> dict[str, Any]:
    """Upfront and yearly cost of renting, with the parts that make it up."""
    c = s.cloud
    if c.fixed_annual_usd is not None or c.usd_per_request is not None:
        annual = (c.fixed_annual_usd or 0.0) + (c.usd_per_request or 0.0) * s.workload.requests_per_year
        return {"upfront": c.upfront_usd, "annual": annual, "parts": {"quoted": annual}, "usd_per_gpu_hour": None}
    inst = instance_types()[c.instance_type]
    train_h, infer_h = s.workload.gpu_hours(inst.gpu)
    price = inst.on_demand_usd_per_hour
    slowdown = 1.0
    if c.pricing == "spot":
        price *= 1 - c.spot_discount
        slowdown = wl.interruption_cost(c.spot_interruptions_per_hour, c.checkpoint_write_s, c.restart_s).slowdown
    elif c.pricing == "reserved":
        price *= 1 - c.reserved_discount
    per_gpu_hour = price / inst.gpus
    compute = (train_h * slowdown + infer_h) * per_gpu_hour
    storage = 12 * sum(tb * c.storage_usd_per_tb_month[k] for k, tb in c.storage_tb.items())
    egress = c.egress_tb_per_year * 1000 * c.egress_usd_per_gb
    support = c.support_pct * (compute + storage + egress)
    parts = {"compute": compute, "storage": storage, "egress": egress, "support": support}
    return {"upfront": c.upfront_usd, "annual": sum(parts.values()), "parts": parts,
            "usd_per_gpu_hour": per_gpu_hour * (1 + c.support_pct), "gpu_hours": train_h * slowdown + infer_h,
            "spot_slowdown": slowdown}


def own_costs(s: Scenario) -> dict[str, Any]:
    """Upfront, yearly and residual value of buying, with the parts that make it up."""
    o = s.own
    if o.fixed_annual_usd is not None:
        return {"upfront": o.fixed_upfront_usd, "annual": o.fixed_annual_usd, "residual": 0.0,
                "parts": {"quoted": o.fixed_annual_usd}, "servers": None, "capacity_gpu_hours": None}
    srv = servers()[o.server]
    train_h, infer_h = s.workload.gpu_hours(srv.gpu)
    needed = (train_h + infer_h) / (HOURS_PER_YEAR * o.utilisation * srv.gpus)
    count = o.servers or max(1, math.ceil(needed))
    capex = count * ((o.capex_per_server_usd or srv.capex_usd) + o.network_capex_per_node_usd
                     + o.storage_capex_per_node_usd)
    kw = count * (o.power_kw_per_node or srv.power_kw)
    busy = min(1.0, (train_h + infer_h) / (count * srv.gpus * HOURS_PER_YEAR))  # the workload sets the load
    load = 0.3 + 0.7 * busy  # servers draw ~30% of peak when idle
    parts = {"power": kw * load * o.pue * HOURS_PER_YEAR * o.usd_per_kwh,
             "colocation": kw * o.pue * o.colo_usd_per_kw_month * 12,
             "staff": o.staff_fte * o.staff_usd_per_fte, "maintenance": o.maintenance_pct * capex}
    book = capex * max(o.residual_pct, 1 - s.years / o.depreciation_years)
    return {"upfront": capex, "annual": sum(parts.values()), "residual": book, "parts": parts, "servers": count,
            "capacity_gpu_hours": count * srv.gpus * HOURS_PER_YEAR, "needed_servers": needed}


def npv(upfront: float, annual: float, years: int, rate: float, residual: float = 0.0) -> float:
    """Present value of the costs: upfront now, yearly costs at each year end, residual credited at the end."""
    return upfront + sum(annual / (1 + rate) ** y for y in range(1, years + 1)) - residual / (1 + rate) ** years


def cumulative(upfront: float, annual: float, months: int, residual: float = 0.0) -> list[float]:
    """Cumulative cost at the end of each month 0..months (residual value credited in the last month)."""
    curve = [upfront + annual * m / 12 for m in range(months + 1)]
    curve[-1] -= residual
    return curve


def break_even_month(cloud: list[float], own: list[float]) -> int | None:
    """The first month in which owning has cost no more than renting, if it comes within the horizon."""
    return next((m for m, (c, o) in enumerate(zip(cloud, own, strict=True)) if m > 0 and o <= c), None)


def projected_break_even_month(c: dict[str, float], o: dict[str, float]) -> int | None:
    """The first month owning has cost no more than renting, were both to go on at their annual rates past
    the horizon (no residual value); None when owning never catches up."""
    gap, monthly = o["upfront"] - c["upfront"], (o["annual"] - c["annual"]) / 12
    if monthly >= 0:
        return 1 if gap + monthly <= 0 else None
    return max(1, math.ceil(gap / -monthly - 1e-9))


def analyse(s: Scenario) -> dict[str, Any]:
    """Everything the report shows, as plain numbers."""
    c, o = cloud_costs(s), own_costs(s)
    months = 12 * s.years
    curves = {"cloud": cumulative(c["upfront"], c["annual"], months),
              "own": cumulative(o["upfront"], o["annual"], months, o["residual"])}
    totals = {"cloud": curves["cloud"][-1], "own": curves["own"][-1]}
    out: dict[str, Any] = {
        "scenario": s.name, "years": s.years, "cloud": c, "own": o, "curves": curves, "totals": totals,
        "per_year": {"cloud": [c["upfront"]] + [c["annual"]] * s.years,
                     "own": [o["upfront"]] + [o["annual"]] * s.years},
        "residual": {"cloud": 0.0, "own": o["residual"]},
        "npv": {"cloud": npv(c["upfront"], c["annual"], s.years, s.cost_of_capital),
                "own": npv(o["upfront"], o["annual"], s.years, s.cost_of_capital, o["residual"])},
        "break_even_month": break_even_month(curves["cloud"], curves["own"]),
        "break_even_month_projected": projected_break_even_month(c, o),
        "cheaper": "own" if totals["own"] < totals["cloud"] else "cloud",
    }
    own_annualised = (o["upfront"] - o["residual"]) / s.years + o["annual"]
    w = s.workload
    if s.cloud.usd_per_request:
        cloud_fixed = c["annual"] - s.cloud.usd_per_request * w.requests_per_year
        out["break_even_requests_per_year"] = (own_annualised + c["upfront"] / s.years - cloud_fixed) \
            / s.cloud.usd_per_request
    if c.get("usd_per_gpu_hour") and o.get("capacity_gpu_hours"):
        out["break_even_utilisation"] = own_annualised / (o["capacity_gpu_hours"] * c["usd_per_gpu_hour"])
    out["unit_costs"] = unit_costs(s, totals)
    return out


def unit_costs(s: Scenario, totals: dict[str, float]) -> dict[str, dict[str, float | None]]:
    """Cost per million training tokens and per thousand requests, splitting costs by GPU-hours."""
    w = s.workload
    gpu = instance_types()[s.cloud.instance_type].gpu if s.cloud.instance_type in instance_types() else "H100"
    train_h, infer_h = w.gpu_hours(gpu)
    share = train_h / (train_h + infer_h) if train_h + infer_h else 0.0
    out = {}
    for option, total in totals.items():
        train_tokens, requests = w.train_tokens * s.years, w.requests_per_year * s.years
        out[option] = {"usd_per_million_train_tokens": total * share / train_tokens * 1e6 if train_tokens else None,
                       "usd_per_thousand_requests": total * (1 - share) / requests * 1e3 if requests else None}
    return out


SENSITIVE = {
    "cloud price": ("cloud", ("fixed_annual_usd", "usd_per_request", "reserved_discount")),
    "own capex": ("own", ("fixed_upfront_usd", "capex_per_server_usd")),
    "own yearly costs": ("own", ("fixed_annual_usd", "staff_usd_per_fte", "usd_per_kwh")),
    "utilisation": ("own", ("utilisation",)),
    "volume": ("workload", ("requests_per_year", "pretrain_tokens_per_year")),
}


def sensitivity(s: Scenario, swing: float = 0.2) -> list[dict[str, Any]]:
    """Own-minus-cloud total when each input moves ±swing (the tornado chart), largest effect first."""
    base = analyse(s)["totals"]
    rows = []
    for label, (section, fields) in SENSITIVE.items():
        deltas = []
        for factor in (1 - swing, 1 + swing):
            data = s.model_dump()
            changed = False
            for f in fields:
                value = data[section].get(f)
                if isinstance(value, int | float) and value and f != "reserved_discount":
                    new = value * factor
                    data[section][f] = min(new, 1.0) if f == "utilisation" else new
                    changed = True
            if not changed:
                break
            t = analyse(Scenario.model_validate(data))["totals"]
            deltas.append(t["own"] - t["cloud"])
        if len(deltas) == 2:
            rows.append({"input": label, "low": deltas[0], "high": deltas[1], "base": base["own"] - base["cloud"]})
    return sorted(rows, key=lambda r: -abs(r["high"] - r["low"]))
