"""The global steps over every shard's work files: dedup decision and split, tokenizer, packing.

Each reads and writes files in the work directory (see `jobs.data.shard`), so on a cluster they can run as
one job after the per-shard array. Order never depends on the number of shards or workers:

- dedup keeps the first document in (source, path, record) order;
- a document goes to eval when a hash of its id falls below data.eval_fraction;
- packing concatenates each split's documents in the order of another hash of their ids, so any prefix of
  blocks is a spread sample of documents.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from jobs.data.progress import Bar
from jobs.data.shard import iter_documents, shard_dir
from jobs.data.sources import stable_hash
from jobs.recipe import Recipe

EXACT, NEAR, TRAIN, EVAL = -1, -2, 0, 1
SPLITS = ("train", "eval")


def unit_hash(doc_id: str, salt: str) -> float:
    """A stable number in [0, 1) for a document id."""
    return stable_hash(doc_id, salt) / 2**64


def _load_meta(work_dir: Path, num_shards: int) -> list[dict[str, Any]]:
    return [json.loads((shard_dir(work_dir, s) / "clean" / "meta.json").read_text()) for s in range(num_shards)]


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, array)
    os.replace(tmp, path)


def deduplicate(recipe: Recipe, work_dir: Path, progress: Bar | None = None) -> dict[str, Any]:
    """Global exact and near dedup over all shards, then the train/eval split; writes decision.npy per shard."""
    from jobs.data.dedup import exact_duplicates, near_duplicates

    cfg = recipe.data
    metas = _load_meta(work_dir, cfg.num_shards)
    rows = sorted((tuple(m["orders"][r]), s, r) for s, m in enumerate(metas) for r in range(len(m["ids"])))
    ids = [metas[s]["ids"][r] for _, s, r in rows]
    exact = exact_duplicates(ids, [metas[s]["sha"][r] for _, s, r in rows]) if cfg.dedup.exact else {}
    survivors = [(i, s, r) for i, (_, s, r) in enumerate(rows) if ids[i] not in exact]
    near: dict[str, str] = {}
    if cfg.dedup.near and survivors:
        sigs = [np.load(shard_dir(work_dir, s) / "clean" / "minhash.npy") for s in range(cfg.num_shards)]
        matrix = np.stack([sigs[s][r] for _, s, r in survivors])
        near = near_duplicates([ids[i] for i, _, _ in survivors], matrix, cfg.dedup.threshold, progress)
    decisions = [np.zeros(len(m["ids"]), dtype=np.int8) for m in metas]
    for i, (_, s, r) in enumerate(rows):
        doc_id = ids[i]
        decisions[s][r] = (EXACT if doc_id in exact else NEAR if doc_id in near
                           else EVAL if unit_hash(doc_id, "split:") < cfg.eval_fraction else TRAIN)
    for s, d in enumerate(decisions):
        _save_npy(shard_dir(work_dir, s) / "decision.npy", d)
    summary = _dedup_summary(metas, decisions, exact, near)
    (work_dir / "dedup.json").write_text(json.dumps(summary, indent=1))
    return summary


def _dedup_summary(metas: list[dict[str, Any]], decisions: list[np.ndarray], exact: dict[str, str],
                   near: dict[str, str]) -> dict[str, Any]:
    """Counts and bytes per outcome, and a sample of what was dropped as a duplicate of what."""
    out: dict[str, Any] = {}
    for name, code in (("exact", EXACT), ("near", NEAR), ("train", TRAIN), ("eval", EVAL)):
        docs = sum(int((d == code).sum()) for d in decisions)
        size = sum(int(np.asarray(m["bytes"], dtype=np.int64)[d == code].sum()) for m, d in zip(metas, decisions,
                                                                                               strict=True))
        out[name] = {"docs": docs, "bytes": size}
    out["examples"] = {"exact": dict(sorted(exact.items())[:20]), "near": dict(sorted(near.items())[:20])}
    return out


def _train_texts(recipe: Recipe, work_dir: Path, progress: Bar | None) -> Any:
    """The train split's kept texts, shard by shard; with tokenizer.max_train_bytes, an even share per shard."""
    cfg = recipe.data
    decisions = [np.load(shard_dir(work_dir, s) / "decision.npy") for s in range(cfg.num_shards)]
    budget = recipe.tokenizer.max_train_bytes
    per_shard = None if budget is None else budget // cfg.num_shards + 1
    for s in range(cfg.num_shards):
        used = 0
        for row, _, text in iter_documents(work_dir, s):
            if decisions[s][row] != TRAIN:
                continue
            if per_shard is not None and used >= per_shard:
                break
            used += len(text.encode("utf-8"))
            if progress:
                progress(1)
            yield text


