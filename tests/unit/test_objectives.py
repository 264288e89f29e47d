"""Post-training objectives: prompt tokens get no gradient, packed samples are isolated, DPO and distillation
equal their formulas on hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from jobs.recipe import ModelConfig
from jobs.train.loss import IGNORE
from jobs.train.model import build_model
from jobs.train.objectives import block_causal_mask, distill_loss, dpo_loss, masked_lm_loss, sequence_logps

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64,
        "vocab_size": 97}


def tiny_model(architecture: str = "llama", attention: str = "sdpa") -> torch.nn.Module:
    model = build_model(ModelConfig(architecture=architecture, **TINY), seed=3)
    model.config._attn_implementation = attention
    return model.eval()


def test_no_gradient_reaches_the_prompt_tokens() -> None:
    """Positions that predict prompt tokens get zero gradient; the weights' gradient is the response's alone."""
    model = tiny_model()
    prompt, response = torch.tensor([[11, 12, 13, 14]]), torch.tensor([[50, 51, 52]])
    ids = torch.cat([prompt, response], 1)
    labels = ids.clone()
    labels[:, : prompt.shape[1]] = IGNORE
    logits = model(input_ids=ids).logits
    logits.retain_grad()
    masked_lm_loss(logits, labels).backward()
    p = prompt.shape[1]
    assert torch.all(logits.grad[0, : p - 1] == 0)  # positions 0..p-2 predict prompt tokens 1..p-1
    assert torch.all(logits.grad[0, p - 1:-1].abs().sum(-1) > 0)  # each response token is learnt
    assert torch.all(logits.grad[0, -1] == 0)  # the last position predicts nothing
    masked = [q.grad.clone() for q in model.parameters()]
    model.zero_grad()
    response_only = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[0, p - 1:-1], response[0])
    response_only.backward()
    for a, q in zip(masked, model.parameters(), strict=True):
        torch.testing.assert_close(a, q.grad)


@pytest.mark.parametrize(("architecture", "attention"), [("llama", "sdpa"), ("llama", "eager"), ("gpt2", "sdpa"),
                                                         ("gpt2", "eager")])
def test_packed_samples_do_not_attend_to_each_other(architecture: str, attention: str) -> None:
    model = tiny_model(architecture, attention)
    g = torch.Generator().manual_seed(0)
    first, second = torch.randint(0, 97, (1, 6), generator=g), torch.randint(0, 97, (1, 9), generator=g)
    segments = torch.tensor([[1] * 6 + [2] * 9 + [0] * 3])
    positions = torch.tensor([list(range(6)) + list(range(9)) + list(range(3))])
    pad = torch.zeros(1, 3, dtype=torch.long)
    mask = block_causal_mask(segments)

    def logits(a: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=torch.cat([a, second, pad], 1), attention_mask=mask,
                         position_ids=positions).logits

    changed = (first + 1) % 97
    packed, other = logits(first), logits(changed)
    assert torch.equal(packed[0, 6:15], other[0, 6:15])  # sample 2 does not see sample 1
    assert not torch.allclose(packed[0, :6], other[0, :6])
    with torch.no_grad():
        alone = model(input_ids=second).logits
    torch.testing.assert_close(packed[0, 6:15], alone[0], atol=1e-5, rtol=1e-5)  # positions restart


def test_block_causal_mask_values() -> None:
    m = block_causal_mask(torch.tensor([[1, 1, 2, 0]]))
    allowed = (m[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    assert m.shape == (1, 1, 4, 4) and m.min() == torch.finfo(torch.float32).min
    with pytest.raises(ValueError, match="batch, sequence"):
        block_causal_mask(torch.tensor([1, 2]))


def test_sequence_logps_sums_the_labelled_tokens() -> None:
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
    labels = torch.tensor([[IGNORE, 1, 2]])  # position 0 predicts token 1 (p=0.25), position 1 predicts 2 (p=0.1)
    assert sequence_logps(logits, labels).item() == pytest.approx(math.log(0.25) + math.log(0.1), abs=1e-6)
    labels = torch.tensor([[IGNORE, IGNORE, 2]])
    assert sequence_logps(logits, labels).item() == pytest.approx(math.log(0.1), abs=1e-6)
    assert masked_lm_loss(logits, labels).item() == pytest.approx(-math.log(0.1), abs=1e-6)


def test_dpo_loss_equals_the_formula_on_a_hand_computed_example() -> None:
    # pair 1: policy (-4, -6), reference (-5, -5): r_c = 0.5*(1) = 0.5, r_r = 0.5*(-1) = -0.5, margin 1.0
    # pair 2: policy (-7, -3), reference (-6, -4): r_c = -0.5, r_r = 0.5, margin -1.0
    # loss = mean(-log sigmoid(1), -log sigmoid(-1)) = mean(0.3132617, 1.3132617) = 0.8132617
    loss, margin, accuracy = dpo_loss(torch.tensor([-4.0, -7.0]), torch.tensor([-6.0, -3.0]),
                                      torch.tensor([-5.0, -6.0]), torch.tensor([-5.0, -4.0]), beta=0.5)
    assert loss.item() == pytest.approx(0.8132617, abs=1e-6)
    assert margin.item() == pytest.approx(0.0) and accuracy.item() == pytest.approx(0.5)
    loss, margin, accuracy = dpo_loss(torch.tensor([-4.0]), torch.tensor([-6.0]), torch.tensor([-5.0]),
                                      torch.tensor([-5.0]), beta=0.1)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.2)), abs=1e-6)  # 0.5981389
    assert margin.item() == pytest.approx(0.2) and accuracy.item() == 1.0
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=0.0)


def test_dpo_gradient_flows_to_the_policy_only() -> None:
    pol = torch.tensor([-4.0, -6.0], requires_grad=True)
    ref = torch.tensor([-5.0, -5.0], requires_grad=True)
    loss, _, _ = dpo_loss(pol[:1], pol[1:], ref[:1], ref[1:], beta=0.5)
    loss.backward()
    s = 1 / (1 + math.exp(-1.0))  # d/dm -log sigmoid(m) = -(1 - sigmoid(m)); dm/dpol_c = beta
    assert pol.grad.tolist() == pytest.approx([-0.5 * (1 - s), 0.5 * (1 - s)], abs=1e-6)
    assert ref.grad is None


def test_distill_loss_equals_the_formula() -> None:
    # one sequence of 3, vocab 2; position 0 is a prompt position (label of token 1 IGNORE), position 1 scored
    student = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [5.0, 5.0]]])
    teacher = torch.tensor([[[9.0, -9.0], [0.0, 2.0], [1.0, 1.0]]])
    labels = torch.tensor([[IGNORE, IGNORE, 1]])
    t, alpha = 2.0, 0.5
    # at T=2: student softmax([1, 0]), teacher softmax([0, 1])
    p_s = [math.exp(1) / (math.exp(1) + 1), 1 / (math.exp(1) + 1)]
    p_t = [p_s[1], p_s[0]]
    kl = sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s, strict=True))  # = 0.4621172
    ce = -math.log(1 / (math.exp(2) + 1))  # the student's p(token 1) at position 1, T=1: 2.1269280
    expected = t * t * kl + alpha * ce
    got = distill_loss(student, teacher, labels, temperature=t, alpha=alpha)
    assert got.item() == pytest.approx(expected, abs=1e-5)
    assert expected == pytest.approx(4 * 0.4621172 + 0.5 * 2.1269280, abs=1e-6)
    same = distill_loss(teacher, teacher, labels, temperature=t, alpha=0.0)
    assert same.item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="tokenizer"):
        distill_loss(student, teacher[..., :1], labels)


def test_the_trainers_language_modelling_objective_keeps_packed_samples_apart() -> None:
    """jobs.train.methods, as the trainer calls it on a get_batch dict: the loss of a packed block is the loss of
    its samples run one by one (dropping the mask or the reset positions would mix them)."""
    from jobs.train.methods import LanguageModelling

    torch.manual_seed(0)
    model = tiny_model().eval()
    a, b = torch.randint(1, 90, (1, 6)), torch.randint(1, 90, (1, 5))
    packed = {"input_ids": torch.cat([a, b], 1), "labels": torch.cat([a, b], 1).clone(),
              "segment_ids": torch.tensor([[1] * 6 + [2] * 5]),
              "position_ids": torch.tensor([list(range(6)) + list(range(5))])}
    packed["labels"][0, 6] = IGNORE  # a sample's first token is not predicted from the previous sample
    objective = LanguageModelling(torch.float32)
    with torch.no_grad():
        total, count = objective.eval_sums(model, packed)
        alone = [objective.eval_sums(model, {"input_ids": x, "labels": x}) for x in (a, b)]
    assert count == sum(c for _, c in alone) == 5 + 4
    assert total == pytest.approx(sum(s for s, _ in alone), rel=1e-5)


def test_the_trainers_distillation_objective_learns_from_the_teacher() -> None:
    """jobs.train.methods.Distillation: with alpha 0 the loss is the KL to the teacher only, zero when the
    student is the teacher and positive for another teacher."""
    from jobs.train.methods import Distillation

    student = tiny_model()
    batch = {"input_ids": torch.randint(1, 90, (2, 8))}
    batch["labels"] = batch["input_ids"].clone()
    same = Distillation(tiny_model(), "cpu", torch.float32, temperature=2.0, alpha=0.0)  # seed 3: same weights
    other = Distillation(build_model(ModelConfig(**TINY), seed=4), "cpu", torch.float32, temperature=2.0, alpha=0.0)
    with torch.no_grad():
        assert float(same.loss(student, batch)) == pytest.approx(0.0, abs=1e-6)
        assert float(other.loss(student, batch)) > 1e-3
    assert all(not p.requires_grad for p in other.frozen.parameters())  # the teacher is never trained
