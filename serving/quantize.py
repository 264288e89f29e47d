"""Quantize a causal LM for serving and measure what it cost: bytes and logit deviation."""

from __future__ import annotations

import io
from typing import Any, Literal

Mode = Literal["none", "int8-dynamic", "int8-weight", "int4-weight", "bf16"]
CPU_MODES = {"none", "int8-dynamic", "int8-weight"}


def conv1d_to_linear(model: Any) -> int:
    """Replace GPT-2's transposed `Conv1D` layers by `nn.Linear` so quantizers see them; return how many."""
    import torch
    from transformers.pytorch_utils import Conv1D

    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                n_in, n_out = child.weight.shape
                lin = torch.nn.Linear(n_in, n_out, bias=child.bias is not None)
                lin.weight.data = child.weight.data.t().contiguous()
                if child.bias is not None:
                    lin.bias.data = child.bias.data
                setattr(parent, name, lin)
                swapped += 1
    return swapped


def quantize(model: Any, mode: Mode, device: str) -> Any:
    """The model in the requested precision; int8 on CPU, int8/int4/bf16 on GPUs."""
    import torch

    if mode != "none" and device == "cpu" and mode not in CPU_MODES:
        raise ValueError(f"quantization={mode!r} needs a GPU; on CPU use one of {sorted(CPU_MODES)}")
    conv1d_to_linear(model)
    if mode == "none":
        return model
    if mode == "bf16":
        return model.to(torch.bfloat16)
    if mode == "int8-dynamic":
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig() if mode == "int8-weight" else Int4WeightOnlyConfig())
    return model


def model_bytes(model: Any) -> int:
    """Serialized size of the state dict (what the weights occupy)."""
    import torch

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def logit_deviation(reference: Any, quantized: Any, vocab: int, device: str, tokens: int = 64) -> dict[str, float]:
    """Max absolute logit difference and mean KL(ref || quant) on a fixed probe sequence."""
    import torch

    g = torch.Generator().manual_seed(0)
    probe = torch.randint(0, vocab, (1, tokens), generator=g).to(device)
    with torch.no_grad():
        ref = reference(probe).logits.float()
        got = quantized(probe).logits.float()
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean")
    return {"max_abs_logit_diff": float((ref - got).abs().max()), "kl_per_token": float(kl) / tokens}
