"""The one eval-loss definition: shares cover the split once, padding counts nowhere, sums match the model's loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jobs.train.loss import IGNORE, share_batches, split_loss, token_loss_sum


@pytest.mark.parametrize(("blocks", "shares", "batch"), [(10, 3, 4), (7, 2, 2), (1, 4, 8), (416, 2, 4)])
def test_shares_cover_every_block_once_with_equal_batch_counts(blocks: int, shares: int, batch: int) -> None:
    parts = [share_batches(blocks, s, shares, batch) for s in range(shares)]
    assert len({len(p) for p in parts}) == 1  # ranks that meet in collectives run as many forwards
    ids = np.concatenate([b for p in parts for b in p])
    assert sorted(ids[ids >= 0].tolist()) == list(range(blocks))


class Blocks:
    def __init__(self, n: int, length: int) -> None:
        self.rows = np.random.default_rng(0).integers(0, 50, size=(n, length))

    def __len__(self) -> int:
        return len(self.rows)

    def get_batch(self, ids: np.ndarray) -> dict[str, np.ndarray]:  # PackedDataset's contract for text data
        rows = self.rows[np.where(ids < 0, 0, ids)]
        return {"input_ids": rows, "labels": np.where((ids < 0)[:, None], IGNORE, rows)}


def test_split_loss_is_the_token_weighted_model_loss() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    data = Blocks(5, 16)
    total, count = split_loss(lambda inputs: model(**inputs).logits, data, batch=2)  # 3 batches, one padded row
    ids = torch.from_numpy(data.rows)
    with torch.no_grad():
        whole = float(model(input_ids=ids, labels=ids).loss)  # Hugging Face's mean over all predicted positions
    assert count == 5 * 15 and total / count == pytest.approx(whole, rel=1e-5)
    labels = ids.clone()
    labels[1:] = IGNORE
    s, c = token_loss_sum(model(input_ids=ids).logits, labels)
    assert c == 15 and float(s) / c == pytest.approx(float(model(input_ids=ids[:1], labels=ids[:1]).loss), rel=1e-5)
