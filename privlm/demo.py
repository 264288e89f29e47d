"""The demo path on this machine, station by station: data, pretrain, LoRA fine-tune (as jobs: Slurm when a
cluster answers, else the local executor), registry, serving, and the cost of a real-sized plan."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from jobs.files import atomic_write_text
from jobs.recipe import Recipe, load_recipe
from jobs.train.distributed import REPO_ROOT

PRETRAIN = REPO_ROOT / "recipes" / "tiny-cpu.yaml"
FINETUNE = REPO_ROOT / "recipes" / "tiny-cpu-lora.yaml"
DEMO_SUMMARY = Path("runs/demo-summary.json")
COST_SCENARIO = REPO_ROOT / "recipes" / "cost" / "h100-buy-vs-p5-rent.yaml"


def run_demo(pretrain_steps: int | None = None, keep_serving: bool = False, port: int = 8000) -> int:
    """Run each station in order and print where the model is and what each step cost in time."""
    from jobs.data.pipeline import prepare_data
    from jobs.launch.submit import default_executor, follow, submit_training

    console = Console()
    timings: list[tuple[str, float, str]] = []
    overrides = [f"training.max_steps={pretrain_steps}"] if pretrain_steps else []
    pretrain = load_recipe(PRETRAIN, overrides)
    finetune = load_recipe(FINETUNE)

    for label, recipe in (("data: pretraining corpus", pretrain), ("data: fine-tuning corpus", finetune)):
        console.rule(label)
        t0 = time.perf_counter()
        result = prepare_data(recipe)
        note = " (unchanged, reused)" if result.skipped else ""
        timings.append((label, time.perf_counter() - t0, f"{result.output_dir}{note}"))

    kind = default_executor()
    for label, recipe in ((f"train: pretrain (DeepSpeed, 2 ranks, {kind} job)", pretrain),
                          (f"train: LoRA fine-tune ({kind} job)", finetune)):
        console.rule(label)
        t0 = time.perf_counter()
        if already_trained(recipe):
            console.print(f"{recipe.run_path / 'model'} is trained from this exact recipe: reused")
            timings.append((label, time.perf_counter() - t0, f"{recipe.run_path / 'model'} (unchanged, reused)"))
            continue
        try:
            follow(submit_training(recipe, kind), recipe, console)
        except Exception as exc:  # the job's log tail is printed by follow()
            console.print(f"[red]{label} failed ({exc}); rerun `make demo` to resume from the last checkpoint")
            return 1
        timings.append((label, time.perf_counter() - t0, str(recipe.run_path / "model")))

    console.rule("registry: register, evaluate, promote (MLflow)")
    t0 = time.perf_counter()
    outcome = register_and_promote(console, pretrain.run_path, finetune.run_path, finetune.data_path)
    timings.append(("registry: MLflow", time.perf_counter() - t0, outcome))

    console.rule("serve: the champion, int8, OpenAI-compatible (Ray Serve)")
    t0 = time.perf_counter()
    answer, completion = serve_and_ask(console, keep_serving, port)
    timings.append(("serve: Ray Serve + one completion", time.perf_counter() - t0, answer))

    console.rule("cost: a real-sized plan, next to what this demo measured")
    t0 = time.perf_counter()
    verdict, totals = cost_station(console, pretrain.run_path)
    timings.append(("cost: rent or buy (recipes/cost)", time.perf_counter() - t0, verdict))

    _print_summary(console, timings, pretrain.run_path, finetune.run_path)
    record = {"executor": kind, "stations": [{"station": label, "seconds": sec, "output": out}
                                              for label, sec, out in timings],
              "completion": completion, "cost": totals}
    atomic_write_text(DEMO_SUMMARY, json.dumps(record, indent=1))
    console.print(f"summary: {DEMO_SUMMARY}")
    return 0


def already_trained(recipe: Recipe) -> bool:
    """True when the run finished all its steps from a recipe identical to this one (so the model is current)."""
    summary, saved = recipe.run_path / "summary.json", recipe.run_path / "recipe.yaml"
    if not (summary.is_file() and saved.is_file() and (recipe.run_path / "model").is_dir()):
        return False
    same = load_recipe(saved).fingerprint() == recipe.fingerprint()
    return same and json.loads(summary.read_text()).get("step") == recipe.training.total_steps


def cost_station(console: Console, run: Path) -> tuple[str, dict]:
    """The 7B rent-or-buy scenario's totals, with this demo's measured throughput beside the plan's assumption."""
    from cost.model import analyse, load_scenario
    from cost.report import terminal_table, verdict

    scenario = load_scenario(COST_SCENARIO)
    result = analyse(scenario)
    labels = {"cloud": scenario.cloud.label, "own": scenario.own.label}
    console.print(terminal_table(result, labels))
    lines = verdict(result, labels)
    for line in lines:
        console.print(line)
    measured = _measured_throughput(run)
    if measured:
        console.print(f"this demo measured {measured['tokens_per_s']:,.0f} tokens/s at MFU {measured['mfu']:.1%} on "
                      f"this CPU; the plan assumes MFU {scenario.workload.train_mfu:.0%} on H100 "
                      f"(calibrate it with `privlm cost run RUN_ID` on a real cluster run)")
    totals = {"scenario": result["scenario"], "years": result["years"], "totals": result["totals"],
              "cheaper": result["cheaper"], "break_even_month": result["break_even_month"], "measured": measured}
    return f"{labels[result['cheaper']]} is cheaper over {result['years']} years ({COST_SCENARIO.name})", totals


