"""Normalisation, length filters and Gopher quality heuristics."""

from __future__ import annotations

from jobs.data.clean import length_reason, normalize
from jobs.data.quality import quality_reason
from jobs.recipe import FilterConfig

PROSE = ("The committee reviewed the proposal in detail and agreed that the new storage cluster should be "
         "installed before the end of the quarter, provided the budget holds. ") * 4
CODE = '''def parse(line: str) -> dict:
    """Split a key=value line into a mapping."""
    key, _, value = line.partition("=")
    if not key:
        raise ValueError(f"no key in {line!r}")
    return {key.strip(): value.strip()}


class Registry:
    def __init__(self) -> None:
        self.items: dict[str, int] = {}

    def add(self, name: str, count: int) -> None:
        self.items[name] = self.items.get(name, 0) + count
'''
CFG = FilterConfig(min_chars=100, min_words=20, max_symbol_ratio=0.5, min_alpha_word_fraction=0.4,
                   max_duplicate_line_fraction=0.5, max_top_ngram_fraction=0.3)


def test_normalize_nfc_line_endings_trailing_space_and_blank_runs() -> None:
    raw = "Cafe\u0301  \r\nline two\t\r\n\n\n\n\n    indented\n"
    assert normalize(raw) == "Café\nline two\n\n\n    indented\n"


def test_normalize_keeps_code_indentation() -> None:
    assert normalize(CODE) == CODE


def test_length_bounds() -> None:
    assert length_reason("short text", CFG) == "too_short_chars"
    assert length_reason("x" * 300, CFG) == "too_few_words"
    assert length_reason(PROSE, CFG.model_copy(update={"max_chars": 100})) == "too_long_chars"
    assert length_reason(PROSE, CFG) is None


def test_prose_and_code_pass_quality() -> None:
    assert quality_reason(PROSE, CFG) is None
    assert quality_reason(CODE, CFG) is None


def test_each_heuristic_drops_what_it_should() -> None:
    assert quality_reason("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa " * 30, CFG) == "mean_word_length"
    assert quality_reason("# heading # more ## and ### " * 20, CFG) == "symbol_ratio"
    assert quality_reason("\n".join(["buy now cheap watches"] * 10 + ["unique line here"]), CFG) == "duplicate_lines"
    spam = "click here " * 60 + PROSE[:200]
    assert quality_reason(spam, CFG.model_copy(update={"max_duplicate_line_fraction": 1.0})) == "top_ngram"
    numbers = " ".join(str(1000 + i) for i in range(200))
    assert quality_reason(numbers, CFG) == "alpha_words"
