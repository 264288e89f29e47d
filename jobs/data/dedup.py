"""Exact (SHA-256) and near-duplicate (MinHash LSH) detection, deterministic: the first by id is kept."""

from __future__ import annotations

import hashlib
import re

import numpy as np

_WORD = re.compile(r"\w+")
SCHEME = "affine32"  # datasketch's default hashing scheme, named so stored signatures stay comparable


def exact_key(text: str) -> str:
    """SHA-256 of the normalised text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def shingles(text: str, size: int) -> set[bytes]:
    """Lower-cased word n-grams (the whole text when it is shorter than one n-gram)."""
    words = _WORD.findall(text.lower())
    if len(words) < size:
        return {" ".join(words).encode()}
    return {" ".join(words[i:i + size]).encode() for i in range(len(words) - size + 1)}


def signature(text: str, num_perm: int, shingle_size: int, seed: int = 1) -> np.ndarray:
    """MinHash signature (uint64 hash values) of a text's shingles."""
    from datasketch import MinHash

    mh = MinHash(num_perm=num_perm, seed=seed, scheme=SCHEME)
    mh.update_batch(list(shingles(text, shingle_size)))
    return mh.hashvalues.astype(np.uint64)


def near_duplicates(ids: list[str], signatures: np.ndarray, threshold: float) -> dict[str, str]:
    """{dropped id: the kept id it duplicates}, scanning in `ids` order so the first one stays.

    LSH proposes candidates; a candidate counts only if the signatures' estimated Jaccard reaches the
    threshold (LSH alone has false positives).
    """
    from datasketch import MinHash, MinHashLSH

    num_perm = signatures.shape[1] if len(signatures) else 128
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    row_of = {}
    dropped: dict[str, str] = {}
    for i, doc_id in enumerate(ids):
        mh = MinHash(num_perm=num_perm, hashvalues=signatures[i], scheme=SCHEME)
        candidates = sorted(lsh.query(mh), key=row_of.__getitem__)
        match = next((c for c in candidates if np.mean(signatures[row_of[c]] == signatures[i]) >= threshold), None)
        if match is not None:
            dropped[doc_id] = match
            continue
        lsh.insert(doc_id, mh)
        row_of[doc_id] = i
    return dropped
