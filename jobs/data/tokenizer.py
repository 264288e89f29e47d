"""Byte-level BPE trained on the cleaned corpus, or an existing tokenizer; saved as a Hugging Face directory."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

EOS = "<|endoftext|>"
# The files a Hugging Face tokenizer directory may hold; model weights next to them are not copied.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")


class TokenizerError(ValueError):
    """A tokenizer that cannot be used for this recipe; the message names the field and the fix."""


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int, out_dir: Path) -> Any:
    """Train byte-level BPE with one special token (EOS, also BOS and padding); save it to `out_dir`.

    Byte-level means every string round-trips through encode and decode, whatever its characters.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS],
                            show_progress=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   model_max_length=1_000_000)
    fast.save_pretrained(out_dir)
    return fast


def copy_tokenizer(source: Path, out_dir: Path) -> Any:
    """Load an existing tokenizer directory (e.g. the base model's) and copy its files to `out_dir`."""
    from transformers import AutoTokenizer

    if not any((source / name).is_file() for name in TOKENIZER_FILES):
        raise TokenizerError(
            f"tokenizer.path={str(source)!r} holds no tokenizer (no tokenizer.json or tokenizer_config.json). "
            "Create it by preparing the base model's data first, e.g. `privlm data prepare recipes/tiny-cpu.yaml` "
            "for data/tiny-cpu/tokenizer, or point tokenizer.path at a Hugging Face model directory")
    tok = AutoTokenizer.from_pretrained(source)
    if not getattr(tok, "is_fast", False):
        raise TokenizerError(f"tokenizer.path={str(source)!r} loads only as a slow tokenizer; privlm needs a fast "
                             "one (a tokenizer.json)")
    if tok.eos_token_id is None:
        raise TokenizerError(f"tokenizer.path={str(source)!r} has no EOS token; privlm separates documents with it")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out_dir / name)
    if not (out_dir / "tokenizer.json").is_file():
        tok.save_pretrained(out_dir)  # converted from a slow format: store the fast form too
    return tok


def check_vocab(tok: Any, model_vocab: int | None, source: str) -> None:
    """The model's embedding must have a row for every token id."""
    if model_vocab is not None and len(tok) > model_vocab:
        raise TokenizerError(f"the tokenizer from {source} has {len(tok)} tokens but model.vocab_size={model_vocab}; "
                             f"set model.vocab_size to at least {len(tok)} (or leave it unset to follow it)")


def encode_batch(tok: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens, truncation or length warnings (Rust, multithreaded)."""
    backend = tok.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast skips offsets (tokenizers>=0.21)
    return [e.ids for e in encode(texts, add_special_tokens=False)]
