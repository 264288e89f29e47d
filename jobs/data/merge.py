"""The global steps over every shard's work files: dedup decision and split, tokenizer, packing.

Each reads and writes files in the work directory (see `jobs.data.shard`), so on a cluster they can run as
one job after the per-shard array. Order never depends on the number of shards or workers:

- dedup keeps the first document in (source, path, record) order, from the buckets' verified pairs
  (`jobs.data.buckets`), and a repeated sentence stays in the first kept document that has it;
- the split is stratified (by source, or by a record field): within each stratum, documents in the order of
  a hash of their ids go to validation (stored as `eval`), then test, then train, in the configured shares;
- packing concatenates each split's documents in the order of another hash of their ids, so any prefix of
  blocks is a spread sample of documents; with source weights, the train split takes each source's share of
  the tokens (a small source is repeated, a large one cut), so every epoch of the sampler sees the weights.
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

EXACT, NEAR, TRAIN, EVAL, TEST = -1, -2, 0, 1, 2
SPLITS = ("train", "eval", "test")
SPLIT_CODES = ((TRAIN, "train"), (EVAL, "eval"), (TEST, "test"))


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
    """Global exact and near dedup over all shards, then the split and the repeated sentences to remove.

    Writes decision.npy and sentence_drop.npy per shard. Reads the shards' meta and the buckets' results,
    never the signatures.
    """
    from jobs.data.buckets import load_bucket_results
    from jobs.data.dedup import exact_duplicates, near_duplicates_from_pairs

    cfg = recipe.data
    metas = _load_meta(work_dir, cfg.num_shards)
    rows = sorted((tuple(m["orders"][r]), s, r) for s, m in enumerate(metas) for r in range(len(m["ids"])))
    ids = [metas[s]["ids"][r] for _, s, r in rows]
    exact = exact_duplicates(ids, [metas[s]["sha"][r] for _, s, r in rows]) if cfg.dedup.exact else {}
    pairs, sentences = load_bucket_results(work_dir, cfg.num_shards)
    near: dict[str, str] = {}
    if cfg.dedup.near:
        classes = [int(metas[s]["sha"][r][:16], 16) for _, s, r in rows]
        near = near_duplicates_from_pairs(ids, classes, pairs, [i not in exact for i in ids])
    if progress:
        progress(len(ids))
    decisions = [np.zeros(len(m["ids"]), dtype=np.int8) for m in metas]
    kept = []
    for i, (_, s, r) in enumerate(rows):
        if ids[i] in exact:
            decisions[s][r] = EXACT
        elif ids[i] in near:
            decisions[s][r] = NEAR
        else:
            kept.append((s, r))
    split_strata(kept, metas, decisions, cfg.split)
    drops = sentence_drops(sentences, metas, decisions)
    for s, d in enumerate(decisions):
        _save_npy(shard_dir(work_dir, s) / "decision.npy", d)
        _save_npy(shard_dir(work_dir, s) / "sentence_drop.npy", drops[s])
    summary = _dedup_summary(metas, decisions, exact, near)
    summary["sentences"] = {"removed": sum(len(d) for d in drops),
                            "docs": sum(len(np.unique(d["row"])) for d in drops)}
    (work_dir / "dedup.json").write_text(json.dumps(summary, indent=1))
    return summary


def split_strata(kept: list[tuple[int, int]], metas: list[dict[str, Any]], decisions: list[np.ndarray],
                 split: Any) -> None:
    """Assign each kept (shard, row) to validation (EVAL), test or train, stratum by stratum, in place.

    A stratum is the record field's value (split.by: field:NAME) or else the source. Within it, documents in
    the order of a hash of their ids: the first round(n * validation) go to validation, the next ones up to
    round(n * (validation + test)) to test.
    """
    strata: dict[tuple[str, str], list[tuple[float, int, int]]] = {}
    for s, r in kept:
        group = metas[s]["group"][r] if split.field else None
        key = ("field", group) if group is not None else ("source", str(metas[s]["orders"][r][0]))
        strata.setdefault(key, []).append((unit_hash(metas[s]["ids"][r], "split:"), s, r))
    for members in strata.values():
        members.sort()
        n_val = round(len(members) * split.validation)
        n_test = round(len(members) * (split.validation + split.test)) - n_val
        for k, (_, s, r) in enumerate(members):
            decisions[s][r] = EVAL if k < n_val else TEST if k < n_val + n_test else TRAIN


def sentence_drops(occurrences: np.ndarray, metas: list[dict[str, Any]],
                   decisions: list[np.ndarray]) -> list[np.ndarray]:
    """Per shard, (row, hash) of the sentences to remove: every kept occurrence but the first in keep order."""
    from jobs.data.buckets import SENTENCE_DTYPE

    out: list[list[tuple[int, int]]] = [[] for _ in metas]
    if len(occurrences):
        bounds = np.flatnonzero(np.r_[True, occurrences["hash"][1:] != occurrences["hash"][:-1], True])
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            group = [(tuple(metas[int(o["shard"])]["orders"][int(o["row"])]), int(o["shard"]), int(o["row"]))
                     for o in occurrences[start:end] if decisions[int(o["shard"])][int(o["row"])] >= 0]
            for _, s, r in sorted(group)[1:]:
                out[s].append((r, int(occurrences["hash"][start])))
    arrays = []
    for entries in out:
        arr = np.array(sorted(entries), dtype=np.uint64).reshape(-1, 2)
        rec = np.empty(len(arr), dtype=SENTENCE_DTYPE)
        rec["row"], rec["hash"] = arr[:, 0], arr[:, 1]
        arrays.append(rec)
    return arrays


def _dedup_summary(metas: list[dict[str, Any]], decisions: list[np.ndarray], exact: dict[str, str],
                   near: dict[str, str]) -> dict[str, Any]:
    """Counts and bytes per outcome, and a sample of what was dropped as a duplicate of what."""
    out: dict[str, Any] = {}
    for name, code in (("exact", EXACT), ("near", NEAR), ("train", TRAIN), ("eval", EVAL), ("test", TEST)):
        docs = sum(int((d == code).sum()) for d in decisions)
        size = sum(int(np.asarray(m["bytes"], dtype=np.int64)[d == code].sum()) for m, d in zip(metas, decisions,
                                                                                               strict=True))
        out[name] = {"docs": docs, "bytes": size}
    out["examples"] = {"exact": dict(sorted(exact.items())[:20]), "near": dict(sorted(near.items())[:20])}
    return out


MAX_TOKENIZER_REPEATS = 16


def tokenizer_repeats(recipe: Recipe, work_dir: Path) -> dict[int, int]:
    """How many times the tokenizer sees each source's train texts: once without weights; with weights, the
    whole number of passes closest to the source's weighted share of the train bytes (1 to 16: more
    makes BPE memorise a small source's phrases).

    BPE merges follow frequency, so a small Chinese source weighted at 70% must count as 70% of the text, or
    its characters stay split into bytes (see the README's tokenizer figures).
    """
    weights = [src.weight for src in recipe.data.sources]
    if weights[0] is None:
        return dict.fromkeys(range(len(weights)), 1)
    natural = [0] * len(weights)
    for s, meta in enumerate(_load_meta(work_dir, recipe.data.num_shards)):
        decision = np.load(shard_dir(work_dir, s) / "decision.npy")
        for row, order in enumerate(meta["orders"]):
            if decision[row] == TRAIN:
                natural[order[0]] += meta["bytes"][row]
    total = sum(natural)
    return {i: min(MAX_TOKENIZER_REPEATS, max(1, round(w / sum(weights) * total / natural[i]))) if natural[i] else 1
            for i, w in enumerate(weights)}


def _train_texts(recipe: Recipe, work_dir: Path, progress: Bar | None) -> Any:
    """The train split's kept texts, shard by shard, each as often as `tokenizer_repeats` says; with
    tokenizer.max_train_bytes, an even share per shard."""
    from jobs.data.shard import kept_documents

    cfg = recipe.data
    budget = recipe.tokenizer.max_train_bytes
    per_shard = None if budget is None else budget // cfg.num_shards + 1
    repeats = tokenizer_repeats(recipe, work_dir)
    metas = _load_meta(work_dir, cfg.num_shards)
    for s in range(cfg.num_shards):
        sources = [order[0] for order in metas[s]["orders"]]
        used = 0
        for row, text in kept_documents(recipe, work_dir, s, codes=(TRAIN,)):
            if per_shard is not None and used >= per_shard:
                break
            times = repeats[sources[row]]
            used += len(text.encode("utf-8")) * times
            if progress:
                progress(1)
            yield from [text] * times


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


def _doc_table(recipe: Recipe, work_dir: Path) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """One row per kept document across shards: shard, offset and length in its tokens.bin, split, hashes,
    source, language (an index into the returned language list); and the documents' ids."""
    names = ("shard", "offset", "length", "split", "order", "rank", "bytes", "source", "lang")
    cols: dict[str, list[Any]] = {k: [] for k in names}
    ids: list[str] = []
    metas = _load_meta(work_dir, recipe.data.num_shards)
    languages = sorted({lang for m in metas for lang in m["lang"]})
    lang_index = {lang: i for i, lang in enumerate(languages)}
    for s, meta in enumerate(metas):
        tokens = shard_dir(work_dir, s) / "tokens"
        lengths, rows = np.load(tokens / "lengths.npy"), np.load(tokens / "rows.npy")
        sizes = np.load(tokens / "bytes.npy")
        decision = np.load(shard_dir(work_dir, s) / "decision.npy")
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
        for row, off, n, size in zip(rows, offsets, lengths, sizes, strict=True):
            doc_id = meta["ids"][row]
            ids.append(doc_id)
            for key, value in (("shard", s), ("offset", off), ("length", n), ("split", decision[row]),
                               ("order", stable_hash(doc_id, "order:")), ("rank", unit_hash(doc_id, "split:")),
                               ("bytes", size), ("source", meta["orders"][row][0]),
                               ("lang", lang_index[meta["lang"][row]])):
                cols[key].append(value)
    dtypes = {"order": np.uint64, "rank": np.float64}
    return {k: np.asarray(v, dtype=dtypes.get(k, np.int64)) for k, v in cols.items()}, languages, ids


def top_up(table: dict[str, np.ndarray], block_size: int, code: int, fraction: float) -> int:
    """Move train documents (lowest split hash first) to split `code` until it fills one block; return how many.

    Only when its fraction > 0, and never so many that train would fall below one block. This happens on tiny
    corpora only; the documents moved were among the tokenizer's training texts.
    """
    if fraction <= 0:
        return 0
    split, length = table["split"], table["length"]
    held_tokens, train_tokens = int(length[split == code].sum()), int(length[split == TRAIN].sum())
    moved = 0
    for i in np.argsort(table["rank"], kind="stable"):
        if held_tokens >= block_size:
            break
        if split[i] == TRAIN and train_tokens - length[i] >= block_size:
            split[i] = code
            held_tokens, train_tokens, moved = held_tokens + length[i], train_tokens - length[i], moved + 1
    return moved


def _token_stream(path: Path, dtype: np.dtype) -> np.ndarray:
    """A shard's token ids, memory-mapped (numpy cannot map an empty file)."""
    return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.empty(0, dtype)


Piece = tuple[int, int, int]  # (row of the document table, tokens taken from its start, repeat)


def natural_pieces(table: dict[str, np.ndarray], chosen: np.ndarray) -> list[Piece]:
    """Every chosen document whole, in the packing order."""
    order = chosen[np.lexsort((table["offset"][chosen], table["shard"][chosen], table["order"][chosen]))]
    return [(int(i), int(table["length"][i]), 0) for i in order]


def weighted_pieces(table: dict[str, np.ndarray], chosen: np.ndarray, ids: list[str],
                    weights: list[float]) -> list[Piece]:
    """The chosen documents with each source's share of the tokens: source s gets round(w_s / sum(w) * T) of
    the T natural tokens. A source short of its share is repeated (each pass in a fresh hash order), one with
    more is cut; the last document taken is cut to the exact count. Pieces of all sources are interleaved in
    the order of a hash of (id, pass)."""
    total = int(table["length"][chosen].sum())
    pieces: list[tuple[int, int, int, int]] = []  # (order hash, row, take, pass)
    for source, weight in enumerate(weights):
        mine = chosen[table["source"][chosen] == source]
        need = round(weight / sum(weights) * total)
        if need and not int(table["length"][mine].sum()):
            raise ValueError(f"data.sources[{source}].weight={weight} but the source has no train tokens left "
                             "after filtering and dedup; remove its weight or loosen the filters")
        repeat = 0
        while need > 0:
            salt = "order:" if repeat == 0 else f"order:{repeat}:"
            hashes = [stable_hash(ids[i], salt) for i in mine]
            for k in np.lexsort((table["offset"][mine], table["shard"][mine], np.asarray(hashes, np.uint64))):
                i = int(mine[k])
                take = min(int(table["length"][i]), need)
                pieces.append((hashes[k], i, take, repeat))
                need -= take
                if need == 0:
                    break
            repeat += 1
    pieces.sort(key=lambda p: (p[0], int(table["shard"][p[1]]), int(table["offset"][p[1]]), p[3]))
    return [(i, take, rep) for _, i, take, rep in pieces]


def pack(recipe: Recipe, work_dir: Path, out_dir: Path, tokenizer: dict[str, Any],
         progress: Bar | None = None) -> dict[str, Any]:
    """Concatenate each split's token streams in the packing order and cut them into block files in out_dir."""
    from jobs.data.pack import BlockWriter, token_dtype

    block = recipe.training.sequence_length
    dtype = token_dtype(tokenizer["vocab_size"])
    per_file = max(1, int(recipe.data.output_file_mb * 1e6) // (block * dtype.itemsize))
    table, languages, ids = _doc_table(recipe, work_dir)
    split_cfg = recipe.data.split
    moved = {"eval": top_up(table, block, EVAL, split_cfg.validation),
             "test": top_up(table, block, TEST, split_cfg.test)}
    streams = [_token_stream(shard_dir(work_dir, s) / "tokens" / "tokens.bin", dtype)
               for s in range(recipe.data.num_shards)]
    weights = [src.weight for src in recipe.data.sources]
    splits, index_entries = {}, {}
    for code, name in SPLIT_CODES:
        writer = BlockWriter(out_dir, name, block, dtype, per_file)
        chosen = np.nonzero(table["split"] == code)[0]
        weighted = code == TRAIN and weights[0] is not None
        pieces = weighted_pieces(table, chosen, ids, weights) if weighted else natural_pieces(table, chosen)
        per_source: dict[str, int] = {}
        per_lang: dict[str, int] = {}
        for i, take, _ in pieces:
            s, off = table["shard"][i], table["offset"][i]
            writer.write(streams[s][off:off + take])
            src, lang = str(int(table["source"][i])), languages[int(table["lang"][i])]
            per_source[src] = per_source.get(src, 0) + take
            per_lang[lang] = per_lang.get(lang, 0) + take
            if progress:
                progress(1)
        index_entries[name] = writer.close()
        splits[name] = {"docs": len(chosen), "bytes": int(table["bytes"][chosen].sum()),
                        "tokens": sum(take for _, take, _ in pieces), "blocks": writer.blocks,
                        "tokens_in_blocks": writer.tokens_written, "tokens_dropped": writer.tokens_dropped,
                        "files": len(index_entries[name]), "tokens_per_source": dict(sorted(per_source.items())),
                        "tokens_per_language": dict(sorted(per_lang.items())),
                        "bytes_per_language": _per_language(table, "bytes", chosen, languages),
                        "natural_tokens": int(table["length"][chosen].sum()),
                        "natural_tokens_per_language": _per_language(table, "length", chosen, languages),
                        "docs_per_source": {str(k): int(v) for k, v in
                                            zip(*np.unique(table["source"][chosen], return_counts=True), strict=True)}}
    return {"splits": splits, "index": index_entries, "eval_topped_up_docs": moved["eval"],
            "test_topped_up_docs": moved["test"], "dtype": dtype}


def _per_language(table: dict[str, np.ndarray], column: str, chosen: np.ndarray,
                  languages: list[str]) -> dict[str, int]:
    """The sum of a column over the chosen documents, per language (before any weighting)."""
    return {lang: int(table[column][chosen][table["lang"][chosen] == k].sum())
            for k, lang in enumerate(languages) if (table["lang"][chosen] == k).any()}
