"""The DeepSpeed JSON config for a recipe; `deepspeed.extra` is merged in last, verbatim."""

from __future__ import annotations

from typing import Any

from jobs.recipe import Recipe


def _offload(device: str, nvme_path: str | None) -> dict[str, Any]:
    block: dict[str, Any] = {"device": device}
    if device == "nvme":
        block["nvme_path"] = nvme_path
    if device != "none":
        block["pin_memory"] = True
    return block


def deepspeed_config(recipe: Recipe, world_size: int, load_universal: bool = False) -> dict[str, Any]:
    """Batch geometry, AdamW, warmup-cosine to a floor, ZeRO stage and offload, precision, AutoTP.

    `train_batch_size` counts data-parallel ranks only (world / (tensor x pipeline)); `load_universal`
    loads a checkpoint converted by `ds_to_universal` (a resume on another data-parallel degree)."""
    from jobs.recipe import parallel_problems

    t, ds = recipe.training, recipe.deepspeed
    problems = parallel_problems(recipe, world_size)
    if problems:
        raise ValueError(f"this launch has {world_size} ranks: " + "; ".join(problems))
    data_parallel = world_size // recipe.parallel.model_parallel
    warmup = max(t.warmup_steps, 1)
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(ds.offload_optimizer, ds.nvme_path)
    if ds.offload_param != "none":
        zero["offload_param"] = _offload(ds.offload_param, ds.nvme_path)
    config: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation(data_parallel),
        "gradient_clipping": t.grad_clip,
        "optimizer": {
            "type": ds.optimizer.type,
            "params": {
                "lr": t.learning_rate,
                "betas": list(t.betas),
                "eps": ds.optimizer.eps,
                "weight_decay": t.weight_decay,
                "torch_adam": ds.optimizer.torch_adam,
            },
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": t.total_steps,
                "warmup_num_steps": warmup,
                "warmup_min_ratio": 1.0 / warmup,
                "warmup_type": "linear",
                "cos_min_ratio": t.min_learning_rate / t.learning_rate,
            },
        },
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer != "none":
        config["zero_force_ds_cpu_optimizer"] = False
    if recipe.parallel.tensor > 1:
        config["tensor_parallel"] = {"autotp_size": recipe.parallel.tensor}
        # DeepSpeed checks train_batch_size against the whole world before the TP mesh exists: leave it
        # to be derived (micro batch x accumulation); our loop feeds each tensor group one data share
        del config["train_batch_size"]
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    return _merge(config, ds.extra)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `extra` into `base` (extra wins)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
