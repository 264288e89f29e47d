"""The per-shard steps, each runnable as its own process (a pool worker here, a Slurm array task there).

They talk only through files in the work directory `<data_path>.work/`:

    plan.json                        fingerprint, settings hash, shard count (from `pipeline.plan_shards`)
    shard-00003/inputs.json          the input files of shard 3 (from `pipeline.plan_shards`)
    shard-00003/clean/docs.jsonl     its documents after cleaning, filtering and redaction: {"id", "text"}
    shard-00003/clean/meta.json      per document: id, keep-first order (source, path, record), bytes, and
                                     the SHA-256 of the text as it will be trained on (normalised, redacted)
    shard-00003/clean/minhash.npy    MinHash signatures, documents x num_perm
    shard-00003/clean/stats.json     documents and bytes per stage, drop reasons, PII counts
    shard-00003/decision.npy         from the global dedup: -2 near dup, -1 exact dup, 0 train, 1 eval
    shard-00003/tokens/              token ids of the kept documents, each followed by EOS

A step writes into `<name>.tmp` and renames it into place, so a directory that exists is complete; a rerun of
`process_shard` (a requeued array task, or `prepare` after a failure) skips a shard whose clean/ exists.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jobs.data.sources import InputFile, read_documents
from jobs.recipe import Recipe, load_recipe, parse_recipe

STAGES = ("read", "normalise", "length filter", "quality filter", "pii redaction")
Progress = Callable[[int], None] | None


def shard_dir(work_dir: Path, shard_index: int) -> Path:
    return Path(work_dir) / f"shard-{shard_index:05d}"


def as_recipe(recipe: Recipe | str | Path) -> Recipe:
    """A Recipe, or one loaded from a YAML recipe file or a JSON dump of one."""
    if isinstance(recipe, Recipe):
        return recipe
    path = Path(recipe)
    if path.suffix == ".json":
        return parse_recipe(json.loads(path.read_text()), str(path))
    return load_recipe(path)


def check_plan(recipe: Recipe, work_dir: Path) -> dict[str, Any]:
    """The work directory's plan, refusing one made for other settings."""
    from jobs.data.manifest import settings_hash

    plan_file = Path(work_dir) / "plan.json"
    if not plan_file.is_file():
        raise FileNotFoundError(f"{work_dir} has no plan.json; run jobs.data.pipeline.plan_shards(recipe) first")
    plan = json.loads(plan_file.read_text())
    if plan["settings"] != settings_hash(recipe):
        raise ValueError(f"{work_dir} was planned with other data settings than recipe {recipe.name!r}; "
                         "plan it again (privlm data prepare --force)")
    return plan


def _publish(tmp: Path, final: Path) -> None:
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


class ShardStats:
    """Documents and bytes kept after each stage, drop reasons, PII redactions of one shard."""

    def __init__(self, shard: int) -> None:
        self.shard = shard
        self.kept = {stage: [0, 0] for stage in STAGES}
        self.dropped: dict[str, list[int]] = {}
        self.pii: Counter[str] = Counter()
        self.pii_docs = 0

    def keep(self, stage: str, text: str) -> None:
        self.kept[stage][0] += 1
        self.kept[stage][1] += len(text.encode("utf-8"))

    def drop(self, reason: str, text: str) -> None:
        row = self.dropped.setdefault(reason, [0, 0])
        row[0] += 1
        row[1] += len(text.encode("utf-8"))

    def to_json(self, **extra: Any) -> dict[str, Any]:
        return {"shard": self.shard, "kept": self.kept, "dropped": self.dropped, "pii": dict(self.pii),
                "pii_docs": self.pii_docs, **extra}


def clean_document(text: str, recipe: Recipe, stats: ShardStats) -> str | None:
    """Normalise, filter and redact one document; None when it is dropped (the reason goes to stats)."""
    from jobs.data.clean import length_reason, looks_binary, normalize
    from jobs.data.pii import redact
    from jobs.data.quality import Doc, quality_reason

    cfg = recipe.data
    stats.keep("read", text)
    if looks_binary(text):
        stats.drop("binary", text)
        return None
    text = normalize(text)
    stats.keep("normalise", text)
    doc = Doc.of(text)
    reason = length_reason(text, cfg.filters, len(doc.words))
    if reason:
        stats.drop(reason, text)
        return None
    stats.keep("length filter", text)
    reason = quality_reason(doc, cfg.filters)
    if reason:
        stats.drop(reason, text)
        return None
    stats.keep("quality filter", text)
    text, found = redact(text, cfg.pii)
    stats.pii.update(found)
    stats.pii_docs += bool(found)
    stats.keep("pii redaction", text)
    return text


