"""Packed token shards: fixed-length blocks in memory-mapped binary files, an index, a resumable sampler.

On disk (`<data_dir>`):
    train-00000.bin ...   blocks of `block_size` token ids, raw little-endian uint16 (vocab <= 65535) or uint32
    eval-00000.bin ...
    index.json            {"dtype", "block_size", "vocab_size", "eos_id", "format", "arrays",
                           "splits": {split: [{file, blocks, <array>: file, ...}]}}
    tokenizer/            the Hugging Face tokenizer that produced the ids (with its chat template for chat data)

data.format chat (`SequenceWriter.add_packed`): samples packed whole into blocks, the rest of a block padded
with EOS; beside each `train-00000.bin` of token ids:
    train-00000.mask.bin  uint8 per token, 1 where the token is an assistant token (trained on), else 0
    train-00000.seg.bin   uint16 per token, the sample's number within its block (1, 2, ...), 0 on padding
data.format preference (`SequenceWriter.add_row`, one pair per row, right-padded): the chosen sequence in
`train-00000.bin`, `.mask.bin`, `.seg.bin` and the rejected one in `train-00000.rejected.bin`,
`.rejected.mask.bin`, `.rejected.seg.bin`; row i of both is pair i.
`index.json["arrays"]` maps each entry key to its dtype: text {"file"}; chat {"file", "mask", "segments"};
preference also {"rejected", "rejected_mask", "rejected_segments"}.

The trainer reads blocks with `PackedDataset` (`get_blocks` for token ids, `get_batch` for the model's
inputs, labels and positions), picks them with `ResumableSampler` (a pure function of the global sample
position, so resuming at a step is exact) and decodes with `load_tokenizer`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

INDEX = "index.json"
IGNORE = -100  # the label of a token that is not trained on (as jobs.train.loss and Hugging Face use)
MASK_DTYPE = np.dtype("u1")
SEGMENT_DTYPE = np.dtype("<u2")
# entry key -> file name suffix of the arrays beside the token ids, per data.format
ARRAY_SUFFIXES = {"mask": ".mask.bin", "segments": ".seg.bin", "rejected": ".rejected.bin",
                  "rejected_mask": ".rejected.mask.bin", "rejected_segments": ".rejected.seg.bin"}
FORMAT_ARRAYS = {"text": ("file",), "chat": ("file", "mask", "segments"),
                 "preference": ("file", "mask", "segments", "rejected", "rejected_mask", "rejected_segments")}


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


class SequenceWriter:
    """Writes one split of masked sequences as rows of `block_size`: token ids, loss mask and segment ids.

    `add_packed` (chat) puts whole samples one after another into the current row and starts a new row when
    the next does not fit; `add_row` (preference) gives each sequence a row of its own. The unused end of a
    row is EOS with mask 0 and segment 0. A sample's first token never carries the loss: it would be
    predicted from the sample before it. `prefix` names the files (`train`, or `train` + suffix `.rejected`).
    """

    def __init__(self, out_dir: Path, split: str, block_size: int, dtype: np.dtype, rows_per_file: int,
                 eos_id: int, suffix: str = "") -> None:
        self.out_dir, self.split, self.block_size, self.suffix = Path(out_dir), split, block_size, suffix
        self.dtype, self.eos_id = np.dtype(dtype), eos_id
        if block_size > np.iinfo(SEGMENT_DTYPE).max:
            raise ValueError(f"training.sequence_length={block_size} is above {np.iinfo(SEGMENT_DTYPE).max}, the "
                             "most samples a packed block's segment ids can number")
        rows = max(1, rows_per_file)
        self._ids = np.full((rows, block_size), eos_id, dtype=self.dtype)
        self._mask = np.zeros((rows, block_size), dtype=MASK_DTYPE)
        self._seg = np.zeros((rows, block_size), dtype=SEGMENT_DTYPE)
        self._row, self._fill, self._segment = 0, 0, 0
        self.files: list[dict[str, Any]] = []
        self.samples = 0
        self.tokens = 0  # sample tokens written (not padding)
        self.loss_tokens = 0

    def add_packed(self, ids: np.ndarray, mask: np.ndarray) -> None:
        """Append one sample to the current row, or to a new row when it does not fit in what is left."""
        n = len(ids)
        if not 0 < n <= self.block_size or len(mask) != n:
            raise ValueError(f"a sample of {n} tokens (mask {len(mask)}) does not fit blocks of {self.block_size}")
        if self._fill + n > self.block_size:
            self._next_row()
        self._segment += 1
        row, start = self._row, self._fill
        self._ids[row, start:start + n] = ids
        self._mask[row, start:start + n] = mask
        self._mask[row, start] = 0
        self._seg[row, start:start + n] = self._segment
        self._fill += n
        self.samples, self.tokens = self.samples + 1, self.tokens + n
        self.loss_tokens += int(self._mask[row, start:start + n].sum())

    def add_row(self, ids: np.ndarray, mask: np.ndarray) -> None:
        """One sequence alone in a row (right-padded)."""
        if self._fill:
            self._next_row()
        self.add_packed(ids, mask)
        self._next_row()

    def _next_row(self) -> None:
        if not self._fill:
            return
        self._row, self._fill, self._segment = self._row + 1, 0, 0
        if self._row == len(self._ids):
            self._flush()

    def _flush(self) -> None:
        rows = self._row
        if rows:
            base = f"{self.split}-{len(self.files):05d}{self.suffix}"
            entry: dict[str, Any] = {"file": f"{base}.bin", "blocks": rows, "mask": f"{base}.mask.bin",
                                     "segments": f"{base}.seg.bin"}
            for key, array in (("file", self._ids), ("mask", self._mask), ("segments", self._seg)):
                with open(self.out_dir / entry[key], "wb") as fh:
                    array[:rows].tofile(fh)
                    fh.flush()
                    os.fsync(fh.fileno())
            self.files.append(entry)
        self._ids.fill(self.eos_id)
        self._mask.fill(0)
        self._seg.fill(0)
        self._row = 0

    def close(self) -> list[dict[str, Any]]:
        """Write the last rows (a partly filled row is kept, padded); return the index entries."""
        self._next_row()
        self._flush()
        return self.files

    @property
    def blocks(self) -> int:
        return sum(f["blocks"] for f in self.files)


def preference_entries(chosen: list[dict[str, Any]], rejected: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One index entry per file pair of a preference split: the chosen arrays, then the rejected ones."""
    if [e["blocks"] for e in chosen] != [e["blocks"] for e in rejected]:
        raise ValueError("chosen and rejected sequences were written out of step: prepare the data again")
    return [{**c, "rejected": r["file"], "rejected_mask": r["mask"], "rejected_segments": r["segments"]}
            for c, r in zip(chosen, rejected, strict=True)]


