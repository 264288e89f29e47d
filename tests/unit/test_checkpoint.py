"""The publish/verify protocol of checkpoints and CheckpointManager (save, prune, find, load) on real files,
with a fake engine (no DeepSpeed needed)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from jobs.train import checkpoint
from jobs.train.checkpoint import (
    META,
    CheckpointError,
    CheckpointManager,
    find_latest,
    published,
    sha256_file,
    tag_for,
    verify,
)
from jobs.train.distributed import RankInfo


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


class FakeEngine:
    """What CheckpointManager asks of a DeepSpeed engine: write its files under DIR/TAG, read them back."""

    def __init__(self, payload: bytes = b"weights") -> None:
        self.payload = payload
        self.loaded: tuple[str, str] | None = None

    def save_checkpoint(self, directory: str, tag: str, client_state: dict, save_latest: bool,
                        exclude_frozen_parameters: bool) -> None:
        path = Path(directory) / tag
        path.mkdir(parents=True, exist_ok=True)
        (path / "mp_rank_00_model_states.pt").write_bytes(self.payload)
        (path / "client.json").write_text(json.dumps(client_state))

    def load_checkpoint(self, directory: str, tag: str, load_module_strict: bool) -> tuple[str, dict]:
        self.loaded = (directory, tag)
        return directory, json.loads((Path(directory) / tag / "client.json").read_text())


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., CheckpointManager]:
    """A one-rank CheckpointManager writing real files under tmp_path/ckpt (no process group: no barriers)."""
    monkeypatch.setattr(checkpoint, "barrier", lambda: None)

    def make(keep: int = 3) -> CheckpointManager:
        return CheckpointManager(tmp_path / "ckpt", RankInfo(0, 0, 1, "cpu"), keep=keep)

    return make


LAYOUT = {"tensor": 1, "pipeline": 1, "data": 1}


def save(mgr: CheckpointManager, step: int, **meta: object) -> Path:
    return mgr.save(FakeEngine(), step, {"step": step}, {"layout": LAYOUT, "data_fingerprint": "data-a", **meta},
                    rank_state={"running_loss": step / 10})


def test_pruning_keeps_the_newest_keep_and_the_best(manager: Callable[..., CheckpointManager]) -> None:
    mgr = manager(keep=2)
    for step in (10, 20, 30, 40, 50):
        save(mgr, step, best=step == 20)
        assert (mgr.directory / "latest").read_text() == tag_for(step)
    assert [p.name for p in published(mgr.directory)] == [tag_for(50), tag_for(40), tag_for(20)]
    assert (mgr.directory / "best").read_text() == tag_for(20)
    assert not (mgr.directory / ".staging" / tag_for(50)).exists()


def test_resume_loads_the_newest_with_its_rank_state(manager: Callable[..., CheckpointManager]) -> None:
    mgr = manager()
    save(mgr, 10)
    save(mgr, 20)
    resume = mgr.find(1, LAYOUT, "data-a")
    assert resume is not None and resume.checkpoint.step == 20 and not resume.reshaped
    engine = FakeEngine()
    state = mgr.load(engine, resume)
    assert engine.loaded == (str(mgr.directory), tag_for(20))
    assert state == {"step": 20, "rank_state": {"running_loss": 2.0}}


def test_a_broken_newest_checkpoint_resumes_from_the_previous_one(manager: Callable[..., CheckpointManager]) -> None:
    mgr = manager()
    save(mgr, 10)
    newest = save(mgr, 20)
    (newest / "mp_rank_00_model_states.pt").write_bytes(b"WEIGHTS")  # same size, flipped bits
    resume = mgr.find(1, LAYOUT, "data-a")
    assert resume is not None and resume.checkpoint.step == 10
    (mgr.directory / tag_for(10) / "rng_rank00000.pt").unlink()
    assert mgr.find(1, LAYOUT, "data-a") is None  # nothing that verifies: train from scratch, never load garbage


def test_a_checkpoint_of_other_data_is_refused(manager: Callable[..., CheckpointManager]) -> None:
    mgr = manager()
    save(mgr, 10)
    with pytest.raises(CheckpointError, match="was trained on data data-a but the prepared data is now data-b"):
        mgr.find(1, LAYOUT, "data-b")


@pytest.mark.parametrize("key", ["tensor", "pipeline"])
def test_other_tensor_or_pipeline_degrees_are_refused(manager: Callable[..., CheckpointManager], key: str) -> None:
    mgr = manager()
    save(mgr, 10, layout={**LAYOUT, key: 2})
    with pytest.raises(CheckpointError, match=rf"parallel\.{key}=2 but this run has 1; resume with parallel\.{key}: 2"):
        mgr.find(1, LAYOUT, "data-a")


def test_another_data_parallel_degree_is_a_reshape(manager: Callable[..., CheckpointManager]) -> None:
    mgr = manager()
    save(mgr, 10, zero_stage=2)
    resume = mgr.find(2, {**LAYOUT, "data": 2}, "data-a")
    assert resume is not None and resume.reshaped and resume.universal
