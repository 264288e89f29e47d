"""The one definition of language-model loss on held-out data, used in-run and by `privlm model evaluate`.

eval loss = (sum of next-token cross-entropy over every predicted position of the split)
            / (number of predicted positions)
Positions whose label is IGNORE (padding rows that even out ranks' shares) count in neither. A model that
computes its own loss (Hugging Face `labels=`, the mean over predicted positions; under AutoTP DeepSpeed's
vocab-parallel cross-entropy over sharded logits) contributes mean x `predicted_positions`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

IGNORE = -100


def token_loss_sum(logits: Any, labels: Any) -> tuple[Any, int]:
    """(sum of next-token cross-entropy, predicted positions) of a batch; logits [B, S, V], labels [B, S]."""
    import torch.nn.functional as F

    shift_labels = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), shift_labels.to(logits.device),
                            ignore_index=IGNORE, reduction="sum")
    return total, predicted_positions(labels)


def predicted_positions(labels: Any) -> int:
    """How many next-token predictions a batch's labels score."""
    return int((labels[:, 1:] != IGNORE).sum())


def mean_token_loss(logits: Any, labels: Any) -> Any:
    """Mean next-token cross-entropy of a batch (the training objective)."""
    total, count = token_loss_sum(logits, labels)
    return total / max(count, 1)


def share_batches(num_blocks: int, share: int, shares: int, batch: int, limit: int | None = None) -> list[np.ndarray]:
    """Block ids of one rank's share of the split (strided), cut into batches; -1 pads the last batch.

    Every share gets the same number of batches, so ranks that meet in collectives (ZeRO-3 gathers,
    tensor and pipeline parallelism) run the same number of forward passes."""
    n = num_blocks if limit is None else min(num_blocks, limit)
    per_share = -(-n // shares)
    count = max(1, -(-per_share // batch))
    ids = np.full(count * batch, -1, dtype=np.int64)
    mine = np.arange(share, n, shares, dtype=np.int64)
    ids[: len(mine)] = mine
    return [ids[i:i + batch] for i in range(0, len(ids), batch)]


def batch_with_labels(data: Any, ids: np.ndarray) -> tuple[Any, Any]:
    """(input_ids, labels) for block ids (`PackedDataset.get_batch`: a padding id -1 gives a row labelled
    IGNORE; chat data is labelled on assistant tokens only)."""
    import torch

    batch = data.get_batch(ids)
    return torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["labels"])


def split_loss(logits_of: Callable[[dict[str, Any]], Any], data: Any, batch: int,
               limit: int | None = None) -> tuple[float, int]:
    """(loss sum, predicted positions) over the first `limit` blocks (None: all) of a split, in one process;
    `logits_of` takes the model's keyword inputs (jobs.train.methods.model_inputs: packed chat blocks come
    with their block-diagonal attention mask and positions)."""
    import torch

    from jobs.train.methods import model_inputs

    total, count = 0.0, 0
    with torch.no_grad():
        for ids in share_batches(len(data), 0, 1, batch, limit):
            tensors = {k: torch.from_numpy(v) for k, v in data.get_batch(ids).items()}
            s, c = token_loss_sum(logits_of(model_inputs(tensors, dtype=torch.float32)), tensors["labels"])
            total, count = total + float(s), count + c
    return total, count
