"""`privlm model ...`: register, evaluate, quantize, promote, roll back and inspect models in MLflow."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

model_app = typer.Typer(help="MLflow registry: register, evaluate, promote by alias, roll back.",
                        no_args_is_help=True)


def _fail(exc: Exception, code: int = 1) -> None:
    typer.secho(str(exc), fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@model_app.command("register")
def register(run_dir: Path = typer.Argument(..., help="a finished run, e.g. runs/tiny-cpu-lora"),
             name: str = typer.Option(None, help="registered model name (default: the recipe's)"),
             adapter: bool = typer.Option(False, help="register a LoRA run's adapter unmerged, served on its base")
             ) -> None:
    """Log RUN_DIR's exported model in its MLflow run and register a new version with its lineage."""
    from mlops.registry import RegistryError, register_adapter, register_run

    try:
        reg = register_adapter(run_dir, name) if adapter else register_run(run_dir, name)
    except (RegistryError, FileNotFoundError) as exc:
        _fail(exc)
    verb = "already registered as" if reg.reused else "registered"
    typer.echo(f"{verb} {reg.name} version {reg.version} (run {reg.run_id}, parent "
               f"{reg.tags.get('privlm.parent', 'none')})")


@model_app.command("evaluate")
def evaluate(name: str, version: str,
             data: Path = typer.Option(None, help="prepared data dir whose eval split to use (default: the version's)"),
             max_blocks: int = typer.Option(64, help="eval blocks to score")) -> None:
    """Held-out perplexity and a generation sanity check, logged to the version."""
    from mlops.evaluate import evaluate_version
    from mlops.registry import RegistryError

    try:
        result = evaluate_version(name, version, data, max_blocks)
    except RegistryError as exc:
        _fail(exc)
    measure = (f"preference accuracy {result['eval_preference_accuracy']:.3f} on {result['eval_pairs']} held-out pairs"
               if "eval_preference_accuracy" in result else
               f"perplexity {result['eval_perplexity']:.3f} on {result['eval_blocks']} blocks")
    typer.echo(f"{name}/{result['version']}: {measure}; generation {'ok' if result['generation_ok'] else 'FAILED'}: "
               f"{result['sample']!r}")


@model_app.command("quantize")
def quantize(name: str, version: str,
             scheme: str = typer.Option(..., help="w8a8 (int8 weights and activations, runs on CPU), w4a16, ..."),
             calibration: Path = typer.Option(None, help="prepared data dir whose train blocks choose a clip ratio "
                                                         "per layer (default: plain absmax)"),
             device: str = typer.Option("auto", help="where the checkpoint will be served: cpu, cuda or auto"),
             max_blocks: int = typer.Option(64, help="eval blocks to score, parent and quantized"),
             verify_vllm: bool = typer.Option(False, help="also load it in vLLM offline and generate (~30 s)")) -> None:
    """Quantize NAME/VERSION for vLLM, compare perplexity with it, register the result as a new version."""
    from mlops.quantize import QuantizeRefused, quantize_version
    from mlops.registry import RegistryError

    try:
        r = quantize_version(name, version, scheme, calibration, device=None if device == "auto" else device,
                             max_blocks=max_blocks, verify_vllm=verify_vllm)
    except QuantizeRefused as exc:
        _fail(exc, 2)
    except RegistryError as exc:
        _fail(exc)
    vllm = f"; vLLM generated {r['vllm']['tokens']} tokens" if r["vllm"] else ""
    typer.echo(f"{name}/{r['version']}: {scheme} of {r['parent']}, {r['bytes'] / 1e6:.1f} MB (parent "
               f"{r['parent_bytes'] / 1e6:.1f} MB); perplexity {r['eval_perplexity']:.3f} vs "
               f"{r['parent_perplexity']:.3f} ({r['perplexity_delta']:+.2%}){vllm}")


