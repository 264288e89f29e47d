"""Chat and preference data (data.format chat | preference): JSONL records -> chat template -> masked sequences.

    chat record        {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
                       or {"prompt": str, "response": str} (one user turn, one assistant turn)
    preference record  {"prompt": str or messages, "chosen": str, "rejected": str}; chosen and rejected are the
                       assistant's next turn (a string, or a list of one assistant message)

`prepare_records` is what `privlm data prepare` runs for these formats: read and check every record (a bad
one is skipped and counted per reason, with the record in quarantine.jsonl), redact PII in every message,
drop exact duplicates, split (a source's `split`, or data.split's fractions by a stable hash), render each
with the tokenizer's chat template (privlm's default when it has none; saved with the tokenizer so the
exported model and vLLM render prompts the same way), and write token ids, loss mask and segment ids with
`jobs.data.pack.SequenceWriter`. The language, length and quality filters and near-dedup of text data do
not apply: chat samples are short and written on purpose.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jobs.recipe import Recipe

ROLES = ("system", "user", "assistant")

# Zephyr's layout (a role header, the content, EOS) with the assistant's content and its EOS inside
# {% generation %}, so `apply_chat_template(return_assistant_tokens_mask=True)` marks exactly what the model
# must learn to say, and stopping at EOS ends its turn. It needs no new special tokens: every tokenizer
# privlm trains has EOS, so the model's embedding keeps its size.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- message['content'] + eos_token -}}{% endgeneration %}"
    "{%- else -%}"
    "{{- message['content'] + eos_token -}}"
    "{%- endif -%}"
    "{{- '\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}"
)


class RecordError(ValueError):
    """A record that cannot be trained on; the message is the reason it is counted under."""


@dataclass
class PreferencePair:
    """The conversation before the answer, and the preferred and dispreferred answers."""

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str

    def conversations(self) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        return ([*self.prompt, {"role": "assistant", "content": self.chosen}],
                [*self.prompt, {"role": "assistant", "content": self.rejected}])


def parse_messages(value: Any, field_name: str = "messages") -> list[dict[str, str]]:
    """A list of {role, content} messages, checked; raises RecordError with the reason."""
    if not isinstance(value, list) or not value:
        raise RecordError(f"{field_name} is not a non-empty list")
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RecordError("message without a role")
        if m["role"] not in ROLES:
            raise RecordError("unknown role")
        if not isinstance(m.get("content"), str):
            raise RecordError("message content is not a string")
        if not m["content"].strip():
            raise RecordError("empty assistant turn" if m["role"] == "assistant" else "empty message")
        out.append({"role": m["role"], "content": m["content"]})
    if any(m["role"] == "system" for m in out[1:]):
        raise RecordError("system message not first")
    return out


def parse_chat(record: Any) -> list[dict[str, str]]:
    """The messages of a chat record (`messages`, or `prompt`/`response`); raises RecordError."""
    if not isinstance(record, dict):
        raise RecordError("record is not an object")
    if "messages" in record:
        messages = parse_messages(record["messages"])
    elif "prompt" in record or "response" in record:
        if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise RecordError("missing prompt")
        if not isinstance(record.get("response"), str):
            raise RecordError("missing response")
        messages = parse_messages([{"role": "user", "content": record["prompt"]},
                                   {"role": "assistant", "content": record["response"]}])
    else:
        raise RecordError("no messages or prompt/response")
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError("no assistant turn")
    return messages


def _answer(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        if value[0].get("role") != "assistant":
            raise RecordError(f"{key} is not an assistant message")
        value = value[0].get("content")
    if value is None:
        raise RecordError(f"missing {key}")
    if not isinstance(value, str):
        raise RecordError(f"{key} is not a string")
    if not value.strip():
        raise RecordError("empty assistant turn")
    return value


def parse_preference(record: Any) -> PreferencePair:
    """The pair of a preference record; raises RecordError."""
    if not isinstance(record, dict):
        raise RecordError("record is not an object")
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RecordError("missing prompt")
        messages = [{"role": "user", "content": prompt}]
    elif prompt is None:
        raise RecordError("missing prompt")
    else:
        messages = parse_messages(prompt, "prompt")
    if messages[-1]["role"] == "assistant":
        raise RecordError("prompt ends with an assistant turn")
    chosen, rejected = _answer(record, "chosen"), _answer(record, "rejected")
    if chosen == rejected:
        raise RecordError("chosen equals rejected")
    return PreferencePair(messages, chosen, rejected)


def has_generation_blocks(template: str | None) -> bool:
    """Whether a chat template marks the assistant's tokens with {% generation %} (transformers' mechanism)."""
    return bool(template) and "generation" in template and "endgeneration" in template


def set_chat_template(tok: Any, template_file: Path | None = None) -> str:
    """Give `tok` the template to render with; return where it came from.

    A template file (data.chat.template) wins, then the tokenizer's own, then DEFAULT_CHAT_TEMPLATE. The
    caller saves the tokenizer (`save_pretrained` writes chat_template.jinja), so serving uses the same one.
    """
    if template_file is not None:
        tok.chat_template = template_file.read_text(encoding="utf-8")
        probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                 {"role": "assistant", "content": "a"}]
        try:
            tok.apply_chat_template(probe, tokenize=False)
        except Exception as exc:  # jinja's syntax and undefined-variable errors
            raise ValueError(f"data.chat.template={str(template_file)!r} does not render a system/user/assistant "
                             f"conversation ({type(exc).__name__}: {exc}); fix the template or remove the field "
                             "to use the tokenizer's") from None
        return f"file {template_file}"
    if getattr(tok, "chat_template", None):
        return "tokenizer"
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return "privlm default"


def tokenize_chat(tok: Any, messages: list[dict[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, mask) of one conversation; mask is 1 on the assistant's tokens (content and end of turn).

    Templates with {% generation %} use transformers' `return_assistant_tokens_mask`. Templates without
    (many published ones) cannot: there the assistant's characters are found by rendering the conversation
    up to each assistant turn (with the generation prompt) and up to its end, and the tokens whose
    characters fall in between (less trailing whitespace) are marked; a template whose shorter renderings
    are not prefixes of the whole raises RecordError.
    """
    if has_generation_blocks(tok.chat_template):
        out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        return np.asarray(out["input_ids"], dtype=np.int64), np.asarray(out["assistant_masks"], dtype=np.uint8)
    text = tok.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = tok.apply_chat_template(messages[:i + 1], tokenize=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise RecordError("chat template renders turns inconsistently")
        spans.append((len(before), len(through.rstrip())))  # the separator after a turn is not the answer
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    mask = np.zeros(len(ids), dtype=np.uint8)
    for t, (a, b) in enumerate(enc["offset_mapping"]):
        mask[t] = any(lo <= a and b <= hi and b > a for lo, hi in spans)
    return ids, mask


def fit_length(ids: np.ndarray, mask: np.ndarray, length: int, truncate: bool) -> tuple[np.ndarray, np.ndarray]:
    """The sequence cut to `length` when truncate is set; RecordError when it does not fit or has nothing
    left to train on."""
    if len(ids) > length:
        if not truncate:
            raise RecordError("longer than training.sequence_length")
        ids, mask = ids[:length], mask[:length]
    if not mask[1:].any():
        raise RecordError("no assistant tokens within training.sequence_length")
    return ids, mask


@dataclass
class Counts:
    """What happened to the records of one run: read, kept, and skipped per reason."""

    read: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    pii: Counter[str] = field(default_factory=Counter)
    pii_records: int = 0

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1


def _redact(texts: list[str], recipe: Recipe, counts: Counts) -> list[str]:
    """NFC and PII placeholders in each text of one record; the record counts once if anything was found."""
    from jobs.data.pii import redact

    out, found = [], Counter()
    for text in texts:
        clean, hits = redact(unicodedata.normalize("NFC", text), recipe.data.pii)
        found.update(hits)
        out.append(clean)
    if found:
        counts.pii.update(found)
        counts.pii_records += 1
    return out


def redact_value(value: list[dict[str, str]] | PreferencePair, recipe: Recipe,
                 counts: Counts) -> list[dict[str, str]] | PreferencePair:
    """The record with PII redacted in every message (and in chosen and rejected)."""
    if isinstance(value, PreferencePair):
        *prompt, chosen, rejected = _redact([m["content"] for m in value.prompt] + [value.chosen, value.rejected],
                                            recipe, counts)
        return PreferencePair([{**m, "content": c} for m, c in zip(value.prompt, prompt, strict=True)],
                              chosen, rejected)
    texts = _redact([m["content"] for m in value], recipe, counts)
    return [{**m, "content": c} for m, c in zip(value, texts, strict=True)]


@dataclass
class Record:
    """A checked record: where it came from and what it holds (messages, or a preference pair)."""

    doc_id: str
    source: int
    path: str
    line: int
    value: list[dict[str, str]] | PreferencePair


def read_records(recipe: Recipe, inputs: list[Any], counts: Counts,
                 quarantine: list[dict[str, Any]]) -> Iterator[Record]:
    """Every valid record of the inputs, in (source, path, line) order, PII redacted; the rest counted."""
    from jobs.data.sources import SourceError

    parse = parse_preference if recipe.data.format == "preference" else parse_chat
    for item in inputs:
        if item.format != "jsonl":
            raise SourceError(f"data.sources[{item.source}]: {item.path} is {item.format}, but data.format="
                              f"{recipe.data.format!r} reads JSONL records; exclude it with data.sources"
                              f"[{item.source}].exclude or convert it to JSONL")
        for n, line in _lines(item.path):
            counts.read += 1
            try:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise RecordError("invalid JSON") from None
                value = parse(record)
            except RecordError as exc:
                counts.skip(str(exc))
                quarantine.append({"id": f"{item.doc_prefix}#{n}", "source": item.source, "path": item.rel,
                                   "record": n, "reason": str(exc), "text": line})
                continue
            value = redact_value(value, recipe, counts)
            yield Record(f"{item.doc_prefix}#{n}", item.source, item.rel, n, value)


def _lines(path: str) -> Iterator[tuple[int, str]]:
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                yield n, line.rstrip("\n")


def split_of(recipe: Recipe, record: Record) -> str:
    """The record's source's fixed split, else train/eval/test by a stable hash of its id and data.split."""
    fixed = recipe.data.sources[record.source].split
    if fixed is not None:
        return fixed
    from jobs.data.merge import unit_hash

    u = unit_hash(record.doc_id, "split")
    split = recipe.data.split
    return "eval" if u < split.validation else "test" if u < split.validation + split.test else "train"


def _content_key(value: list[dict[str, str]] | PreferencePair) -> str:
    payload = value.__dict__ if isinstance(value, PreferencePair) else value
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def write_sequences(recipe: Recipe, tok: Any, records: Iterator[Record], out_dir: Path, dtype: np.dtype,
                    counts: Counts, quarantine: list[dict[str, Any]]) -> dict[str, Any]:
    """Tokenize, check length, and write each split; returns {split: index entries} and per-split stats."""
    from jobs.data.pack import SequenceWriter, preference_entries

    length = recipe.training.sequence_length
    rows = max(1, int(recipe.data.output_file_mb * 1e6) // (length * dtype.itemsize))
    preference = recipe.data.format == "preference"
    writers: dict[str, list[SequenceWriter]] = {}
    seen: set[str] = set()
    for rec in records:
        key = _content_key(rec.value)
        try:
            if key in seen:
                raise RecordError("duplicate")
            seen.add(key)
            convs = rec.value.conversations() if isinstance(rec.value, PreferencePair) else (rec.value,)
            seqs = [fit_length(*tokenize_chat(tok, c), length, recipe.data.chat.truncate) for c in convs]
        except RecordError as exc:
            counts.skip(str(exc))
            quarantine.append({"id": rec.doc_id, "source": rec.source, "path": rec.path, "record": rec.line,
                               "reason": str(exc)})
            continue
        split = split_of(recipe, rec)
        if split not in writers:
            writers[split] = [SequenceWriter(out_dir, split, length, dtype, rows, tok.eos_token_id, suffix)
                              for suffix in (("", ".rejected") if preference else ("",))]
        for writer, (ids, mask) in zip(writers[split], seqs, strict=True):
            (writer.add_row if preference else writer.add_packed)(ids.astype(dtype), mask)
    index, stats = {}, {}
    for split in ("train", "eval", "test"):
        ws = writers.get(split)
        entries = [w.close() for w in ws] if ws else [[]]
        index[split] = preference_entries(*entries) if preference and ws else entries[0]
        first = ws[0] if ws else None
        stats[split] = {"docs": first.samples if first else 0, "blocks": first.blocks if first else 0,
                        "tokens": sum(w.tokens for w in ws) if ws else 0,
                        "loss_tokens": sum(w.loss_tokens for w in ws) if ws else 0,
                        "padding_tokens": sum(w.blocks * length - w.tokens for w in ws) if ws else 0}
    return {"index": index, "splits": stats}


def _fingerprint(recipe: Recipe, inputs: list[Any]) -> dict[str, Any]:
    """The text pipeline's fingerprint plus the content of data.chat.template."""
    from jobs.data.manifest import fingerprint

    parts = {k: v for k, v in fingerprint(recipe, inputs).items() if k != "fingerprint"}
    template = recipe.data.chat.resolved_template()
    if template is not None:
        parts["chat_template"] = hashlib.sha256(template.read_bytes()).hexdigest()
    parts["chat_pipeline"] = 1  # bump when the output of the same records and settings changes
    return {**parts, "fingerprint": hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]}


def _no_records_error(recipe: Recipe, inputs: list[Any], counts: Counts) -> ValueError:
    files = ", ".join(x.path for x in inputs[:3]) + (" ..." if len(inputs) > 3 else "")
    reasons = ", ".join(f"{r}: {n}" for r, n in counts.skipped.most_common()) or "no records"
    shape = ('{"prompt": ..., "chosen": ..., "rejected": ...}' if recipe.data.format == "preference" else
             '{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]} or '
             '{"prompt": ..., "response": ...}')
    hint = (" (raise training.sequence_length or set data.chat.truncate: true)"
            if "longer than training.sequence_length" in counts.skipped else "")
    return ValueError(f"data.format={recipe.data.format!r}: none of the {counts.read} records in {files} can be "
                      f"trained on ({reasons}){hint}; each line must be JSON like {shape}")


def prepare_records(recipe: Recipe, force: bool = False, console: Any = None) -> Any:
    """`privlm data prepare` for chat and preference data: skip when current, else build and publish."""
    from rich.console import Console

    from jobs.data.manifest import MANIFEST, QUARANTINE, REPORT, build_manifest, current_manifest
    from jobs.data.pack import token_dtype, write_index
    from jobs.data.pipeline import PrepareResult, check_output_dir
    from jobs.data.sources import discover
    from jobs.data.tokenizer import check_vocab, copy_tokenizer
    from jobs.files import atomic_write_text, fsync_dir, replace_dir

    console = console or Console()
    started = time.perf_counter()
    out = recipe.data_path
    check_output_dir(out)
    inputs = discover(recipe.data.sources)
    fps = _fingerprint(recipe, inputs)
    if not force and current_manifest(out, fps["fingerprint"]) is not None:
        console.print(f"{out} is up to date (inputs and settings unchanged, fingerprint {fps['fingerprint']}): "
                      "skipping; use --force to rebuild", soft_wrap=True, highlight=False)
        return PrepareResult(out, skipped=True, fingerprint=fps["fingerprint"],
                             report=json.loads((out / REPORT).read_text()))
    tmp = Path(f"{out}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tok = copy_tokenizer(Path(recipe.tokenizer.path), tmp / "tokenizer")
        check_vocab(tok, recipe.model.vocab_size, f"tokenizer.path={recipe.tokenizer.path!r}")
        template_source = set_chat_template(tok, recipe.data.chat.resolved_template())
        tok.save_pretrained(tmp / "tokenizer")  # writes chat_template.jinja: the export copies this directory
        dtype = token_dtype(len(tok))
        counts, quarantine = Counts(), []
        packed = write_sequences(recipe, tok, read_records(recipe, inputs, counts, quarantine), tmp, dtype,
                                 counts, quarantine)
        kept = sum(s["docs"] for s in packed["splits"].values())
        if not kept:
            raise _no_records_error(recipe, inputs, counts)
        if not packed["splits"]["train"]["docs"]:
            raise ValueError(f"data.format={recipe.data.format!r}: every kept record went to a held-out split; "
                             "give a data.sources entry split: train (or none), or lower data.split's fractions")
        index = write_index(tmp, dtype, recipe.training.sequence_length, len(tok), tok.eos_token_id,
                            packed["index"], recipe.data.format)
        report = _report(recipe, counts, packed["splits"], kept, template_source, tok, time.perf_counter() - started)
        if quarantine:
            atomic_write_text(tmp / QUARANTINE, "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in quarantine))
        manifest = build_manifest(recipe, inputs, fps, report, index)
        manifest["data_format"], manifest["skipped"] = recipe.data.format, dict(counts.skipped)
        atomic_write_text(tmp / REPORT, json.dumps(report, indent=1, ensure_ascii=False))
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False))
        fsync_dir(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print_records_report(report, str(out), console)
    return PrepareResult(out, skipped=False, fingerprint=fps["fingerprint"], report=report)


def _report(recipe: Recipe, counts: Counts, splits: dict[str, Any], kept: int, template_source: str, tok: Any,
            seconds: float) -> dict[str, Any]:
    valid = counts.read - sum(v for r, v in counts.skipped.items() if r not in _LATE_REASONS)
    return {
        "recipe": recipe.name, "format": recipe.data.format, "seconds": round(seconds, 3),
        "stages": [{"stage": "read", "docs": counts.read, "bytes": 0},
                   {"stage": "valid records", "docs": valid, "bytes": 0},
                   {"stage": "kept", "docs": kept, "bytes": 0}],
        "records": {"read": counts.read, "kept": kept, "skipped": dict(counts.skipped.most_common())},
        "pii_redactions": dict(counts.pii), "pii_docs": counts.pii_records,
        "splits": splits,
        "tokenizer": {"source": recipe.tokenizer.path, "vocab_size": len(tok), "eos_id": tok.eos_token_id,
                      "chat_template": template_source},
        "sequence_length": recipe.training.sequence_length, "truncate": recipe.data.chat.truncate,
    }


# skipped after a record parsed (the others mean the record itself is malformed)
_LATE_REASONS = ("duplicate", "longer than training.sequence_length", "no assistant tokens within "
                 "training.sequence_length", "chat template renders turns inconsistently")


def print_records_report(report: dict[str, Any], out: str, console: Any) -> None:
    """A few lines: records kept and skipped per reason, and the splits."""
    r = report["records"]
    console.print(f"{report['format']} data -> {out}: {r['kept']:,} of {r['read']:,} records kept "
                  f"(template: {report['tokenizer']['chat_template']})", highlight=False, soft_wrap=True)
    for reason, n in r["skipped"].items():
        console.print(f"  skipped, {reason}: {n:,}", highlight=False)
    for name, s in report["splits"].items():
        if s["docs"]:
            console.print(f"  {name}: {s['docs']:,} samples in {s['blocks']:,} blocks, {s['loss_tokens']:,} "
                          f"trained tokens, {s['padding_tokens']:,} padding", highlight=False)