def array_dtypes(dtype: np.dtype, data_format: str) -> dict[str, str]:
    """Entry key -> dtype name of every array a split of `data_format` stores."""
    kinds = {"file": dtype, "rejected": dtype, "mask": MASK_DTYPE, "rejected_mask": MASK_DTYPE,
             "segments": SEGMENT_DTYPE, "rejected_segments": SEGMENT_DTYPE}
    return {key: np.dtype(kinds[key]).name for key in FORMAT_ARRAYS[data_format]}


def write_index(out_dir: Path, dtype: np.dtype, block_size: int, vocab_size: int, eos_id: int,
                splits: dict[str, list[dict[str, Any]]], data_format: str = "text") -> dict[str, Any]:
    """The index that `PackedDataset` reads."""
    from jobs.files import atomic_write_text

    if data_format not in FORMAT_ARRAYS:
        raise ValueError(f"data.format={data_format!r} is unknown; use one of {sorted(FORMAT_ARRAYS)}")
    index = {"dtype": np.dtype(dtype).name, "block_size": block_size, "vocab_size": vocab_size, "eos_id": eos_id,
             "format": data_format, "arrays": array_dtypes(dtype, data_format), "splits": splits}
    atomic_write_text(Path(out_dir) / INDEX, json.dumps(index, indent=1))
    return index


