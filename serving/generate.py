"""Batched generation with per-request sampling, stop sequences and token limits (KV cache, left padding)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass
class GenRequest:
    """One sequence to generate."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class GenResult:
    """What was generated for one sequence."""

    text: str
    tokens: int
    finish_reason: str  # stop | length


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The tokenizer's chat template, or a plain role-tagged one when it has none."""
    template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)


def _choose(logits: Any, reqs: list[GenRequest], gens: list[Any]) -> Any:
    """Greedy for temperature 0, else top-p sampling at the request's temperature, row by row."""
    import torch

    out = torch.empty(len(reqs), dtype=torch.long)
    for i, r in enumerate(reqs):
        row = logits[i].float()
        if r.temperature == 0:
            out[i] = int(row.argmax())
            continue
        probs = torch.softmax(row / r.temperature, dim=-1)
        if r.top_p < 1.0:
            sorted_p, idx = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < r.top_p
            probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
        out[i] = int(torch.multinomial(probs, 1, generator=gens[i]))
    return out


def stream_tokens(model: Any, pad_id: int, reqs: list[GenRequest]) -> Iterator[list[int | None]]:
    """Yield, per decoding step, the new token of every still-running row (None once a row is done)."""
    import torch

    device = next(model.parameters()).device
    width = max(len(r.prompt_ids) for r in reqs)
    ids = torch.full((len(reqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(reqs), width), dtype=torch.long)
    for i, r in enumerate(reqs):
        ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
        mask[i, width - len(r.prompt_ids):] = 1
    gens = []
    for r in reqs:
        g = torch.Generator()
        g.manual_seed(r.seed if r.seed is not None else random.getrandbits(62))
        gens.append(g)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                    use_cache=True)
        for _ in range(max(r.max_tokens for r in reqs)):
            nxt = _choose(out.logits[:, -1].cpu(), reqs, gens)
            yield nxt.tolist()
            mask = torch.cat([mask, torch.ones((len(reqs), 1), dtype=torch.long)], dim=1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=nxt[:, None].to(device), attention_mask=mask.to(device),
                        position_ids=positions.to(device), past_key_values=out.past_key_values, use_cache=True)


class Decoder:
    """Turns a row's tokens into text, applying EOS, stop sequences and max_tokens."""

    def __init__(self, tokenizer: Any, req: GenRequest) -> None:
        self.tokenizer, self.req = tokenizer, req
        self.tokens: list[int] = []
        self.text = ""
        self.finish: str | None = None

    def add(self, token: int) -> str:
        """Accept one token; return the new text it adds (what a stream would send)."""
        if self.finish:
            return ""
        if token == self.tokenizer.eos_token_id:
            self.finish = "stop"
            return ""
        self.tokens.append(token)
        full = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        for s in self.req.stop:
            if s in full:
                full = full[: full.index(s)]
                self.finish = "stop"
        if not self.finish and len(self.tokens) >= self.req.max_tokens:
            self.finish = "length"
        delta, self.text = full[len(self.text):], full
        return delta


def generate(model: Any, tokenizer: Any, reqs: list[GenRequest]) -> list[GenResult]:
    """Generate every request of a batch to completion."""
    decoders = [Decoder(tokenizer, r) for r in reqs]
    for step in stream_tokens(model, tokenizer.pad_token_id or tokenizer.eos_token_id, reqs):
        for d, tok in zip(decoders, step, strict=True):
            d.add(tok)
        if all(d.finish for d in decoders):
            break
    return [GenResult(d.text, len(d.tokens), d.finish or "length") for d in decoders]