@model_app.command("promote")
def promote(name: str, version: str = typer.Argument(None, help="version to make the challenger"),
            to: str = typer.Option("challenger", help="challenger, or champion (through the evaluation gate)"),
            reason: str = typer.Option("", help="why, recorded with the promotion"),
            metric: str = typer.Option(None, help="override the recipe's policy metric"),
            min_margin: float = typer.Option(None, help="override the recipe's minimum margin"),
            ab: bool = typer.Option(False, "--ab", help="decide by the A/B test on production feedback "
                                                        "(`privlm model compare`) instead of offline metrics"),
            feedback: str = typer.Option(None, envvar="PRIVLM_FEEDBACK_URL",
                                         help="feedback store URL (default: the serving default)")) -> None:
    """`promote NAME VERSION` sets the challenger; `promote NAME --to champion` passes it through the gate."""
    from mlops.feedback import default_url
    from mlops.promote import PromotionRefused, promote_challenger, promote_champion
    from mlops.registry import RegistryError

    try:
        if to == "challenger":
            if version is None:
                _fail(ValueError("give the VERSION to make the challenger"))
            d = promote_challenger(name, version, reason)
            typer.echo(f"{name}: challenger -> v{d.version} (was {d.previous or 'none'})")
            return
        if to != "champion":
            _fail(ValueError(f"--to {to!r}: use challenger or champion"))
        d = promote_champion(name, {"metric": metric, "min_margin": min_margin}, reason,
                             feedback_url=(feedback or default_url()) if ab or feedback else None)
    except PromotionRefused as exc:
        typer.secho(str(exc), fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(3) from None
    except RegistryError as exc:
        _fail(exc)
    typer.echo(f"{name}: champion -> v{d.version} (was {d.previous or 'none'}): {d.reason}" if d.promoted
               else f"{name}: {d.reason}")


@model_app.command("compare")
def compare(name: str,
            feedback: str = typer.Option(None, envvar="PRIVLM_FEEDBACK_URL",
                                         help="feedback store URL (default: the serving default)"),
            since_hours: float = typer.Option(None, help="only answers from the last N hours"),
            as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Champion against challenger on production feedback: means, Welch's t-test, effect size, sample size."""
    from rich.console import Console
    from rich.table import Table

    from mlops.compare import compare_versions
    from mlops.feedback import FeedbackError, FeedbackStore, default_url
    from mlops.promote import policy_for
    from mlops.registry import RegistryError, alias_version

    try:
        champion, challenger = alias_version(name, "champion"), alias_version(name, "challenger")
        store = FeedbackStore(feedback or default_url())
        since = time.time() - since_hours * 3600 if since_hours else None
        result = compare_versions(store, name, f"{name}/v{champion.version}", f"{name}/v{challenger.version}",
                                  policy_for(challenger).ab, since)
    except (RegistryError, FeedbackError) as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(result.as_dict(), indent=1))
        return
    table = Table(title=f"{name}: A/B on production feedback (scores 0-1)")
    for col in ("arm", "version", "rated", "mean", "sd"):
        table.add_column(col, justify="right" if col in ("rated", "mean", "sd") else "left")
    for arm, a in (("champion", result.champion), ("challenger", result.challenger)):
        table.add_row(arm, a.version, str(a.n), "-" if a.mean is None else f"{a.mean:.3f}",
                      "-" if a.sd is None else f"{a.sd:.3f}")
    console = Console()
    console.print(table)
    console.print(result.verdict())
    if result.challenger_wins:
        console.print(f"promote with: privlm model promote {name} --to champion --ab")


@model_app.command("rollback")
def rollback_cmd(name: str, reason: str = typer.Option("", help="why, recorded with the rollback")) -> None:
    """Restore the previous champion."""
    from mlops.promote import rollback
    from mlops.registry import RegistryError

    try:
        d = rollback(name, reason)
    except RegistryError as exc:
        _fail(exc)
    typer.echo(f"{name}: champion -> v{d.version} (rolled back from v{d.previous})")


@model_app.command("list")
def list_models() -> None:
    """Registered models with their aliases and latest version."""
    from rich.console import Console
    from rich.table import Table

    from mlops.tracking import client

    table = Table(title="registered models")
    for col in ("name", "versions", "champion", "challenger", "updated"):
        table.add_column(col)
    for m in client().search_registered_models():
        aliases = getattr(m, "aliases", {}) or {}
        latest = max((int(v.version) for v in m.latest_versions or []), default=0)
        table.add_row(m.name, str(latest), _v(aliases.get("champion")), _v(aliases.get("challenger")),
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(m.last_updated_timestamp / 1000)))
    Console().print(table)