class PackedDataset:
    """The blocks of one split across its files, memory-mapped on first read; cheap to construct and to pickle.

    `format` is the recipe's data.format the directory was prepared with: text, chat or preference.
    """

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
        self.format: str = index.get("format", "text")  # indexes written before data.format have text
        self._arrays = {k: np.dtype(v) for k, v in index.get("arrays", {"file": self.dtype.name}).items()}
        entries = [e for e in index["splits"][split] if e["blocks"]]
        self._files = [{key: self.data_dir / e[key] for key in self._arrays} | {"blocks": int(e["blocks"])}
                       for e in entries]
        self._starts = np.cumsum([0] + [e["blocks"] for e in self._files])
        self._maps: list[dict[str, np.memmap]] | None = None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}  # memory maps are reopened in the receiving process

    def _memmaps(self) -> list[dict[str, np.memmap]]:
        if self._maps is None:
            maps = []
            for entry in self._files:
                blocks, arrays = entry["blocks"], {}
                for key, dtype in self._arrays.items():
                    path = entry[key]
                    expected = blocks * self.block_size * dtype.itemsize
                    if not path.is_file() or path.stat().st_size != expected:
                        raise OSError(f"{path} is missing or not {expected} bytes as {INDEX} says; prepare the data "
                                      "again with `privlm data prepare RECIPE --force`")
                    arrays[key] = np.memmap(path, dtype=dtype, mode="r", shape=(blocks, self.block_size))
                maps.append(arrays)
            self._maps = maps
        return self._maps

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        return self.get_blocks(np.array([i + len(self) if i < 0 else i]))[0]

    def get_blocks(self, indices: Any) -> np.ndarray:
        """Blocks by index: a (len(indices), block_size) int64 array (for preference data, the chosen ids)."""
        return self._gather("file", np.asarray(indices, dtype=np.int64).reshape(-1))

    def _gather(self, key: str, indices: np.ndarray) -> np.ndarray:
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"block index out of range 0..{len(self) - 1} of the {self.split} split")
        out = np.empty((len(indices), self.block_size), dtype=np.int64)
        if not len(indices):
            return out
        maps = self._memmaps()
        file_of = np.searchsorted(self._starts, indices, side="right") - 1
        for f in np.unique(file_of):
            rows = np.nonzero(file_of == f)[0]
            out[rows] = maps[f][key][indices[rows] - self._starts[f]]
        return out

    def get_batch(self, indices: Any) -> dict[str, np.ndarray]:
        """The model's inputs for block ids, each a (len(indices), block_size) int64 array.

        text: `input_ids`, `labels` (the ids). chat: also `position_ids` (0 at each sample's start) and
        `segment_ids` (the sample's number in its block, 0 on padding; `jobs.train.objectives.block_causal_mask`
        turns them into the attention mask), and labels are IGNORE (-100) except on assistant tokens.
        preference: `chosen_input_ids`, `chosen_labels`, `chosen_position_ids`, `chosen_segment_ids` and the
        same four for `rejected_`; labels only on the response. An id of -1 (padding, as
        `jobs.train.loss.share_batches` makes) gives block 0 with every label IGNORE.
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        pad = indices < 0
        ids = np.where(pad, 0, indices)
        if self.format == "text":
            tokens = self.get_blocks(ids)
            return {"input_ids": tokens, "labels": np.where(pad[:, None], IGNORE, tokens)}
        if self.format == "chat":
            return self._sequences(ids, pad, "file", "mask", "segments", "")
        return {**self._sequences(ids, pad, "file", "mask", "segments", "chosen_"),
                **self._sequences(ids, pad, "rejected", "rejected_mask", "rejected_segments", "rejected_")}

    def _sequences(self, ids: np.ndarray, pad: np.ndarray, tokens_key: str, mask_key: str, segments_key: str,
                   prefix: str) -> dict[str, np.ndarray]:
        tokens = self._gather(tokens_key, ids)
        trained = (self._gather(mask_key, ids) == 1) & ~pad[:, None]
        segments = self._gather(segments_key, ids)
        return {f"{prefix}input_ids": tokens, f"{prefix}labels": np.where(trained, tokens, IGNORE),
                f"{prefix}position_ids": position_ids(segments), f"{prefix}segment_ids": segments}


def position_ids(segment_ids: np.ndarray) -> np.ndarray:
    """Positions that restart at 0 wherever the segment id changes along each row (int64)."""
    segment_ids = np.asarray(segment_ids)
    steps = np.arange(segment_ids.shape[-1], dtype=np.int64)
    starts = np.ones(segment_ids.shape, dtype=bool)
    starts[..., 1:] = segment_ids[..., 1:] != segment_ids[..., :-1]
    return steps - np.maximum.accumulate(np.where(starts, steps, 0), axis=-1)


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
