"""Byte-level BPE trained on the cleaned corpus, saved as a Hugging Face tokenizer directory."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

EOS = "<|endoftext|>"


def train_tokenizer(texts: Iterator[str], vocab_size: int, min_frequency: int, out_dir: Path) -> Any:
    """Train byte-level BPE with one special token (EOS, also BOS and padding); save it to `out_dir`."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS],
                            show_progress=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   model_max_length=1_000_000)
    fast.save_pretrained(out_dir)
    return fast


def copy_tokenizer(source: Path, out_dir: Path, max_vocab: int) -> Any:
    """Use an existing tokenizer directory (e.g. the base model's); checked against the model's vocabulary."""
    from transformers import AutoTokenizer

    if not (source / "tokenizer.json").is_file() and not (source / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"tokenizer.path={str(source)!r} holds no tokenizer; create it with `privlm data prepare` on the base "
            "recipe (e.g. recipes/tiny-cpu.yaml) or point it at a Hugging Face model directory")
    tok = AutoTokenizer.from_pretrained(source)
    if len(tok) > max_vocab:
        raise ValueError(f"tokenizer at {source} has {len(tok)} tokens but model.vocab_size={max_vocab}")
    if tok.eos_token is None:
        raise ValueError(f"tokenizer at {source} has no EOS token; privlm separates documents with it")
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges"))):
            shutil.copy2(f, out_dir / f.name)
    return tok
