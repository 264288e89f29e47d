"""What each stage kept and dropped: `report.json` beside the shards and a rich table at the end of a run."""

from __future__ import annotations

from collections import Counter
from typing import Any

from jobs.data.shard import STAGES

LENGTH_REASONS = ("too_few_chars", "too_many_chars", "too_few_words", "too_many_words")


def stage_of(reason: str) -> str:
    """The stage that drops documents for `reason`."""
    if reason == "binary":
        return "normalise"
    if reason == "language_not_kept":
        return "language"
    return "length filter" if reason in LENGTH_REASONS else "quality filter"


def _sum_shards(shard_stats: list[dict[str, Any]]) -> dict[str, Any]:
    kept = {stage: [0, 0] for stage in STAGES}
    dropped: dict[str, list[int]] = {}
    pii: Counter[str] = Counter()
    languages: dict[str, dict[str, Any]] = {}
    quarantined: dict[str, list[int]] = {}
    for st in shard_stats:
        for lang, row in st["languages"].items():
            total = languages.setdefault(lang, {"read": [0, 0], "kept": [0, 0], "dropped": {}})
            for key in ("read", "kept"):
                total[key] = [a + b for a, b in zip(total[key], row[key], strict=True)]
            for reason, counts in row["dropped"].items():
                total["dropped"][reason] = [a + b for a, b in zip(total["dropped"].get(reason, [0, 0]), counts,
                                                                  strict=True)]
        for key, counts in st["quarantined"].items():
            quarantined[key] = [a + b for a, b in zip(quarantined.get(key, [0, 0]), counts, strict=True)]
        for stage, (docs, size) in st["kept"].items():
            kept[stage][0] += docs
            kept[stage][1] += size
        for reason, (docs, size) in st["dropped"].items():
            row = dropped.setdefault(reason, [0, 0])
            row[0] += docs
            row[1] += size
        pii.update(st["pii"])
    return {"kept": kept, "dropped": dropped, "pii": pii, "pii_docs": sum(st["pii_docs"] for st in shard_stats),
            "languages": languages, "quarantined": quarantined, "t2s_docs": sum(st["t2s_docs"] for st in shard_stats),
            "files": sum(st["files"] for st in shard_stats), "file_bytes": sum(st["file_bytes"] for st in shard_stats)}


