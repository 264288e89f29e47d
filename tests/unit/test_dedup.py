"""Exact and near-duplicate detection: planted duplicates found, distinct texts kept, first one wins."""

from __future__ import annotations

import random

import numpy as np

from jobs.data.dedup import exact_key, near_duplicates, signature


def article(seed: int, words: int = 300) -> str:
    rng = random.Random(seed)
    vocab = [f"w{rng.randrange(5000)}" for _ in range(2000)]
    return " ".join(rng.choice(vocab) for _ in range(words))


def edit(text: str, changes: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = text.split()
    for _ in range(changes):
        words[rng.randrange(len(words))] = "changed"
    return " ".join(words)


def test_exact_key_is_content_hash() -> None:
    assert exact_key("a b") == exact_key("a b") != exact_key("a  b")


def test_near_duplicates_found_and_distinct_kept() -> None:
    base = [article(i) for i in range(20)]
    docs = {f"doc{i:02d}": t for i, t in enumerate(base)}
    docs["doc50-near-of-03"] = edit(base[3], 5)
    docs["doc51-near-of-07"] = edit(base[7], 3, seed=1)
    docs["doc52-far-from-09"] = edit(base[9], 150, seed=2)  # half the words changed: a different text
    ids = sorted(docs)
    sigs = np.stack([signature(docs[i], 128, 5) for i in ids])
    dropped = near_duplicates(ids, sigs, threshold=0.7)
    assert dropped == {"doc50-near-of-03": "doc03", "doc51-near-of-07": "doc07"}


def test_first_in_order_is_kept() -> None:
    text = article(42)
    ids = ["b-copy", "a-original"]
    sigs = np.stack([signature(edit(text, 2), 128, 5), signature(text, 128, 5)])
    assert near_duplicates(sorted(ids), sigs[[1, 0]], 0.7) == {"b-copy": "a-original"}
