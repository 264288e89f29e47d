"""Normalisation (Unicode NFC, line endings, trailing spaces, blank runs) and length filters."""

from __future__ import annotations

import re
import unicodedata

from jobs.recipe import FilterConfig

_LINE_BREAKS = re.compile(r"\r\n?|[\u2028\u2029\x85]")
# Invisible characters that carry no text: NUL, BOM/zero-width no-break space, zero-width space, soft hyphen,
# and ASCII controls other than tab and newline (form feeds in old source files, stray escapes).
_INVISIBLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ufeff\u200b\u00ad]")
# Exotic spaces (no-break, en/em, ideographic...) become plain spaces so indentation stays consistent.
_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_TRAILING = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{4,}")


def looks_binary(raw: str) -> bool:
    """NUL bytes near the start: a binary file that slipped through the include globs."""
    return "\x00" in raw[:8192]


def normalize(text: str) -> str:
    """NFC, LF line endings, no invisible characters or trailing blanks, at most two blank lines in a row.

    Leading indentation (spaces and tabs) is left exactly as it was, so code stays valid.
    """
    text = _LINE_BREAKS.sub("\n", text)
    text = _INVISIBLE.sub("", text)
    text = _SPACES.sub(" ", text)
    text = _TRAILING.sub("", text)
    text = _BLANK_RUNS.sub("\n\n\n", text)
    text = unicodedata.normalize("NFC", text.strip("\n"))  # last: removing a character can expose a pair
    return text + "\n" if text.strip() else ""


def length_reason(text: str, cfg: FilterConfig, words: int | None = None) -> str | None:
    """Why a document fails the character and word count bounds, or None."""
    n = len(text)
    if n < cfg.min_chars:
        return "too_few_chars"
    if n > cfg.max_chars:
        return "too_many_chars"
    words = len(text.split()) if words is None else words
    if words < cfg.min_words:
        return "too_few_words"
    if words > cfg.max_words:
        return "too_many_words"
    return None
