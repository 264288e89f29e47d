"""Packed token shards: fixed-length blocks in memory-mapped binary files, an index, a resumable sampler.

On disk (`<data_dir>`):
    train-00000.bin ...   blocks of `block_size` token ids, uint16 (vocab <= 65535) or uint32
    eval-00000.bin ...
    index.json            {"dtype", "block_size", "vocab_size", "eos_id", "splits": {split: [{file, blocks}]}}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every token id."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def write_blocks(tokens: np.ndarray, block_size: int, path: Path) -> int:
    """Cut a token stream into whole blocks (the remainder is dropped) and write them; return the block count."""
    blocks = len(tokens) // block_size
    tokens[: blocks * block_size].tofile(path)
    return blocks


class PackedDataset:
    """Blocks of one split across its shard files, memory-mapped lazily."""

    def __init__(self, data_dir: str | Path, split: str = "train") -> None:
        self.data_dir = Path(data_dir)
        index_file = self.data_dir / "index.json"
        if not index_file.is_file():
            raise FileNotFoundError(f"{self.data_dir} holds no prepared data (no index.json); run "
                                    "`privlm data prepare RECIPE` first")
        index = json.loads(index_file.read_text())
        if split not in index["splits"]:
            raise FileNotFoundError(f"{self.data_dir} has no {split!r} split")
        self.block_size: int = index["block_size"]
        self.vocab_size: int = index["vocab_size"]
        self.eos_id: int = index["eos_id"]
        self.dtype = np.dtype(index["dtype"])
        self._files = [(self.data_dir / s["file"], s["blocks"]) for s in index["splits"][split] if s["blocks"]]
        self._starts = np.cumsum([0] + [n for _, n in self._files])
        self._maps: list[np.memmap] | None = None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _memmaps(self) -> list[np.memmap]:
        if self._maps is None:
            self._maps = [np.memmap(p, dtype=self.dtype, mode="r", shape=(n, self.block_size)) for p, n in self._files]
        return self._maps

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get_blocks(np.array([i]))[0]

    def get_blocks(self, indices: Any) -> np.ndarray:
        """(len(indices), block_size) int64 token ids."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"block index out of range 0..{len(self) - 1}")
        files = np.searchsorted(self._starts, indices, side="right") - 1
        maps = self._memmaps()
        out = np.empty((len(indices), self.block_size), dtype=np.int64)
        for row, (f, i) in enumerate(zip(files, indices, strict=True)):
            out[row] = maps[f][i - self._starts[f]]
        return out


class ResumableSampler:
    """Sample position -> block id: a fresh permutation per epoch from (seed, epoch); no hidden state.

    Position p belongs to epoch p // num_blocks; resuming at any position is exact because the
    position is derived from the global step.
    """

    def __init__(self, num_blocks: int, seed: int) -> None:
        if num_blocks <= 0:
            raise ValueError("no blocks to sample from")
        self.num_blocks = num_blocks
        self.seed = seed
        self._cache: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) > 2:
                self._cache.clear()
            self._cache[epoch] = np.random.default_rng((self.seed, epoch)).permutation(self.num_blocks)
        return self._cache[epoch]

    def indices(self, start: int, count: int) -> np.ndarray:
        """Block ids for positions start .. start+count-1."""
        positions = np.arange(start, start + count, dtype=np.int64)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(positions // self.num_blocks):
            mask = positions // self.num_blocks == epoch
            out[mask] = self.permutation(int(epoch))[positions[mask] % self.num_blocks]
        return out


def load_tokenizer(data_dir: str | Path) -> Any:
    """The tokenizer saved beside the shards."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(data_dir) / "tokenizer")
