"""LoRA through peft: wrap a model, save adapters, merge them into a plain model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from jobs.recipe import LoRAConfig

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel


def apply_lora(model: PreTrainedModel, cfg: LoRAConfig) -> PeftModel:
    """Freeze the base and add trainable low-rank adapters to the target modules."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(cfg.target_modules) - present)
    if missing:
        raise ValueError(
            f"finetune.lora.target_modules={missing} are not modules of this model; "
            f"choose among {sorted(m for m in present if m.endswith(('proj', 'attn', 'fc')))}"
        )
    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                        target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def merge_lora(model: PeftModel) -> PreTrainedModel:
    """Fold the adapters into the base weights and return a plain transformers model."""
    return model.merge_and_unload()
