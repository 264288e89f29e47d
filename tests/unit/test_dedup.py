"""Exact and near-duplicate detection: planted duplicates found, distinct texts kept, the first one wins."""

from __future__ import annotations

import random

import numpy as np

from jobs.data.dedup import MinHasher, exact_duplicates, exact_key, near_duplicates, shingles

HASHER = MinHasher(num_perm=128, shingle_size=5)


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


def signatures(texts: list[str]) -> np.ndarray:
    return np.stack([HASHER.signature(t) for t in texts])


def test_exact_key_and_exact_duplicates_keep_the_first() -> None:
    assert exact_key("a b") == exact_key("a b") != exact_key("a  b")
    ids = ["a", "b", "c", "d"]
    keys = [exact_key(t) for t in ("x", "y", "x", "x")]
    assert exact_duplicates(ids, keys) == {"c": "a", "d": "a"}


def test_shingles() -> None:
    assert shingles("One two, three four", 2) == {b"one two", b"two three", b"three four"}
    assert shingles("short", 5) == {b"short"}


def test_signatures_are_stable_across_instances() -> None:
    text = article(1)
    assert np.array_equal(HASHER.signature(text), MinHasher(128, 5).signature(text))
    assert HASHER.signature(text).dtype == np.uint32 and HASHER.signature(text).shape == (128,)


def test_near_duplicates_found_and_distinct_kept() -> None:
    base = [article(i) for i in range(20)]
    docs = {f"doc{i:02d}": t for i, t in enumerate(base)}
    docs["doc50-near-of-03"] = edit(base[3], 3)  # a few words changed
    docs["doc51-near-of-07"] = edit(base[7], 2, seed=1)
    docs["doc52-far-from-09"] = edit(base[9], 150, seed=2)  # half the words changed: a different text
    ids = sorted(docs)
    dropped = near_duplicates(ids, signatures([docs[i] for i in ids]), threshold=0.8)
    assert dropped == {"doc50-near-of-03": "doc03", "doc51-near-of-07": "doc07"}


def test_first_in_order_is_kept_whatever_the_input_order() -> None:
    text = article(42)
    copy = edit(text, 2)
    assert near_duplicates(["a", "b"], signatures([text, copy]), 0.8) == {"b": "a"}
    assert near_duplicates(["a", "b"], signatures([copy, text]), 0.8) == {"b": "a"}


def test_documents_are_compared_with_kept_ones_only() -> None:
    words = article(7).split()
    a = " ".join(words)
    one, two = [f"new{i}" for i in range(20)], [f"other{i}" for i in range(20)]
    b = " ".join(words[:50] + one + words[70:])  # Jaccard about 0.85 with a
    c = " ".join(words[:50] + one + words[70:200] + two + words[220:])  # 0.85 with b, 0.72 with a
    hasher = MinHasher(num_perm=256, shingle_size=5)
    sigs = np.stack([hasher.signature(t) for t in (a, b, c)])
    assert near_duplicates(["a", "b", "c"], sigs, 0.8) == {"b": "a"}  # c's only near twin, b, was dropped


def test_empty_input() -> None:
    assert near_duplicates([], np.empty((0, 128), dtype=np.uint32), 0.8) == {}
