"""Serving figures: the endpoint batched vs unbatched vs in-process batched generation; int8 vs fp32.

Writes benchmarks/results/serve.json. (a) our HTTP endpoint with dynamic batching, (b) the same with
max_batch_size=1, (c) the limit: batched generation called in-process, no server. All on the same
model, prompt and max_tokens, measured in this run. Then the int8 model's bytes and tokens/s
against fp32 on a ~100M-parameter Llama (a tiny model is overhead-bound).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.train import RESULTS, machine  # noqa: E402

PROMPT, MAX_TOKENS, PORT = "def main", 16, 18099
LEVELS = (1, 8, 32)


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


def summarize(latencies: list[float], seconds: float) -> dict[str, float]:
    ordered = sorted(latencies)
    return {"requests_per_s": len(latencies) / seconds, "p50_s": statistics.median(ordered),
            "p99_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


def load_http(clients: int, per_client: int = 6) -> dict[str, float]:
    import httpx

    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 1.0}

    def one(_: int) -> float:
        t0 = time.perf_counter()
        httpx.post(f"http://127.0.0.1:{PORT}/v1/completions", json=body, timeout=300).raise_for_status()
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(one, range(clients * per_client)))
    return summarize(latencies, time.perf_counter() - t0)


def bench_endpoint(model: Path, batch: int) -> dict[str, dict[str, float]]:
    from ray import serve

    from serving.app import build_app

    serve.run(build_app({"model_uri": str(model), "quantization": "none", "max_batch_size": batch,
                         "max_ongoing_requests": 64, "max_queued_requests": 1000, "cache_size": 0,
                         "audit_log": None, "limits": {"max_tokens": MAX_TOKENS}}), name="privlm", route_prefix="/")
    load_http(1, 2)  # warm-up
    return {str(c): load_http(c) for c in LEVELS}


def bench_in_process(model_dir: Path) -> dict[str, dict[str, float]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serving.generate import GenRequest, generate

    torch.set_num_threads(1)
    model, tok = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    out = {}
    for clients in LEVELS:
        batch = min(clients, 8)  # what the endpoint's max_batch_size allows
        latencies, t0 = [], time.perf_counter()
        for _ in range(clients * 6 // batch):
            s = time.perf_counter()
            generate(model, tok, [GenRequest(ids, MAX_TOKENS, 1.0) for _ in range(batch)])
            latencies += [time.perf_counter() - s] * batch
        out[str(clients)] = summarize(latencies, time.perf_counter() - t0)
    return out


def bench_int8(tokens: int = 32) -> dict[str, float]:
    """fp32 vs int8-dynamic on a ~100M-parameter Llama: bytes and generation tokens/s (batch 1, 2 threads)."""
    import copy

    import torch

    from jobs.recipe import ModelConfig
    from jobs.train.model import build_model
    from serving.generate import GenRequest, generate
    from serving.quantize import model_bytes, quantize

    torch.set_num_threads(2)
    cfg = ModelConfig(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=2048, vocab_size=8192,
                      max_position_embeddings=512, tie_word_embeddings=False)
    fp32 = build_model(cfg, 0).eval()
    int8 = quantize(copy.deepcopy(fp32), "int8-dynamic", "cpu")

    class Tok:  # generate() needs only these
        eos_token_id, pad_token_id = -1, 0

        @staticmethod
        def decode(ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    def speed(m) -> float:
        generate(m, Tok, [GenRequest(list(range(1, 17)), 4, 0.0)])
        t0 = time.perf_counter()
        generate(m, Tok, [GenRequest(list(range(1, 17)), tokens, 0.0)])
        return tokens / (time.perf_counter() - t0)

    result = {"params": sum(p.numel() for p in fp32.parameters()), "fp32_bytes": model_bytes(fp32),
              "int8_bytes": model_bytes(int8), "fp32_tokens_per_s": speed(fp32), "int8_tokens_per_s": speed(int8)}
    result["bytes_ratio"] = result["int8_bytes"] / result["fp32_bytes"]
    result["speedup"] = result["int8_tokens_per_s"] / result["fp32_tokens_per_s"]
    return result


def main() -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    tmp = Path(tempfile.mkdtemp(prefix="privlm-serve-bench-"))
    model = tiny_model(tmp)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    try:
        batched = bench_endpoint(model, 8)
        unbatched = bench_endpoint(model, 1)
    finally:
        serve.shutdown()
        ray.shutdown()
    limit = bench_in_process(model)
    int8 = bench_int8()
    rps = {k: {c: v[c]["requests_per_s"] for c in v} for k, v in
           {"batched": batched, "unbatched": unbatched, "in_process": limit}.items()}
    result = {"machine": machine(), "model": "tiny-cpu architecture (3.2M params), fp32, max_tokens 16",
              "endpoint_batched": batched, "endpoint_unbatched": unbatched, "in_process_batched": limit,
              "ratio_batched_to_in_process_at_8": rps["batched"]["8"] / rps["in_process"]["8"],
              "ratio_batched_to_unbatched_at_8": rps["batched"]["8"] / rps["unbatched"]["8"],
              "targets": {"batched_to_in_process_at_8": 0.7, "batched_to_unbatched_at_8": 3.0,
                          "int8_bytes_ratio_max": 0.3, "int8_speedup_min": 1.5},
              "int8_vs_fp32_100m": int8}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k.startswith(("ratio", "int8"))}, indent=1))


if __name__ == "__main__":
    main()
