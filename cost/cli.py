"""`privlm cost report|compare|run`: rent or buy, computed, explained and drawn (no torch, ray or pulumi)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

cost_app = typer.Typer(help="Cloud versus own hardware: TCO, break-even, NPV, reports with charts.",
                       no_args_is_help=True)


def _scenario(path: Path, live_prices: bool) -> Any:
    from cost.model import ScenarioError, load_scenario
    from infra.hardware import CatalogError

    try:
        scenario = load_scenario(path)
    except (ScenarioError, CatalogError) as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(2) from None
    if live_prices and scenario.cloud.pricing == "spot":
        from cost.prices import live_spot_price
        from infra.hardware import instance_types

        inst = instance_types()[scenario.cloud.instance_type]
        price = live_spot_price(inst.instance_type, inst.region)
        if price is None:
            typer.echo("no live spot price (no AWS credentials or no data): using the catalog's discount")
        else:
            discount = 1 - price / inst.on_demand_usd_per_hour
            typer.echo(f"live spot price {inst.instance_type} {inst.region}: ${price:.2f}/h ({discount:.0%} off)")
            scenario = scenario.model_copy(update={"cloud": scenario.cloud.model_copy(
                update={"spot_discount": min(max(discount, 0.0), 0.99)})})
    return scenario


def _labels(scenario: Any) -> dict[str, str]:
    return {"cloud": scenario.cloud.label, "own": scenario.own.label}


def _jsonable(a: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in a.items() if k != "curves"}


@cost_app.command("report")
def report(scenario: Path, out: Path = typer.Option(None, help="write report.md, report.html and charts here"),
           as_json: bool = typer.Option(False, "--json", help="print the numbers as JSON"),
           live_prices: bool = typer.Option(False, help="spot prices from AWS (boto3) when credentials exist")) -> None:
    """Per-year and cumulative cost of renting and owning, unit costs, break-even and NPV."""
    from rich.console import Console

    from cost.model import analyse, sensitivity
    from cost.report import terminal_table, verdict, write_reports

    s = _scenario(scenario, live_prices)
    a = analyse(s)
    if as_json:
        typer.echo(json.dumps(_jsonable(a), indent=1, default=str))
        return
    console = Console()
    console.print(terminal_table(a, _labels(s)))
    for line in verdict(a, _labels(s)):
        console.print(line)
    if out:
        path = write_reports(a, sensitivity(s), _labels(s), out)
        console.print(f"report: {path} and {out / 'report.md'}")


@cost_app.command("compare")
def compare(scenarios: list[Path], as_json: bool = typer.Option(False, "--json")) -> None:
    """Several scenarios side by side."""
    from rich.console import Console
    from rich.table import Table

    from cost.model import analyse
    from cost.report import money

    results = [analyse(_scenario(p, False)) for p in scenarios]
    if as_json:
        typer.echo(json.dumps([_jsonable(a) for a in results], indent=1, default=str))
        return
    t = Table(title="scenarios")
    for col in ("scenario", "years", "cloud total", "own total", "cloud NPV", "own NPV", "cheaper", "break-even"):
        t.add_column(col, justify="left" if col == "scenario" else "right")
    for a in results:
        m = a["break_even_month"]
        t.add_row(a["scenario"], str(a["years"]), money(a["totals"]["cloud"]), money(a["totals"]["own"]),
                  money(a["npv"]["cloud"]), money(a["npv"]["own"]), a["cheaper"], f"month {m}" if m else "-")
    Console().print(t)


@cost_app.command("run")
def run_cost(run_id: str, mfu: float = typer.Option(0.4, help="assumed MFU on the GPU alternatives")) -> None:
    """What a finished MLflow run cost on the hardware it used, and what it would cost on each GPU instance."""
    from rich.console import Console
    from rich.table import Table

    from cost.workload import gpu_hours, training_flops
    from infra.hardware import gpu_for, instance_types
    from mlops.tracking import client

    run = client().get_run(run_id)
    params, metrics = run.data.params, run.data.metrics
    seconds = metrics.get("wall_seconds")
    tokens = metrics.get("tokens")
    n = float(run.data.tags.get("privlm.params", 0) or 0) or _params_from_recipe(params)
    world = int(run.data.tags.get("privlm.world_size", "1"))
    if not seconds or not tokens:
        typer.secho(f"run {run_id} has no wall_seconds/tokens metrics (is it a finished privlm run?)", fg="red",
                    err=True)
        raise typer.Exit(2)
    used = f"{world} x {run.data.tags.get('privlm.gpu') or run.data.tags.get('privlm.device', 'cpu')}"
    t = Table(title=f"run {run_id}: {tokens:,.0f} tokens, {n / 1e6:.1f}M params, {seconds / 60:.1f} min on {used}")
    for col in ("hardware", "GPU-hours", "hours", "cost"):
        t.add_column(col, justify="right")
    t.add_row(f"as run ({used})", f"{seconds * world / 3600:.3f}", f"{seconds / 3600:.3f}", "-")
    for inst in instance_types().values():
        h = gpu_hours(training_flops(n, tokens), gpu_for(inst.gpu).bf16_dense_tflops, mfu)
        t.add_row(inst.instance_type, f"{h:.4f}", f"{h / inst.gpus:.4f}",
                  f"${h / inst.gpus * inst.on_demand_usd_per_hour:,.4f}")
    Console().print(t)


def _params_from_recipe(params: dict[str, str]) -> float:
    """Approximate parameter count from a tracked recipe's model section (no torch)."""
    h, layers = float(params.get("model.hidden_size", 0)), float(params.get("model.num_layers", 0))
    vocab = float(params.get("model.vocab_size", 0) or params.get("tokenizer.vocab_size", 0))
    return 12 * layers * h * h + vocab * h


