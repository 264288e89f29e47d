"""The `privlm` command: assembles each station's typer sub-app; nothing else.

Station modules import their heavy dependencies (torch, ray, pulumi_aws) inside commands, so
`privlm --help` stays fast.
"""

from __future__ import annotations

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
    import sys

    from privlm.demo import run_demo

    sys.exit(run_demo(pretrain_steps=steps, keep_serving=keep_serving, port=port))


@app.command("doctor")
def doctor() -> None:
    """Check this machine for each station: what is missing, and the fix. Exit 0 when the demo can run."""
    import sys

    from privlm.doctor import run_doctor

    sys.exit(run_doctor())


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
