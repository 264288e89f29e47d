"""`privlm data ...` and `privlm train ...`: thin commands over jobs.data and jobs.train."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

data_app = typer.Typer(help="Turn raw text into deduplicated, redacted, tokenized training shards.",
                       no_args_is_help=True)
train_app = typer.Typer(help="Pretrain and fine-tune with DeepSpeed (full or LoRA), with exact resume.",
                        no_args_is_help=True)

RecipeArg = typer.Argument(..., exists=False, help="path to a recipe YAML, e.g. recipes/tiny-cpu.yaml")
OverrideOpt = typer.Option([], "--set", "-s", help="override a recipe field: training.max_steps=20")


def _load(path: Path, overrides: list[str]):
    from jobs.recipe import RecipeError, load_recipe

    try:
        return load_recipe(path, overrides)
    except RecipeError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


@data_app.command("prepare")
def prepare(recipe: Path = RecipeArg, overrides: list[str] = OverrideOpt,
            force: bool = typer.Option(False, help="redo every stage even if the manifest matches")) -> None:
    """Clean, deduplicate, redact, train a tokenizer and pack shards for RECIPE."""
    from jobs.data.pipeline import prepare_data

    result = prepare_data(_load(recipe, overrides), force=force)
    typer.echo(f"shards in {result.output_dir}")


@train_app.command("run")
def run(recipe: Path = RecipeArg, overrides: list[str] = OverrideOpt) -> None:
    """Train RECIPE here: N DeepSpeed ranks on this machine, or this rank under torchrun/Slurm."""
    from jobs.train.launcher import launch_local

    sys.exit(launch_local(_load(recipe, overrides), recipe_path=recipe, overrides=overrides))
