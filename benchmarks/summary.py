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


def _row(figure: str, value: str, baseline: str, ratio: float, target: str, met: bool) -> str:
    return f"| {figure} | {value} | {baseline} | {ratio:.2f} | {target} | {'yes' if met else '**no**'} |"


def rows() -> tuple[list[str], list[str]]:
    """Table rows and the machine line of each result file."""
    out, machines = [], []
    train = _load("train")
    if train:
        t, b = train["trainer"], train["baseline_plain_pytorch"]
        out.append(_row("training tokens/s (DeepSpeed, 2 ranks)", f"{t['tokens_per_s']:,.0f}",
                        f"{b['tokens_per_s']:,.0f} (plain PyTorch loop)", train["ratio_tokens_per_s"],
                        f">= {train['target_ratio']}", train["ratio_tokens_per_s"] >= train["target_ratio"]))
        machines.append(("train.json", train["machine"]))
    serve = _load("serve")
    if serve:
        tg, q = serve["targets"], serve["int8_vs_fp32_100m"]
        e8 = serve["endpoint_batched"]["8"]["requests_per_s"]
        out.append(_row("endpoint req/s at 8 clients (batched)", f"{e8:.1f}",
                        f"{serve['in_process_batched']['8']['requests_per_s']:.1f} (in-process batched)",
                        serve["ratio_batched_to_in_process_at_8"], f">= {tg['batched_to_in_process_at_8']}",
                        serve["ratio_batched_to_in_process_at_8"] >= tg["batched_to_in_process_at_8"]))
        out.append(_row("endpoint req/s at 8 clients (batched)", f"{e8:.1f}",
                        f"{serve['endpoint_unbatched']['8']['requests_per_s']:.1f} (unbatched endpoint)",
                        serve["ratio_batched_to_unbatched_at_8"], f">= {tg['batched_to_unbatched_at_8']}",
                        serve["ratio_batched_to_unbatched_at_8"] >= tg["batched_to_unbatched_at_8"]))
        out.append(_row("int8 model bytes (~100M params)", f"{q['int8_bytes'] / 1e6:.0f} MB",
                        f"{q['fp32_bytes'] / 1e6:.0f} MB (fp32)", q["bytes_ratio"],
                        f"<= {tg['int8_bytes_ratio_max']}", q["bytes_ratio"] <= tg["int8_bytes_ratio_max"]))
        out.append(_row("int8 generation tokens/s (~100M params)", f"{q['int8_tokens_per_s']:.0f}",
                        f"{q['fp32_tokens_per_s']:.0f} (fp32)", q["speedup"], f">= {tg['int8_speedup_min']}",
                        q["speedup"] >= tg["int8_speedup_min"]))
        machines.append(("serve.json", serve["machine"]))
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
    missing = [n for n in ("train", "serve", "goodput") if not (RESULTS / f"{n}.json").is_file()]
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
