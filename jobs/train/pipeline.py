"""Our Llama and GPT-2 models as DeepSpeed `PipelineModule`s: a flat list of layers with one tensor between them.

DeepSpeed's pipeline engine needs the model as a sequence (embedding, blocks, final norm and head) where
each layer maps one tensor to the next; a Hugging Face `*ForCausalLM` is one module with keyword
arguments, so it is re-expressed here around the very same submodules (the same weights as the
data-parallel model for the same seed). Tied input and output embeddings become a `TiedLayerSpec`
shared by the first and last stage (DeepSpeed all-reduces its gradient across them). Each layer knows
its Hugging Face parameter names, so the trained pipeline exports as an ordinary model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from jobs.train.loss import mean_token_loss, token_loss_sum


class TokenEmbedding(nn.Module):
    """Token embedding (GPT-2: plus learned positions); tied as the output head on the last stage."""

    def __init__(self, embedding: nn.Embedding, prefix: str, positions: nn.Embedding | None = None,
                 positions_prefix: str = "") -> None:
        super().__init__()
        self.weight = embedding.weight
        self.positions = positions
        self.prefix, self.positions_prefix = prefix, positions_prefix

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = nn.functional.embedding(input_ids, self.weight)
        if self.positions is not None:
            hidden = hidden + self.positions(torch.arange(input_ids.shape[1], device=input_ids.device))[None]
        return hidden

    def hf_state(self) -> dict[str, torch.Tensor]:
        state = {self.prefix + "weight": self.weight}
        if self.positions is not None:
            state[self.positions_prefix + "weight"] = self.positions.weight
        return state


def tied_head(embedding: TokenEmbedding, hidden: torch.Tensor) -> torch.Tensor:
    """The output head of a tied model: hidden states times the embedding matrix."""
    return nn.functional.linear(hidden, embedding.weight)


class LlamaBlock(nn.Module):
    """One LlamaDecoderLayer; rotary position embeddings are recomputed per block (they hold no weights)."""

    def __init__(self, layer: nn.Module, rotary: nn.Module, prefix: str) -> None:
        super().__init__()
        self.layer, self.rotary, self.prefix = layer, rotary, prefix  # rotary: buffers only, shared by blocks

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
        # attention_mask=None: SDPA attention is causal by itself (is_causal), as in the HF forward
        return self.layer(hidden, position_embeddings=self.rotary(hidden, positions), position_ids=positions)

    def hf_state(self) -> dict[str, torch.Tensor]:
        return {self.prefix + k: v for k, v in self.layer.state_dict().items()}


class GPT2Block(nn.Module):
    """One GPT2Block (causal through SDPA)."""

    def __init__(self, layer: nn.Module, prefix: str) -> None:
        super().__init__()
        self.layer, self.prefix = layer, prefix

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.layer(hidden)
        return out[0] if isinstance(out, tuple) else out

    def hf_state(self) -> dict[str, torch.Tensor]:
        return {self.prefix + k: v for k, v in self.layer.state_dict().items()}


class Head(nn.Module):
    """Final norm, then (untied models) the output projection."""

    def __init__(self, norm: nn.Module, norm_prefix: str, lm_head: nn.Module | None = None) -> None:
        super().__init__()
        self.norm, self.norm_prefix, self.lm_head = norm, norm_prefix, lm_head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(hidden)
        return self.lm_head(hidden) if self.lm_head is not None else hidden

    def hf_state(self) -> dict[str, torch.Tensor]:
        state = {self.norm_prefix + k: v for k, v in self.norm.state_dict().items()}
        if self.lm_head is not None:
            state.update({"lm_head." + k: v for k, v in self.lm_head.state_dict().items()})
        return state


class PipelineLoss:
    """Mean token loss for training; the loss *sum* while evaluating (so uneven shares weigh right)."""

    def __init__(self) -> None:
        self.summing = False

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return token_loss_sum(logits, labels)[0] if self.summing else mean_token_loss(logits, labels)


def pipeline_module(model: nn.Module, stages: int, partition: str, activation_checkpointing: bool) -> Any:
    """A PipelineModule over `model`'s own submodules (Llama or GPT-2), with its PipelineLoss as `loss_fn`."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    tied = bool(model.config.tie_word_embeddings)
    if model.config.model_type == "llama":
        base, emb = model.model, TokenEmbedding
        first = (emb, model.model.embed_tokens, "model.embed_tokens.")
        blocks = [LayerSpec(LlamaBlock, layer, base.rotary_emb, f"model.layers.{i}.")
                  for i, layer in enumerate(base.layers)]
        norm = (base.norm, "model.norm.")
    elif model.config.model_type == "gpt2":
        base = model.transformer
        first = (TokenEmbedding, base.wte, "transformer.wte.", base.wpe, "transformer.wpe.")
        blocks = [LayerSpec(GPT2Block, layer, f"transformer.h.{i}.") for i, layer in enumerate(base.h)]
        norm = (base.ln_f, "transformer.ln_f.")
    else:
        raise ValueError(f"no pipeline layout for model type {model.config.model_type!r}")
    if tied:
        layers = [TiedLayerSpec("embed", *first), *blocks, LayerSpec(Head, *norm),
                  TiedLayerSpec("embed", *first, forward_fn=tied_head)]
    else:
        layers = [LayerSpec(*first), *blocks, LayerSpec(Head, *norm, model.lm_head)]
    loss = PipelineLoss()
    pipe = PipelineModule(layers=layers, num_stages=stages, loss_fn=loss,
                          partition_method="parameters" if partition == "parameters" else "uniform",
                          activation_checkpoint_interval=1 if activation_checkpointing else 0)
    pipe.privlm_loss = loss
    return pipe


def hf_state_dict(pipe: nn.Module) -> dict[str, torch.Tensor] | None:
    """All pipeline ranks: the whole model's state dict under Hugging Face names on global rank 0, else None."""
    import torch.distributed as dist

    local: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for module in pipe.modules():
        if hasattr(module, "hf_state") and id(module) not in seen:
            seen.add(id(module))
            local.update({k: v.detach().cpu().clone() for k, v in module.hf_state().items()})
    gathered: list[Any] = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    merged: dict[str, torch.Tensor] = {}
    for part in gathered:
        merged.update(part)
    return merged
