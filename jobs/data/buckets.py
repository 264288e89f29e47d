"""The distributed half of the global dedup: one task per bucket of LSH band keys and sentence hashes.

Each `process_shard` writes, per bucket, the band keys (`clean/bands/bucket-NNNNN.npy`: key, SHA-256 prefix,
row) and the prose sentence hashes (`clean/sentences/bucket-NNNNN.npy`: hash, row) of its documents. Task j
(`dedup_bucket`) reads bucket j of every shard, so it holds 1/num_shards of the keys, and reads only the
signature rows it needs, memory-mapped:

    buckets/bucket-00003/pairs.npy      verified similar pairs of texts, as (SHA prefix, SHA prefix), sorted
    buckets/bucket-00003/sentences.npy  sentences found in two or more documents: (hash, shard, row), sorted

Documents with one text (one SHA-256) share a signature, so a band group is reduced to one document per text
before pairs are checked, and a pair of texts stands for every pair of their copies. The final decision
(`jobs.data.merge.deduplicate`) needs only these small files, never the signatures.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from jobs.data.shard import Progress, as_recipe, check_plan, publish, shard_dir

BAND_DTYPE = np.dtype([("key", "<u8"), ("sha", "<u8"), ("row", "<u4")])
SENTENCE_DTYPE = np.dtype([("hash", "<u8"), ("row", "<u4")])
OCCURRENCE_DTYPE = np.dtype([("hash", "<u8"), ("shard", "<u4"), ("row", "<u4")])


def bucket_file(work_dir: Path, shard_index: int, kind: str, bucket: int) -> Path:
    return shard_dir(work_dir, shard_index) / "clean" / kind / f"bucket-{bucket:05d}.npy"


def bucket_dir(work_dir: Path, bucket: int) -> Path:
    return Path(work_dir) / "buckets" / f"bucket-{bucket:05d}"


def write_buckets(out_dir: Path, kind: str, entries: np.ndarray, buckets: np.ndarray, num_buckets: int) -> None:
    """Split one shard's entries by bucket into `out_dir/kind/bucket-NNNNN.npy` (every bucket gets a file)."""
    folder = out_dir / kind
    folder.mkdir(parents=True, exist_ok=True)
    for b in range(num_buckets):
        np.save(folder / f"bucket-{b:05d}.npy", entries[buckets == b])


