"""`privlm data ...` and `privlm train ...`: thin commands over jobs.data and jobs.train."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from jobs.launch.records import JobRecord

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


def _job_fields(rec: JobRecord, info: dict[str, Any]) -> dict[str, Any]:
    """One job as `jobs list --json` and `jobs status --json` print it."""
    return {"job": rec.job_id, "kind": rec.kind, "recipe": rec.name, "executor": rec.executor, **info,
            "run": rec.run_dir, "submitted_at": rec.submitted_at}


@jobs_app.command("list")
def jobs_list(all_jobs: bool = typer.Option(False, "--all", help="also jobs that have ended"),
              as_json: bool = typer.Option(False, "--json", help="a JSON list, one object per job")) -> None:
    """Submitted jobs with their state, restarts and last checkpoint."""
    from rich.console import Console
    from rich.table import Table

    from jobs.launch.records import ACTIVE, load_records, state

    rows = []
    for rec in load_records():
        info = state(rec)
        if all_jobs or str(info["state"]).split()[0] in ACTIVE:
            rows.append((rec, info))
    if as_json:
        typer.echo(json.dumps([_job_fields(rec, info) for rec, info in rows], indent=1, default=str))
        return
    table = Table("job", "kind", "recipe", "executor", "state", "restarts", "resumes", "checkpoint", "nodes")
    for rec, info in rows:
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
                lines: int = typer.Option(10, help="log lines to show"),
                as_json: bool = typer.Option(False, "--json", help="one JSON object (the log tail as `log`)")) -> None:
    """One job: state, restarts, resumes, last checkpoint and the tail of its log."""
    from jobs.launch.records import state, tail

    rec = _record(job_id)
    fields = _job_fields(rec, state(rec))
    if as_json:
        typer.echo(json.dumps({**fields, "log": tail(rec, lines).splitlines()}, indent=1, default=str))
        return
    for key, value in fields.items():
        if key != "submitted_at":
            typer.echo(f"{key:>16}: {value}")
    typer.echo(tail(rec, lines))


@jobs_app.command("logs")
def jobs_logs(job_id: str = typer.Argument(...), lines: int = typer.Option(40, "--lines", "-n"),
              follow: bool = typer.Option(False, "--follow", "-f", help="keep printing new lines until the job ends"),
              interval: float = typer.Option(1.0, help="seconds between polls with --follow")) -> None:
    """The last lines of a job's log (rank 0); with --follow, then every new line until the job ends."""
    from jobs.launch.records import tail

    rec = _record(job_id)
    if not follow:
        typer.echo(tail(rec, lines))
        return
    try:
        final = follow_log(rec, lines, interval, typer.echo)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    typer.secho(f"job {rec.job_id} ended: {final}", err=True)


def follow_log(rec: JobRecord, lines: int, interval: float, emit: Callable[[str], None],
               state_every_s: float = 5.0) -> str:
    """Emit the last LINES lines of task 0's log, then each line appended to it, until the job is no longer
    active; return its final state. The scheduler is asked at most every STATE_EVERY_S seconds."""
    import time

    from jobs.launch.records import ACTIVE, log_files, state

    offset, partial, started = 0, "", False

    def emit_new(final: bool) -> None:
        nonlocal offset, partial, started
        files = log_files(rec)
        if not files:
            return
        if files[0].stat().st_size < offset:  # rewritten (a requeued job's new log): start again at its top
            offset, partial = 0, ""
        with files[0].open("rb") as log:
            log.seek(offset)
            chunk = log.read()
        offset += len(chunk)
        *complete, partial = (partial + chunk.decode(errors="replace")).split("\n")
        if final and partial:
            complete, partial = [*complete, partial], ""
        for line in complete if started else complete[-lines:]:
            emit(line)
        started = True

    next_state = 0.0
    while True:
        emit_new(final=False)
        if time.monotonic() >= next_state:
            current = str(state(rec)["state"])
            next_state = time.monotonic() + state_every_s
            if current.split()[0] not in ACTIVE:
                emit_new(final=True)  # what the job wrote between the last read and its end
                return current
        time.sleep(interval)


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