def _measured_throughput(run: Path) -> dict[str, float] | None:
    """Median tokens/s and MFU of the run's logged steps."""
    import statistics

    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    records = [r for r in map(json.loads, path.read_text().splitlines()) if r.get("tokens_per_s")]
    if not records:
        return None
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
            "mfu": statistics.median(r["mfu"] for r in records)}


def serve_and_ask(console: Console, keep_serving: bool, port: int = 8000) -> tuple[str, dict]:
    """Serve models:/privlm-tiny@champion through vLLM and ask it for one completion over HTTP."""
    import os
    import secrets

    import httpx

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from serving.deploy import deploy, serve_start
    from serving.settings import ServeSettings

    key = os.environ.get("PRIVLM_API_KEYS", "").split(",")[0].strip() or f"sk-demo-{secrets.token_hex(8)}"
    os.environ["PRIVLM_API_KEYS"] = os.environ.get("PRIVLM_API_KEYS") or key
    ray.init(num_cpus=8, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        settings = ServeSettings(model_uri="models:/privlm-tiny@champion", port=port)
        serve_start(settings)
        with console.status("starting the vLLM engine (about a minute on CPU)"):
            deploy(settings)
        body = {"model": "privlm-tiny", "prompt": "def test_", "max_tokens": 24, "temperature": 0}
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120,
                           headers={"Authorization": f"Bearer {key}"})
        reply.raise_for_status()
        text = reply.json()["choices"][0]["text"]
        version = reply.headers["x-privlm-model-version"]
        console.print(f"POST /v1/completions {json.dumps(body)}\n-> {version}: {body['prompt']}{text}")
        if keep_serving:
            console.print(f"serving on http://127.0.0.1:{port}/v1 until Ctrl-C (API key {key})")
            while True:
                time.sleep(3600)
        return f"{version}: {text.strip()[:40]!r}", reply.json()
    except KeyboardInterrupt:
        return "stopped", {}
    finally:
        serve.shutdown()
        ray.shutdown()


def register_and_promote(console: Console, base_run: Path, tuned_run: Path, eval_data: Path) -> str:
    """Register both models as versions of one, evaluate them on the fine-tuning task, gate the champion."""
    from mlops.evaluate import evaluate_version
    from mlops.promote import PromotionRefused, promote_challenger, promote_champion
    from mlops.registry import register_run
    from mlops.tracking import tracking_uri

    versions = []
    for run in (base_run, tuned_run):
        reg = register_run(run)
        if reg.reused:
            console.print(f"{reg.name} v{reg.version} ({run.name}): already registered and evaluated")
            continue
        result = evaluate_version(reg.name, reg.version, data_dir=eval_data)
        console.print(f"{reg.name} v{reg.version} ({run.name}): perplexity {result['eval_perplexity']:.2f} "
                      "on the fine-tuning task's held-out split")
        versions.append(reg)
    name = reg.name
    for reg in versions:
        promote_challenger(name, reg.version, reason="demo")
        try:
            decision = promote_champion(name, reason="demo")
            console.print(f"champion: v{decision.version} ({decision.reason})")
        except PromotionRefused as refused:
            console.print(f"[yellow]{refused}")
    return f"models:/{name}@champion in {tracking_uri()}"


def _print_summary(console: Console, timings: list[tuple[str, float, str]], *runs: Path) -> None:
    table = Table(title="privlm demo")
    table.add_column("station")
    table.add_column("seconds", justify="right")
    table.add_column("output")
    for label, seconds, output in timings:
        table.add_row(label, f"{seconds:.1f}", output)
    table.add_row("total", f"{sum(t for _, t, _ in timings):.1f}", "")
    console.print(table)
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        console.print(f"{run.name}: {summary['step']} steps, {summary['tokens']:,} tokens, "
                      f"held-out loss {summary['eval_loss']:.3f} (perplexity {summary['eval_perplexity']:.1f}), "
                      f"model in {summary['model_dir']}")
