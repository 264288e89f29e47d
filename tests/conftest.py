"""Shared fixtures: a small real corpus prepared by the real pipeline, and recipe writers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import LOCAL_TRACKING_DIR, SMALL, merge, write_recipe


@pytest.fixture(scope="session", autouse=True)
def _local_tracking_store() -> Iterator[None]:
    """The sqlite MLflow store that runs without a server write to, removed after the session."""
    yield
    import shutil

    shutil.rmtree(LOCAL_TRACKING_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real prepared dataset (120 stdlib files, 1k-token BPE, 64-token blocks), made once per session."""
    from jobs.data.pipeline import prepare_data
    from jobs.recipe import parse_recipe

    out = tmp_path_factory.mktemp("small-data") / "data"
    recipe = parse_recipe(merge(SMALL, {"data": {"output_dir": str(out)}}))
    prepare_data(recipe)
    return out


@pytest.fixture
def make_recipe(tmp_path: Path, small_data: Path) -> Callable[..., Path]:
    """Write a SMALL-based recipe whose run and checkpoints live under tmp_path."""

    def make(name: str = "small", **sections: Any) -> Path:
        run = tmp_path / name
        data = merge(SMALL, {"name": name, "run_dir": str(run), "data": {"output_dir": str(small_data)},
                             "checkpoint": {"directory": str(run / "checkpoints")}})
        return write_recipe(tmp_path / f"{name}.yaml", merge(data, sections))

    return make


class MlflowServer:
    """A lean real `mlflow server` (sqlite, one worker, no job execution) on 127.0.0.1."""

    def __init__(self, root: Path) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.root = root
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        with open(self.root / "server.log", "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--workers", "1", "--host", "127.0.0.1",
                 "--port", str(self.port), "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                 "--artifacts-destination", str(self.root / "artifacts")],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if urllib.request.urlopen(f"{self.uri}/health", timeout=1).status == 200:
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One real MLflow tracking and registry server for the session, stopped at the end."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def moto_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """moto's server (S3, EC2, ...) on 127.0.0.1 with fake credentials; stopped after the test."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    yield url
    proc.terminate()
    proc.wait(10)
