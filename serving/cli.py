"""`privlm serve up|status|down`: run the endpoint on a Ray cluster and follow the champion alias."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import typer
import yaml

serve_app = typer.Typer(help="Ray Serve: a quantized, OpenAI-compatible endpoint that follows the champion.",
                        no_args_is_help=True)

APP_NAME = "privlm"
CONFIG = Path(__file__).parent / "config" / "privlm-serve.yaml"
STATE = Path("runs/serving/ray-started-by-privlm")


def load_settings(config: Path | None, overrides: dict[str, Any]) -> Any:
    """Settings from a Serve config file's application args, with command-line overrides."""
    from serving.settings import ServeSettings

    args: dict[str, Any] = {}
    if config is not None:
        doc = yaml.safe_load(config.read_text()) or {}
        apps = [a for a in doc.get("applications", []) if a.get("name") == APP_NAME]
        if not apps:
            raise typer.BadParameter(f"{config} has no application named {APP_NAME!r}")
        args = apps[0].get("args", {})
    return ServeSettings.model_validate({**args, **{k: v for k, v in overrides.items() if v is not None}})


def connect(num_cpus: int | None = None) -> None:
    """Join the running Ray cluster, or start a local head node that outlives this command."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    try:
        ray.init(address="auto", include_dashboard=False, logging_level="ERROR")
        return
    except ConnectionError:
        pass
    cmd = ["ray", "start", "--head", "--include-dashboard=false", "--disable-usage-stats"]
    if num_cpus:
        cmd.append(f"--num-cpus={num_cpus}")
    subprocess.run(cmd, check=True, capture_output=True)
    STATE.parent.mkdir(parents=True, exist_ok=True)
    STATE.write_text(str(time.time()))
    ray.init(address="auto", include_dashboard=False, logging_level="ERROR")


def deploy(settings: Any) -> str:
    """Deploy (or roll) the application; return the champion version it serves."""
    from ray import serve

    from serving.app import build_app, resolve_model

    _, version = resolve_model(settings.model_uri, settings.tracking_uri)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_app(settings.model_dump()), name=APP_NAME, route_prefix="/")
    return version


def follow_champion(settings: Any, current: str, interval_s: float, rounds: int | None = None) -> None:
    """Poll the alias; when it moves, roll the deployment to the new version (Serve drains the old one)."""
    from serving.app import resolve_model

    done = 0
    while rounds is None or done < rounds:
        time.sleep(interval_s)
        done += 1
        _, version = resolve_model(settings.model_uri, settings.tracking_uri)
        if version != current:
            typer.echo(f"champion moved: {current} -> {version}; rolling out")
            current = deploy(settings)
            typer.echo(f"now serving {current}")


@serve_app.command("up")
def up(model_uri: str = typer.Argument(None, help="models:/NAME@champion (default) or a model directory"),
       config: Path = typer.Option(CONFIG, help="a Serve config file whose privlm application args to use"),
       port: int = typer.Option(None, help="HTTP port (default from the config: 8000)"),
       quantization: str = typer.Option(None, help="none, int8-dynamic, int8-weight, int4-weight, bf16"),
       watch: bool = typer.Option(False, help="keep running and roll out each new champion"),
       interval: float = typer.Option(10.0, help="seconds between alias checks with --watch")) -> None:
    """Serve MODEL_URI on a Ray cluster (a local one is started if none runs)."""
    from pydantic import ValidationError

    try:
        settings = load_settings(config, {"model_uri": model_uri, "port": port, "quantization": quantization})
    except ValidationError as exc:
        raise typer.BadParameter(str(exc)) from None
    if settings.tracking_uri is None:
        from mlops.tracking import tracking_uri

        settings = settings.model_copy(update={"tracking_uri": tracking_uri()})
    connect()
    version = deploy(settings)
    typer.echo(f"serving {version} at http://{settings.host}:{settings.port}/v1 (model name "
               f"{settings.model_uri.removeprefix('models:/').split('@')[0].split('/')[0]})")
    if watch:
        try:
            follow_champion(settings, version, interval)
        except KeyboardInterrupt:
            typer.echo("stopped watching; the endpoint keeps running (`privlm serve down` stops it)")


@serve_app.command("status")
def status() -> None:
    """Applications, deployments and their replicas."""
    connect_existing()
    from ray import serve

    st = serve.status()
    out = {name: {"status": str(app.status), "deployments": {d: str(s.status) for d, s in app.deployments.items()}}
           for name, app in st.applications.items()}
    typer.echo(json.dumps(out, indent=1))


def connect_existing() -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    try:
        ray.init(address="auto", include_dashboard=False, logging_level="ERROR")
    except ConnectionError:
        typer.secho("no Ray cluster is running here: start one with `privlm serve up`", fg="red", err=True)
        raise typer.Exit(1) from None


@serve_app.command("down")
def down() -> None:
    """Remove the application; stop the local Ray cluster if `privlm serve up` started it."""
    connect_existing()
    from ray import serve

    serve.delete(APP_NAME)
    if STATE.exists():
        import ray

        ray.shutdown()
        subprocess.run(["ray", "stop"], capture_output=True)
        STATE.unlink()
    typer.echo("endpoint stopped")
