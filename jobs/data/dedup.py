"""Exact (SHA-256) and near-duplicate (MinHash LSH) detection.

Per shard, `exact_key` and `MinHasher.signature` turn each document into a hash and a signature; one global
pass (`exact_duplicates`, then `near_duplicates`) walks every shard's documents in the keep-first order and
drops a document when an earlier kept one has the same hash or a similar enough signature.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import numpy as np

_WORD = re.compile(r"\w+")
SCHEME = "affine32"  # datasketch's hashing scheme, named so stored signatures stay comparable
SEED = 1


def exact_key(text: str) -> str:
    """SHA-256 of the normalised text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def shingles(text: str, size: int) -> set[bytes]:
    """Lower-cased word n-grams (the whole text when it is shorter than one n-gram)."""
    words = _WORD.findall(text.lower())
    if len(words) <= size:
        return {" ".join(words).encode()}
    return {" ".join(words[i:i + size]).encode() for i in range(len(words) - size + 1)}


class MinHasher:
    """MinHash signatures with one fixed set of permutations (built once, not per document)."""

    def __init__(self, num_perm: int, shingle_size: int) -> None:
        from datasketch import MinHash

        self.shingle_size = shingle_size
        self._template = MinHash(num_perm=num_perm, seed=SEED, scheme=SCHEME)

    def signature(self, text: str) -> np.ndarray:
        """The signature of a text's shingles: num_perm uint32 values."""
        from datasketch import MinHash

        mh = MinHash(num_perm=len(self._template), seed=SEED, scheme=SCHEME,
                     permutations=self._template.permutations)
        mh.update_batch(shingles(text, self.shingle_size))
        return mh.hashvalues


def jaccard_estimate(a: np.ndarray, b: np.ndarray) -> float:
    """Share of equal signature entries: an unbiased estimate of the shingles' Jaccard similarity."""
    return float(np.mean(a == b))


def exact_duplicates(ids: list[str], keys: list[str]) -> dict[str, str]:
    """{dropped id: the kept id with the same key}, scanning in `ids` order so the first one stays."""
    first: dict[str, str] = {}
    dropped = {}
    for doc_id, key in zip(ids, keys, strict=True):
        if key in first:
            dropped[doc_id] = first[key]
        else:
            first[key] = doc_id
    return dropped


def near_duplicates(ids: list[str], signatures: np.ndarray, threshold: float,
                    progress: Any = None) -> dict[str, str]:
    """{dropped id: the kept id it duplicates}, scanning in `ids` order so the first one stays.

    LSH proposes candidates among the documents kept so far; a candidate counts only if the signatures'
    estimated Jaccard similarity reaches the threshold (LSH alone has false positives). A document is
    compared with kept documents only, so a chain a~b~c with a and c far apart keeps a and c.
    """
    from datasketch import LeanMinHash, MinHashLSH

    if not ids:
        return {}
    lsh = MinHashLSH(threshold=threshold, num_perm=signatures.shape[1])
    row_of: dict[str, int] = {}
    dropped: dict[str, str] = {}
    for i, doc_id in enumerate(ids):
        mh = LeanMinHash(seed=SEED, hashvalues=signatures[i], scheme=SCHEME)
        candidates = sorted(lsh.query(mh), key=row_of.__getitem__)
        match = next((c for c in candidates if jaccard_estimate(signatures[row_of[c]], signatures[i]) >= threshold),
                     None)
        if match is None:
            lsh.insert(doc_id, mh, check_duplication=False)
            row_of[doc_id] = i
        else:
            dropped[doc_id] = match
        if progress is not None:
            progress(1)
    return dropped
