"""Packing round trip with a real tokenizer, the index, the reader, and the sampler's exact resume position."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.data.pack import BlockWriter, PackedDataset, ResumableSampler, load_tokenizer, token_dtype, write_index
from jobs.data.tokenizer import EOS, encode_batch, train_tokenizer

DOCS = [f"def f{i}(x):\n    return x * {i}  # café {i}\n" * (1 + i % 4) for i in range(40)]


def write_split(root: Path, stream: np.ndarray, block: int, per_file: int, split: str = "train") -> list[dict]:
    writer = BlockWriter(root, split, block, token_dtype(1000), per_file)
    for start in range(0, len(stream), 7):  # many small writes, as documents come
        writer.write(stream[start:start + 7])
    return writer.close()


def test_block_writer_cuts_whole_blocks_across_files(tmp_path: Path) -> None:
    stream = np.arange(1, 84, dtype=np.uint16)  # 83 tokens: 10 blocks of 8, 3 dropped
    entries = write_split(tmp_path, stream, 8, per_file=4)
    assert entries == [{"file": "train-00000.bin", "blocks": 4}, {"file": "train-00001.bin", "blocks": 4},
                       {"file": "train-00002.bin", "blocks": 2}]
    write_index(tmp_path, np.dtype("uint16"), 8, 1000, 0, {"train": entries, "eval": []})
    ds = PackedDataset(tmp_path)
    assert len(ds) == 10 and ds.block_size == 8 and ds.vocab_size == 1000 and ds.eos_id == 0
    assert np.array_equal(ds.get_blocks(np.arange(10)).reshape(-1), stream[:80])  # only the final remainder goes
    assert ds[5].dtype == np.int64 and np.array_equal(ds[5], stream[40:48]) and np.array_equal(ds[-1], stream[72:80])
    assert np.array_equal(ds.get_blocks(np.array([9, 0, 4])), stream[:80].reshape(10, 8)[[9, 0, 4]])
    assert len(PackedDataset(tmp_path, "eval")) == 0


def test_round_trip_through_a_trained_tokenizer(tmp_path: Path) -> None:
    tok = train_tokenizer(iter(DOCS), vocab_size=300, min_frequency=2, out_dir=tmp_path / "tokenizer")
    assert tok.eos_token == tok.bos_token == tok.pad_token == EOS and len(tok) <= 300
    stream = np.concatenate([np.asarray([*ids, tok.eos_token_id], dtype=np.uint16)
                             for ids in encode_batch(tok, DOCS)])
    entries = write_split(tmp_path, stream, 16, per_file=5)
    write_index(tmp_path, np.dtype("uint16"), 16, len(tok), tok.eos_token_id, {"train": entries, "eval": []})
    ds = PackedDataset(tmp_path)
    blocks = ds.get_blocks(np.arange(len(ds))).reshape(-1)
    assert len(ds) == len(stream) // 16 and np.array_equal(blocks, stream[: len(ds) * 16])
    decoded = load_tokenizer(tmp_path).decode(blocks)
    assert (EOS.join(DOCS) + EOS).startswith(decoded)  # byte-level BPE: text comes back exactly
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["block_size"] == 16 and index["eos_id"] == tok.eos_token_id


def test_dtype_follows_vocab() -> None:
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32


def test_reader_errors_and_pickling(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="privlm data prepare"):
        PackedDataset(tmp_path)
    entries = write_split(tmp_path, np.arange(64, dtype=np.uint16), 8, per_file=100)
    write_index(tmp_path, np.dtype("uint16"), 8, 1000, 0, {"train": entries, "eval": []})
    ds = PackedDataset(tmp_path)
    with pytest.raises(IndexError):
        ds.get_blocks([8])
    with pytest.raises(FileNotFoundError, match="no 'test' split"):
        PackedDataset(tmp_path, "test")
    ds[0]
    clone = pickle.loads(pickle.dumps(ds))  # e.g. into a DataLoader worker: maps are reopened there
    assert np.array_equal(clone[3], ds[3])
    (tmp_path / "train-00000.bin").write_bytes(b"\0" * 10)
    with pytest.raises(OSError, match="--force"):
        PackedDataset(tmp_path)[0]


def test_sampler_epochs_are_permutations_across_the_boundary() -> None:
    s = ResumableSampler(10, seed=3)
    window = s.indices(5, 10)  # the second half of epoch 0 and the first half of epoch 1
    assert sorted(np.concatenate([s.indices(0, 5), window[:5]])) == list(range(10))
    assert sorted(s.indices(0, 10)) == list(range(10)) == sorted(s.indices(10, 10))
    assert not np.array_equal(s.indices(0, 10), s.indices(10, 10))
    assert np.array_equal(s.indices(0, 10), np.random.default_rng((3, 0)).permutation(10))


def test_sampler_depends_on_the_seed_only() -> None:
    assert np.array_equal(ResumableSampler(50, 1).indices(0, 50), ResumableSampler(50, 1).indices(0, 50))
    assert not np.array_equal(ResumableSampler(50, 1).indices(0, 50), ResumableSampler(50, 2).indices(0, 50))


@settings(max_examples=60, deadline=None)
@given(num_blocks=st.integers(1, 23), start=st.integers(0, 120), count=st.integers(0, 60), seed=st.integers(0, 99))
def test_resume_at_any_position_is_exact(num_blocks: int, start: int, count: int, seed: int) -> None:
    long = ResumableSampler(num_blocks, seed).indices(0, start + count)
    assert np.array_equal(ResumableSampler(num_blocks, seed).indices(start, count), long[start:])


def test_sampler_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="no blocks"):
        ResumableSampler(0, 1)
    with pytest.raises(ValueError):
        ResumableSampler(5, 1).indices(-1, 3)
