"""Gopher-style quality heuristics (Rae et al. 2021, appendix A), each returning a drop reason or None.

Words are whitespace-separated tokens, as in Gopher, except in Chinese and Japanese, where each Han or kana
character counts as one word (`jobs.data.language.units`): counts, repetition and symbol ratios are then in
characters. The mean word length is measured over the space-separated words only, and not at all for a
document that is mostly unspaced script. For code, words include operators and punctuation, which is why
the code recipes loosen the symbol and alphabetic-word thresholds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from jobs.data.language import UNSPACED, spaced_words, units
from jobs.recipe import FilterConfig


@dataclass(frozen=True)
class Doc:
    """A text split once into what the heuristics look at: its word units, and its space-separated words."""

    text: str
    words: list[str]
    spaced_words: list[str]

    @classmethod
    def of(cls, text: str) -> Doc:
        words = units(text)
        if UNSPACED.search(text) is None:
            return cls(text, words, words)
        return cls(text, words, spaced_words(text))

    @property
    def unspaced(self) -> bool:
        """Mostly Chinese or Japanese: the measures are in characters."""
        return len(self.spaced_words) * 2 < len(self.words)


def mean_word_length(words: list[str]) -> float:
    return sum(map(len, words)) / len(words) if words else 0.0


def symbol_ratio(text: str, words: list[str]) -> float:
    """Hash marks and ellipses per word."""
    return (text.count("#") + text.count("...") + text.count("…")) / max(len(words), 1)


def duplicate_line_fraction(text: str) -> float:
    """Share of non-empty lines that repeat an earlier line (compared without surrounding blanks)."""
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    return (len(lines) - len(set(lines))) / len(lines) if lines else 0.0


def top_ngram_fraction(words: list[str], n: int = 2) -> float:
    """Share of word characters covered by the occurrences of the most frequent word n-gram."""
    if len(words) < n:
        return 0.0
    grams = Counter(zip(*(words[i:] for i in range(n)), strict=False))
    gram, count = grams.most_common(1)[0]
    return min(1.0, count * sum(map(len, gram)) / max(sum(map(len, words)), 1))


def alpha_word_fraction(words: list[str], letters: int = 0) -> float:
    """Share of words that contain at least one alphabetic character; `letters` more words are known to be
    single letters (the Han and kana characters of a Chinese or Japanese text, counted apart for speed)."""
    return (letters + sum(1 for w in words if any(map(str.isalpha, w)))) / max(len(words) + letters, 1)


def check_mean_word_length(doc: Doc, cfg: FilterConfig) -> str | None:
    if doc.unspaced:
        return None
    mwl = mean_word_length(doc.spaced_words)
    if mwl < cfg.min_mean_word_length:
        return "mean_word_length_low"
    return "mean_word_length_high" if mwl > cfg.max_mean_word_length else None


def check_symbol_ratio(doc: Doc, cfg: FilterConfig) -> str | None:
    return "symbol_ratio" if symbol_ratio(doc.text, doc.words) > cfg.max_symbol_ratio else None


def check_duplicate_lines(doc: Doc, cfg: FilterConfig) -> str | None:
    return "duplicate_lines" if duplicate_line_fraction(doc.text) > cfg.max_duplicate_line_fraction else None


def check_top_ngram(doc: Doc, cfg: FilterConfig) -> str | None:
    return "top_ngram" if top_ngram_fraction(doc.words) > cfg.max_top_ngram_fraction else None


def check_alpha_words(doc: Doc, cfg: FilterConfig) -> str | None:
    unspaced = len(doc.words) - len(doc.spaced_words)
    fraction = alpha_word_fraction(doc.spaced_words, unspaced)
    return "alpha_words" if fraction < cfg.min_alpha_word_fraction else None


CHECKS: tuple[Callable[[Doc, FilterConfig], str | None], ...] = (
    check_mean_word_length, check_symbol_ratio, check_duplicate_lines, check_top_ngram, check_alpha_words)


def quality_reason(text: str | Doc, cfg: FilterConfig) -> str | None:
    """The first heuristic the document fails, or None when it passes them all."""
    doc = text if isinstance(text, Doc) else Doc.of(text)
    for check in CHECKS:
        reason = check(doc, cfg)
        if reason:
            return reason
    return None
