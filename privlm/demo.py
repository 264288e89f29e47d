"""The demo path on this machine, station by station: data, pretrain, LoRA fine-tune, registry, serving."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from jobs.recipe import load_recipe
from jobs.train.distributed import REPO_ROOT

PRETRAIN = REPO_ROOT / "recipes" / "tiny-cpu.yaml"
FINETUNE = REPO_ROOT / "recipes" / "tiny-cpu-lora.yaml"


def run_demo(pretrain_steps: int | None = None, keep_serving: bool = False) -> int:
    """Run each station in order and print where the model is and what each step cost in time."""
    from jobs.data.pipeline import prepare_data
    from jobs.train.launcher import launch_local

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

    for label, recipe, path, extra in (("train: pretrain (DeepSpeed, 2 ranks)", pretrain, PRETRAIN, overrides),
                                       ("train: LoRA fine-tune", finetune, FINETUNE, [])):
        console.rule(label)
        t0 = time.perf_counter()
        code = launch_local(recipe, recipe_path=path, overrides=extra)
        if code != 0:
            console.print(f"[red]{label} exited with {code}; rerun `make demo` to resume from the last checkpoint")
            return code
        timings.append((label, time.perf_counter() - t0, str(recipe.run_path / "model")))

    console.rule("registry: register, evaluate, promote (MLflow)")
    t0 = time.perf_counter()
    outcome = register_and_promote(console, pretrain.run_path, finetune.run_path, finetune.data_path)
    timings.append(("registry: MLflow", time.perf_counter() - t0, outcome))

    console.rule("serve: the champion, int8, OpenAI-compatible (Ray Serve)")
    t0 = time.perf_counter()
    answer = serve_and_ask(console, keep_serving)
    timings.append(("serve: Ray Serve + one completion", time.perf_counter() - t0, answer))

    _print_summary(console, timings, pretrain.run_path, finetune.run_path)
    return 0


def serve_and_ask(console: Console, keep_serving: bool, port: int = 8000) -> str:
    """Serve models:/privlm-tiny@champion and ask it for one completion over HTTP."""
    import os

    import httpx

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from serving.app import build_app

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"model_uri": "models:/privlm-tiny@champion", "port": port}), name="privlm",
                  route_prefix="/")
        body = {"model": "privlm-tiny", "prompt": "def test_", "max_tokens": 24, "temperature": 0}
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120)
        reply.raise_for_status()
        text = reply.json()["choices"][0]["text"]
        version = reply.headers["x-privlm-model-version"]
        console.print(f"POST /v1/completions {json.dumps(body)}\n-> {version}: {body['prompt']}{text}")
        if keep_serving:
            console.print(f"serving on http://127.0.0.1:{port}/v1 until Ctrl-C")
            while True:
                time.sleep(3600)
        return f"{version}: {text.strip()[:40]!r}"
    except KeyboardInterrupt:
        return "stopped"
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