def _v(version: object) -> str:
    return f"v{version}" if version else "-"


def version_rows(name: str) -> list[dict[str, object]]:
    """Every version of NAME: aliases, eval metrics, lineage, promotion record."""
    from mlops.registry import require_model
    from mlops.tracking import client

    model = require_model(name)
    aliases: dict[str, list[str]] = {}
    for alias, version in (getattr(model, "aliases", {}) or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for mv in sorted(client().search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version)):
        tags = mv.tags
        rows.append({"version": str(mv.version), "aliases": sorted(aliases.get(str(mv.version), [])),
                     "eval": {k.removeprefix("eval."): v for k, v in tags.items()
                              if k.startswith("eval.") and k not in ("eval.sample",)},
                     "recipe": tags.get("privlm.recipe"), "parent": tags.get("privlm.parent"),
                     "data": tags.get("privlm.data_fingerprint"), "commit": tags.get("privlm.git_commit"),
                     "step": tags.get("privlm.step"), "promoted": tags.get("promotion.when"),
                     "promotion_reason": tags.get("promotion.reason")})
    return rows


@model_app.command("show")
def show(name: str, as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Versions of NAME with aliases, eval metrics, lineage and promotion record."""
    from rich.console import Console
    from rich.table import Table

    from mlops.registry import RegistryError

    try:
        rows = version_rows(name)
    except RegistryError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    table = Table(title=name)
    for col in ("version", "aliases", "perplexity", "recipe", "parent", "step", "commit", "data", "promoted"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["version"], ", ".join(r["aliases"]) or "-", r["eval"].get("eval_perplexity", "-"),
                      r["recipe"] or "-", r["parent"] or "-", r["step"] or "-", (r["commit"] or "-")[:10],
                      (r["data"] or "-")[:12], r["promoted"] or "-")
    Console().print(table)


@model_app.command("sync")
def sync_cmd(run_dir: Path) -> None:
    """Deliver the MLflow records a run buffered while the tracking server was unreachable."""
    from mlops.tracking import sync

    left = sync(run_dir)
    if left:
        _fail(RuntimeError(f"{left} records still pending: the tracking server does not answer"))
    typer.echo(f"{run_dir}: every record delivered")


# --- `privlm monitor drift|loop` (registered on the monitor app) ------------------------------------
def drift_cmd(name: str,
              version: str = typer.Option(None, help="version to check (default: the champion)"),
              prometheus: str = typer.Option("http://127.0.0.1:9090", envvar="PRIVLM_PROMETHEUS_URL"),
              alertmanager: str = typer.Option(None, envvar="PRIVLM_ALERTMANAGER_URL",
                                               help="post a PrivlmOutputDrift alert here when drifted"),
              window: str = typer.Option(None, help="recent window, e.g. 30m (default: the recipe's)"),
              threshold: float = typer.Option(None, help="KL threshold (default: the recipe's, 0.15)"),
              capture_reference: bool = typer.Option(False, "--capture-reference",
                                                     help="make the last reference_window the reference"),
              as_json: bool = typer.Option(False, "--json")) -> None:
    """KL divergence of the served version's recent outputs against its reference; exit 4 when drifted."""
    from rich.console import Console
    from rich.table import Table

    from mlops.drift import alert, measure
    from mlops.monitor import Prometheus
    from mlops.promote import drift_policy_for
    from mlops.registry import RegistryError, alias_version, get_version

    try:
        mv = get_version(name, version) if version else alias_version(name, "champion")
        policy = drift_policy_for(mv).model_copy(update={k: v for k, v in
                                                         {"window": window, "threshold": threshold}.items() if v})
        report = measure(Prometheus(prometheus), mv, policy, capture_reference)
        if report.drifted and alertmanager:
            alert(alertmanager, report)
    except (RegistryError, ConnectionError, ValueError) as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=1))
    else:
        table = Table(title=f"{report.version}: output drift, last {report.window} vs reference")
        table.add_column("measure")
        table.add_column("KL", justify="right")
        for measure_name, value in report.divergences.items():
            table.add_row(measure_name, f"{value:.4f}")
        console = Console()
        console.print(table)
        console.print(report.verdict)
    if report.drifted:
        raise typer.Exit(4)


