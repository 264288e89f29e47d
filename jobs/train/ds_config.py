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


def deepspeed_config(recipe: Recipe, world_size: int) -> dict[str, Any]:
    """Batch geometry, AdamW, warmup-cosine to a floor, ZeRO stage and offload, precision."""
    t, ds = recipe.training, recipe.deepspeed
    if t.global_batch_size % (t.micro_batch_size * world_size):
        raise ValueError(
            f"training.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size x "
            f"world size ({t.micro_batch_size} x {world_size}) of this launch"
        )
    warmup = max(t.warmup_steps, 1)
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(ds.offload_optimizer, ds.nvme_path)
    if ds.offload_param != "none":
        zero["offload_param"] = _offload(ds.offload_param, ds.nvme_path)
    config: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * world_size),
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
    return _merge(config, ds.extra)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `extra` into `base` (extra wins)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
