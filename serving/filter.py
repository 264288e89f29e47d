"""The block list on whole generated text: streamed or not, a blocked word is removed wherever the
chunks split it, and the choice ends with finish_reason `content_filter`."""

from __future__ import annotations

import re


class BlockList:
    """Case-insensitive words refused in prompts and removed from outputs."""

    def __init__(self, words: list[str]) -> None:
        words = [w for w in words if w]
        self.pattern = re.compile("|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)), re.I) \
            if words else None
        self.hold = max((len(w) for w in words), default=1) - 1

    def __bool__(self) -> bool:
        return self.pattern is not None

    def matches(self, text: str) -> bool:
        return bool(self.pattern and self.pattern.search(text))

    def scrub(self, text: str) -> tuple[str, bool]:
        """(text without blocked words, whether any was removed)."""
        if not self.pattern:
            return text, False
        out, hits = self.pattern.subn("", text)
        return out, hits > 0

    def stream(self) -> StreamScrubber:
        return StreamScrubber(self)


class StreamScrubber:
    """Holds back the last len(longest word)-1 characters, so a word split across chunks is still caught."""

    def __init__(self, blocks: BlockList) -> None:
        self.blocks = blocks
        self.pending = ""
        self.hit = False

    def feed(self, delta: str) -> str:
        """The part of the text so far that can be sent now."""
        if not self.blocks:
            return delta
        self.pending, hit = self.blocks.scrub(self.pending + delta)
        self.hit |= hit
        cut = max(0, len(self.pending) - self.blocks.hold)
        ready, self.pending = self.pending[:cut], self.pending[cut:]
        return ready

    def flush(self) -> str:
        rest, hit = self.blocks.scrub(self.pending)
        self.hit |= hit
        self.pending = ""
        return rest
