"""Normalisation (Unicode NFC, line endings, trailing spaces, blank runs) and length filters."""

from __future__ import annotations

import re
import unicodedata

from jobs.recipe import FilterConfig

_BLANK_RUNS = re.compile(r"\n{3,}")
_TRAILING = re.compile(r"[ \t]+\n")


def normalize(text: str) -> str:
    """NFC, LF line endings, no trailing whitespace, at most two blank lines; indentation is kept."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\x00", "").replace("\ufeff", "")
    text = _TRAILING.sub("\n", text)
    text = _BLANK_RUNS.sub("\n\n\n", text)
    return text.strip("\n") + "\n" if text.strip() else ""


def length_reason(text: str, cfg: FilterConfig) -> str | None:
    """Why a document fails the character and word length bounds, or None."""
    n = len(text)
    if n < cfg.min_chars:
        return "too_short_chars"
    if n > cfg.max_chars:
        return "too_long_chars"
    words = len(text.split())
    if words < cfg.min_words:
        return "too_few_words"
    if words > cfg.max_words:
        return "too_many_words"
    return None
