"""Normalisation and length filters."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobs.data.clean import length_reason, looks_binary, normalize
from jobs.recipe import FilterConfig

CODE = '''def parse(line: str) -> dict:
    """Split a key=value line into a mapping."""
    key, _, value = line.partition("=")
    if not key:
\t\traise ValueError(f"no key in {line!r}")
    return {key.strip(): value.strip()}


class Registry:
    def add(self, name: str, count: int) -> None:
        self.items[name] = self.items.get(name, 0) + count
'''
CFG = FilterConfig(min_chars=100, max_chars=10_000, min_words=20, max_words=1000)


def test_unicode_nfc() -> None:
    assert normalize("Cafe\u0301\n") == "Café\n"  # e + combining acute -> é
    assert normalize("\ufb01\n") == "\ufb01\n"  # NFC, not NFKC: the ligature stays


def test_line_endings_trailing_blanks_and_blank_runs() -> None:
    raw = "one  \r\ntwo\t\rthree\n\n\n\n\n\nfour\u2028five\n"
    assert normalize(raw) == "one\ntwo\nthree\n\n\nfour\nfive\n"


def test_two_blank_lines_survive() -> None:
    assert normalize("a\n\n\nb\n") == "a\n\n\nb\n"


def test_code_indentation_is_kept() -> None:
    assert normalize(CODE) == CODE
    assert normalize("    x = 1   \n\tif y:\n\t\tpass\n") == "    x = 1\n\tif y:\n\t\tpass\n"


def test_invisible_characters_go_and_exotic_spaces_become_spaces() -> None:
    assert normalize("\ufeffa\u200bb\x00c\x0cd\n") == "abcd\n"
    assert normalize("a\u00a0b\u3000c\n") == "a b c\n"


def test_leading_and_trailing_blank_lines_and_empty_texts() -> None:
    assert normalize("\n\n  first\nlast\n\n\n") == "  first\nlast\n"
    assert normalize("") == normalize(" \n\t\n") == ""


@given(st.text(alphabet=st.sampled_from(list("ab \t\n\r\u00a0\u200be\u0301")), max_size=60))
def test_normalize_is_idempotent(text: str) -> None:
    once = normalize(text)
    assert normalize(once) == once
    assert "\r" not in once and "\n\n\n\n" not in once and " \n" not in once


def test_length_reasons() -> None:
    prose = "The committee reviewed the proposal and agreed on the plan. " * 5
    assert length_reason("short", CFG) == "too_few_chars"
    assert length_reason("x" * 200, CFG) == "too_few_words"
    assert length_reason(prose * 50, CFG) == "too_many_chars"
    assert length_reason("a " * 2000, CFG.model_copy(update={"max_chars": 100_000})) == "too_many_words"
    assert length_reason(prose, CFG) is None


def test_binary_detection() -> None:
    assert looks_binary("\x7fELF\x00\x00\x01")
    assert not looks_binary(CODE)


@pytest.mark.parametrize("text", ["", "\n"])
def test_empty_documents_fail_the_length_filter(text: str) -> None:
    assert length_reason(normalize(text), CFG) == "too_few_chars"