def loop_cmd(name: str,
             recipe: Path = typer.Option(..., help="the fine-tune recipe to run, e.g. recipes/tiny-cpu-lora.yaml"),
             feedback: str = typer.Option(None, envvar="PRIVLM_FEEDBACK_URL", help="feedback store URL"),
             on_drift: bool = typer.Option(False, help="retrain when `monitor drift` finds drift"),
             every_feedback: int = typer.Option(None, help="retrain after this many new rated answers"),
             every_hours: float = typer.Option(None, help="retrain on this schedule"),
             prometheus: str = typer.Option("http://127.0.0.1:9090", envvar="PRIVLM_PROMETHEUS_URL"),
             min_score: float = typer.Option(0.75, help="answers rated at least this (0-1) become training data"),
             executor: str = typer.Option(None, help="slurm or local (default: slurm where sbatch exists)"),
             set_: list[str] = typer.Option([], "--set", "-s", help="override a recipe field")) -> None:
    """One turn of the loop: promote an A/B winner, or retrain on feedback when a trigger fires."""
    from rich.console import Console

    from mlops.feedback import FeedbackError, FeedbackStore, default_url
    from mlops.loop import Trigger, due, export_feedback, last_retrain, retrain
    from mlops.promote import PromotionRefused, promote_champion
    from mlops.registry import RegistryError, alias_version
    from mlops.tracking import client

    console = Console()
    url = feedback or default_url()
    if not (on_drift or every_feedback or every_hours):
        _fail(ValueError("give a trigger: --on-drift, --every-feedback N or --every-hours H"))
    try:
        store = FeedbackStore(url)
        try:
            alias_version(name, "challenger")
            d = promote_champion(name, reason="A/B winner (privlm monitor loop)", feedback_url=url)
            console.print(f"{name}: champion -> v{d.version}: {d.reason}")
            return
        except PromotionRefused as exc:
            console.print(f"{name}: challenger stays: {exc}")
        drifted = False
        if on_drift:
            from mlops.drift import measure
            from mlops.monitor import Prometheus
            from mlops.promote import drift_policy_for

            champion = alias_version(name, "champion")
            drifted = measure(Prometheus(prometheus), champion, drift_policy_for(champion)).drifted
        since = last_retrain(client(), name)
        why = due(Trigger(on_drift, every_feedback, every_hours * 3600 if every_hours else None), store, name,
                  since, drifted)
        if why is None:
            console.print(f"{name}: no retraining due")
            return
        out = Path("runs") / "feedback" / f"{name}-{int(time.time())}.jsonl"
        exported = export_feedback(store, name, out, min_score, since)
        console.print(f"{name}: retraining ({why}); {exported.kept} of {exported.considered} rated answers "
                      f"exported to {out} ({exported.duplicates} duplicates, redactions {exported.redactions})")
        if exported.kept == 0:
            _fail(RegistryError(f"no answer rated >= {min_score} to train on"))
        result = retrain(name, recipe, out, set_, executor, console)
    except (RegistryError, FeedbackError, ConnectionError, ValueError) as exc:
        _fail(exc)
    console.print(f"{name}: v{result['version']} {'is the challenger' if result['challenger'] else 'failed the gate'}"
                  f": {result['gate']}")
