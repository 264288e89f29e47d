"""`privlm data ...` and `privlm train ...`: thin commands over jobs.data and jobs.train."""

from __future__ import annotations

import json
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

    try:
        result = prepare_data(_load(recipe, overrides), force=force)
    except ValueError as exc:  # SourceError, TokenizerError, OutputDirError...: the message names the fix
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    typer.echo(f"shards in {result.output_dir}")


@train_app.command("run")
def run(recipe: Path = RecipeArg, overrides: list[str] = OverrideOpt) -> None:
    """Train RECIPE here: N DeepSpeed ranks on this machine, or this rank under torchrun/Slurm."""
    from jobs.train.launcher import launch_local

    sys.exit(launch_local(_load(recipe, overrides), recipe_path=recipe, overrides=overrides))


jobs_app = typer.Typer(help="Jobs submitted with `train submit` or `data submit`: state, restarts, logs.",
                       no_args_is_help=True)
ExecutorOpt = typer.Option(None, "--executor", "-e",
                           help="slurm or local; default: slurm when a cluster answers here, else local")


def _submit_error(exc: Exception) -> typer.Exit:
    typer.secho(str(exc), fg=typer.colors.RED, err=True)
    return typer.Exit(2)


def _check_executor(kind: str | None) -> str | None:
    if kind not in (None, "slurm", "local"):
        typer.secho(f"--executor {kind!r}: use slurm or local", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    return kind


@train_app.command("submit")
def submit(recipe: Path = RecipeArg, overrides: list[str] = OverrideOpt, executor: str | None = ExecutorOpt,
           wait: bool = typer.Option(False, "--wait", help="wait for the job to end and print its result")) -> None:
    """Submit RECIPE through submitit: requeued on preemption, time limit or spot notice, resumed exactly."""
    from jobs.launch.slurm import SubmitError
    from jobs.launch.submit import default_executor, submit_training

    kind = _check_executor(executor) or default_executor()
    try:
        job = submit_training(_load(recipe, overrides), kind)
    except SubmitError as exc:
        raise _submit_error(exc) from None
    typer.echo(f"submitted job {job.job_id} ({kind}); follow it with `privlm jobs status {job.job_id}`")
    if wait:
        from jobs.launch.submit import follow

        typer.echo(json.dumps(follow(job, _load(recipe, overrides))[0], indent=1))


@data_app.command("feedback")
def data_feedback(model: str = typer.Argument(..., help="registered model name whose answers to export"),
                  out: Path = typer.Option(..., help="JSONL file to write, a fine-tuning source"),
                  feedback: str = typer.Option(None, envvar="PRIVLM_FEEDBACK_URL", help="feedback store URL"),
                  min_score: float = typer.Option(0.75, help="lowest rating kept, 0-1 (thumbs up = 1, 4/5 = 0.75)"),
                  since_hours: float = typer.Option(None, help="only answers from the last N hours"),
                  against: list[Path] = typer.Option([], help="training data to deduplicate against (files or "
                                                              "folders); repeatable")) -> None:
    """Export well-rated production answers (PII-redacted, deduplicated) as a fine-tuning source."""
    import time

    from mlops.feedback import FeedbackError, FeedbackStore, default_url
    from mlops.loop import export_feedback

    try:
        store = FeedbackStore(feedback or default_url())
        since = time.time() - since_hours * 3600 if since_hours else None
        r = export_feedback(store, model, out, min_score, since, list(against))
    except FeedbackError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{out}: {r.kept} of {r.considered} rated answers ({r.below_score} rated below {min_score}, "
               f"{r.duplicates} duplicates; redacted {r.redactions or 'nothing'})")


@data_app.command("submit")
def data_submit(recipe: Path = RecipeArg, overrides: list[str] = OverrideOpt,
                executor: str | None = ExecutorOpt) -> None:
    """Prepare RECIPE's data as an array job (one task per shard), then the global dedup and packing."""
    from jobs.launch.data_array import submit_data
    from jobs.launch.slurm import SubmitError
    from jobs.launch.submit import default_executor

    kind = _check_executor(executor) or default_executor()
    try:
        sub = submit_data(_load(recipe, overrides), kind)
    except SubmitError as exc:
        raise _submit_error(exc) from None
    if sub.finalize is None:
        typer.echo(f"{sub.output_dir} is up to date: nothing submitted")
        return
    typer.echo(f"submitted {len(sub.shards)} shard task(s) (job {sub.shards[0].job_id.split('_')[0]}) and the "
               f"global pass (job {sub.finalize.job_id}, after them) ({kind})")


@jobs_app.command("list")
def jobs_list(all_jobs: bool = typer.Option(False, "--all", help="also jobs that have ended")) -> None:
    """Submitted jobs with their state, restarts and last checkpoint."""
    from rich.console import Console
    from rich.table import Table

    from jobs.launch.records import ACTIVE, load_records, state

    table = Table("job", "kind", "recipe", "executor", "state", "restarts", "resumes", "checkpoint", "nodes")
    for rec in load_records():
        info = state(rec)
        if not all_jobs and str(info["state"]).split()[0] not in ACTIVE:
            continue
        table.add_row(rec.job_id, rec.kind, rec.name, rec.executor, str(info["state"]),
                      str(info["restarts"] if info["restarts"] is not None else "-"), str(info["resumes"]),
                      str(info["last_checkpoint"] if info["last_checkpoint"] is not None else "-"),
                      str(info["nodes"] or "-"))
    Console().print(table)


def _record(job_id: str):
    from jobs.launch.records import find

    try:
        return find(job_id)
    except KeyError as exc:
        typer.secho(str(exc.args[0]), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


@jobs_app.command("status")
def jobs_status(job_id: str = typer.Argument(..., help="job id from `train submit` or `jobs list`"),
                lines: int = typer.Option(10, help="log lines to show")) -> None:
    """One job: state, restarts, resumes, last checkpoint and the tail of its log."""
    from jobs.launch.records import state, tail

    rec = _record(job_id)
    info = state(rec)
    for key, value in {"job": rec.job_id, "kind": rec.kind, "recipe": rec.name, "executor": rec.executor,
                       **info, "run": rec.run_dir}.items():
        typer.echo(f"{key:>16}: {value}")
    typer.echo(tail(rec, lines))


@jobs_app.command("logs")
def jobs_logs(job_id: str = typer.Argument(...), lines: int = typer.Option(40, "--lines", "-n")) -> None:
    """The last lines of a job's log (rank 0)."""
    from jobs.launch.records import tail

    typer.echo(tail(_record(job_id), lines))


@jobs_app.command("preempt")
def jobs_preempt(job_id: str = typer.Argument(...)) -> None:
    """Preempt a job as Slurm would: its ranks checkpoint, it is requeued, and it resumes (e.g. before a drain)."""
    from jobs.launch.records import preempt

    if not preempt(_record(job_id)):
        typer.secho(f"job {job_id} has no running ranks", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    typer.echo(f"sent the preemption signal to {job_id}: it checkpoints, requeues and resumes")


@jobs_app.command("cancel")
def jobs_cancel(job_id: str = typer.Argument(...)) -> None:
    """Cancel a job (its ranks write a checkpoint on the way out when Slurm's KillWait allows)."""
    from jobs.launch.records import cancel

    cancel(_record(job_id))
    typer.echo(f"cancelled {job_id}")