def _group_bounds(sorted_keys: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each run of two or more equal keys."""
    if len(sorted_keys) < 2:
        return []
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    ends = np.r_[starts[1:], len(sorted_keys)]
    return [(int(s), int(e)) for s, e in zip(starts, ends, strict=True) if e - s > 1]


def similar_pairs(recipe: Any, work_dir: Path, bucket: int) -> tuple[np.ndarray, dict[str, int]]:
    """Verified (SHA prefix, SHA prefix) pairs among the documents that share a band key in this bucket."""
    from jobs.data.dedup import jaccard_estimate

    n = recipe.data.num_shards
    parts = []
    for s in range(n):
        entries = np.load(bucket_file(work_dir, s, "bands", bucket))
        part = np.empty(len(entries), dtype=[("key", "<u8"), ("sha", "<u8"), ("shard", "<u4"), ("row", "<u4")])
        part["key"], part["sha"], part["row"], part["shard"] = entries["key"], entries["sha"], entries["row"], s
        parts.append(part)
    allentries = np.concatenate(parts) if parts else np.empty(0, dtype=BAND_DTYPE)
    allentries = allentries[np.lexsort((allentries["row"], allentries["shard"], allentries["key"]))]
    signatures = [np.load(shard_dir(work_dir, s) / "clean" / "minhash.npy", mmap_mode="r") for s in range(n)]
    threshold = recipe.data.dedup.threshold
    candidates: set[tuple[int, int, int, int, int, int]] = set()
    for start, end in _group_bounds(allentries["key"]):
        group = allentries[start:end]
        _, first = np.unique(group["sha"], return_index=True)  # one document per text: the first in the group
        reps = group[np.sort(first)]
        for i in range(len(reps)):
            for j in range(i + 1, len(reps)):
                a, b = sorted(((int(reps[i]["sha"]), int(reps[i]["shard"]), int(reps[i]["row"])),
                               (int(reps[j]["sha"]), int(reps[j]["shard"]), int(reps[j]["row"]))))
                candidates.add((*a, *b))
    pairs = set()
    for sha_a, sa, ra, sha_b, sb, rb in sorted(candidates):
        if (sha_a, sha_b) not in pairs and jaccard_estimate(signatures[sa][ra], signatures[sb][rb]) >= threshold:
            pairs.add((sha_a, sha_b))
    out = np.array(sorted(pairs), dtype=np.uint64).reshape(-1, 2)
    return out, {"band_entries": len(allentries), "candidate_pairs": len(candidates), "similar_pairs": len(out)}


def repeated_sentences(recipe: Any, work_dir: Path, bucket: int) -> np.ndarray:
    """(hash, shard, row) of every sentence of this bucket that occurs in two or more documents."""
    parts = []
    for s in range(recipe.data.num_shards):
        entries = np.load(bucket_file(work_dir, s, "sentences", bucket))
        part = np.empty(len(entries), dtype=OCCURRENCE_DTYPE)
        part["hash"], part["row"], part["shard"] = entries["hash"], entries["row"], s
        parts.append(part)
    occ = np.concatenate(parts) if parts else np.empty(0, dtype=OCCURRENCE_DTYPE)
    occ = occ[np.lexsort((occ["row"], occ["shard"], occ["hash"]))]
    keep = np.zeros(len(occ), dtype=bool)
    for start, end in _group_bounds(occ["hash"]):
        keep[start:end] = True
    return occ[keep]


def dedup_bucket(recipe: Any, bucket: int, work_dir: str | Path, progress: Progress = None) -> dict[str, Any]:
    """Array task `bucket` of the global dedup: similar pairs and repeated sentences of one bucket.

    Writes `buckets/bucket-NNNNN/` (pairs.npy, sentences.npy, stats.json); a bucket already done is skipped.
    """
    recipe, work_dir = as_recipe(recipe), Path(work_dir)
    check_plan(recipe, work_dir)
    final = bucket_dir(work_dir, bucket)
    if (final / "stats.json").is_file():
        if progress:
            progress(1)
        return json.loads((final / "stats.json").read_text())
    started = time.perf_counter()
    tmp = final.with_name(final.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    dedup = recipe.data.dedup
    stats: dict[str, Any] = {"bucket": bucket}
    pairs = np.empty((0, 2), dtype=np.uint64)
    if dedup.near:
        pairs, counts = similar_pairs(recipe, work_dir, bucket)
        stats.update(counts)
    np.save(tmp / "pairs.npy", pairs)
    sentences = repeated_sentences(recipe, work_dir, bucket) if dedup.sentences else np.empty(0, OCCURRENCE_DTYPE)
    np.save(tmp / "sentences.npy", sentences)
    stats.update(repeated_sentence_occurrences=len(sentences), seconds=time.perf_counter() - started)
    (tmp / "stats.json").write_text(json.dumps(stats))
    publish(tmp, final)
    if progress:
        progress(1)
    return stats


def load_bucket_results(work_dir: Path, num_buckets: int) -> tuple[set[tuple[int, int]], np.ndarray]:
    """Every bucket's similar pairs (as a set) and repeated-sentence occurrences (concatenated)."""
    pairs: set[tuple[int, int]] = set()
    sentences = []
    for b in range(num_buckets):
        folder = bucket_dir(work_dir, b)
        pairs.update((int(x), int(y)) for x, y in np.load(folder / "pairs.npy"))
        sentences.append(np.load(folder / "sentences.npy"))
    return pairs, np.concatenate(sentences) if sentences else np.empty(0, OCCURRENCE_DTYPE)
