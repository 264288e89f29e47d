"""Rank environment and device selection: the same code on CPU (gloo) and GPUs (NCCL)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the job, read from the torchrun-style environment."""

    rank: int
    local_rank: int
    world_size: int
    device: str  # "cpu" or "cuda"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def has_cuda() -> bool:
    """True when a CUDA device is usable (torch imported lazily)."""
    import torch

    return torch.cuda.is_available()


def rank_env_present(env: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """True when a launcher (ours, torchrun, Slurm via submitit) already set RANK and WORLD_SIZE."""
    return "RANK" in env and "WORLD_SIZE" in env


def accelerator_env(threads: int) -> dict[str, str]:
    """Variables every rank needs before deepspeed is imported."""
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.setdefault("TORCH_EXTENSIONS_DIR", os.environ.get("TORCH_EXTENSIONS_DIR",
                                                          str(REPO_ROOT / ".torch_extensions")))
    if not has_cuda():
        env["DS_ACCELERATOR"] = "cpu"
    return env


def init_distributed(threads: int | None) -> RankInfo:
    """Join the process group DeepSpeed will use; set threads and the device for this rank."""
    for key, value in accelerator_env(threads or 1).items():
        os.environ.setdefault(key, value)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(threads or 1)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
    return RankInfo(
        rank=int(os.environ["RANK"]),
        local_rank=local_rank,
        world_size=int(os.environ["WORLD_SIZE"]),
        device=device,
    )


def barrier() -> None:
    """A barrier across all ranks."""
    import torch.distributed as dist

    dist.barrier()


def _collective_device() -> str:
    import torch

    return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"


def all_reduce_max(value: float) -> float:
    """The maximum of a scalar over all ranks (used to agree on stop requests)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_mean(values: list[float]) -> list[float]:
    """Mean of a few scalars over all ranks, in one collective."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / dist.get_world_size()).tolist()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum of a few scalars over all ranks, in one collective."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_max_many(values: list[float]) -> list[float]:
    """Element-wise maximum of a few scalars over all ranks, in one collective."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()
