"""Serving figures: our endpoint (vLLM behind our gateway) against bare vLLM and the previous endpoint.

Writes benchmarks/results/serve.json (`--quick`: benchmarks/results/serve-quick.json, a smoke run).
Three systems, measured in this run on this machine, one at a time (each stopped before the next
starts), over HTTP on loopback, fp32 on every side:

1. ours: serving/ (our gateway in front of Ray Serve LLM's vLLM deployment), API key auth on;
2. bare vLLM: vLLM's own OpenAI server on the same model directory, same KV cache size and context;
3. previous: the static-batching endpoint (Ray Serve, `@serve.batch` of 8, HF generation) of
   commit 047d668, run from a temporary git worktree of that commit.

Two models with random weights (random weights rarely emit EOS, so generation lengths match across
systems; tokens/s counts the completion tokens each server reports): the demo's architecture
(tiny-cpu, 3.2M params) and a ~100M-parameter Llama. Load: 1, 8 and 32 concurrent clients on
/v1/completions, max_tokens 16 and 128; then, per level, a burst of streaming requests for the
time to the first text chunk (TTFT), each closed once that chunk arrives.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.train import RESULTS, machine  # noqa: E402

PROMPT, KEY = "def main", "sk-bench"
PORTS = {"ours": 18101, "bare_vllm": 18102, "previous": 18103}
PREVIOUS_COMMIT = "047d668"
MAX_MODEL_LEN, KV_CACHE_GIB = 256, 1  # ServeSettings.engine.kv_cache_gib's default; bare vLLM gets the same
PREVIOUS_THREADS = os.cpu_count() or 2  # torch threads of the previous endpoint: every core, as vLLM uses
TARGETS = {"ratio_to_bare_vllm_min": 0.8, "ratio_to_previous_at_32_min": 1.5, "p99_at_32_demo_16_max_s": 1.0}
LARGE = {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 2048, "vocab_size": 8192,
         "max_position_embeddings": 512, "tie_word_embeddings": False}

# Runs inside the previous commit's worktree (cwd and PYTHONPATH there), so its `serving` is imported.
PREVIOUS_RUNNER = r"""
import json, os, signal, sys, time
import ray
from ray import serve
from serving.app import build_app

args, port = json.loads(sys.argv[1]), int(sys.argv[2])
ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
serve.start(http_options={"host": "127.0.0.1", "port": port})
serve.run(build_app(args), name="privlm", route_prefix="/")
print("READY", flush=True)

def stop(*_):
    serve.shutdown()
    ray.shutdown()
    os._exit(0)

signal.signal(signal.SIGTERM, stop)
while True:
    time.sleep(1)
"""


# --- models -----------------------------------------------------------------------------------
def tiny_model(tmp: Path) -> Path:
    """The demo's architecture with a byte-level tokenizer, random weights (speed does not need training)."""
    from jobs.data.tokenizer import train_tokenizer
    from jobs.recipe import load_recipe
    from jobs.train.model import build_model

    recipe = load_recipe(REPO / "recipes" / "tiny-cpu.yaml")
    out = tmp / "tiny" / "model"
    texts = (p.read_text(errors="replace") for p in sorted(Path(os.__file__).parent.glob("*.py"))[:60])
    tok = train_tokenizer(texts, recipe.tokenizer.vocab_size, 2, out)
    build_model(recipe.model, 0, tok.eos_token_id).save_pretrained(out)
    return out


def large_model(tmp: Path, tokenizer_dir: Path) -> Path:
    """A ~100M-parameter Llama, random weights, with the demo's trained tokenizer (8192 tokens) beside it."""
    from transformers import AutoTokenizer

    from jobs.recipe import ModelConfig
    from jobs.train.model import build_model

    out = tmp / "llama100m" / "model"
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.save_pretrained(out)
    build_model(ModelConfig(**LARGE), 0, tok.eos_token_id).save_pretrained(out)
    return out


def params(model_dir: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for f in model_dir.glob("*.safetensors") for t in load_file(f).values())


# --- servers: each a context manager yielding (base URL, model name), stopped on exit ---------------
def _wait_healthy(url: str, proc: subprocess.Popen | None, log: Path, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was healthy; last log lines:\n"
                               + "\n".join(log.read_text(errors="replace").splitlines()[-30:]))
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        time.sleep(1)
    raise RuntimeError(f"{url}/health not ready after {timeout:.0f} s; see {log}")


