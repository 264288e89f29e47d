"""Language identification (lingua, offline: its models ship in the wheel) and script-aware word units.

Chinese and Japanese are written without spaces, so `text.split()` sees a paragraph as one "word". Every
measure that counts words (length filter, Gopher heuristics, MinHash shingles) counts *units* instead: each
Han or kana character is one unit, and each whitespace-separated run of other characters is one unit. For
space-separated text (English, code, Korean) the units are exactly `text.split()`.
"""

from __future__ import annotations

import functools
import re
from typing import Any

# Han (CJK unified ideographs, extensions A-F, compatibility), Hiragana, Katakana: scripts written unspaced.
UNSPACED_CHARS = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
UNSPACED = re.compile(f"[{UNSPACED_CHARS}]")
_UNIT = re.compile(f"[{UNSPACED_CHARS}]|[^\\s{UNSPACED_CHARS}]+")
_SPACED = re.compile(f"[^\\s{UNSPACED_CHARS}]+")
_UNSPACED_RUN = re.compile(f"[{UNSPACED_CHARS}]+")
UNDETERMINED = "und"


@functools.lru_cache(maxsize=1)
def supported_codes() -> frozenset[str]:
    """The ISO 639-1 codes lingua knows, and "und" (undetermined)."""
    from lingua import Language

    return frozenset(lang.iso_code_639_1.name.lower() for lang in Language.all()) | {UNDETERMINED}


def units(text: str) -> list[str]:
    """Han/kana characters one by one, everything else split on whitespace."""
    if UNSPACED.search(text) is None:
        return text.split()
    return _UNIT.findall(text)


def spaced_words(text: str) -> list[str]:
    """The units that are not Han or kana characters: the whitespace-separated words between them."""
    return _SPACED.findall(text)


def blank_unspaced(text: str) -> str:
    """The text with every Han and kana character replaced by a space (same length, same offsets)."""
    return _UNSPACED_RUN.sub(lambda m: " " * len(m.group()), text)


@functools.lru_cache(maxsize=4)
def _detector(candidates: tuple[str, ...]) -> Any:
    from lingua import IsoCode639_1, LanguageDetectorBuilder

    codes = [IsoCode639_1.from_str(c) for c in candidates if c != UNDETERMINED]
    return LanguageDetectorBuilder.from_iso_codes_639_1(*codes).with_low_accuracy_mode().build()


def detect_language(text: str, candidates: tuple[str, ...], sample_chars: int = 1000) -> str:
    """ISO 639-1 code of the most likely candidate for the first `sample_chars` characters, or "und".

    lingua's low-accuracy mode (trigrams only) over a bounded sample keeps this at ~80 MB/s of documents; a
    longer sample rarely changes the answer for documents of one language.
    """
    found = _detector(candidates).detect_language_of(text[:sample_chars])
    return found.iso_code_639_1.name.lower() if found is not None else UNDETERMINED


@functools.lru_cache(maxsize=1)
def _t2s() -> Any:
    import opencc

    return opencc.OpenCC("t2s")


def to_simplified(text: str) -> str:
    """Traditional Chinese characters and phrases converted to Simplified by OpenCC's t2s dictionaries."""
    return _t2s().convert(text)