def build_tokenizer(recipe: Recipe, work_dir: Path, progress: Bar | None = None) -> dict[str, Any]:
    """Train the BPE tokenizer on the train split, or copy tokenizer.path; into `<work_dir>/tokenizer`."""
    from jobs.data.tokenizer import check_vocab, copy_tokenizer, train_tokenizer

    final = work_dir / "tokenizer"
    tmp = work_dir / "tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if recipe.tokenizer.path:
        source = recipe.tokenizer.path
        tok = copy_tokenizer(Path(source), tmp)
    else:
        source = "trained"
        tok = train_tokenizer(_train_texts(recipe, work_dir, progress), recipe.tokenizer.vocab_size,
                              recipe.tokenizer.min_frequency, tmp)
    check_vocab(tok, recipe.model.vocab_size, f"tokenizer.path={source!r}" if recipe.tokenizer.path else
                "training")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return {"source": source, "vocab_size": len(tok), "eos_id": tok.eos_token_id, "eos_token": tok.eos_token}


def _doc_table(recipe: Recipe, work_dir: Path) -> dict[str, np.ndarray]:
    """One row per kept document across shards: shard, offset and length in its tokens.bin, split, hashes."""
    cols: dict[str, list[Any]] = {k: [] for k in ("shard", "offset", "length", "split", "order", "rank", "bytes")}
    for s, meta in enumerate(_load_meta(work_dir, recipe.data.num_shards)):
        tokens = shard_dir(work_dir, s) / "tokens"
        lengths, rows = np.load(tokens / "lengths.npy"), np.load(tokens / "rows.npy")
        decision = np.load(shard_dir(work_dir, s) / "decision.npy")
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
        for row, off, n in zip(rows, offsets, lengths, strict=True):
            doc_id = meta["ids"][row]
            cols["shard"].append(s)
            cols["offset"].append(off)
            cols["length"].append(n)
            cols["split"].append(decision[row])
            cols["order"].append(stable_hash(doc_id, "order:"))
            cols["rank"].append(unit_hash(doc_id, "split:"))
            cols["bytes"].append(meta["bytes"][row])
    dtypes = {"order": np.uint64, "rank": np.float64}
    return {k: np.asarray(v, dtype=dtypes.get(k, np.int64)) for k, v in cols.items()}


def top_up_eval(table: dict[str, np.ndarray], block_size: int, eval_fraction: float) -> int:
    """Move train documents (lowest split hash first) to eval until eval fills one block; return how many.

    Only when eval_fraction > 0, and never so many that train would fall below one block. This happens on tiny
    corpora only; the documents moved were among the tokenizer's training texts.
    """
    if eval_fraction <= 0:
        return 0
    split, length = table["split"], table["length"]
    eval_tokens, train_tokens = int(length[split == EVAL].sum()), int(length[split == TRAIN].sum())
    moved = 0
    for i in np.argsort(table["rank"], kind="stable"):
        if eval_tokens >= block_size:
            break
        if split[i] == TRAIN and train_tokens - length[i] >= block_size:
            split[i] = EVAL
            eval_tokens, train_tokens, moved = eval_tokens + length[i], train_tokens - length[i], moved + 1
    return moved


def _token_stream(path: Path, dtype: np.dtype) -> np.ndarray:
    """A shard's token ids, memory-mapped (numpy cannot map an empty file)."""
    return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.empty(0, dtype)


def pack(recipe: Recipe, work_dir: Path, out_dir: Path, tokenizer: dict[str, Any],
         progress: Bar | None = None) -> dict[str, Any]:
    """Concatenate each split's token streams in the packing order and cut them into block files in out_dir."""
    from jobs.data.pack import BlockWriter, token_dtype

    block = recipe.training.sequence_length
    dtype = token_dtype(tokenizer["vocab_size"])
    per_file = max(1, int(recipe.data.output_file_mb * 1e6) // (block * dtype.itemsize))
    table = _doc_table(recipe, work_dir)
    moved = top_up_eval(table, block, recipe.data.eval_fraction)
    streams = [_token_stream(shard_dir(work_dir, s) / "tokens" / "tokens.bin", dtype)
               for s in range(recipe.data.num_shards)]
    splits, index_entries = {}, {}
    for code, name in ((TRAIN, "train"), (EVAL, "eval")):
        writer = BlockWriter(out_dir, name, block, dtype, per_file)
        chosen = np.nonzero(table["split"] == code)[0]
        for i in chosen[np.lexsort((table["offset"][chosen], table["shard"][chosen], table["order"][chosen]))]:
            s, off = table["shard"][i], table["offset"][i]
            writer.write(streams[s][off:off + table["length"][i]])
            if progress:
                progress(1)
        index_entries[name] = writer.close()
        splits[name] = {"docs": len(chosen), "bytes": int(table["bytes"][chosen].sum()),
                        "tokens": int(table["length"][chosen].sum()), "blocks": writer.blocks,
                        "tokens_in_blocks": writer.tokens_written, "tokens_dropped": writer.tokens_dropped,
                        "files": len(index_entries[name])}
    return {"splits": splits, "index": index_entries, "eval_topped_up_docs": moved, "dtype": dtype}
