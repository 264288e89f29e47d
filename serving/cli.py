"""`privlm serve up|status|down`: run the endpoint on a Ray cluster and follow the champion alias."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import typer
import yaml

serve_app = typer.Typer(help="Ray Serve + vLLM: an authenticated OpenAI-compatible endpoint following the champion.",
                        no_args_is_help=True)

CONFIG = Path(__file__).parent / "config" / "privlm-serve.yaml"
STATE = Path("runs/serving/ray-started-by-privlm")


def load_settings(config: Path | None, overrides: dict[str, Any]) -> Any:
    """Settings from a Serve config file's application args, with command-line overrides."""
    from serving.deploy import APP_NAME
    from serving.settings import ServeSettings

    args: dict[str, Any] = {}
    if config is not None:
        doc = yaml.safe_load(config.read_text()) or {}
        apps = [a for a in doc.get("applications", []) if a.get("name") == APP_NAME]
        if not apps:
            raise typer.BadParameter(f"{config} has no application named {APP_NAME!r}")
        args = apps[0].get("args", {})
    return ServeSettings.model_validate({**args, **{k: v for k, v in overrides.items() if v is not None}})


def add_api_key(env: str, key: str) -> None:
    """Add KEY to the comma-separated keys in $ENV, which `prepare` folds into the gateway's hashes."""
    keys = [k.strip() for k in os.environ.get(env, "").split(",") if k.strip()]
    os.environ[env] = ",".join([*keys, key.strip()] if key.strip() not in keys else keys)


def ray_cli() -> str:
    """The `ray` executable of this Python environment (works without an activated venv)."""
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.is_file() else (shutil.which("ray") or "ray")


def connect(num_cpus: int | None = None) -> None:
    """Join the running Ray cluster, or start a local head node that outlives this command.

    Ray's token authentication is on unless RAY_AUTH_MODE says otherwise: the token is made once
    (~/.ray/auth_token) and every process of this user uses it.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    try:
        ray.init(address="auto", include_dashboard=False, logging_level="ERROR")
        return
    except ConnectionError:
        pass
    if os.environ["RAY_AUTH_MODE"] == "token":
        subprocess.run([ray_cli(), "get-auth-token", "--generate"], check=True, capture_output=True)
    cmd = [ray_cli(), "start", "--head", "--include-dashboard=false", "--disable-usage-stats",
           f"--num-cpus={num_cpus or max(8, os.cpu_count() or 1)}"]  # logical CPUs: gateway + engines
    subprocess.run(cmd, check=True, capture_output=True)
    STATE.parent.mkdir(parents=True, exist_ok=True)
    STATE.write_text(str(time.time()))
    ray.init(address="auto", include_dashboard=False, logging_level="ERROR")


def follow_champion(settings: Any, current: str, interval_s: float, rounds: int | None = None) -> None:
    """Poll the alias; when it moves, warm the new version's engine, then move the gateway to it."""
    from serving.deploy import roll_to
    from serving.engine import pin

    done = 0
    while rounds is None or done < rounds:
        time.sleep(interval_s)
        done += 1
        pinned = pin(settings.model_uri, settings.tracking_uri)
        label = pinned.removeprefix("models:/").replace("/", "/v", 1)
        if label != current:
            typer.echo(f"champion moved: {current} -> {label}; rolling out")
            current = roll_to(settings, pinned)
            typer.echo(f"now serving {current}")


@serve_app.command("up")
def up(model_uri: str = typer.Argument(None, help="models:/NAME@champion (default) or a model directory"),
       config: Path = typer.Option(CONFIG, help="a Serve config file whose privlm application args to use"),
       port: int = typer.Option(None, help="HTTP port (default from the config: 8000)"),
       quantization: str = typer.Option(None, help="serve the version quantized with this scheme (w8a8 ...)"),
       watch: bool = typer.Option(False, help="keep running and roll out each new champion"),
       interval: float = typer.Option(10.0, help="seconds between alias checks with --watch"),
       api_key: str = typer.Option(None, "--api-key", envvar="PRIVLM_API_KEY",
                                   help="a key the gateway accepts, besides those in auth.api_keys_env "
                                        "(PRIVLM_API_KEYS)")) -> None:
    """Serve MODEL_URI on a Ray cluster (a local one is started if none runs)."""
    from pydantic import ValidationError

    from mlops.registry import RegistryError
    from serving.deploy import deploy, serve_start
    from serving.engine import ServingError
    from serving.settings import settings_error

    try:
        settings = load_settings(config, {"model_uri": model_uri, "port": port, "quantization": quantization})
        if api_key:
            add_api_key(settings.auth.api_keys_env, api_key)
        from serving.app import prepare

        settings = prepare(settings)
    except (ValidationError, ServingError, RegistryError) as exc:
        typer.secho(settings_error(exc), fg="red", err=True)
        raise typer.Exit(2) from None
    if settings.auth.mode == "none":
        typer.secho("authentication is OFF (auth.mode: none): anyone who reaches the port may use the model",
                    fg="yellow", err=True)
    connect()
    serve_start(settings)
    try:
        version = deploy(settings)
    except (ServingError, RegistryError) as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(2) from None
    scheme = "https" if settings.tls else "http"
    typer.echo(f"serving {version} at {scheme}://{settings.host}:{settings.port}/v1 (model name "
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
    os.environ.setdefault("RAY_AUTH_MODE", "token")
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

    from serving.deploy import APP_NAME, ENGINE_PREFIX

    for name in list(serve.status().applications):
        if name == APP_NAME or name.startswith(ENGINE_PREFIX):
            serve.delete(name)
    if STATE.exists():
        import ray

        ray.shutdown()
        subprocess.run([ray_cli(), "stop"], capture_output=True)
        STATE.unlink()
    typer.echo("endpoint stopped")
