"""Packing round trip, the index, and the sampler's exact resume position."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jobs.data.pack import PackedDataset, ResumableSampler, token_dtype, write_blocks


def make_dataset(root: Path, streams: list[np.ndarray], block: int) -> int:
    splits = []
    for i, tokens in enumerate(streams):
        n = write_blocks(tokens.astype(np.uint16), block, root / f"train-{i:05d}.bin")
        splits.append({"file": f"train-{i:05d}.bin", "blocks": n})
    index = {"dtype": "uint16", "block_size": block, "vocab_size": 1000, "eos_id": 0,
             "splits": {"train": splits, "eval": []}}
    (root / "index.json").write_text(json.dumps(index))
    return sum(s["blocks"] for s in splits)


def test_blocks_round_trip_across_shards(tmp_path: Path) -> None:
    a, b = np.arange(1, 35), np.arange(100, 150)  # 34 and 50 tokens: 4 and 6 blocks of 8
    assert make_dataset(tmp_path, [a, b], 8) == 10
    ds = PackedDataset(tmp_path)
    assert len(ds) == 10 and ds.block_size == 8
    whole = ds.get_blocks(np.arange(10)).reshape(-1)
    assert np.array_equal(whole, np.concatenate([a[:32], b[:48]]))  # remainders dropped per shard
    assert ds.get_blocks([5]).dtype == np.int64 and np.array_equal(ds[5], b[8:16])


def test_dtype_follows_vocab() -> None:
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32


def test_sampler_epochs_are_permutations() -> None:
    s = ResumableSampler(10, seed=3)
    first, second = s.indices(0, 10), s.indices(10, 10)
    assert sorted(first) == list(range(10)) == sorted(second)
    assert not np.array_equal(first, second)


def test_sampler_resume_at_any_position_is_exact() -> None:
    long = ResumableSampler(7, seed=11).indices(0, 40)
    for start in (0, 3, 6, 7, 13, 20, 33):
        resumed = ResumableSampler(7, seed=11).indices(start, 40 - start)
        assert np.array_equal(resumed, long[start:])


def test_missing_data_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="privlm data prepare"):
        PackedDataset(tmp_path)