def process_shard(recipe: Recipe | str | Path, shard_index: int, work_dir: str | Path,
                  progress: Progress = None) -> dict[str, Any]:
    """Clean, filter and redact one shard's documents; hash and MinHash them for the global dedup.

    Reads `shard-NNNNN/inputs.json`, writes `shard-NNNNN/clean/` (docs.jsonl, meta.json, minhash.npy,
    stats.json); returns the stats. A shard already cleaned (by an earlier, interrupted run) is not redone.
    """
    from jobs.data.dedup import MinHasher, exact_key

    recipe = as_recipe(recipe)
    check_plan(recipe, Path(work_dir))
    final = shard_dir(Path(work_dir), shard_index) / "clean"
    if (final / "stats.json").is_file():
        stats = json.loads((final / "stats.json").read_text())
        if progress:
            progress(stats["file_bytes"])
        return stats
    started = time.perf_counter()
    tmp = final.with_name("clean.tmp")
    items = [InputFile(**x) for x in json.loads((final.parent / "inputs.json").read_text())]
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    stats = ShardStats(shard_index)
    hasher = MinHasher(recipe.data.dedup.num_perm, recipe.data.dedup.shingle_size) if recipe.data.dedup.near else None
    meta: dict[str, list[Any]] = {"ids": [], "orders": [], "sha": [], "bytes": []}
    signatures = []
    with open(tmp / "docs.jsonl", "w", encoding="utf-8") as out:
        for doc in _documents(items, progress):
            text = clean_document(doc.text, recipe, stats)
            if text is None:
                continue
            out.write(json.dumps({"id": doc.doc_id, "text": text}, ensure_ascii=False) + "\n")
            meta["ids"].append(doc.doc_id)
            meta["orders"].append(list(doc.order))
            meta["sha"].append(exact_key(text))
            meta["bytes"].append(len(text.encode("utf-8")))
            if hasher is not None:
                signatures.append(hasher.signature(text))
    num_perm = recipe.data.dedup.num_perm if hasher else 0
    np.save(tmp / "minhash.npy", np.array(signatures, dtype=np.uint32).reshape(len(meta["ids"]), num_perm))
    (tmp / "meta.json").write_text(json.dumps(meta))
    result = stats.to_json(files=len(items), file_bytes=sum(x.size for x in items),
                           seconds=time.perf_counter() - started)
    (tmp / "stats.json").write_text(json.dumps(result))
    _publish(tmp, final)
    return result


def _documents(items: list[InputFile], progress: Progress) -> Iterator[Any]:
    """Every document of the shard's files; progress advances by each file's size once it is read."""
    for item in items:
        yield from read_documents(item)
        if progress:
            progress(item.size)


def iter_documents(work_dir: Path, shard_index: int) -> Iterator[tuple[int, str, str]]:
    """(row, id, text) of the documents that passed the shard's filters, in file order."""
    with open(shard_dir(work_dir, shard_index) / "clean" / "docs.jsonl", encoding="utf-8") as fh:
        for row, line in enumerate(fh):
            doc = json.loads(line)
            yield row, doc["id"], doc["text"]


def tokenize_shard(recipe: Recipe | str | Path, shard_index: int, work_dir: str | Path,
                   progress: Progress = None) -> dict[str, Any]:
    """Token ids of the shard's kept documents, each followed by EOS, with the work directory's tokenizer.

    Writes `shard-NNNNN/tokens/` (tokens.bin in the index dtype, lengths.npy and rows.npy per kept document);
    returns the token count. Documents go to the Rust tokenizer in batches of ~8 MB, which it spreads over
    every core: a local run calls this in its own process, one shard after the other.
    """
    recipe, work_dir = as_recipe(recipe), Path(work_dir)
    check_plan(recipe, work_dir)
    final = shard_dir(work_dir, shard_index) / "tokens"
    tmp = final.with_name("tokens.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tok = load_work_tokenizer(work_dir)
    decision = np.load(shard_dir(work_dir, shard_index) / "decision.npy")
    rows, lengths = [], []
    with open(tmp / "tokens.bin", "wb") as out:
        for batch in _kept_batches(work_dir, shard_index, decision):
            lengths += _write_tokens(tok, [text for _, text in batch], out)
            rows += [row for row, _ in batch]
            if progress:
                progress(sum(len(text.encode("utf-8")) for _, text in batch))
    np.save(tmp / "lengths.npy", np.asarray(lengths, dtype=np.int64))
    np.save(tmp / "rows.npy", np.asarray(rows, dtype=np.int64))
    _publish(tmp, final)
    return {"shard": shard_index, "tokens": int(sum(lengths))}


def _kept_batches(work_dir: Path, shard_index: int, decision: np.ndarray,
                  batch_chars: int = 8_000_000) -> Iterator[list[tuple[int, str]]]:
    """(row, text) of the documents the dedup kept, in batches of about `batch_chars` characters."""
    batch, size = [], 0
    for row, _, text in iter_documents(work_dir, shard_index):
        if decision[row] >= 0:
            batch.append((row, text))
            size += len(text)
            if size >= batch_chars:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def _write_tokens(tok: Any, texts: list[str], out: Any) -> list[int]:
    """Append each text's ids and an EOS to `out`; return the lengths (EOS included)."""
    from jobs.data.pack import token_dtype
    from jobs.data.tokenizer import encode_batch

    dtype, eos = token_dtype(len(tok)), tok.eos_token_id
    lengths = []
    for ids in encode_batch(tok, texts):
        np.asarray([*ids, eos], dtype=dtype).tofile(out)
        lengths.append(len(ids) + 1)
    return lengths


def load_work_tokenizer(work_dir: Path) -> Any:
    """The tokenizer in `<work_dir>/tokenizer`, loaded once per version of its files."""
    tok_file = Path(work_dir) / "tokenizer" / "tokenizer.json"
    st = tok_file.stat()
    return _load_tokenizer(str(tok_file.parent), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=1)
def _load_tokenizer(path: str, mtime_ns: int, size: int) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
