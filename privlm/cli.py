"""The `privlm` command: assembles each station's typer sub-app; nothing else.

Station modules import their heavy dependencies (torch, ray, pulumi_aws) inside commands, so
`privlm --help` stays fast and `pip install "privlm[cost]"` is enough for `privlm cost` and `privlm plan`;
a command whose extra is not installed stops with the `pip install` that fixes it (`main`).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import sys
from pathlib import Path

import typer

from cost.cli import cost_app, plan_command
from infra.cli import cluster_app, infra_app
from jobs.cli import data_app, jobs_app, train_app
from mlops.cli import model_app
from mlops.monitor import monitor_app
from serving.cli import serve_app

app = typer.Typer(
    help="privlm: data -> DeepSpeed training on Slurm -> MLflow registry -> Ray Serve, with its cost.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
# the top-level module a command imports -> the extra that installs it
EXTRA_OF_MODULE = {
    **dict.fromkeys(("torch", "deepspeed", "transformers", "peft", "tokenizers", "safetensors", "datasketch", "lingua",
                     "opencc", "jsonschema", "numpy", "pyarrow", "submitit", "psutil", "mlflow", "torchao", "pynvml",
                     "scipy", "sqlalchemy"),
                    "train"),
    **dict.fromkeys(("ray", "vllm", "fastapi", "starlette", "uvicorn", "prometheus_client", "jwt", "httpx"), "serve"),
    **dict.fromkeys(("pulumi", "pulumi_aws", "pulumi_command", "pulumi_policy"), "infra"),
    **dict.fromkeys(("ansible", "ansible_runner", "jinja2"), "cluster"),
    **dict.fromkeys(("matplotlib", "boto3", "botocore"), "cost"),
}


def version() -> str:
    """The installed distribution's version (package metadata), else the source tree's."""
    try:
        return md.version("privlm")
    except md.PackageNotFoundError:
        from privlm import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"privlm {version()}")
        raise typer.Exit(0)


@app.callback()
def common(
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                                            help="MLflow tracking server (default: the sqlite store ./mlflow)"),
    cluster: Path | None = typer.Option(None, "--cluster", envvar="PRIVLM_CLUSTER",
                                        help="slurm.conf of the Slurm cluster to use (sets SLURM_CONF)"),
    _version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                  help="print the version and exit"),
) -> None:
    """Options that every command shares; each can be set once in the environment instead."""
    if tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    if cluster is not None:
        if not cluster.is_file():
            typer.secho(f"--cluster (PRIVLM_CLUSTER) {str(cluster)!r}: no such file; give the cluster's slurm.conf, "
                        "e.g. /etc/slurm/slurm.conf", fg="red", err=True)
            raise typer.Exit(2)
        os.environ["SLURM_CONF"] = str(cluster.resolve())


app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")
app.add_typer(jobs_app, name="jobs")
app.add_typer(cluster_app, name="cluster")
app.add_typer(infra_app, name="infra")
app.add_typer(model_app, name="model")
app.add_typer(serve_app, name="serve")
app.add_typer(monitor_app, name="monitor")
app.add_typer(cost_app, name="cost")
app.command("plan")(plan_command)


@app.command("demo")
def demo(steps: int | None = typer.Option(None, help="override the pretraining steps (default: the recipe's)"),
         keep_serving: bool = typer.Option(False, help="leave the endpoint running at the end"),
         port: int = typer.Option(8000, help="HTTP port of the endpoint on 127.0.0.1")) -> None:
    """Run the whole path on this machine: data, pretrain, LoRA fine-tune, register, promote, serve."""
    from privlm.demo import run_demo

    sys.exit(run_demo(pretrain_steps=steps, keep_serving=keep_serving, port=port))


@app.command("doctor")
def doctor(as_json: bool = typer.Option(False, "--json", help="one JSON object: ok, blocking, findings")) -> None:
    """Check this machine for each station: what is missing, and the fix. Exit 0 when the demo can run."""
    from privlm.doctor import run_doctor

    sys.exit(run_doctor(as_json))


def missing_extra_message(exc: ModuleNotFoundError) -> str | None:
    """The fix for a command whose optional dependency is not installed; None for any other missing module."""
    top = (exc.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(top)
    if extra is None:
        return None
    return (f"this command needs {top}, which is not installed: pip install \"privlm[{extra}]\" "
            "(or \"privlm[all]\" for every station)")


def main() -> None:
    """Console-script entry point: a missing optional dependency ends with its fix, exit code 5."""
    try:
        app()
    except ModuleNotFoundError as exc:
        message = missing_extra_message(exc)
        if message is None:
            raise
        typer.secho(message, fg="red", err=True)
        sys.exit(5)


if __name__ == "__main__":
    main()
