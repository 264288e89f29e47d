"""Test helpers: the SMALL recipe, recipe writing, running the real CLI, reading metrics."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import yaml

REPO = Path(__file__).resolve().parents[1]
PRIVLM = [sys.executable, "-m", "privlm.cli"]
LOCAL_TRACKING_DIR = Path(tempfile.gettempdir()) / f"privlm-tests-{os.getpid()}"

# A model small enough that a 2-rank DeepSpeed step takes milliseconds on 2 cores.
SMALL = {
    "name": "small",
    "model": {"architecture": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
              "intermediate_size": 128, "max_position_embeddings": 128},
    "tokenizer": {"vocab_size": 1024},
    "data": {
        "sources": [{"path": "{stdlib}", "include": ["*.py"], "exclude": ["test/*", "*/tests/*", "idlelib/*"],
                     "max_files": 120}],
        "num_shards": 2, "workers": 2, "eval_fraction": 0.05,
        "filters": {"min_chars": 200, "min_words": 20, "max_symbol_ratio": 0.5, "min_alpha_word_fraction": 0.3,
                    "max_top_ngram_fraction": 0.5},
    },
    "training": {"sequence_length": 64, "micro_batch_size": 4, "global_batch_size": 16, "processes_per_node": 2,
                 "learning_rate": 1e-2, "min_learning_rate": 1e-3, "warmup_steps": 2, "max_steps": 12,
                 "log_every": 1, "seed": 7},
    "deepspeed": {"zero_stage": 1},
    "checkpoint": {"interval": 4, "keep": 2},
}


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge two recipe mappings (extra wins)."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def write_recipe(path: Path, data: dict[str, Any]) -> Path:
    """Write a recipe mapping as YAML and return its path."""
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_env() -> dict[str, str]:
    """Environment for child processes: the repo on the path, shared op cache."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    env.pop("PRIVLM_FAULT", None)
    LOCAL_TRACKING_DIR.mkdir(exist_ok=True)  # never the repo's own ./mlflow store
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{LOCAL_TRACKING_DIR}/mlflow.db")
    return env


def privlm(*args: str, env: dict[str, str] | None = None, timeout: float = 600,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real `privlm` CLI in a subprocess from the repo root."""
    proc = subprocess.run([*PRIVLM, *args], cwd=REPO, env=env or run_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"privlm {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def read_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl; after a resume the later record of a step wins."""
    losses: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            losses[rec["step"]] = rec["loss"]
    return losses


def read_samples(run: Path) -> dict[int, list[int]]:
    """step -> sorted block ids trained at that step over all data-parallel ranks, from the latest launch
    that trained it (tensor/pipeline peers of a data rank record the same ids); training.record_samples."""
    by_step: dict[int, dict[float, dict[int, list[int]]]] = {}
    for f in sorted((run / "samples").glob("rank-*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            by_step.setdefault(rec["step"], {}).setdefault(rec["attempt"], {})[rec["data_rank"]] = rec["ids"]
    return {s: sorted(i for ids in attempts[max(attempts)].values() for i in ids) for s, attempts in by_step.items()}


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Block until the run has logged `step` (the process must stay alive meanwhile)."""
    deadline = time.monotonic() + timeout
    metrics = run / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and max(read_losses(run) or {0: 0}) >= step:
            return
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else proc.returncode
        time.sleep(0.02)
    raise TimeoutError(f"step {step} not reached")


def start_run(recipe: Path) -> subprocess.Popen:
    """`privlm train run RECIPE` in the background, in its own session (so a test can kill the whole job)."""
    return subprocess.Popen([*PRIVLM, "train", "run", str(recipe)], cwd=REPO, env=run_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


class FakeIMDS(BaseHTTPRequestHandler):
    notices: ClassVar[dict[str, dict]] = {}
    token = "tok-123"

    def do_PUT(self) -> None:
        ok = self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
        self._send(200 if ok else 400, self.token if ok else "")

    def do_GET(self) -> None:
        if self.headers.get("X-aws-ec2-metadata-token") != self.token:
            return self._send(401, "")
        path = self.path.removeprefix("/latest/meta-data/")
        if path in self.notices:
            return self._send(200, json.dumps(self.notices[path]))
        return self._send(404, "")

    def _send(self, code: int, body: str) -> None:
        self.send_response(code)
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def fake_imds() -> Iterator[str]:
    """An EC2 instance metadata service (IMDSv2) on loopback; set FakeIMDS.notices to serve notices."""
    FakeIMDS.notices = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeIMDS)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
