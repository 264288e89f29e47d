"""MLflow tracking that never blocks or loses data: records go to a disk outbox, a thread delivers them.

Event sequence it handles:
1. Server up: each record is appended to `<run>/tracking/outbox.jsonl` and delivered within a second.
2. Server unreachable (at start or mid-run): training goes on; records accumulate in the outbox; the
   delivery thread retries with backoff and sends everything, in order, once the server answers.
3. Training killed: the outbox and the delivered offset are on disk; the resumed run continues the
   same MLflow run and delivers what was left. `privlm model sync RUN_DIR` delivers without training.
Checkpoints are logged as pointers (path, bytes, checksum of the meta file), never uploaded.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import threading
import time
from pathlib import Path
from typing import Any

from jobs.recipe import Recipe

MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, or a local sqlite store under the working directory (no server needed)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow' / 'mlflow.db'}"


def configure_client_env() -> None:
    """Fail fast instead of MLflow's minutes of HTTP retries; no telemetry; no store-migration chatter."""
    import logging

    for name in ("mlflow.store", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("mlflow.transformers").setLevel(logging.ERROR)  # hub model-card and license lookups
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # model cards and licenses are never fetched from a hub


def client(uri: str | None = None) -> Any:
    """An MlflowClient for the tracking URI (and the registry behind it)."""
    configure_client_env()
    from mlflow.tracking import MlflowClient

    uri = uri or tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(mlflow_client: Any, name: str) -> str:
    """Get or create an experiment; local stores keep artifacts beside the database."""
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    uri = mlflow_client.tracking_uri
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
    try:
        return mlflow_client.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another process
        return mlflow_client.get_experiment_by_name(name).experiment_id


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"a": {"b": 1}}` -> `{"a.b": "1"}`: the whole recipe as MLflow params."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return out


class Outbox:
    """An append-only JSONL queue on disk with a background thread that delivers it to MLflow."""

    def __init__(self, directory: Path, uri: str, experiment: str, run_name: str, interval_s: float = 1.0) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "outbox.jsonl"
        self.state_path = directory / "state.json"
        self.uri, self.experiment, self.run_name = uri, experiment, run_name
        self.interval_s = interval_s
        self.last_error: str | None = None
        self._fh = open(self.path, "a", buffering=1)  # noqa: SIM115 - kept open for the run
        self._write_lock = threading.Lock()
        self._deliver_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._client: Any = None
        self._thread = threading.Thread(target=self._loop, name="mlflow-outbox", daemon=True)
        self._thread.start()

    # --- producer side ----------------------------------------------------------------------
    def put(self, kind: str, **fields: Any) -> None:
        """Append one record durably (flushed to the OS) and wake the delivery thread."""
        with self._write_lock:
            self._fh.write(json.dumps({"kind": kind, "time_ms": int(time.time() * 1000), **fields}) + "\n")
            self._fh.flush()
        self._wake.set()

    def close(self, timeout_s: float = 30.0) -> bool:
        """Stop the thread after a last delivery attempt; True when everything was delivered."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)
        with self._write_lock:
            self._fh.close()
        return self.pending() == 0

    # --- delivery side ------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        if self.state_path.is_file():
            return json.loads(self.state_path.read_text())
        return {"run_id": None, "offset": 0}

    def _save_state(self, state: dict[str, Any]) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_path)

    def pending(self) -> int:
        """Records written but not yet delivered."""
        offset = self.state()["offset"]
        with open(self.path, "rb") as fh:
            fh.seek(offset)
            return fh.read().count(b"\n")

    def _loop(self) -> None:
        backoff = self.interval_s
        while True:
            self._wake.wait(backoff)
            self._wake.clear()
            ok = self.deliver()
            if self._stop.is_set():
                return
            backoff = self.interval_s if ok else min(backoff * 2, 15.0)

    def deliver(self) -> bool:
        """Send everything pending, in order; False (and keep it) when the server does not answer."""
        with self._deliver_lock:
            try:
                self._deliver_pending()
                self.last_error = None
                return True
            except Exception as exc:  # network errors, 5xx: the records stay in the outbox
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                return False

    def _deliver_pending(self) -> None:
        state = self.state()
        if self._client is None:
            self._client = client(self.uri)
        if state["run_id"] is None:
            exp = experiment_id(self._client, self.experiment)
            state["run_id"] = self._client.create_run(exp, run_name=self.run_name).info.run_id
            self._save_state(state)
        with open(self.path, "rb") as fh:
            fh.seek(state["offset"])
            data = fh.read()
        end = data.rfind(b"\n") + 1  # a line still being written is left for next time
        lines = data[:end].splitlines(keepends=True)
        i = 0
        while i < len(lines):
            batch, size = self._take_batch(lines, i)
            self._send(state["run_id"], batch)
            i += len(batch)
            state["offset"] += size
            self._save_state(state)

    @staticmethod
    def _take_batch(lines: list[bytes], start: int) -> tuple[list[dict[str, Any]], int]:
        """Consecutive records that fit in one log_batch call (a status change goes alone)."""
        batch, size, counts = [], 0, {"metrics": 0, "params": 0, "tags": 0}
        for line in lines[start:]:
            rec = json.loads(line)
            kind = rec["kind"]
            if kind == "status":
                if batch:
                    break
                return [rec], len(line)
            n = len(rec["data"])
            limit = {"metrics": MAX_METRICS, "params": MAX_PARAMS, "tags": MAX_TAGS}[kind]
            if batch and counts[kind] + n > limit:
                break
            batch.append(rec)
            counts[kind] += n
            size += len(line)
        return batch, size

    def _send(self, run_id: str, batch: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        if batch[0]["kind"] == "status":
            self._client.update_run(run_id, status=batch[0]["status"])
            return
        metrics = [Metric(k, float(v), r["time_ms"], r["step"]) for r in batch if r["kind"] == "metrics"
                   for k, v in r["data"].items()]
        params = [Param(k, v[:6000]) for r in batch if r["kind"] == "params" for k, v in r["data"].items()]
        tags = [RunTag(k, v[:5000]) for r in batch if r["kind"] == "tags" for k, v in r["data"].items()]
        for chunk in range(0, max(len(params), 1), MAX_PARAMS):  # params from several records may exceed 100
            self._client.log_batch(run_id, metrics=metrics if chunk == 0 else [],
                                   params=params[chunk:chunk + MAX_PARAMS], tags=tags if chunk == 0 else [])


class RunTracker:
    """What the training loop tells MLflow: recipe, system, metrics, checkpoint pointers, outcome."""

    def __init__(self, recipe: Recipe, uri: str | None = None) -> None:
        self.recipe = recipe
        from jobs.run_dir import RunDir

        self.outbox = Outbox(RunDir.of(recipe).tracking_dir, uri or tracking_uri(), recipe.registry.experiment,
                             run_name=recipe.name)

    def start(self, resumed_step: int | None, extra_tags: dict[str, str]) -> None:
        self.outbox.put("params", data=flatten(self.recipe.model_dump(mode="json")))
        self.outbox.put("tags", data={**system_tags(), **extra_tags, "privlm.recipe": self.recipe.name,
                                      "privlm.recipe_fingerprint": self.recipe.fingerprint(),
                                      "privlm.run_dir": str(self.recipe.run_path.resolve())})
        self.outbox.put("status", status="RUNNING")
        if resumed_step is not None:
            self.outbox.put("tags", data={"privlm.resumed_from_step": str(resumed_step)})

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.outbox.put("metrics", step=step, data={k: v for k, v in values.items() if isinstance(v, int | float)})

    def checkpoint(self, step: int, path: Path, size: int) -> None:
        """A pointer, not a copy: large checkpoints never go through the tracking server."""
        meta = path / "meta.json"
        pointer = {"step": step, "path": str(path.resolve()), "bytes": size,
                   "meta_sha256": _sha256(meta) if meta.is_file() else None}
        self.outbox.put("tags", data={"privlm.checkpoint.latest": json.dumps(pointer),
                                      f"privlm.checkpoint.{path.name}": json.dumps(pointer)})

    def finish(self, status: str, summary: dict[str, Any], timeout_s: float = 30.0) -> bool:
        """Record the outcome and flush; False when the server is still unreachable (the outbox keeps it)."""
        values = {k: v for k, v in summary.items() if isinstance(v, int | float) and v is not None}
        self.outbox.put("metrics", step=int(summary.get("step", 0)), data=values)
        self.outbox.put("status", status=status)
        return self.outbox.close(timeout_s)

    @property
    def run_id(self) -> str | None:
        return self.outbox.state()["run_id"]


def system_tags() -> dict[str, str]:
    """Host, Python and library versions."""
    import torch

    tags = {"privlm.host": socket.gethostname(), "privlm.python": platform.python_version(),
            "privlm.torch": torch.__version__, "privlm.cpus": str(os.cpu_count())}
    try:
        import deepspeed

        tags["privlm.deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        tags["privlm.gpu"] = torch.cuda.get_device_name()
    return tags


def _sha256(path: Path) -> str:
    from jobs.train.checkpoint import sha256_file

    return sha256_file(path)


def sync(run_dir: Path, uri: str | None = None, timeout_s: float = 30.0) -> int:
    """Deliver what a run's outbox still holds; return how many records remain."""
    from jobs.run_dir import RunDir

    state_dir = RunDir.at(run_dir).tracking_dir
    if not (state_dir / "outbox.jsonl").is_file():
        raise FileNotFoundError(f"{run_dir} has no tracking outbox (was it trained with registry.tracking on?)")
    outbox = Outbox(state_dir, uri or tracking_uri(), experiment="privlm", run_name=run_dir.name)
    deadline = time.monotonic() + timeout_s
    while outbox.pending() and time.monotonic() < deadline and not outbox.deliver():
        time.sleep(1.0)
    outbox.close(timeout_s=1.0)
    return outbox.pending()
