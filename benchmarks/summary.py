"""Collect every benchmark's JSON into benchmarks/results/summary.md: figure, baseline from the same run, ratio.

Run by `make bench` after the benchmark scripts; a missing result file is listed as not run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _row(figure: str, value: str, baseline: str, ratio: float | None, target: str, met: bool | None) -> str:
    shown = "-" if ratio is None else f"{ratio:.2f}"
    verdict = "-" if met is None else "yes" if met else "**no**"
    return f"| {figure} | {value} | {baseline} | {shown} | {target} | {verdict} |"


def _level(serve: dict[str, Any], system: str, model: str, tokens: int, clients: int) -> dict[str, Any]:
    return serve["systems"].get(system, {}).get(model, {}).get("by_max_tokens", {}).get(str(tokens), {}).get(
        str(clients), {})


def serve_rows(serve: dict[str, Any]) -> list[str]:
    """Ours against bare vLLM (every model and length) and the previous endpoint (~100M, 128 tokens)."""
    tg, out = serve["targets"], []
    for clients in (8, 32):
        for config, ratio in serve.get(f"ratio_to_bare_vllm_at_{clients}_by_model_tokens", {}).items():
            model, tokens = config.split("/")
            ours = _level(serve, "ours", model, int(tokens), clients)
            bare = _level(serve, "bare_vllm", model, int(tokens), clients)
            out.append(_row(f"endpoint req/s at {clients} clients ({model}, {tokens} tokens)",
                            f"{ours['requests_per_s']:.1f}", f"{bare['requests_per_s']:.1f} (bare vLLM server)", ratio,
                            f">= {tg['ratio_to_bare_vllm_min']}", ratio >= tg["ratio_to_bare_vllm_min"]))
    ratio = serve.get("ratio_to_previous_at_32")
    if ratio is not None:
        ours, prev = _level(serve, "ours", "llama100m", 128, 32), _level(serve, "previous", "llama100m", 128, 32)
        out.append(_row("endpoint tokens/s at 32 clients (~100M params, 128 tokens)", f"{ours['tokens_per_s']:.0f}",
                        f"{prev['tokens_per_s']:.0f} (previous static-batching endpoint)", ratio,
                        f">= {tg['ratio_to_previous_at_32_min']}", ratio >= tg["ratio_to_previous_at_32_min"]))
    p99 = serve.get("p99_at_32_demo_16_s")
    if p99 is not None:
        bare = _level(serve, "bare_vllm", "demo", 16, 32).get("p99_s")
        out.append(_row("endpoint p99 latency at 32 clients (demo model, 16 tokens)", f"{p99:.2f} s",
                        f"{bare:.2f} s (bare vLLM server)" if bare is not None else "-",
                        p99 / bare if bare else None, f"<= {tg['p99_at_32_demo_16_max_s']} s",
                        p99 <= tg["p99_at_32_demo_16_max_s"]))
    return out


def quantize_rows(q: dict[str, Any]) -> list[str]:
    """Bytes and tokens/s of the quantized checkpoint against fp32, from whatever of them quantize.json holds
    (benchmarks/quantize.py: `bytes_ratio`, `speedup_batch_N`, per-scheme `bytes`, `tokens_per_s_batch_N`)."""
    tg, out = q.get("targets") or {}, []
    fp32 = q.get("fp32") if isinstance(q.get("fp32"), dict) else {}
    scheme = next((k for k, v in q.items() if k != "fp32" and isinstance(v, dict) and "bytes" in v), None)
    quant = q.get(scheme, {}) if scheme else {}
    label = scheme or "quantized"
    ratio = q.get("bytes_ratio")
    if isinstance(ratio, int | float):
        limit = tg.get("bytes_ratio_max")
        out.append(_row(f"{label} checkpoint bytes", f"{quant['bytes'] / 1e6:.0f} MB" if "bytes" in quant else "-",
                        f"{fp32['bytes'] / 1e6:.0f} MB (fp32)" if "bytes" in fp32 else "fp32", ratio,
                        f"<= {limit}" if limit is not None else "-", None if limit is None else ratio <= limit))
    for key in sorted(k for k in q if k.startswith("speedup")):
        speed = q[key]
        if not isinstance(speed, int | float):
            continue
        batch = key.removeprefix("speedup").strip("_")
        rate = f"tokens_per_s_{batch}" if batch else "tokens_per_s"
        floor = tg.get(f"{key}_min", tg.get("speedup_min"))
        out.append(_row(f"{label} generation tokens/s" + (f" ({batch.replace('_', ' ')})" if batch else ""),
                        f"{quant[rate]:.0f}" if rate in quant else "-",
                        f"{fp32[rate]:.0f} (fp32)" if rate in fp32 else "fp32", speed,
                        f">= {floor}" if floor is not None else "-", None if floor is None else speed >= floor))
    return out


def data_rows(data: dict[str, Any]) -> list[str]:
    """The data pipeline end to end on both corpora against the baseline commit, and Chinese bytes/token."""
    out = []
    for corpus, label in (("stdlib", "stdlib corpus"), ("zh", "Chinese corpus")):
        ours, base = data["ours"][corpus]["end_to_end"], data["baseline"][corpus]["end_to_end"]
        ratio = data["ratio_end_to_end_mb_per_s"][corpus]
        target = data.get("target_ratio_stdlib") if corpus == "stdlib" else None
        out.append(_row(f"data prepare MB/s, {label}", f"{ours['mb_per_s']:.2f}",
                        f"{base['mb_per_s']:.2f} (commit {data['baseline_commit']})", ratio,
                        f">= {target}" if target else "-", None if target is None else ratio >= target))
    tok = data.get("chinese_tokenizer", {})
    zh = next((v for k, v in tok.items() if k.startswith("ours tiny-cpu-zh")), None)
    stdlib = next((v for k, v in tok.items() if k.startswith("baseline tiny-cpu")), None)
    if zh and stdlib:
        out.append(_row("Chinese held-out bytes/token (tiny-cpu-zh tokenizer)", f"{zh['bytes_per_token']:.2f}",
                        f"{stdlib['bytes_per_token']:.2f} (tiny-cpu tokenizer)",
                        zh["bytes_per_token"] / stdlib["bytes_per_token"], "-", None))
    return out


def rows() -> tuple[list[str], list[str]]:
    """Table rows and the machine line of each result file."""
    out, machines = [], []
    train = _load("train")
    if train:
        t, b = train["trainer"], train["baseline_plain_pytorch"]
        out.append(_row("training tokens/s (DeepSpeed, 2 ranks)", f"{t['tokens_per_s']:,.0f}",
                        f"{b['tokens_per_s']:,.0f} (plain PyTorch loop)", train["ratio_tokens_per_s"],
                        f">= {train['target_ratio']}", train["ratio_tokens_per_s"] >= train["target_ratio"]))
        for key, label in (("tensor2", "tensor parallel T=2"), ("pipeline2", "pipeline parallel P=2")):
            layout = train.get("parallel_layouts_2_ranks", {}).get(key)
            if layout:
                zero1 = train["parallel_layouts_2_ranks"]["zero1"]["tokens_per_s"]
                out.append(_row(f"training tokens/s, {label} (2 ranks)", f"{layout['tokens_per_s']:,.0f}",
                                f"{zero1:,.0f} (ZeRO-1, 2 data-parallel ranks)", layout["ratio_to_zero1"], "-", None))
        if train.get("resume_2_to_1_ranks_s") is not None:
            out.append(_row("resume a 2-rank checkpoint on 1 rank (s)", f"{train['resume_2_to_1_ranks_s']:.2f}",
                            f"{t['checkpoint_save_s']:.2f} (writing it)", None, "-", None))
        machines.append(("train.json", train["machine"]))
    serve = _load("serve")
    if serve and "ratio_to_bare_vllm_at_8" in serve:
        out += serve_rows(serve)
        machines.append(("serve.json", serve["machine"]))
    elif serve:
        out.append("| serve.json predates the vLLM benchmark: rerun `benchmarks/serve.py` | | | | | |")
    quant = _load("quantize")
    if quant:
        out += quantize_rows(quant)
        if quant.get("machine"):
            machines.append(("quantize.json", quant["machine"]))
    data = _load("data")
    if data:
        out += data_rows(data)
        machines.append(("data.json", data["machine"]))
    goodput = _load("goodput")
    if goodput:
        p, b = goodput["preempted"], goodput["baseline"]
        out.append(_row(f"goodput, preempted every {goodput['preempt_every_s']:.0f} s", f"{p['wall_s']:.0f} s wall "
                        f"({p['preemptions']} preemptions)", f"{b['wall_s']:.0f} s (no preemption)",
                        goodput["goodput"], f">= {goodput['target']}", goodput["meets_target"]))
        machines.append(("goodput.json", goodput["machine"]))
    return out, [f"- `{name}`: {m['cores']} cores {m['cpu']}, GPU {m['gpu'] or 'none'}, Python {m['python']}, "
                 f"commit {m['commit']}, {m['date']}" for name, m in machines]


def main() -> None:
    table, machines = rows()
    missing = [n for n in ("train", "serve", "goodput", "data") if not (RESULTS / f"{n}.json").is_file()]
    lines = ["# privlm benchmarks", "",
             "Each figure is measured beside its baseline in the same run; the ratio is figure / baseline "
             "(for bytes, lower is better).", "",
             "| figure | value | baseline | ratio | target | met |", "| --- | --- | --- | --- | --- | --- |",
             *table, "", "Measured on:", *machines]
    if missing:
        lines += ["", "Not run: " + ", ".join(f"`{n}.json`" for n in missing)]
    (RESULTS / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
