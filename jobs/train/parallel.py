"""One training step, validation and the export state dict under each layout: data parallel (ZeRO 0-3),
tensor parallel (DeepSpeed AutoTP) and pipeline parallel (DeepSpeed PipelineModule).

The loop in engine.py calls the same four things whatever the layout: `train_step`, `eval_sums`,
`state_dict` and the data-parallel coordinates that decide which samples this rank reads.
Rank layouts are DeepSpeed's own: AutoTP's mesh is (data, tensor), so tensor groups are consecutive
ranks; the pipeline topology is (pipe, data), so a stage's ranks are consecutive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from jobs.recipe import Recipe
from jobs.train.distributed import RankInfo, all_reduce_sum
from jobs.train.loss import batch_with_labels, predicted_positions, share_batches


@dataclass(frozen=True)
class Layout:
    """Degrees of this launch and where this rank sits in the data-parallel dimension."""

    tensor: int
    pipeline: int
    data: int
    data_rank: int

    @classmethod
    def of(cls, recipe: Recipe, rank: RankInfo) -> Layout:
        t, p = recipe.parallel.tensor, recipe.parallel.pipeline
        data = rank.world_size // (t * p)
        data_rank = rank.rank // t if t > 1 else rank.rank % data
        return cls(t, p, data, data_rank)

    def describe(self) -> str:
        return f"tensor {self.tensor} x pipeline {self.pipeline} x data {self.data}"


class Runner:
    """The DeepSpeed engine of one rank, driven the same way under every layout."""

    def __init__(self, recipe: Recipe, rank: RankInfo, model: Any, load_universal: bool = False) -> None:
        import deepspeed

        from jobs.train.ds_config import deepspeed_config

        self.recipe, self.rank = recipe, rank
        self.layout = Layout.of(recipe, rank)
        self.full_model = model  # the Hugging Face model (config, export); its layers live in the engine
        module = model
        if self.layout.tensor > 1:  # records the TP degree, so the config's batch check counts data ranks only
            import torch

            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.deepspeed.precision, torch.float32)
            module = deepspeed.tp_model_init(model=model, tp_size=self.layout.tensor, dtype=dtype)
        if self.layout.pipeline > 1:
            from jobs.train.pipeline import pipeline_module

            module = pipeline_module(model, self.layout.pipeline, recipe.parallel.partition,
                                     recipe.training.activation_checkpointing)
        params = [p for p in module.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2]},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        config = deepspeed_config(recipe, rank.world_size, load_universal)
        self.engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=[g for g in groups if g["params"]],
                                                    config=config)
        if self.layout.pipeline == 1 and rank.rank:
            self.full_model = None
        from jobs.train.methods import objective_for

        self.objective = objective_for(recipe, rank, next(module.parameters()).dtype)

    def _tensors(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        return {k: self._to_device(torch.from_numpy(v)) for k, v in batch.items()}

    def _to_device(self, tensor: Any) -> Any:
        return tensor.to(f"cuda:{self.rank.local_rank}") if self.rank.device == "cuda" else tensor

    def train_step(self, micro_batches: list[dict[str, np.ndarray]],
                   loss_scale: float = 1.0) -> tuple[float, int, float | None]:
        """One optimizer step over this rank's micro-batches (`PackedDataset.get_batch` dicts): (sum of
        micro-batch losses, how many, grad norm computed before the step where DeepSpeed keeps none).
        `loss_scale` exists for fault injection."""
        engine = self.engine
        if self.layout.pipeline > 1:  # text only (the recipe refuses other data): labels are the inputs
            batches = iter([(b["input_ids"], b["input_ids"]) for b in map(self._tensors, micro_batches)])
            loss = float(engine.train_batch(data_iter=batches)) * loss_scale
            return loss * len(micro_batches), len(micro_batches), None
        total, norm = 0.0, None
        for i, micro in enumerate(micro_batches):
            loss = self.objective.loss(engine, self._tensors(micro)) * loss_scale
            engine.backward(loss)
            if i == len(micro_batches) - 1:
                norm = _grad_norm_before_step(engine)
            engine.step()
            total += loss.item()
        return total, len(micro_batches), norm

    def grad_norm(self, before: float | None) -> float:
        """The pre-clipping global gradient norm of the last step."""
        norm = self.engine.get_global_grad_norm() if before is None else before
        return float(norm) if norm is not None else float("nan")

    def eval_loss(self, data: Any, limit: int | None = None, teacher: bool = False) -> float:
        """The method's held-out loss (jobs.train.loss for language modelling, DPO's loss on held-out pairs)
        over the whole split (or its first `limit` blocks), each data-parallel rank taking a strided share;
        every rank returns the same value. `teacher`: the distillation teacher's loss on the same split."""
        import torch

        mb = self.recipe.training.micro_batch_size
        batches = share_batches(len(data), self.layout.data_rank, self.layout.data, mb, limit)
        engine = self.engine
        if self.layout.pipeline > 1:
            loss_fn = engine.module.privlm_loss
            loss_fn.summing = True
            try:
                pairs = [batch_with_labels(data, ids) for ids in batches]
                count = sum(predicted_positions(labels) for _, labels in pairs)
                items = iter([(self._to_device(x), self._to_device(y)) for x, y in pairs])
                mean_of_sums = float(engine.eval_batch(data_iter=items, num_micro_batches=len(pairs)))
            finally:
                loss_fn.summing = False
            # eval_batch averages the per-micro-batch sums over micro-batches and data-parallel replicas
            total = mean_of_sums * len(pairs) * self.layout.data
            counted, = all_reduce_sum([count / (self.layout.pipeline * self.layout.tensor)])
            return total / counted
        engine.eval()
        total, count = 0.0, 0.0
        with torch.no_grad():
            for ids in batches:
                # the model's own loss: under AutoTP the logits are vocabulary shards and DeepSpeed swaps in a
                # vocab-parallel cross-entropy; it is the mean over predicted positions, so sum = mean x count
                batch = self._tensors(data.get_batch(ids))
                s, c = self.objective.teacher_eval_sums(batch) if teacher else self.objective.eval_sums(engine, batch)
                total, count = total + s, count + c
        engine.train()
        # tensor-parallel ranks of one group computed the same share: count it once
        total, counted = all_reduce_sum([total / self.layout.tensor, count / self.layout.tensor])
        return total / counted

    def state_dict(self) -> dict[str, Any] | None:
        """All ranks: the full model under Hugging Face names on rank 0 (gathered over ZeRO-3 partitions,
        tensor shards or pipeline stages), None elsewhere."""
        if self.layout.pipeline > 1:
            from jobs.train.pipeline import hf_state_dict

            return hf_state_dict(self.engine.module)
        if self.layout.tensor > 1:
            return self.engine._consolidated_16bit_state_dict()  # AutoTP's gather (named 16-bit, keeps dtype)
        from jobs.train.export import gathered_state_dict

        return gathered_state_dict(self.engine.module, self.rank)


def _grad_norm_before_step(engine: Any) -> float | None:
    """ZeRO-0 keeps no global norm: compute it from the averaged gradients before the optimizer step."""
    if engine.zero_optimization_stage() != 0:
        return None
    import torch

    norms = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else None
