"""Packed token shards: fixed-length blocks in memory-mapped binary files, an index, a resumable sampler.

On disk (`<data_dir>`):
    train-00000.bin ...   blocks of `block_size` token ids, raw little-endian uint16 (vocab <= 65535) or uint32
    eval-00000.bin ...
    index.json            {"dtype", "block_size", "vocab_size", "eos_id", "splits": {split: [{file, blocks}]}}
    tokenizer/            the Hugging Face tokenizer that produced the ids

The trainer reads blocks with `PackedDataset`, picks them with `ResumableSampler` (a pure function of the
global sample position, so resuming at a step is exact) and decodes with `load_tokenizer`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

INDEX = "index.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every token id."""
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


class BlockWriter:
    """Cuts one split's token stream into blocks and writes `<split>-NNNNN.bin` files of whole blocks.

    Only the final partial block of the whole stream is dropped; `close()` returns the index entries.
    """

    def __init__(self, out_dir: Path, split: str, block_size: int, dtype: np.dtype, blocks_per_file: int) -> None:
        self.out_dir, self.split, self.block_size, self.dtype = Path(out_dir), split, block_size, np.dtype(dtype)
        self._buf = np.empty(max(1, blocks_per_file) * block_size, dtype=self.dtype)
        self._fill = 0
        self.files: list[dict[str, Any]] = []
        self.tokens_written = 0
        self.tokens_dropped = 0

    def write(self, tokens: np.ndarray) -> None:
        """Append tokens to the stream."""
        pos = 0
        while pos < len(tokens):
            take = min(len(tokens) - pos, len(self._buf) - self._fill)
            self._buf[self._fill:self._fill + take] = tokens[pos:pos + take]
            self._fill += take
            pos += take
            if self._fill == len(self._buf):
                self._flush()

    def _flush(self) -> None:
        blocks = self._fill // self.block_size
        if blocks:
            name = f"{self.split}-{len(self.files):05d}.bin"
            with open(self.out_dir / name, "wb") as fh:
                self._buf[: blocks * self.block_size].tofile(fh)
                fh.flush()
                os.fsync(fh.fileno())
            self.files.append({"file": name, "blocks": blocks})
            self.tokens_written += blocks * self.block_size
        self.tokens_dropped += self._fill - blocks * self.block_size
        self._fill = 0

    def close(self) -> list[dict[str, Any]]:
        """Write the last whole blocks, drop the remainder, return [{file, blocks}, ...]."""
        self._flush()
        return self.files

    @property
    def blocks(self) -> int:
        return sum(f["blocks"] for f in self.files)


def write_index(out_dir: Path, dtype: np.dtype, block_size: int, vocab_size: int, eos_id: int,
                splits: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The index that `PackedDataset` reads."""
    from jobs.files import atomic_write_text

    index = {"dtype": np.dtype(dtype).name, "block_size": block_size, "vocab_size": vocab_size, "eos_id": eos_id,
             "splits": splits}
    atomic_write_text(Path(out_dir) / INDEX, json.dumps(index, indent=1))
    return index


class PackedDataset:
    """The blocks of one split across its files, memory-mapped on first read; cheap to construct and to pickle."""

    def __init__(self, data_dir: str | Path, split: str = "train") -> None:
        self.data_dir = Path(data_dir)
        self.split = split
        index_file = self.data_dir / INDEX
        if not index_file.is_file():
            raise FileNotFoundError(f"{self.data_dir} holds no prepared data (no {INDEX}); run "
                                    "`privlm data prepare RECIPE` first")
        index = json.loads(index_file.read_text())
        if split not in index["splits"]:
            raise FileNotFoundError(f"{self.data_dir} has no {split!r} split (it has {sorted(index['splits'])})")
        self.block_size: int = index["block_size"]
        self.vocab_size: int = index["vocab_size"]
        self.eos_id: int = index["eos_id"]
        self.dtype = np.dtype(index["dtype"])
        self._files = [(self.data_dir / s["file"], int(s["blocks"])) for s in index["splits"][split] if s["blocks"]]
        self._starts = np.cumsum([0] + [n for _, n in self._files])
        self._maps: list[np.memmap] | None = None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}  # memory maps are reopened in the receiving process

    def _memmaps(self) -> list[np.memmap]:
        if self._maps is None:
            maps = []
            for path, blocks in self._files:
                expected = blocks * self.block_size * self.dtype.itemsize
                if not path.is_file() or path.stat().st_size != expected:
                    raise OSError(f"{path} is missing or not {expected} bytes as {INDEX} says; prepare the data "
                                  "again with `privlm data prepare RECIPE --force`")
                maps.append(np.memmap(path, dtype=self.dtype, mode="r", shape=(blocks, self.block_size)))
            self._maps = maps
        return self._maps

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        return self.get_blocks(np.array([i + len(self) if i < 0 else i]))[0]

    def get_blocks(self, indices: Any) -> np.ndarray:
        """Blocks by index: a (len(indices), block_size) int64 array."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"block index out of range 0..{len(self) - 1} of the {self.split} split")
        out = np.empty((len(indices), self.block_size), dtype=np.int64)
        if not len(indices):
            return out
        maps = self._memmaps()
        file_of = np.searchsorted(self._starts, indices, side="right") - 1
        for f in np.unique(file_of):
            rows = np.nonzero(file_of == f)[0]
            out[rows] = maps[f][indices[rows] - self._starts[f]]
        return out


class ResumableSampler:
    """Sample position -> block id, with a fresh permutation per epoch from (seed, epoch) and no hidden state.

    Position p belongs to epoch p // num_blocks and is permutation_epoch[p % num_blocks]; a run resumed at
    position `step * global_batch_size` sees exactly the blocks the uninterrupted run would have seen.
    """

    def __init__(self, num_blocks: int, seed: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks={num_blocks}: there are no blocks to sample from")
        self.num_blocks = num_blocks
        self.seed = seed
        self._cache: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        """The block order of one epoch."""
        if epoch not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = np.random.default_rng((self.seed, epoch)).permutation(self.num_blocks)
        return self._cache[epoch]

    def indices(self, start: int, count: int) -> np.ndarray:
        """Block ids for the global sample positions start .. start+count-1."""
        if start < 0 or count < 0:
            raise ValueError(f"start={start} and count={count} must not be negative")
        positions = np.arange(start, start + count, dtype=np.int64)
        epochs = positions // self.num_blocks
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = self.permutation(int(epoch))[positions[mask] % self.num_blocks]
        return out


def load_tokenizer(data_dir: str | Path) -> Any:
    """The tokenizer (a PreTrainedTokenizerFast) saved beside the shards in `<data_dir>/tokenizer`."""
    from transformers import AutoTokenizer

    path = Path(data_dir) / "tokenizer"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist; run `privlm data prepare RECIPE` first")
    return AutoTokenizer.from_pretrained(path)
