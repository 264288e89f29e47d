"""Exact (SHA-256), near-duplicate (MinHash LSH) and repeated-sentence detection.

Per shard, `exact_key` and `MinHasher.signature` turn each document into a hash and a signature, and
`band_keys` cuts the signature into the LSH bands datasketch would use (`lsh_bands`). Documents that share
a band key are candidates; `jobs.data.buckets` finds them bucket by bucket (a bucket holds the band keys
that fall in it, from every shard), so no process holds every signature. One global pass then walks the
documents in the keep-first order and drops one when an earlier kept one has the same hash or a similar
enough signature: the same decisions as `near_duplicates`, the one-process reference.

Shingles are n-grams of word units (`jobs.data.language.units`): word n-grams for English and code,
character n-grams for Chinese and Japanese, whose words are not separated by spaces.

Sentences: prose (not code) is split into sentences; a sentence of at least `min_sentence_chars` that
appears in several kept documents stays in the first of them and is removed from the others.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import numpy as np

from jobs.data.language import UNSPACED, UNSPACED_CHARS

_WORD = re.compile(r"\w+")
_UNIT_WORD = re.compile(f"[{UNSPACED_CHARS}]|[^\\W{UNSPACED_CHARS}]+")  # a Han/kana character, or a word
SCHEME = "affine32"  # datasketch's hashing scheme, named so stored signatures stay comparable
SEED = 1


def exact_key(text: str) -> str:
    """SHA-256 of the normalised text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def shingles(text: str, size: int) -> set[bytes]:
    """Lower-cased n-grams of words, where a Han or kana character is a word (the whole text when shorter)."""
    lowered = text.lower()
    words = _WORD.findall(lowered) if UNSPACED.search(lowered) is None else _UNIT_WORD.findall(lowered)
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


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) that datasketch's MinHashLSH picks for this threshold and signature size."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


_MULT = np.uint64(0x9E3779B97F4A7C15)


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """A 64-bit key per (document, band): equal bands give equal keys, and the band's index is part of the key.

    A polynomial hash of the band's values in wrapping uint64 arithmetic (vectorised); two different bands
    colliding has probability ~2^-64, and every candidate pair is checked against its signatures anyway.
    """
    docs = signatures.shape[0]
    keys = np.empty((docs, bands), dtype=np.uint64)
    sig = signatures.astype(np.uint64)
    with np.errstate(over="ignore"):
        for b in range(bands):
            h = np.full(docs, np.uint64(b + 1) * _MULT, dtype=np.uint64)
            for j in range(b * rows, (b + 1) * rows):
                h = (h ^ sig[:, j]) * _MULT
            keys[:, b] = h ^ (h >> np.uint64(29))
    return keys


def bucket_of(keys: np.ndarray, num_buckets: int) -> np.ndarray:
    """The bucket (array task) that handles each key."""
    return (keys % np.uint64(num_buckets)).astype(np.int64)


def near_duplicates_from_pairs(ids: list[str], classes: list[int], pairs: set[tuple[int, int]],
                               live: list[bool]) -> dict[str, str]:
    """{dropped id: the kept id it duplicates}, scanning in `ids` order, from verified similar pairs.

    `classes[i]` is document i's class: documents with one text (one SHA-256) share it, and so share their
    signature. `pairs` holds verified (class, class) pairs; `live[i]` is False for documents already dropped
    as exact duplicates. Document i is dropped when its class or a class paired with it already has a kept
    document, and matched to the earliest such one: `near_duplicates`' rule without its LSH index.
    """
    neighbours: dict[int, list[int]] = {}
    for a, b in pairs:
        neighbours.setdefault(a, []).append(b)
        neighbours.setdefault(b, []).append(a)
    first_kept: dict[int, int] = {}  # class -> position of its earliest kept document
    dropped: dict[str, str] = {}
    for i, doc_id in enumerate(ids):
        if not live[i]:
            continue
        c = classes[i]
        matches = [first_kept[k] for k in (c, *neighbours.get(c, ())) if k in first_kept]
        if matches:
            dropped[doc_id] = ids[min(matches)]
        else:
            first_kept[c] = i
    return dropped


# --- repeated sentences -----------------------------------------------------------------------------
_SENTENCE_END = re.compile(r"[。！？；!?]+[」』”’）)\]\"']*[ \t]*\n*|\.+[\"')\]]*(?:[ \t]+|\n+|$)\n*|\n+")
CODE_SUFFIXES = frozenset({".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".java", ".js", ".ts", ".go", ".rs",
                           ".rb", ".php", ".sh", ".sql", ".cs", ".kt", ".swift", ".scala", ".lua", ".r", ".m"})
_CODE_LINE = re.compile(r"^\s*(?:#|//|/\*|\*|@|import\s|from\s\S+\simport|def\s|class\s|return\b|if\s.*:$|"
                        r"for\s.*:$|else:|elif\s|try:|except\b|[{}])|[{};]\s*$|^[ \t]{2,}[!-~]|[=({\[,]\s*$")


def is_code(text: str, rel: str) -> bool:
    """Source code (by file suffix, or by a third of its lines looking like code): its lines are not sentences."""
    if any(rel.lower().endswith(s) for s in CODE_SUFFIXES):
        return True
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return bool(lines) and sum(1 for ln in lines if _CODE_LINE.search(ln)) * 3 >= len(lines)


def split_sentences(text: str) -> list[str]:
    """The text cut after each sentence end (。！？；!? or '.' before a space) and line break; joins back to it."""
    pieces, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        if m.end() > start:
            pieces.append(text[start:m.end()])
            start = m.end()
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def sentence_hash(piece: str, min_chars: int) -> int | None:
    """A 63-bit hash of a sentence without its surrounding blanks; None when it is too short to remove."""
    key = piece.strip()
    if len(key) < min_chars:
        return None
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big") >> 1


def sentence_hashes(text: str, min_chars: int) -> list[int]:
    """The distinct hashes of a prose document's sentences, in order of first appearance."""
    seen: dict[int, None] = {}
    for piece in split_sentences(text):
        h = sentence_hash(piece, min_chars)
        if h is not None:
            seen.setdefault(h)
    return list(seen)


def remove_sentences(text: str, hashes: set[int], min_chars: int) -> str:
    """The text without the sentences whose hash is in `hashes`."""
    return "".join(p for p in split_sentences(text) if sentence_hash(p, min_chars) not in hashes)
