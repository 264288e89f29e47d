"""`privlm data prepare`: the data stations in order, sharded, with a manifest and a report.

1. plan          discover inputs, fingerprint them with the settings, assign files to shards
2. clean_shard   per shard (a process locally, an array task on Slurm): normalise, length and quality
                 filters, PII redaction, SHA-256 and MinHash signatures
3. finalize      global exact + near dedup, eval split, tokenizer, packing (per shard), index,
                 manifest, report; published by one directory rename
Nothing is half-written: work happens in `.<name>.work` and `.<name>.tmp` beside the output.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from jobs.data.sources import InputFile, discover, read_documents
from jobs.files import atomic_write_text, replace_dir
from jobs.recipe import Recipe


@dataclass
class PrepareResult:
    """Where the shards are and what happened."""

    output_dir: Path
    skipped: bool
    report: dict[str, Any] = field(default_factory=dict)


def work_dir(recipe: Recipe) -> Path:
    out = recipe.data_path
    return out.parent / f".{out.name}.work"


def settings(recipe: Recipe) -> dict[str, Any]:
    """Everything that changes the output besides the input files."""
    return {"data": recipe.data.model_dump(mode="json", exclude={"workers", "output_dir"}),
            "tokenizer": recipe.tokenizer.model_dump(mode="json"), "block_size": recipe.training.sequence_length,
            "model_vocab": recipe.model.vocab_size}


def fingerprint(recipe: Recipe, inputs: list[InputFile]) -> str:
    """SHA-256 over the settings and every input's path, size and mtime."""
    h = hashlib.sha256(json.dumps(settings(recipe), sort_keys=True).encode())
    if recipe.tokenizer.path:
        tok = Path(recipe.tokenizer.path) / "tokenizer.json"
        h.update(tok.read_bytes() if tok.is_file() else b"")
    for item in inputs:
        h.update(f"{item.path}\0{item.size}\0{item.mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def plan(recipe: Recipe) -> tuple[str, list[list[InputFile]]]:
    """(fingerprint, inputs per shard); writes the shard plan into the work directory."""
    inputs = discover(recipe.data.sources)
    shards: list[list[InputFile]] = [[] for _ in range(recipe.data.num_shards)]
    for item in inputs:
        shards[item.shard(recipe.data.num_shards)].append(item)
    work = work_dir(recipe)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for i, items in enumerate(shards):
        (work / f"inputs-{i:05d}.json").write_text(json.dumps([asdict(x) for x in items]))
    return fingerprint(recipe, inputs), shards


def clean_shard(recipe: Recipe, shard: int) -> dict[str, Any]:
    """Stage 2 for one shard: writes docs-NNNNN.jsonl, sig-NNNNN.npy and stats-NNNNN.json; returns the stats."""
    from jobs.data.clean import length_reason, normalize
    from jobs.data.dedup import exact_key, signature
    from jobs.data.pii import redact
    from jobs.data.quality import quality_reason

    cfg = recipe.data
    work = work_dir(recipe)
    items = [InputFile(**x) for x in json.loads((work / f"inputs-{shard:05d}.json").read_text())]
    stats: dict[str, Any] = {"docs_in": 0, "bytes_in": 0, "dropped": Counter(), "pii": Counter(), "docs_out": 0,
                             "bytes_out": 0}
    sigs = []
    with open(work / f"docs-{shard:05d}.jsonl", "w") as out:
        for item in items:
            for doc in read_documents(item):
                stats["docs_in"] += 1
                stats["bytes_in"] += len(doc.text.encode())
                text = normalize(doc.text)
                reason = length_reason(text, cfg.filters) or quality_reason(text, cfg.filters)
                if reason:
                    stats["dropped"][reason] += 1
                    continue
                text, found = redact(text, cfg.pii)
                stats["pii"].update(found)
                out.write(json.dumps({"id": doc.doc_id, "sha": exact_key(text), "text": text}) + "\n")
                sigs.append(signature(text, cfg.dedup.num_perm, cfg.dedup.shingle_size) if cfg.dedup.near else [])
                stats["docs_out"] += 1
                stats["bytes_out"] += len(text.encode())
    np.save(work / f"sig-{shard:05d}.npy", np.array(sigs, dtype=np.uint64).reshape(len(sigs), -1))
    (work / f"stats-{shard:05d}.json").write_text(json.dumps(stats))
    return stats


def _shard_docs(work: Path, shard: int) -> Iterator[dict[str, Any]]:
    with open(work / f"docs-{shard:05d}.jsonl") as fh:
        for line in fh:
            yield json.loads(line)


def deduplicate(recipe: Recipe) -> dict[str, Any]:
    """Global pass over every shard's hashes and signatures: which documents stay, and which go to eval."""
    from jobs.data.dedup import near_duplicates

    work, cfg = work_dir(recipe), recipe.data
    ids, shas, sigs = [], [], []
    for s in range(cfg.num_shards):
        for doc in _shard_docs(work, s):
            ids.append(doc["id"])
            shas.append(doc["sha"])
        sigs.append(np.load(work / f"sig-{s:05d}.npy"))
    order = sorted(range(len(ids)), key=ids.__getitem__)
    seen: set[str] = set()
    exact_dropped = set()
    for i in order:
        if cfg.dedup.exact and shas[i] in seen:
            exact_dropped.add(ids[i])
        seen.add(shas[i])
    survivors = [i for i in order if ids[i] not in exact_dropped]
    near: dict[str, str] = {}
    if cfg.dedup.near and survivors:
        all_sigs = np.concatenate([s for s in sigs if s.size], axis=0)
        near = near_duplicates([ids[i] for i in survivors], all_sigs[survivors], cfg.dedup.threshold)
    kept = [ids[i] for i in survivors if ids[i] not in near]
    eval_ids = [d for d in kept if _unit_hash(d) < cfg.eval_fraction]
    if cfg.eval_fraction > 0 and not eval_ids and len(kept) > 1:
        eval_ids = [min(kept, key=_unit_hash)]
    decision = {"kept": kept, "eval": eval_ids, "exact_dropped": len(exact_dropped), "near_dropped": len(near)}
    (work / "dedup.json").write_text(json.dumps(decision))
    return decision


def _unit_hash(doc_id: str) -> float:
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64


def pack_shard(recipe: Recipe, shard: int, out_dir: Path) -> dict[str, int]:
    """Tokenize one shard's kept documents, EOS-separated, into train and eval block files."""
    from jobs.data.pack import token_dtype, write_blocks
    from jobs.data.pack import load_tokenizer as load

    work = work_dir(recipe)
    decision = json.loads((work / "dedup.json").read_text())
    kept, eval_ids = set(decision["kept"]), set(decision["eval"])
    tok = load(out_dir)
    dtype = token_dtype(len(tok))
    streams: dict[str, list[int]] = {"train": [], "eval": []}
    docs = [d for d in _shard_docs(work, shard) if d["id"] in kept]
    for start in range(0, len(docs), 256):
        chunk = docs[start:start + 256]
        encoded = tok([d["text"] for d in chunk], add_special_tokens=False)["input_ids"]
        for d, ids in zip(chunk, encoded, strict=True):
            streams["eval" if d["id"] in eval_ids else "train"].extend([*ids, tok.eos_token_id])
    counts = {}
    for split, tokens in streams.items():
        arr = np.asarray(tokens, dtype=dtype)
        counts[f"{split}_tokens"] = len(arr)
        counts[f"{split}_blocks"] = write_blocks(arr, recipe.training.sequence_length,
                                                 out_dir / f"{split}-{shard:05d}.bin")
    return counts


def _parallel(fn: Callable[..., Any], jobs: list[tuple[Any, ...]], workers: int, label: str) -> list[Any]:
    """Run jobs in a process pool (or inline for one worker) with a progress bar; results in job order."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    results: list[Any] = [None] * len(jobs)
    with Progress(TextColumn(f"[bold]{label:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        task = bar.add_task(label, total=len(jobs))
        if workers <= 1 or len(jobs) <= 1:
            for i, args in enumerate(jobs):
                results[i] = fn(*args)
                bar.advance(task)
            return results
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(fn, *args): i for i, args in enumerate(jobs)}
            for fut in futures:
                results[futures[fut]] = fut.result()
                bar.advance(task)
    return results


def _train_texts(recipe: Recipe, decision: dict[str, Any]) -> Iterator[str]:
    kept, eval_ids = set(decision["kept"]), set(decision["eval"])
    for s in range(recipe.data.num_shards):
        for doc in _shard_docs(work_dir(recipe), s):
            if doc["id"] in kept and doc["id"] not in eval_ids:
                yield doc["text"]


def finalize(recipe: Recipe, fp: str, clean_stats: list[dict[str, Any]], started: float) -> dict[str, Any]:
    """Dedup, tokenizer, packing, index, manifest and report; then publish the output directory."""
    from jobs.data.tokenizer import copy_tokenizer, train_tokenizer

    out = recipe.data_path
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    decision = deduplicate(recipe)
    if not decision["kept"]:
        raise ValueError("every document was filtered out; loosen data.filters or check data.sources")
    if recipe.tokenizer.path:
        tok = copy_tokenizer(Path(recipe.tokenizer.path), tmp / "tokenizer", recipe.model.vocab_size)
    else:
        tok = train_tokenizer(_train_texts(recipe, decision), recipe.tokenizer.vocab_size,
                              recipe.tokenizer.min_frequency, tmp / "tokenizer")
    jobs = [(recipe, s, tmp) for s in range(recipe.data.num_shards)]
    packed = _parallel(pack_shard, jobs, recipe.data.workers, "tokenize + pack")
    from jobs.data.pack import token_dtype

    index = {"dtype": token_dtype(len(tok)).name, "block_size": recipe.training.sequence_length,
             "vocab_size": len(tok), "eos_id": tok.eos_token_id,
             "splits": {split: [{"file": f"{split}-{s:05d}.bin", "blocks": p[f"{split}_blocks"]}
                                for s, p in enumerate(packed)] for split in ("train", "eval")}}
    report = build_report(clean_stats, decision, packed, time.perf_counter() - started)
    manifest = {"fingerprint": fp, "settings": settings(recipe), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "privlm_version": _version(), "counts": report["totals"]}
    for name, payload in (("index.json", index), ("manifest.json", manifest), ("report.json", report)):
        atomic_write_text(tmp / name, json.dumps(payload, indent=1))
    replace_dir(tmp, out)
    shutil.rmtree(work_dir(recipe), ignore_errors=True)
    return report


def build_report(clean: list[dict[str, Any]], decision: dict[str, Any], packed: list[dict[str, int]],
                 seconds: float) -> dict[str, Any]:
    """What each stage kept and dropped, per reason, and throughput."""
    total = Counter()
    dropped: Counter[str] = Counter()
    pii: Counter[str] = Counter()
    for s in clean:
        total.update({k: s[k] for k in ("docs_in", "bytes_in", "docs_out", "bytes_out")})
        dropped.update(s["dropped"])
        pii.update(s["pii"])
    tokens = Counter()
    for p in packed:
        tokens.update(p)
    kept = len(decision["kept"])
    stages = [
        {"stage": "input", "docs": total["docs_in"], "dropped": 0},
        {"stage": "length + quality filters", "docs": total["docs_out"], "dropped": total["docs_in"] - total["docs_out"]},
        {"stage": "exact dedup (SHA-256)", "docs": total["docs_out"] - decision["exact_dropped"],
         "dropped": decision["exact_dropped"]},
        {"stage": "near dedup (MinHash LSH)", "docs": kept, "dropped": decision["near_dropped"]},
    ]
    return {"stages": stages, "drop_reasons": dict(dropped), "pii_redactions": dict(pii),
            "totals": {"input_docs": total["docs_in"], "input_bytes": total["bytes_in"], "kept_docs": kept,
                       "eval_docs": len(decision["eval"]), **dict(tokens)},
            "input_bytes": total["bytes_in"], "seconds": seconds, "mb_per_s": total["bytes_in"] / 1e6 / seconds}


def _version() -> str:
    from privlm import __version__

    return __version__


def print_report(report: dict[str, Any], out: Path) -> None:
    """The report as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"data prepared in {out}")
    for col in ("stage", "documents", "dropped"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for row in report["stages"]:
        table.add_row(row["stage"], f"{row['docs']:,}", f"{row['dropped']:,}")
    t = report["totals"]
    table.add_row("packed: train", f"{t.get('train_tokens', 0):,} tokens", f"{t.get('train_blocks', 0):,} blocks")
    table.add_row("packed: eval", f"{t.get('eval_tokens', 0):,} tokens", f"{t.get('eval_blocks', 0):,} blocks")
    console.print(table)
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(report["drop_reasons"].items())) or "none"
    pii = ", ".join(f"{k} {v}" for k, v in sorted(report["pii_redactions"].items())) or "none"
    console.print(f"filtered: {reasons}\nPII redacted: {pii}\n"
                  f"{report['input_bytes'] / 1e6:.1f} MB in {report['seconds']:.1f}s ({report['mb_per_s']:.2f} MB/s)")


def prepare_data(recipe: Recipe, force: bool = False) -> PrepareResult:
    """Run the whole pipeline for a recipe, or skip it when the manifest says the output is current."""
    started = time.perf_counter()
    out = recipe.data_path
    fp, shards = plan(recipe)
    manifest = out / "manifest.json"
    if not force and manifest.is_file() and json.loads(manifest.read_text()).get("fingerprint") == fp:
        shutil.rmtree(work_dir(recipe), ignore_errors=True)
        print(f"[privlm] {out} is up to date (inputs and settings unchanged, fingerprint {fp}); reusing it")
        return PrepareResult(out, skipped=True, report=json.loads((out / "report.json").read_text()))
    clean = _parallel(clean_shard, [(recipe, s) for s in range(len(shards))], recipe.data.workers,
                      "clean + filter + redact")
    report = finalize(recipe, fp, clean, started)
    print_report(report, out)
    return PrepareResult(out, skipped=False, report=report)
