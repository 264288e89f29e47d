"""The demo path on this machine: prepare the corpus, pretrain the tiny model, LoRA fine-tune it."""

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


def run_demo(pretrain_steps: int | None = None) -> int:
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
        timings.append((label, time.perf_counter() - t0, str(result.output_dir)))

    for label, recipe, path, extra in (("train: pretrain (DeepSpeed, 2 ranks)", pretrain, PRETRAIN, overrides),
                                       ("train: LoRA fine-tune", finetune, FINETUNE, [])):
        console.rule(label)
        t0 = time.perf_counter()
        code = launch_local(recipe, recipe_path=path, overrides=extra)
        if code != 0:
            console.print(f"[red]{label} exited with {code}; rerun `make demo` to resume from the last checkpoint")
            return code
        timings.append((label, time.perf_counter() - t0, str(recipe.run_path / "model")))

    _print_summary(console, timings, pretrain.run_path, finetune.run_path)
    return 0


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
