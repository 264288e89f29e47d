"""Post-training objectives as pure functions of logits and labels: masked LM, DPO, distillation.

Conventions (those of Hugging Face and `jobs.train.loss`): logits [B, S, V] come from the model run on
`input_ids` [B, S]; labels [B, S] are the input ids where a token is trained on and IGNORE (-100) elsewhere;
position t's logits predict token t+1, so logits[:, :-1] are scored against labels[:, 1:]. Packed chat
blocks take `block_causal_mask(segment_ids)` as `attention_mask` and their `position_ids`
(`PackedDataset.get_batch` gives both); transformers 5.19 passes a 4D float mask through unchanged to the
sdpa and eager attention of the Llama and GPT-2 models `jobs.train.model.build_model` makes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from jobs.train.loss import IGNORE


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive mask [B, 1, S, S]: 0 where token i may attend j (same segment, j <= i), dtype's min elsewhere.

    Each packed sample sees only itself; padding (segment 0) sees only earlier padding, so no row is fully
    masked (which would give NaN in softmax).
    """
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids has shape {tuple(segment_ids.shape)}; pass [batch, sequence]")
    length = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    mask = torch.zeros(same.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill(~(same & causal), torch.finfo(dtype).min)[:, None]


def _shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits of predicting positions, their target labels with IGNORE as 0, the mask of scored positions)."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ in [batch, sequence]")
    targets = labels[:, 1:]
    scored = targets != IGNORE
    return logits[:, :-1].float(), targets.masked_fill(~scored, 0), scored


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens (chat: assistant tokens only); 0 when none."""
    pred, targets, scored = _shifted(logits, labels)
    losses = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), targets.reshape(-1), reduction="none")
    return (losses * scored.reshape(-1)).sum() / scored.sum().clamp(min=1)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sequence [B]: the sum of log p(token) over its labelled tokens (the response of a pair)."""
    pred, targets, scored = _shifted(logits, labels)
    token_logps = torch.log_softmax(pred, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    return (token_logps * scored).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023) on sequence log-probabilities [B]: (loss, reward margin, accuracy).

    rewards r = beta * (log pi(y|x) - log pi_ref(y|x)); loss = mean(-log sigmoid(r_chosen - r_rejected));
    reward margin = mean(r_chosen - r_rejected); accuracy = share of pairs with r_chosen > r_rejected.
    Margin and accuracy are detached (metrics); the reference terms carry no gradient.
    """
    if beta <= 0:
        raise ValueError(f"beta={beta}: DPO's beta must be positive (0.1 is usual)")
    chosen = beta * (policy_chosen - reference_chosen.detach())
    rejected = beta * (policy_rejected - reference_rejected.detach())
    margin = chosen - rejected
    loss = -F.logsigmoid(margin).mean()
    return loss, margin.detach().mean(), (margin.detach() > 0).float().mean()


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                 temperature: float = 2.0, alpha: float = 0.5) -> torch.Tensor:
    """Knowledge distillation (Hinton et al. 2015): T² · KL(teacher_T || student_T) + alpha · CE.

    The KL is between the softmaxes at temperature T over the vocabulary, averaged over the labelled
    positions (the same ones `masked_lm_loss` scores); T² keeps its gradient's scale independent of T; CE
    is `masked_lm_loss` of the student against the labels. Teacher and student must share the vocabulary.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive (2 is usual)")
    if alpha < 0:
        raise ValueError(f"alpha={alpha} must not be negative")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ; the teacher must use the student's tokenizer")
    pred, _, scored = _shifted(student_logits, labels)
    teacher = teacher_logits[:, :-1].detach().float()
    student_logp = torch.log_softmax(pred / temperature, dim=-1)
    teacher_logp = torch.log_softmax(teacher / temperature, dim=-1)
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    kl = (kl * scored).sum() / scored.sum().clamp(min=1)
    return temperature**2 * kl + alpha * masked_lm_loss(student_logits, labels)


def batch_to_tensors(batch: dict[str, Any], device: Any = "cpu") -> dict[str, torch.Tensor]:
    """`PackedDataset.get_batch`'s numpy arrays as int64 tensors on `device`."""
    return {k: torch.as_tensor(v, dtype=torch.long, device=device) for k, v in batch.items()}
