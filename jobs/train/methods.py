"""What a micro-batch's loss is under each training method, for the data-parallel engine (ZeRO 0-3, AutoTP):

    language modelling   pretraining and full/LoRA fine-tuning, on text blocks or packed chat samples
                         (labels only on assistant tokens; a block-diagonal mask and reset positions so packed
                         samples never attend to each other)
    dpo                  preference pairs against a frozen reference model: -log σ(β·(Δpolicy - Δreference))
    distill              a student learns a registry teacher's distribution: T²·KL + α·CE

Each objective gives the loss to back-propagate, the held-out measure of its method (`eval_sums`, summed over
the split and divided once), and running statistics for the step log (DPO's reward margin and preference
accuracy). The formulas are jobs/train/objectives.py's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jobs.recipe import Recipe
from jobs.train.loss import IGNORE, predicted_positions


def model_inputs(batch: dict[str, Any], prefix: str = "", dtype: Any = None) -> dict[str, Any]:
    """Keyword arguments for a Hugging Face causal LM from `PackedDataset.get_batch` tensors."""
    from jobs.train.objectives import block_causal_mask

    inputs = {"input_ids": batch[f"{prefix}input_ids"]}
    segments = batch.get(f"{prefix}segment_ids")
    if segments is not None:
        inputs["attention_mask"] = block_causal_mask(segments, dtype)
        inputs["position_ids"] = batch[f"{prefix}position_ids"]
    return inputs


class LanguageModelling:
    """Next-token cross-entropy on the labelled tokens (all of a text block; a chat block's assistant turns)."""

    name = "lm"

    def __init__(self, dtype: Any) -> None:
        self.dtype = dtype

    def loss(self, engine: Any, batch: dict[str, Any]) -> Any:
        return engine(**model_inputs(batch, dtype=self.dtype), labels=batch["labels"]).loss

    def eval_sums(self, engine: Any, batch: dict[str, Any]) -> tuple[float, float]:
        """(loss summed over predicted positions, their number): the model's mean x count (under AutoTP the
        model's own vocab-parallel loss is the only one that sees all logits)."""
        count = predicted_positions(batch["labels"])
        if not count:
            return 0.0, 0.0
        return float(self.loss(engine, batch)) * count, float(count)

    def report(self) -> dict[str, float]:
        return {}

    def eval_report(self) -> dict[str, float]:
        return {}


class _WithFrozenModel:
    """A second model (reference or teacher) beside the engine: frozen, in eval mode, on this rank's device."""

    def __init__(self, model: Any, device: str, dtype: Any) -> None:
        import torch

        self.frozen = model.to(device=device, dtype=dtype).eval()  # the engine's dtype: one attention mask fits
        for p in self.frozen.parameters():
            p.requires_grad_(False)
        self.dtype = dtype
        self.no_grad = torch.no_grad


class DirectPreference(_WithFrozenModel):
    """DPO on (prompt, chosen, rejected): chosen and rejected run as one batch through policy and reference."""

    name = "dpo"

    def __init__(self, reference: Any, device: str, dtype: Any, beta: float) -> None:
        super().__init__(reference, device, dtype)
        self.beta = beta
        self._sums = np.zeros(3)  # reward margin, accuracy, pairs: this log interval's training steps
        self._eval_sums = np.zeros(3)  # the same over the held-out split

    def _logps(self, model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
        import torch

        from jobs.train.objectives import sequence_logps

        both = {k: torch.cat([batch[f"chosen_{k}"], batch[f"rejected_{k}"]])
                for k in ("input_ids", "labels", "position_ids", "segment_ids")}
        logits = model(**model_inputs(both, dtype=self.dtype)).logits
        logps = sequence_logps(logits, both["labels"])
        n = batch["chosen_input_ids"].shape[0]
        return logps[:n], logps[n:]

    def _pairs(self, engine: Any, batch: dict[str, Any]) -> tuple[Any, Any, Any]:
        from jobs.train.objectives import dpo_loss

        chosen, rejected = self._logps(engine, batch)
        with self.no_grad():
            ref_chosen, ref_rejected = self._logps(self.frozen, batch)
        real = (batch["chosen_labels"][:, 1:] != IGNORE).any(dim=1)  # padding rows of a share carry no pair
        return dpo_loss(chosen[real], rejected[real], ref_chosen[real], ref_rejected[real], self.beta), real

    def loss(self, engine: Any, batch: dict[str, Any]) -> Any:
        (loss, margin, accuracy), real = self._pairs(engine, batch)
        n = int(real.sum())
        self._sums += [float(margin) * n, float(accuracy) * n, n]
        return loss

    def eval_sums(self, engine: Any, batch: dict[str, Any]) -> tuple[float, float]:
        """(DPO loss summed over held-out pairs, pairs); preference accuracy accumulates for `report`."""
        (loss, margin, accuracy), real = self._pairs(engine, batch)
        n = int(real.sum())
        if not n:
            return 0.0, 0.0
        self._eval_sums += [float(margin) * n, float(accuracy) * n, n]
        return float(loss) * n, float(n)

    @staticmethod
    def _means(sums: np.ndarray, prefix: str = "") -> dict[str, float]:
        """Pair-weighted means over every data-parallel rank (a collective: all ranks call it)."""
        from jobs.train.distributed import all_reduce_sum

        margin, accuracy, n = all_reduce_sum([float(x) for x in sums])
        return {f"{prefix}reward_margin": margin / n if n else float("nan"),
                f"{prefix}preference_accuracy": accuracy / n if n else float("nan")}

    def report(self) -> dict[str, float]:
        """Reward margin and preference accuracy of the training pairs since the last report (then reset)."""
        sums, self._sums = self._sums, np.zeros(3)
        return self._means(sums)

    def eval_report(self) -> dict[str, float]:
        """The same on the held-out pairs of the last validation (then reset)."""
        sums, self._eval_sums = self._eval_sums, np.zeros(3)
        return self._means(sums, "eval_")


class Distillation(_WithFrozenModel):
    """The student (the engine) matches the teacher's temperature-softened distribution on labelled tokens."""

    name = "distill"

    def __init__(self, teacher: Any, device: str, dtype: Any, temperature: float, alpha: float) -> None:
        super().__init__(teacher, device, dtype)
        self.temperature, self.alpha = temperature, alpha
        self.lm = LanguageModelling(self.dtype)
        self.source = ""  # the teacher as lineage records it (NAME/VERSION or its directory)

    def loss(self, engine: Any, batch: dict[str, Any]) -> Any:
        from jobs.train.objectives import distill_loss

        inputs = model_inputs(batch, dtype=self.dtype)
        student = engine(**inputs).logits
        with self.no_grad():
            teacher = self.frozen(**inputs).logits
        return distill_loss(student, teacher, batch["labels"], self.temperature, self.alpha)

    def eval_sums(self, engine: Any, batch: dict[str, Any]) -> tuple[float, float]:
        """The student's own cross-entropy: comparable with the teacher's perplexity on the same split."""
        return self.lm.eval_sums(engine, batch)

    def teacher_eval_sums(self, batch: dict[str, Any]) -> tuple[float, float]:
        """The teacher's cross-entropy on the same batch (what the student is compared with)."""
        with self.no_grad():
            return self.lm.eval_sums(self.frozen, batch)

    def report(self) -> dict[str, float]:
        return {}

    def eval_report(self) -> dict[str, float]:
        return {}


def objective_for(recipe: Recipe, rank: Any, dtype: Any) -> Any:
    """The recipe's objective; DPO's reference and distillation's teacher are loaded here on every rank (a
    registry teacher is downloaded by rank 0 first, the others read its cached copy)."""
    ft = recipe.finetune
    device = f"cuda:{rank.local_rank}" if rank.device == "cuda" else "cpu"
    if ft is None or ft.method in ("full", "lora"):
        return LanguageModelling(dtype)
    from jobs.train.distributed import barrier
    from jobs.train.model import load_pretrained

    if ft.method == "dpo":
        return DirectPreference(load_pretrained(ft.dpo.reference or ft.base), device, dtype, ft.dpo.beta)
    if rank.rank == 0:
        teacher, source = resolve_teacher(ft.distill.teacher)
    barrier()
    if rank.rank != 0:
        teacher, source = resolve_teacher(ft.distill.teacher)
    objective = Distillation(load_pretrained(teacher), device, dtype, ft.distill.temperature, ft.distill.alpha)
    objective.source = source
    return objective


def resolve_teacher(teacher: str) -> tuple[Path, str]:
    """(local model directory, what lineage records) for `finetune.distill.teacher`: a directory as given, or a
    registry URI (`models:/NAME@alias`, `models:/NAME/VERSION`) resolved once to NAME/VERSION and downloaded
    once into the model cache (a later alias move does not change what this run learned from)."""
    if not teacher.startswith("models:/"):
        return Path(teacher), teacher
    from mlops.registry import alias_version, local_model_dir

    name, _, alias = teacher.removeprefix("models:/").partition("@")
    version = f"{name}/{alias_version(name, alias).version}" if alias else teacher.removeprefix("models:/")
    return local_model_dir(f"models:/{version}"), version
