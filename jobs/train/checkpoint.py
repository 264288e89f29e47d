"""Atomic, verified DeepSpeed checkpoints with a `latest` pointer, RNG states and pruning.

Layout under the checkpoint directory:
    .staging/step-00000040/   written by DeepSpeed and every rank, never loaded
    step-00000040/            published: complete, fsynced, with meta.json listing every file
    latest                    the newest published tag (DeepSpeed's own format)
    best                      the tag with the best validation loss (kept when older ones are pruned)
    .universal/step-00000040/ the same checkpoint converted by DeepSpeed's ds_to_universal, made when a
                              run resumes on another number of data-parallel ranks
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
UNIVERSAL = ".universal"
BEST = "best"
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


@dataclass
class Resume:
    """The checkpoint a run resumes from, and whether its data-parallel degree changes on the way."""

    checkpoint: Checkpoint
    reshaped: bool  # written by another number of data-parallel ranks: load through a universal checkpoint
    universal: bool  # the reshape needs ds_to_universal (ZeRO 1-3 partition optimizer states by rank)


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


def read_best(directory: Path) -> str | None:
    """The tag of the best-validated checkpoint, if one was marked."""
    path = directory / BEST
    return path.read_text().strip() if path.is_file() else None


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
        if extra_meta.get("best"):
            atomic_write_text(self.directory / BEST, staged.name)
        best = read_best(self.directory)
        for old in published(self.directory)[self.keep:]:
            if old.name != best:
                shutil.rmtree(old, ignore_errors=True)
                shutil.rmtree(self.directory / UNIVERSAL / old.name, ignore_errors=True)

    def clean_staging(self) -> None:
        """Rank 0: drop what a crashed save left behind."""
        if self.rank.is_main and self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)
        barrier()

    def find(self, world_size: int, layout: dict[str, int], data_fingerprint: str | None = None) -> Resume | None:
        """The newest verified checkpoint to resume from, before the engine exists (a reshape changes its config).

        Refuses a checkpoint trained on other data (a re-prepared dataset has another tokenizer and block
        order: resuming on it would silently train on garbage) or with other tensor/pipeline degrees; a
        different number of data-parallel ranks is a reshape (N -> M ranks, e.g. a requeue on fewer nodes).
        """
        self.clean_staging()
        found = find_latest(self.directory, self.checksums)
        if found is None:
            return None
        trained_on = found.meta.get("data_fingerprint")
        if trained_on and data_fingerprint and trained_on != data_fingerprint:
            raise CheckpointError(
                f"{found.path} was trained on data {trained_on} but the prepared data is now {data_fingerprint} "
                f"(it was re-prepared); move {self.directory} aside to train from scratch, or restore that data"
            )
        old = found.meta.get("layout") or {"tensor": 1, "pipeline": 1, "data": found.meta["world_size"]}
        for key in ("tensor", "pipeline"):
            if old[key] != layout[key]:
                raise CheckpointError(
                    f"{found.path} was written with parallel.{key}={old[key]} but this run has {layout[key]}; "
                    f"resume with parallel.{key}: {old[key]} (only the data-parallel degree may change)")
        reshaped = old["data"] != layout["data"] or found.meta["world_size"] != world_size
        return Resume(found, reshaped, reshaped and found.meta.get("zero_stage", 0) >= 1)

    def load(self, engine: Any, resume: Resume) -> dict[str, Any]:
        """Load `resume` into the engine (built with load_universal when `resume.universal`) and this rank's
        RNG states; returns the client state with this rank's loop state under `rank_state`.

        After a reshape rank r takes the RNG states of old rank min(r, N-1) and no loop state (the
        running loss of the log interval in progress restarts)."""
        found = resume.checkpoint
        directory, tag = self.directory, found.tag
        if resume.universal:
            directory = self._universal(found)
        _, client_state = engine.load_checkpoint(str(directory), tag=tag, load_module_strict=not self.exclude_frozen)
        import torch

        old_world = int(found.meta["world_size"])
        source = self.rank.rank if not resume.reshaped else min(self.rank.rank, old_world - 1)
        rng = torch.load(found.path / f"rng_rank{source:05d}.pt", weights_only=False)
        restore_rng(rng)
        return {**(client_state or {}), "rank_state": {} if resume.reshaped else rng.get("loop", {})}

    def _universal(self, found: Checkpoint) -> Path:
        """All ranks: `found` converted by DeepSpeed's ds_to_universal (rank 0 converts once, into a temporary
        name, then renames); returns the directory holding the converted tag."""
        root = self.directory / UNIVERSAL
        target = root / found.tag
        if self.rank.is_main and not (target / "complete").is_file():
            from argparse import Namespace

            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            tmp = root / f".tmp-{found.tag}"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(target, ignore_errors=True)
            root.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            ds_to_universal(Namespace(input_folder=str(found.path), output_folder=str(tmp), num_extract_workers=1,
                                      num_merge_workers=1, keep_temp_folder=False, strict=True,
                                      inject_missing_state=True))
            (tmp / "complete").write_text(json.dumps({"seconds": time.perf_counter() - started}))
            fsync_tree(tmp)
            os.rename(tmp, target)
            fsync_dir(root)
        barrier()
        return root


def fault_at(point: str, step: int, rank: RankInfo) -> bool:
    """Test hook: PRIVLM_FAULT=POINT:STEP:RANK names where a test injects a fault."""
    spec = os.environ.get("PRIVLM_FAULT", "")
    if spec.count(":") != 2:
        return False
    where, at_step, at_rank = spec.split(":")
    return where == point and int(at_step) == step and int(at_rank) == rank.rank


def _maybe_inject_fault(point: str, step: int, rank: RankInfo) -> None:
    """PRIVLM_FAULT=during_checkpoint:STEP:RANK kills that rank there with SIGKILL."""
    if fault_at(point, step, rank):
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
