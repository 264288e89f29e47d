"""The publish/verify protocol of checkpoints, on hand-made directories (no DeepSpeed needed)."""

from __future__ import annotations

import json
from pathlib import Path

from jobs.train.checkpoint import META, find_latest, published, sha256_file, tag_for, verify


def make_checkpoint(root: Path, step: int, payload: bytes = b"weights") -> Path:
    path = root / tag_for(step)
    path.mkdir(parents=True)
    states = path / "mp_rank_00_model_states.pt"
    states.write_bytes(payload)
    files = {states.name: {"size": len(payload), "sha256": sha256_file(states)}}
    (path / META).write_text(json.dumps({"step": step, "world_size": 2, "files": files}))
    return path


def test_newest_verified_checkpoint_wins(tmp_path: Path) -> None:
    for step in (4, 8, 12):
        make_checkpoint(tmp_path, step)
    assert [p.name for p in published(tmp_path)] == ["step-00000012", "step-00000008", "step-00000004"]
    assert find_latest(tmp_path).step == 12


def test_truncated_file_is_skipped_for_the_previous_one(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, 4)
    newest = make_checkpoint(tmp_path, 8)
    (newest / "mp_rank_00_model_states.pt").write_bytes(b"wei")
    found = find_latest(tmp_path)
    assert found is not None and found.step == 4


def test_corrupt_bytes_caught_only_by_checksum(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path, 4)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"WEIGHTS")  # same size, other content
    assert verify(path, checksums=False)["step"] == 4
    assert find_latest(tmp_path, checksums=True) is None


def test_directory_without_meta_is_never_loaded(tmp_path: Path) -> None:
    (tmp_path / tag_for(16)).mkdir()
    (tmp_path / ".staging" / tag_for(20)).mkdir(parents=True)
    make_checkpoint(tmp_path, 12)
    assert find_latest(tmp_path).step == 12


def test_no_checkpoint_at_all(tmp_path: Path) -> None:
    assert find_latest(tmp_path / "missing") is None