def _stop(proc: subprocess.Popen) -> None:
    """Terminate the server's whole process group; kill what is left after 60 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def ours(model_dir: Path, tmp: Path) -> Iterator[tuple[str, str]]:
    import ray
    from ray import serve

    from serving.deploy import deploy, serve_start
    from serving.engine import served_name
    from serving.settings import ServeSettings

    os.environ["PRIVLM_API_KEYS"] = KEY
    settings = ServeSettings.model_validate({
        "model_uri": str(model_dir), "port": PORTS["ours"], "cache_size": 0, "audit_log": None,
        "max_ongoing_requests": 64, "max_queued_requests": 1000, "limits": {"max_tokens": 128},
        "engine": {"max_model_len": MAX_MODEL_LEN, "kv_cache_gib": KV_CACHE_GIB}})
    ray.init(num_cpus=8, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        serve_start(settings)
        deploy(settings)
        yield f"http://127.0.0.1:{PORTS['ours']}", served_name(str(model_dir))
    finally:
        serve.shutdown()
        ray.shutdown()


@contextlib.contextmanager
def bare_vllm(model_dir: Path, tmp: Path) -> Iterator[tuple[str, str]]:
    url, log = f"http://127.0.0.1:{PORTS['bare_vllm']}", tmp / f"vllm-{model_dir.parent.name}.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--api-key", KEY,
           "--host", "127.0.0.1", "--port", str(PORTS["bare_vllm"])]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB)}
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_healthy(url, proc, log)
        yield url, str(model_dir)
    finally:
        _stop(proc)


@contextlib.contextmanager
def previous(model_dir: Path, tmp: Path, worktree: Path) -> Iterator[tuple[str, str]]:
    url, log = f"http://127.0.0.1:{PORTS['previous']}", tmp / f"previous-{model_dir.parent.name}.log"
    args = {"model_uri": str(model_dir), "quantization": "none", "max_batch_size": 8, "torch_threads": PREVIOUS_THREADS,
            "max_ongoing_requests": 64, "max_queued_requests": 1000, "cache_size": 0, "audit_log": None,
            "limits": {"max_tokens": 128}}
    env = {**os.environ, "PYTHONPATH": str(worktree), "PRIVLM_API_KEYS": KEY}
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-c", PREVIOUS_RUNNER, json.dumps(args), str(PORTS["previous"])],
                                cwd=worktree, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(url, proc, log)
        yield url, model_dir.parent.name
    finally:
        _stop(proc)


@contextlib.contextmanager
def previous_worktree(tmp: Path) -> Iterator[Path]:
    path = Path(tempfile.gettempdir()) / "privlm-prev"
    if path.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], check=False)
        shutil.rmtree(path, ignore_errors=True)
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), PREVIOUS_COMMIT],
                   check=True, capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], check=False)


# --- load ---------------------------------------------------------------------------------------
def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _throughput(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict[str, Any]:
    import httpx

    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 1.0}
    latencies, tokens, errors, todo = [], [], [], iter(range(requests))
    async with httpx.AsyncClient(timeout=600, headers={"Authorization": f"Bearer {KEY}"},
                                 limits=httpx.Limits(max_connections=clients + 4)) as client:
        async def worker() -> None:
            for _ in todo:
                t0 = time.perf_counter()
                try:
                    r = await client.post(f"{url}/v1/completions", json=body)
                except httpx.HTTPError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:500]}")
                    continue
                latencies.append(time.perf_counter() - t0)
                tokens.append(r.json()["usage"]["completion_tokens"])

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    out: dict[str, Any] = {"requests": requests, "ok": len(latencies), "wall_s": wall,
                           "requests_per_s": len(latencies) / wall, "tokens_per_s": sum(tokens) / wall,
                           "mean_completion_tokens": statistics.fmean(tokens) if tokens else 0.0,
                           "p50_s": statistics.median(latencies) if latencies else None,
                           "p99_s": _pct(latencies, 0.99) if latencies else None}
    if errors:
        out["errors"], out["first_error"] = len(errors), errors[0]
    return out


async def _ttft(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict[str, Any]:
    """`requests` streaming requests, `clients` at a time; each closed at its first chunk with text."""
    import httpx

    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 1.0, "stream": True}
    firsts, errors, todo = [], [], iter(range(requests))
    async with httpx.AsyncClient(timeout=600, headers={"Authorization": f"Bearer {KEY}"},
                                 limits=httpx.Limits(max_connections=clients + 4)) as client:
        async def one() -> None:
            t0 = time.perf_counter()
            async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {(await r.aread())[:500].decode(errors='replace')}")
                    return
                async for line in r.aiter_lines():
                    payload = line.removeprefix("data: ").strip()
                    if not line.startswith("data: ") or payload == "[DONE]":
                        continue
                    if any(c.get("text") for c in json.loads(payload).get("choices", [])):
                        firsts.append(time.perf_counter() - t0)
                        return
            errors.append("stream ended without a text chunk")

        async def worker() -> None:
            for _ in todo:
                try:
                    await one()
                except httpx.HTTPError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")

        await asyncio.gather(*(worker() for _ in range(clients)))
    await asyncio.sleep(1.0)  # let the server drop the streams it was told to abandon
    out: dict[str, Any] = {"ttft_requests": requests, "ttft_p50_s": statistics.median(firsts) if firsts else None}
    if errors:
        out["ttft_errors"], out["ttft_first_error"] = len(errors), errors[0]
    return out


def request_count(model: str, max_tokens: int, clients: int, quick: bool) -> int:
    if quick:
        return max(8, 2 * clients)
    if model == "llama100m" and max_tokens == 128:  # ~4 s a request at 1 client
        return {1: 4, 8: 16}.get(clients, clients)
    if model == "demo" and max_tokens == 16:  # fast: more requests for a steadier figure
        return max(16, 8 * clients)
    return max(8, 4 * clients)


def measure(url: str, model: str, model_key: str, plan: dict[str, Any], progress: Any, task: Any,
            quick: bool) -> dict[str, Any]:
    asyncio.run(_throughput(url, model, 1, 2, 16))  # warm-up
    out: dict[str, Any] = {}
    for max_tokens in plan["max_tokens"]:
        for clients in plan["levels"]:
            n = request_count(model_key, max_tokens, clients, quick)
            progress.update(task, description=f"{plan['label']}: {max_tokens} tokens, {clients} clients, {n} req")
            row = asyncio.run(_throughput(url, model, clients, n, max_tokens))
            row |= asyncio.run(_ttft(url, model, clients, max(3, clients), max_tokens))
            out.setdefault(str(max_tokens), {})[str(clients)] = row
            progress.advance(task)
    return out


# --- main ---------------------------------------------------------------------------------------
def _get(systems: dict[str, Any], system: str, model: str, tokens: int, level: int, key: str) -> float | None:
    try:
        return systems[system][model]["by_max_tokens"][str(tokens)][str(level)][key]
    except (KeyError, TypeError):
        return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def bare_ratios(systems: dict[str, Any], clients: int) -> dict[str, float]:
    """Ours / bare vLLM req/s at `clients`, per model and generation length ("model/tokens")."""
    out = {}
    for model, by_model in systems.get("ours", {}).items():
        for tokens in by_model.get("by_max_tokens", {}):
            r = _ratio(_get(systems, "ours", model, int(tokens), clients, "requests_per_s"),
                       _get(systems, "bare_vllm", model, int(tokens), clients, "requests_per_s"))
            if r is not None:
                out[f"{model}/{tokens}"] = r
    return out


def ratio_keys(systems: dict[str, Any]) -> dict[str, Any]:
    """The headline ratios: against bare vLLM the worst case over models and lengths (each one listed)."""
    keys: dict[str, Any] = {}
    for clients in (8, 32):
        per = bare_ratios(systems, clients)
        keys[f"ratio_to_bare_vllm_at_{clients}"] = min(per.values()) if per else None
        keys[f"ratio_to_bare_vllm_at_{clients}_by_model_tokens"] = per
    keys["ratio_to_previous_at_32"] = _ratio(_get(systems, "ours", "llama100m", 128, 32, "tokens_per_s"),
                                             _get(systems, "previous", "llama100m", 128, 32, "tokens_per_s"))
    return keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: demo model, 16 tokens, 1 and 8 clients, few requests")
    opts = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray workers of every system import the `serving` of this checkout (not an installed copy).
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)  # vLLM's and Ray's log set-up would print every request
    levels = (1, 8) if opts.quick else (1, 8, 32)
    token_counts = (16,) if opts.quick else (16, 128)
    tmp = Path(tempfile.mkdtemp(prefix="privlm-serve-bench-"))
    with console.status("building the models"):
        models = {"demo": tiny_model(tmp)}
        if not opts.quick:
            models["llama100m"] = large_model(tmp, models["demo"])
    info = {k: {"params": params(d), "dir_name": d.parent.name} for k, d in models.items()}
    systems: dict[str, Any] = {}
    steps = 3 * len(models) * len(levels) * len(token_counts)
    with previous_worktree(tmp) as worktree, Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("starting", total=steps)
        servers = {"ours": lambda d: ours(d, tmp), "bare_vllm": lambda d: bare_vllm(d, tmp),
                   "previous": lambda d: previous(d, tmp, worktree)}
        for system, server in servers.items():
            for key, model_dir in models.items():
                label = f"{system} / {key}"
                progress.update(task, description=f"{label}: starting")
                t0, load_before = time.perf_counter(), os.getloadavg()[0]
                with server(model_dir) as (url, name):
                    startup = time.perf_counter() - t0
                    plan = {"label": label, "levels": levels, "max_tokens": token_counts}
                    result = measure(url, name, key, plan, progress, task, opts.quick)
                systems.setdefault(system, {})[key] = {
                    "startup_s": startup, "load_average_1m": [load_before, os.getloadavg()[0]],  # a busy machine?
                    "by_max_tokens": result}
                progress.console.log(f"{label}: started in {startup:.0f} s, " + ", ".join(
                    f"{t} tok @{c}: {r['requests_per_s']:.1f} req/s {r['tokens_per_s']:.0f} tok/s"
                    for t, by in result.items() for c, r in by.items()))
    shutil.rmtree(tmp, ignore_errors=True)

    result = {
        "machine": machine(), "quick": opts.quick, "precision": "fp32 on every side",
        "models": {"demo": {"what": "tiny-cpu architecture, random weights", **info["demo"]},
                   **({"llama100m": {"what": "Llama, hidden 768, 12 layers, 12 heads, intermediate 2048, vocab 8192,"
                                             " random weights, the demo's tokenizer", **info["llama100m"]}}
                      if "llama100m" in info else {})},
        "load": {"endpoint": "/v1/completions", "prompt": PROMPT, "temperature": 1.0, "levels": list(levels),
                 "max_tokens": list(token_counts), "client": "asyncio httpx on the same machine, loopback",
                 "tokens_per_s": "completion tokens reported in usage / wall time",
                 "ttft": "stream=true, max(3, clients) requests at the level's concurrency, time to the first "
                         "data chunk with text (each stream closed there), median"},
        "system_settings": {
            "ours": f"serving/ (gateway + Ray Serve LLM vLLM engine), API key auth, max_model_len {MAX_MODEL_LEN}, "
                    f"kv_cache_gib {KV_CACHE_GIB}, max_num_seqs 64, cache off, audit off; ray.init(num_cpus=8)",
            "bare_vllm": f"python -m vllm.entrypoints.openai.api_server --dtype float32 --max-model-len "
                         f"{MAX_MODEL_LEN} --api-key; VLLM_CPU_KVCACHE_SPACE={KV_CACHE_GIB}",
            "previous": f"commit {PREVIOUS_COMMIT} serving.app:build_app, quantization none, max_batch_size 8, "
                        f"torch_threads {PREVIOUS_THREADS}, API key auth; ray.init(num_cpus=2)"},
        "systems": systems,
        **ratio_keys(systems),
        "p99_at_32_demo_16_s": _get(systems, "ours", "demo", 16, 32, "p99_s"),
        "targets": TARGETS,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("serve-quick.json" if opts.quick else "serve.json")
    out.write_text(json.dumps(result, indent=1))
    console.print_json(json.dumps({k: v for k, v in result.items() if k.startswith(("ratio", "p99"))}))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