def _stage_rows(total: dict[str, Any], dedup: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    previous = None
    for stage in STAGES:
        docs, size = total["kept"][stage]
        dropped_bytes = sum(b for r, (_, b) in total["dropped"].items() if stage_of(r) == stage)
        rows.append({"stage": stage, "docs": docs, "bytes": size,
                     "dropped_docs": previous - docs if previous is not None else 0, "dropped_bytes": dropped_bytes})
        previous = docs
    docs, size = rows[-1]["docs"], rows[-1]["bytes"]
    for stage, key in (("exact dedup", "exact"), ("near dedup", "near")):
        docs, size = docs - dedup[key]["docs"], size - dedup[key]["bytes"]
        rows.append({"stage": stage, "docs": docs, "bytes": size, "dropped_docs": dedup[key]["docs"],
                     "dropped_bytes": dedup[key]["bytes"]})
    return rows


def _language_rows(total: dict[str, Any], packed: dict[str, Any]) -> dict[str, Any]:
    """Per language: documents read, kept after the filters, dropped per reason; train tokens, and bytes per
    token of the held-out splits (all splits when the language has none held out)."""
    train = packed["splits"]["train"]
    out = {}
    for lang, row in sorted(total["languages"].items()):
        held_out = [split for name, split in packed["splits"].items()
                    if name != "train" and split["natural_tokens_per_language"].get(lang)]
        measured = held_out or list(packed["splits"].values())  # held out: the tokenizer never saw them
        tokens = sum(split["natural_tokens_per_language"].get(lang, 0) for split in measured)
        nbytes = sum(split["bytes_per_language"].get(lang, 0) for split in measured)
        out[lang] = {"read_docs": row["read"][0], "read_bytes": row["read"][1], "kept_docs": row["kept"][0],
                     "kept_bytes": row["kept"][1],
                     "dropped": {r: {"docs": d, "bytes": b} for r, (d, b) in sorted(row["dropped"].items())},
                     "train_tokens": train["tokens_per_language"].get(lang, 0), "natural_tokens": tokens,
                     "bytes_per_token": nbytes / tokens if tokens else None,
                     "bytes_per_token_on": "validation and test" if held_out else "all splits"}
    return out


def _quarantine_rows(total: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, (records, size) in sorted(total["quarantined"].items()):
        source, reason = key.split("\t", 1)
        out.setdefault(f"data.sources[{source}]", {})[reason] = {"records": records, "bytes": size}
    return out


def build_report(recipe_name: str, shard_stats: list[dict[str, Any]], dedup: dict[str, Any],
                 tokenizer: dict[str, Any], packed: dict[str, Any], seconds: dict[str, float],
                 block_size: int) -> dict[str, Any]:
    """Documents and bytes per stage, drop reasons, PII, dedup, tokens and blocks per split, throughput."""
    total = _sum_shards(shard_stats)
    wall = sum(seconds.values())
    return {
        "recipe": recipe_name,
        "input_files": total["files"], "input_bytes": total["file_bytes"],
        "seconds": wall, "stage_seconds": seconds, "mb_per_s": total["file_bytes"] / 1e6 / max(wall, 1e-9),
        "stages": _stage_rows(total, dedup),
        "drop_reasons": {r: {"stage": stage_of(r), "docs": d, "bytes": b}
                         for r, (d, b) in sorted(total["dropped"].items())},
        "pii_redactions": dict(sorted(total["pii"].items())), "pii_docs": total["pii_docs"],
        "t2s_docs": total["t2s_docs"], "languages": _language_rows(total, packed),
        "quarantined": _quarantine_rows(total),
        "quarantined_records": sum(r for r, _ in total["quarantined"].values()),
        "dedup": dedup, "tokenizer": tokenizer, "block_size": block_size, "splits": packed["splits"],
        "eval_topped_up_docs": packed["eval_topped_up_docs"], "test_topped_up_docs": packed["test_topped_up_docs"],
    }


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f}"


def print_report(report: dict[str, Any], out: str, console: Any = None) -> None:
    """The report as two rich tables (stages, splits), the reasons behind the drops, and the throughput."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    stages = Table(title=f"data prepared: {out}", title_justify="left")
    for col in ("stage", "docs", "MB", "dropped docs", "dropped MB"):
        stages.add_column(col, justify="left" if col == "stage" else "right")
    for row in report["stages"]:
        stages.add_row(row["stage"], f"{row['docs']:,}", _mb(row["bytes"]), f"{row['dropped_docs']:,}",
                       _mb(row["dropped_bytes"]))
    splits = Table(title=f"packed into blocks of {report['block_size']} tokens", title_justify="left")
    for col in ("split", "docs", "MB", "tokens", "blocks", "files", "tokens dropped"):
        splits.add_column(col, justify="left" if col == "split" else "right")
    for name, s in report["splits"].items():
        splits.add_row(name, f"{s['docs']:,}", _mb(s["bytes"]), f"{s['tokens']:,}", f"{s['blocks']:,}",
                       str(s["files"]), f"{s['tokens_dropped']:,}")
    console.print(stages)
    for line in _reason_lines(report):
        console.print(line, highlight=False, soft_wrap=True)
    console.print(splits)
    console.print(_language_table(report))
    tok = report["tokenizer"]
    console.print(f"tokenizer: {tok['source']}, {tok['vocab_size']:,} tokens; "
                  f"{report['input_bytes'] / 1e6:,.1f} MB in {report['seconds']:.1f}s "
                  f"({report['mb_per_s']:.2f} MB/s)", highlight=False, soft_wrap=True)


def _language_table(report: dict[str, Any]) -> Any:
    """Kept and dropped documents, train tokens and bytes per token, per language."""
    from rich.table import Table

    table = Table(title="languages", title_justify="left")
    for col in ("language", "read docs", "kept docs", "dropped docs", "train tokens", "bytes/token"):
        table.add_column(col, justify="left" if col == "language" else "right")
    for lang, row in report["languages"].items():
        dropped = sum(v["docs"] for v in row["dropped"].values())
        bpt = "-" if row["bytes_per_token"] is None else f"{row['bytes_per_token']:.2f}"
        table.add_row(lang, f"{row['read_docs']:,}", f"{row['kept_docs']:,}", f"{dropped:,}",
                      f"{row['train_tokens']:,}", bpt)
    return table


def _reason_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for stage in ("normalise", "language", "length filter", "quality filter"):
        reasons = [f"{r} {v['docs']:,}" for r, v in report["drop_reasons"].items() if v["stage"] == stage]
        if reasons:
            lines.append(f"  {stage} dropped: " + ", ".join(reasons))
    pii = ", ".join(f"{k} {v:,}" for k, v in report["pii_redactions"].items()) or "nothing"
    lines.append(f"  PII redacted: {pii} (in {report['pii_docs']:,} documents)")
    if report["t2s_docs"]:
        lines.append(f"  Traditional→Simplified (OpenCC t2s): {report['t2s_docs']:,} documents converted")
    sentences = report["dedup"].get("sentences", {})
    if sentences.get("removed"):
        lines.append(f"  repeated sentences removed: {sentences['removed']:,} in {sentences['docs']:,} documents")
    for source, reasons in report["quarantined"].items():
        shown = ", ".join(f"{r} {v['records']:,}" for r, v in reasons.items())
        lines.append(f"  quarantined from {source}: {shown} (see quarantine.jsonl)")
    train = report["splits"]["train"]
    if len(train["tokens_per_source"]) > 1:
        shares = ", ".join(f"data.sources[{k}] {v / max(train['tokens'], 1):.1%}"
                           for k, v in train["tokens_per_source"].items())
        lines.append(f"  train tokens per source: {shares}")
    if report["eval_topped_up_docs"]:
        lines.append(f"  eval split topped up with {report['eval_topped_up_docs']} documents to fill one block")
    return lines
