"""Atomic, verified DeepSpeed checkpoints with a `latest` pointer, RNG states and pruning.

Layout under the checkpoint directory:
    .staging/step-00000040/   written by DeepSpeed and every rank, never loaded
    step-00000040/            published: complete, fsynced, with meta.json listing every file
    latest                    the newest published tag (DeepSpeed's own format)
A checkpoint is published by renaming its staging directory only after every rank's files are on
disk and verified; a crash at any moment leaves at most a staging directory, which is discarded.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jobs.files import atomic_write_text, fsync_dir
from jobs.train.distributed import RankInfo, barrier

STAGING = ".staging"
META = "meta.json"
TAG_RE = re.compile(r"^step-(\d{8})$")


def tag_for(step: int) -> str:
    """The directory name of the checkpoint taken after `step` optimizer steps."""
    return f"step-{step:08d}"


def fsync_tree(path: Path) -> None:
    """fsync every file below `path`, then the directories themselves."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def capture_rng() -> dict[str, Any]:
    """This rank's RNG states: Python, NumPy, torch CPU and CUDA."""
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back RNG states captured by `capture_rng`."""
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class Checkpoint:
    """A published checkpoint: where it is and what it says about itself."""

    path: Path
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def tag(self) -> str:
        return self.path.name


class CheckpointError(RuntimeError):
    """A checkpoint that must not be loaded."""


def verify(path: Path, checksums: bool) -> dict[str, Any]:
    """Return the meta of a published checkpoint, or raise CheckpointError saying what is wrong."""
    meta_file = path / META
    if not meta_file.is_file():
        raise CheckpointError(f"{path}: no {META} (incomplete write)")
    meta = json.loads(meta_file.read_text())
    for rel, info in meta["files"].items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{path}: {rel} is missing")
        if f.stat().st_size != info["size"]:
            raise CheckpointError(f"{path}: {rel} has {f.stat().st_size} bytes, expected {info['size']}")
        if checksums and info.get("sha256") and sha256_file(f) != info["sha256"]:
            raise CheckpointError(f"{path}: {rel} checksum mismatch")
    return meta


def published(directory: Path) -> list[Path]:
    """Published checkpoint directories, newest first (by step in the name)."""
    if not directory.is_dir():
        return []
    tags = [p for p in directory.iterdir() if p.is_dir() and TAG_RE.match(p.name)]
    return sorted(tags, key=lambda p: p.name, reverse=True)


def find_latest(directory: Path, checksums: bool = False) -> Checkpoint | None:
    """The newest checkpoint that verifies; broken ones are reported and skipped."""
    for path in published(directory):
        try:
            return Checkpoint(path, verify(path, checksums))
        except (CheckpointError, json.JSONDecodeError, KeyError) as exc:
            print(f"[privlm] skipping checkpoint: {exc}", flush=True)
    return None


class CheckpointManager:
    """Saves and loads a DeepSpeed engine's state through the atomic publish protocol."""

    def __init__(self, directory: Path, rank: RankInfo, keep: int, checksums: bool = True,
                 exclude_frozen: bool = False) -> None:
        self.directory = directory
        self.rank = rank
        self.keep = keep
        self.checksums = checksums
        self.exclude_frozen = exclude_frozen
        self.last_save_seconds: float | None = None
        self.last_save_bytes = 0

    @property
    def staging(self) -> Path:
        return self.directory / STAGING

    def save(self, engine: Any, step: int, client_state: dict[str, Any], extra_meta: dict[str, Any],
             rank_state: dict[str, Any] | None = None) -> Path:
        """Write, verify and publish the checkpoint for `step`; every rank must call this.

        `rank_state` is this rank's own loop state (e.g. its running loss), kept beside its RNG states."""
        started = time.perf_counter()
        tag = tag_for(step)
        staged = self.staging / tag
        if self.rank.is_main:
            shutil.rmtree(staged, ignore_errors=True)
            self.staging.mkdir(parents=True, exist_ok=True)
        barrier()
        engine.save_checkpoint(str(self.staging), tag=tag, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=self.exclude_frozen)
        import torch

        rng_file = staged / f"rng_rank{self.rank.rank:05d}.pt"
        torch.save({**capture_rng(), "loop": rank_state or {}}, rng_file)
        _maybe_inject_fault("during_checkpoint", step, self.rank)
        barrier()
        if self.rank.is_main:
            self._publish(staged, step, extra_meta)
        barrier()
        self.last_save_seconds = time.perf_counter() - started
        if self.rank.is_main:
            self.last_save_bytes = sum(f.stat().st_size for f in (self.directory / tag).rglob("*") if f.is_file())
        return self.directory / tag

    def _publish(self, staged: Path, step: int, extra_meta: dict[str, Any]) -> None:
        """Rank 0: fsync, check every rank's files, write meta, rename, move `latest`, prune."""
        fsync_tree(staged)
        files = sorted(p for p in staged.rglob("*") if p.is_file())
        missing = [r for r in range(self.rank.world_size) if not (staged / f"rng_rank{r:05d}.pt").is_file()]
        if missing:
            raise CheckpointError(f"ranks {missing} did not write their state into {staged}")
        meta = {
            "step": step,
            "world_size": self.rank.world_size,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": {
                str(p.relative_to(staged)): {
                    "size": p.stat().st_size,
                    **({"sha256": sha256_file(p)} if self.checksums else {}),
                }
                for p in files
            },
            **extra_meta,
        }
        atomic_write_text(staged / META, json.dumps(meta, indent=1))
        final = self.directory / staged.name
        if final.exists():  # a re-save of the same step (e.g. signal right after an interval save)
            shutil.rmtree(final)
        os.rename(staged, final)
        fsync_dir(self.directory)
        atomic_write_text(self.directory / "latest", staged.name)
        for old in published(self.directory)[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)

    def clean_staging(self) -> None:
        """Rank 0: drop what a crashed save left behind."""
        if self.rank.is_main and self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)
        barrier()

    def load(self, engine: Any, data_fingerprint: str | None = None) -> tuple[Checkpoint, dict[str, Any]] | None:
        """Load the newest verified checkpoint into the engine and this rank's RNG; None if there is none.

        Refuses a checkpoint written by another number of ranks, or trained on other data (a re-prepared
        dataset has another tokenizer and block order: resuming on it would silently train on garbage).
        """
        self.clean_staging()
        found = find_latest(self.directory, self.checksums)
        if found is None:
            return None
        if found.meta["world_size"] != self.rank.world_size:
            raise CheckpointError(
                f"{found.path} was written by {found.meta['world_size']} ranks but this job has "
                f"{self.rank.world_size}; resume with the same processes_per_node x nodes"
            )
        trained_on = found.meta.get("data_fingerprint")
        if trained_on and data_fingerprint and trained_on != data_fingerprint:
            raise CheckpointError(
                f"{found.path} was trained on data {trained_on} but the prepared data is now {data_fingerprint} "
                f"(it was re-prepared); move {self.directory} aside to train from scratch, or restore that data"
            )
        _, client_state = engine.load_checkpoint(str(self.directory), tag=found.tag,
                                                 load_module_strict=not self.exclude_frozen)
        import torch

        rng = torch.load(found.path / f"rng_rank{self.rank.rank:05d}.pt", weights_only=False)
        restore_rng(rng)
        return found, {**(client_state or {}), "rank_state": rng.get("loop", {})}


def _maybe_inject_fault(point: str, step: int, rank: RankInfo) -> None:
    """Test hook: PRIVLM_FAULT=during_checkpoint:STEP:RANK kills that rank there with SIGKILL."""
    spec = os.environ.get("PRIVLM_FAULT", "")
    if spec.count(":") != 2:
        return
    where, at_step, at_rank = spec.split(":")
    if where == point and int(at_step) == step and int(at_rank) == rank.rank:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def load_module_weights(directory: Path) -> dict[str, Any]:
    """The full fp32 model state dict from a published checkpoint (any ZeRO stage), for fine-tuning."""
    found = find_latest(directory)
    if found is None:
        raise FileNotFoundError(f"{directory} holds no published checkpoint")
    stage = found.meta.get("zero_stage", 0)
    if stage == 0:
        import torch

        states = torch.load(found.path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return states["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=found.tag)
