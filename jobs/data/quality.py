"""Gopher-style quality heuristics (Rae et al. 2021, appendix A), each returning a drop reason."""

from __future__ import annotations

from collections import Counter

from jobs.recipe import FilterConfig


def mean_word_length(words: list[str]) -> float:
    return sum(len(w) for w in words) / len(words) if words else 0.0


def symbol_ratio(text: str, words: list[str]) -> float:
    """Hash marks and ellipses per word."""
    return (text.count("#") + text.count("...") + text.count("…")) / max(len(words), 1)


def duplicate_line_fraction(text: str) -> float:
    """Share of non-empty lines that repeat an earlier line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return 0.0
    return (len(lines) - len(set(lines))) / len(lines)


def top_ngram_fraction(words: list[str], n: int = 2) -> float:
    """Share of characters covered by the most frequent word n-gram."""
    if len(words) < n + 1:
        return 0.0
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    gram, count = grams.most_common(1)[0]
    total = sum(len(w) for w in words)
    return count * sum(len(w) for w in gram) / max(total, 1)


def alpha_word_fraction(words: list[str]) -> float:
    """Share of words that contain at least one alphabetic character."""
    return sum(any(c.isalpha() for c in w) for w in words) / max(len(words), 1)


def quality_reason(text: str, cfg: FilterConfig) -> str | None:
    """The first heuristic the document fails, or None when it passes them all."""
    words = text.split()
    mwl = mean_word_length(words)
    if mwl < cfg.min_mean_word_length or mwl > cfg.max_mean_word_length:
        return "mean_word_length"
    if symbol_ratio(text, words) > cfg.max_symbol_ratio:
        return "symbol_ratio"
    if duplicate_line_fraction(text) > cfg.max_duplicate_line_fraction:
        return "duplicate_lines"
    if top_ngram_fraction(words) > cfg.max_top_ngram_fraction:
        return "top_ngram"
    if alpha_word_fraction(words) < cfg.min_alpha_word_fraction:
        return "alpha_words"
    return None
