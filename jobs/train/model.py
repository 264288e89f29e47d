"""Build decoder-only models from a recipe's config (no hub downloads), or load a base model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from jobs.recipe import ModelConfig

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel


def hf_config(cfg: ModelConfig, eos_id: int | None = None) -> PretrainedConfig:
    """The Hugging Face config for a recipe's model section."""
    from transformers import GPT2Config, LlamaConfig

    special = {} if eos_id is None else {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}
    if cfg.architecture == "llama":
        return LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size or _llama_ffn(cfg.hidden_size),
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
            max_position_embeddings=cfg.max_position_embeddings,
            tie_word_embeddings=cfg.tie_word_embeddings,
            rope_theta=cfg.rope_theta,
            attention_dropout=cfg.dropout,
            **special,
        )
    return GPT2Config(
        vocab_size=cfg.vocab_size,
        n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers,
        n_head=cfg.num_heads,
        n_inner=cfg.intermediate_size,
        n_positions=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        **special,
    )


def _llama_ffn(hidden: int) -> int:
    """Llama's SwiGLU width: 8/3 of hidden, rounded up to a multiple of 64."""
    return 64 * -(-(8 * hidden // 3) // 64)


def build_model(cfg: ModelConfig, seed: int, eos_id: int | None = None) -> PreTrainedModel:
    """A freshly initialised model; the same seed gives the same weights on every rank."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(cfg, eos_id), dtype=torch.float32)
    return model


def load_pretrained(path: str | Path) -> PreTrainedModel:
    """A model saved with `save_pretrained` (our exports, or any Hugging Face directory)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"finetune.base={str(path)!r} is not a Hugging Face model directory (no config.json); "
            "point it at a pretraining run's exported model, e.g. runs/tiny-cpu/model"
        )
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:  # noqa: F821
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def flops_per_token(cfg: ModelConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N plus attention's 12*L*d*S (PaLM, appendix B)."""
    return 6.0 * n_params + 12.0 * cfg.num_layers * cfg.hidden_size * seq_len
