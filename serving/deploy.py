"""Deploy and roll the endpoint on a running Ray: each base model's vLLM engine in a Serve application
of its own, and the gateway application in front of them.

Serve restarts every deployment of an application whose arguments change, and a vLLM engine takes a
minute or more to start. Engines in applications of their own survive a gateway change, so a rollout
is: start the new champion's engine (if it is not already warm, e.g. as the challenger), move the
gateway to it (Serve starts the new gateway replica before it stops the old one), then remove the
engines nothing routes to. No request fails on the way (tested).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from serving.engine import EngineDeployment, group, llm_deployment
from serving.settings import ServeSettings

APP_NAME = "privlm"
ENGINE_PREFIX = "privlm-engine-"


def engine_app_name(dep: EngineDeployment, settings: ServeSettings) -> str:
    """Named by base model and a digest of what shapes the engine, so a changed engine is a new app."""
    shape = json.dumps([dep.base.base_dir, sorted(dep.adapters.items()), settings.engine.model_dump(),
                        settings.num_replicas, settings.min_replicas, settings.max_replicas,
                        settings.max_ongoing_requests, settings.max_queued_requests], sort_keys=True, default=str)
    return f"{ENGINE_PREFIX}{dep.base.deployment}-{hashlib.sha256(shape.encode()).hexdigest()[:8]}"


def running_apps() -> set[str]:
    from ray import serve

    return {name for name, app in serve.status().applications.items() if str(app.status).endswith("RUNNING")}


def deploy(settings: ServeSettings, warm: tuple[str, ...] = (), app_name: str = APP_NAME,
           keep_unused: bool = False) -> str:
    """Deploy (or roll) the endpoint; return the champion version it now serves."""
    from ray import serve

    from serving.app import gateway, plan, prepare

    settings = prepare(settings)
    routes, everything = plan(settings, warm)
    deployments = group(everything, settings.engine)
    running = running_apps()
    engines: dict[str, tuple[str, str]] = {}
    for name, dep in deployments.items():
        app = engine_app_name(dep, settings)
        if app not in running:
            serve.run(llm_deployment(dep, settings), name=app, route_prefix=None)
        engines[name] = (name, app)
    serve.run(gateway(settings, routes, engines), name=app_name, route_prefix="/")
    wait_for_gateway(settings)
    if not keep_unused:
        used = {app for _, app in engines.values()}
        for app in running_apps() - used:
            if app.startswith(ENGINE_PREFIX):
                serve.delete(app, _blocking=False)
    return routes["champion"].version


def wait_for_gateway(settings: ServeSettings, timeout_s: float = 60) -> None:
    """Until the old gateway replica has drained: Serve's proxy may route to it for a moment after serve.run."""
    import time

    import httpx

    from serving.app import settings_digest

    want, scheme = settings_digest(settings), "https" if settings.tls else "http"
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    deadline, streak = time.monotonic() + timeout_s, 0
    while streak < 5 and time.monotonic() < deadline:  # five answers in a row from the new settings
        try:  # only a digest is read: the certificate is not checked on this loopback call
            got = httpx.get(f"{scheme}://{host}:{settings.port}/health", verify=False, timeout=5).json()
        except (httpx.HTTPError, ValueError):
            got = {}
        streak = streak + 1 if got.get("settings") == want else 0
        time.sleep(0.1)


def roll_to(settings: ServeSettings, new_champion_uri: str) -> str:
    """Warm the new champion's engine beside the old one, then move the gateway to it."""
    deploy(settings, warm=(new_champion_uri,), keep_unused=True)
    return deploy(settings)


def serve_start(settings: ServeSettings) -> None:
    """Serve's HTTP proxy on the settings' host and port, with TLS when configured."""
    from ray import serve

    options: dict[str, Any] = {"host": settings.host, "port": settings.port}
    if settings.tls:
        options.update(ssl_certfile=settings.tls.certfile, ssl_keyfile=settings.tls.keyfile)
    serve.start(http_options=options)
