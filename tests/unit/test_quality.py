"""Gopher quality heuristics: each drops what it should; normal prose and code pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.data.clean import normalize
from jobs.data.quality import (
    alpha_word_fraction,
    duplicate_line_fraction,
    mean_word_length,
    quality_reason,
    symbol_ratio,
    top_ngram_fraction,
)
from jobs.recipe import FilterConfig, load_recipe

PROSE = ("The committee reviewed the proposal in detail and agreed that the new storage cluster should be "
         "installed before the end of the quarter, provided the budget holds. Several engineers asked how the "
         "network would be upgraded, and the vendor promised a written answer by Friday. ") * 2
PROSE_CFG = FilterConfig()  # Gopher-like defaults
CODE_CFG = load_recipe(Path(__file__).parents[2] / "recipes" / "tiny-cpu.yaml").data.filters


def test_statistics() -> None:
    assert mean_word_length(["ab", "abcd"]) == 3.0 and mean_word_length([]) == 0.0
    assert symbol_ratio("# a ... b …", ["#", "a", "...", "b", "…"]) == pytest.approx(3 / 5)
    assert duplicate_line_fraction("a\nb\na\n  a  \n\n") == pytest.approx(2 / 4)
    assert top_ngram_fraction(["x", "y", "x", "y", "x", "y"]) == pytest.approx(1.0)
    assert top_ngram_fraction(["a", "b", "c", "d"]) == pytest.approx(2 / 4)
    assert alpha_word_fraction(["abc", "123", "a1", "=="]) == 0.5


def test_prose_passes_the_default_thresholds() -> None:
    assert quality_reason(PROSE, PROSE_CFG) is None


def test_real_code_passes_the_code_recipe() -> None:
    source = normalize(Path(json.__file__).with_name("decoder.py").read_text())
    assert quality_reason(source, CODE_CFG) is None


@pytest.mark.parametrize(("text", "reason"), [
    ("a b c d e f " * 20, "mean_word_length_low"),
    ("supercalifragilisticexpialidocious " * 30, "mean_word_length_high"),
    ("# heading\n## more\n### and more\n" * 20, "symbol_ratio"),
    ("Wait for it... and... then... nothing... " * 10, "symbol_ratio"),
    ("\n".join(["buy cheap watches now"] * 10 + ["a unique closing line"]), "duplicate_lines"),
    (" ".join(str(1000 + i) for i in range(200)), "alpha_words"),
])
def test_each_filter_drops_what_it_should(text: str, reason: str) -> None:
    assert quality_reason(text, PROSE_CFG) == reason


def test_top_ngram_filter() -> None:
    spam = " ".join(["click here"] * 30) + " " + PROSE  # one line, so the duplicate-line filter cannot see it
    cfg = PROSE_CFG.model_copy(update={"max_top_ngram_fraction": 0.2})
    assert quality_reason(spam, cfg) == "top_ngram"
    assert quality_reason(PROSE, cfg) is None


def test_thresholds_come_from_the_recipe() -> None:
    sentences = [s.strip() + "." for s in PROSE.split(".")[:3]] * 2  # 6 lines, 3 of them repeats
    lines = "\n".join([*sentences, "a closing line", "and another one", "with a third", "and the last"])
    assert quality_reason(lines, PROSE_CFG.model_copy(update={"max_duplicate_line_fraction": 0.2})) == \
        "duplicate_lines"
    assert quality_reason(lines, PROSE_CFG.model_copy(update={"max_duplicate_line_fraction": 0.5})) is None