def plan_command(
    recipe: Path = typer.Option(None, help="take the model shape and batch from a training recipe"),
    params: float = typer.Option(None, help="parameters, e.g. 7e9 (with --layers/--hidden/--heads)"),
    layers: int = typer.Option(32), hidden: int = typer.Option(4096), heads: int = typer.Option(32),
    kv_heads: int = typer.Option(None, help="grouped-query KV heads (default: heads)"),
    seq_len: int = typer.Option(4096), micro_batch: int = typer.Option(1), vocab: int = typer.Option(32000),
    tokens: float = typer.Option(1e11, help="training token budget"),
    mfu: float = typer.Option(0.4, help="assumed model FLOPs utilisation"),
    requests_per_s: float = typer.Option(10.0), tokens_per_request: float = typer.Option(500.0),
    context: int = typer.Option(4096), serve_batch: int = typer.Option(16),
    latency_target_s: float = typer.Option(None),
    as_json: bool = typer.Option(False, "--json", help="the numbers as JSON (with the total GPU-hours)"),
) -> None:
    """What hardware does this model need? Training memory per GPU, smallest configurations, serving replicas."""
    from rich.console import Console
    from rich.table import Table

    from cost.plan import TrainShape, replicas_needed, serving_memory_gib, smallest_fits, train_memory_gib
    from infra.hardware import gpus

    if recipe is not None:
        from jobs.recipe import RecipeError, load_recipe

        try:
            r = load_recipe(recipe)
        except RecipeError as exc:
            typer.secho(str(exc), fg="red", err=True)
            raise typer.Exit(2) from None
        m, t = r.model, r.training
        layers, hidden, heads, vocab = m.num_layers, m.hidden_size, m.num_heads, m.vocab_size
        kv_heads, seq_len, micro_batch = m.num_kv_heads or m.num_heads, t.sequence_length, t.micro_batch_size
        ffn = m.intermediate_size or 4 * hidden
        kv = hidden * (kv_heads or heads) // heads
        params = layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * ffn) + vocab * hidden * \
            (1 if m.tie_word_embeddings else 2)
    if params is None:
        typer.secho("give --params (and the shape) or --recipe", fg="red", err=True)
        raise typer.Exit(2)
    shape = TrainShape(params, layers, hidden, heads, seq_len, micro_batch, vocab)
    variants = ((False, False), (True, False), (False, True), (True, True))  # (activation ckpt, CPU offload)
    memory = {stage: [None if off and stage == 0 else train_memory_gib(shape, stage, 8, off, ck)
                      for ck, off in variants] for stage in range(4)}
    options = smallest_fits(shape, tokens, mfu)
    hours = [o["gpu_hours"] for o in options]
    as_written = None
    if recipe is not None:
        as_written = {"gpus": t.world_size, "tensor": r.parallel.tensor, "pipeline": r.parallel.pipeline,
                      "data": r.data_parallel, "zero_stage": r.deepspeed.zero_stage,
                      "gib_per_gpu": train_memory_gib(shape, r.deepspeed.zero_stage, t.world_size,
                                                      r.deepspeed.offload_optimizer != "none",
                                                      t.activation_checkpointing, r.parallel.tensor,
                                                      r.parallel.pipeline)}
    head_dim = hidden // heads
    rep = replicas_needed(params, requests_per_s, tokens_per_request, gpus()["H100"].bf16_dense_tflops,
                          latency_target_s=latency_target_s, batch=serve_batch)
    serving = {q: serving_memory_gib(params, layers, kv_heads or heads, head_dim, context, serve_batch, q)
               for q in ("bf16", "int8", "int4")}
    if as_json:
        typer.echo(json.dumps({
            "params": params, "tokens": tokens, "mfu": mfu, "sequence_length": seq_len, "micro_batch": micro_batch,
            "training_memory_gib_8_gpus": {f"zero{stage}": dict(zip(("plain", "activation_checkpointing",
                                                                     "cpu_offload", "both"), row, strict=True))
                                           for stage, row in memory.items()},
            "options": options, "total_gpu_hours": {"min": min(hours, default=None), "max": max(hours, default=None)},
            "recipe_as_written": as_written, "serving": {"memory_gib": serving, "replicas_on_h100": rep}},
            indent=1, default=str))
        return
    console = Console()
    mem = Table(title=f"training memory per GPU (GiB), {params / 1e9:.2f}B params, seq {seq_len}, micro batch "
                      f"{micro_batch}, 8 GPUs")
    mem.add_column("ZeRO")
    for col in ("plain", "+ activation ckpt", "+ CPU offload", "+ both"):
        mem.add_column(col, justify="right")
    for stage, row in memory.items():
        mem.add_row(str(stage), *("-" if gib is None else f"{gib:,.1f}" for gib in row))
    console.print(mem)
    fits = Table(title=f"smallest configurations that fit, {tokens / 1e9:,.0f}B tokens at {mfu:.0%} MFU")
    for col in ("instance", "GPUs", "nodes", "T x P x D", "ZeRO", "offload", "act. ckpt", "GiB/GPU", "GPU-hours",
                "days", "on-demand cost"):
        fits.add_column(col, justify="right")
    for o in options:
        layout = f"{o['tensor']} x {o['pipeline']} x {o['data']}"
        fits.add_row(o["instance_type"], str(o["gpus"]), str(o["nodes"]), layout, str(o["zero_stage"]),
                     "yes" if o["offload"] else "no", "yes" if o["activation_checkpointing"] else "no",
                     f"{o['gib_per_gpu']:.1f}", f"{o['gpu_hours']:,.0f}", f"{o['days']:.1f}",
                     f"${o['on_demand_usd']:,.0f}")
    console.print(fits)
    if as_written is not None:
        w = as_written
        console.print(f"the recipe as written: {w['gpus']} GPUs, T x P x D = {w['tensor']} x {w['pipeline']} x "
                      f"{w['data']}, ZeRO-{w['zero_stage']}: {w['gib_per_gpu']:,.1f} GiB per GPU")
    if options:
        console.print(f"total GPU-hours: {min(hours):,.0f} to {max(hours):,.0f} (6·N·D FLOPs at {mfu:.0%} MFU, by GPU)")
    serve = Table(title=f"serving: context {context}, batch {serve_batch}, {requests_per_s} req/s x "
                        f"{tokens_per_request:.0f} tokens")
    for col in ("quantization", "weights GiB", "KV cache GiB", "total GiB", "replicas on H100"):
        serve.add_column(col, justify="right")
    for q, m in serving.items():
        serve.add_row(q, f"{m['weights_gib']:.1f}", f"{m['kv_cache_gib']:.1f}", f"{m['total_gib']:.1f}",
                      str(rep["replicas"]))
    console.print(serve)
    if "warning" in rep:
        console.print(f"[yellow]{rep['warning']}")
