"""Export a run's final model in Hugging Face format (safetensors + tokenizer + lineage), atomically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from jobs.files import replace_dir
from jobs.run_dir import LINEAGE_FILE
from jobs.train.distributed import RankInfo, barrier


def gathered_state_dict(module: Any, rank: RankInfo) -> dict[str, Any] | None:
    """All ranks: the full state dict on rank 0 (gathers ZeRO-3 partitions); None elsewhere."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        if rank.is_main:
            copies: dict[int, Any] = {}  # tied weights (embeddings/lm_head) stay one tensor, saved once
            return {k: copies.setdefault(v.data_ptr(), v.detach().cpu().clone())
                    for k, v in module.state_dict().items()}
    return None


def export_full(model: Any, state: dict[str, Any] | None, rank: RankInfo, out_dir: Path, tokenizer_dir: Path,
                lineage: dict[str, Any]) -> None:
    """All ranks: write the trained model (not LoRA) to `out_dir` with its tokenizer; `state` is the full
    state dict gathered on rank 0 (Runner.state_dict), `model` the Hugging Face model it belongs to."""
    if rank.is_main:
        tmp = out_dir.with_name(f".{out_dir.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        _finish(tmp, out_dir, tokenizer_dir, lineage)
    barrier()


def export_lora(module: Any, rank: RankInfo, base: str, out_dir: Path, adapter_dir: Path,
                tokenizer_dir: Path, lineage: dict[str, Any]) -> None:
    """All ranks: save the adapters, then (rank 0) merge them into a fresh copy of the base and save it."""
    state = gathered_state_dict(module, rank)
    if rank.is_main:
        from peft import PeftModel

        from jobs.train.lora import merge_lora
        from jobs.train.model import load_pretrained

        adapter_state = {k: v for k, v in state.items() if "lora_" in k}
        tmp_adapter = adapter_dir.with_name(f".{adapter_dir.name}.tmp")
        shutil.rmtree(tmp_adapter, ignore_errors=True)
        module.save_pretrained(tmp_adapter, state_dict=adapter_state, safe_serialization=True)
        replace_dir(tmp_adapter, adapter_dir)
        merged = merge_lora(PeftModel.from_pretrained(load_pretrained(base), adapter_dir))
        tmp = out_dir.with_name(f".{out_dir.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        merged.save_pretrained(tmp, safe_serialization=True)
        _finish(tmp, out_dir, tokenizer_dir, lineage)
    barrier()


def _finish(tmp: Path, out_dir: Path, tokenizer_dir: Path, lineage: dict[str, Any]) -> None:
    """Add tokenizer and lineage to a model directory, then publish it."""
    for f in tokenizer_dir.iterdir():
        if f.is_file():
            shutil.copy2(f, tmp / f.name)
    (tmp / LINEAGE_FILE).write_text(json.dumps(lineage, indent=1))
    replace_dir(tmp, out_dir)
