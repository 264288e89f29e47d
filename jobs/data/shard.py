"""The per-shard steps, each runnable as its own process (a pool worker here, a Slurm array task there).

They talk only through files in the work directory `<data_path>.work/`:

    plan.json                        fingerprint, settings hash, shard count (from `pipeline.plan_shards`)
    shard-00003/inputs.json          the input files of shard 3 (from `pipeline.plan_shards`)
    shard-00003/clean/docs.jsonl     its documents after cleaning, filtering and redaction: {"id", "text"}
    shard-00003/clean/meta.json      per document: id, keep-first order (source, path, record), bytes, the
                                     SHA-256 of the text as it will be trained on (normalised, redacted),
                                     language, split stratum, whether it is code
    shard-00003/clean/minhash.npy    MinHash signatures, documents x num_perm
    shard-00003/clean/bands/         LSH band keys per bucket, for `jobs.data.buckets`
    shard-00003/clean/sentences/     prose sentence hashes per bucket, for `jobs.data.buckets`
    shard-00003/clean/quarantine.jsonl  records that failed their source's record_schema, with the reason
    shard-00003/clean/stats.json     documents and bytes per stage and per language, drop reasons, PII counts
    shard-00003/decision.npy         from the global dedup: -2 near dup, -1 exact dup, 0 train, 1 eval, 2 test
    shard-00003/sentence_drop.npy    from the global dedup: (row, sentence hash) to remove before tokenizing
    shard-00003/tokens/              token ids of the kept documents, each followed by EOS

A step writes into `<name>.tmp` and renames it into place, so a directory that exists is complete; a rerun of
`process_shard` (a requeued array task, or `prepare` after a failure) skips a shard whose clean/ exists.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jobs.data.sources import InputFile, read_documents
from jobs.recipe import Recipe, load_recipe, parse_recipe

STAGES = ("read", "normalise", "language", "length filter", "quality filter", "pii redaction")
Progress = Callable[[int], None] | None


def shard_dir(work_dir: Path, shard_index: int) -> Path:
    return Path(work_dir) / f"shard-{shard_index:05d}"


def as_recipe(recipe: Recipe | str | Path) -> Recipe:
    """A Recipe, or one loaded from a YAML recipe file or a JSON dump of one."""
    if isinstance(recipe, Recipe):
        return recipe
    path = Path(recipe)
    if path.suffix == ".json":
        return parse_recipe(json.loads(path.read_text()), str(path))
    return load_recipe(path)


def check_plan(recipe: Recipe, work_dir: Path) -> dict[str, Any]:
    """The work directory's plan, refusing one made for other settings."""
    from jobs.data.manifest import settings_hash

    plan_file = Path(work_dir) / "plan.json"
    if not plan_file.is_file():
        raise FileNotFoundError(f"{work_dir} has no plan.json; run jobs.data.pipeline.plan_shards(recipe) first")
    plan = json.loads(plan_file.read_text())
    if plan["settings"] != settings_hash(recipe):
        raise ValueError(f"{work_dir} was planned with other data settings than recipe {recipe.name!r}; "
                         "plan it again (privlm data prepare --force)")
    return plan


def publish(tmp: Path, final: Path) -> None:
    """Replace `final` by the complete directory `tmp`."""
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


class ShardStats:
    """Documents and bytes kept after each stage, drop reasons, PII redactions and languages of one shard."""

    def __init__(self, shard: int) -> None:
        self.shard = shard
        self.kept = {stage: [0, 0] for stage in STAGES}
        self.dropped: dict[str, list[int]] = {}
        self.pii: Counter[str] = Counter()
        self.pii_docs = 0
        self.t2s_docs = 0
        self.quarantined: dict[str, list[int]] = {}  # "source N: reason" -> [records, bytes]
        self.languages: dict[str, dict[str, Any]] = {}

    def _lang(self, lang: str) -> dict[str, Any]:
        return self.languages.setdefault(lang, {"read": [0, 0], "kept": [0, 0], "dropped": {}})

    def keep(self, stage: str, text: str, lang: str | None = None) -> None:
        """Count a document past `stage`; past the last stage, also as kept for its language."""
        n = len(text.encode("utf-8"))
        self.kept[stage][0] += 1
        self.kept[stage][1] += n
        if lang is not None:
            self.count_language("kept", lang, text)

    def count_language(self, key: str, lang: str, text: str) -> None:
        row = self._lang(lang)[key]
        row[0] += 1
        row[1] += len(text.encode("utf-8"))

    def drop(self, reason: str, text: str, lang: str = "und") -> None:
        n = len(text.encode("utf-8"))
        for table in (self.dropped, self._lang(lang)["dropped"]):
            row = table.setdefault(reason, [0, 0])
            row[0] += 1
            row[1] += n

    def quarantine(self, source: int, reason: str, record: str) -> None:
        row = self.quarantined.setdefault(f"{source}\t{reason.split(':')[0]}", [0, 0])
        row[0] += 1
        row[1] += len(record.encode("utf-8"))

    def to_json(self, **extra: Any) -> dict[str, Any]:
        return {"shard": self.shard, "kept": self.kept, "dropped": self.dropped, "pii": dict(self.pii),
                "pii_docs": self.pii_docs, "t2s_docs": self.t2s_docs, "quarantined": self.quarantined,
                "languages": self.languages, **extra}


class Cleaner:
    """Normalise, identify the language, convert t2s, filter (with that language's thresholds) and redact."""

    def __init__(self, recipe: Recipe) -> None:
        self.cfg = recipe.data
        lang = self.cfg.language
        self.candidates = tuple(sorted(set(lang.candidates)))
        self.keep_languages = set(lang.keep) if lang.keep is not None else None
        self._filters: dict[str, Any] = {}

    def filters(self, lang: str) -> Any:
        if lang not in self._filters:
            self._filters[lang] = self.cfg.filters_for(lang)
        return self._filters[lang]

    def language_of(self, text: str) -> str:
        from jobs.data.language import UNDETERMINED, detect_language

        if not self.cfg.language.detect:
            return UNDETERMINED
        return detect_language(text, self.candidates, self.cfg.language.sample_chars)

    def __call__(self, text: str, stats: ShardStats) -> tuple[str, str] | None:
        """(cleaned text, language), or None when the document is dropped (the reason goes to stats)."""
        from jobs.data.clean import length_reason, looks_binary, normalize
        from jobs.data.pii import redact
        from jobs.data.quality import Doc, quality_reason

        stats.keep("read", text)
        if looks_binary(text):
            stats.count_language("read", "und", text)
            stats.drop("binary", text)
            return None
        text = normalize(text)
        stats.keep("normalise", text)
        lang = self.language_of(text)
        stats.count_language("read", lang, text)
        if self.keep_languages is not None and lang not in self.keep_languages:
            stats.drop("language_not_kept", text, lang)
            return None
        if lang == "zh" and self.cfg.language.t2s:
            from jobs.data.language import to_simplified

            converted = to_simplified(text)
            stats.t2s_docs += converted != text
            text = converted
        stats.keep("language", text)
        filters = self.filters(lang)
        doc = Doc.of(text)
        for stage, check in (("length filter", lambda: length_reason(text, filters, len(doc.words))),
                             ("quality filter", lambda: quality_reason(doc, filters))):
            reason = check()
            if reason:
                stats.drop(reason, text, lang)
                return None
            stats.keep(stage, text)
        text, found = redact(text, self.cfg.pii)
        stats.pii.update(found)
        stats.pii_docs += bool(found)
        stats.keep("pii redaction", text, lang)
        return text, lang


def process_shard(recipe: Recipe | str | Path, shard_index: int, work_dir: str | Path,
                  progress: Progress = None) -> dict[str, Any]:
    """Clean, filter and redact one shard's documents; hash, MinHash and band them for the global dedup.

    Reads `shard-NNNNN/inputs.json`, writes `shard-NNNNN/clean/` (docs.jsonl, meta.json, minhash.npy, bands/,
    sentences/, quarantine.jsonl, stats.json); returns the stats. A shard already cleaned (by an earlier,
    interrupted run) is not redone.
    """
    from jobs.data.dedup import MinHasher, exact_key, is_code, sentence_hashes
    from jobs.data.sources import Quarantined

    recipe = as_recipe(recipe)
    check_plan(recipe, Path(work_dir))
    final = shard_dir(Path(work_dir), shard_index) / "clean"
    if (final / "stats.json").is_file():
        stats = json.loads((final / "stats.json").read_text())
        if progress:
            progress(stats["file_bytes"])
        return stats
    started = time.perf_counter()
    tmp = final.with_name("clean.tmp")
    items = [InputFile(**x) for x in json.loads((final.parent / "inputs.json").read_text())]
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    stats = ShardStats(shard_index)
    cfg = recipe.data
    clean = Cleaner(recipe)
    hasher = MinHasher(cfg.dedup.num_perm, cfg.dedup.shingle_size) if cfg.dedup.near else None
    meta: dict[str, list[Any]] = {"ids": [], "orders": [], "sha": [], "bytes": [], "lang": [], "group": [],
                                  "code": []}
    signatures, sentences = [], []
    with open(tmp / "docs.jsonl", "w", encoding="utf-8") as out, \
            open(tmp / "quarantine.jsonl", "w", encoding="utf-8") as quarantine:
        for doc in _documents(items, progress, cfg.split.field):
            if isinstance(doc, Quarantined):
                stats.quarantine(doc.order[0], doc.reason, doc.record)
                quarantine.write(json.dumps({"id": doc.doc_id, "source": doc.order[0], "path": doc.order[1],
                                             "record": doc.order[2], "reason": doc.reason, "raw": doc.record},
                                            ensure_ascii=False) + "\n")
                continue
            result = clean(doc.text, stats)
            if result is None:
                continue
            text, lang = result
            row = len(meta["ids"])
            out.write(json.dumps({"id": doc.doc_id, "text": text}, ensure_ascii=False) + "\n")
            code = is_code(text, doc.order[1])
            for key, value in (("ids", doc.doc_id), ("orders", list(doc.order)), ("sha", exact_key(text)),
                               ("bytes", len(text.encode("utf-8"))), ("lang", lang), ("group", doc.group),
                               ("code", code)):
                meta[key].append(value)
            if hasher is not None:
                signatures.append(hasher.signature(text))
            if cfg.dedup.sentences and not code:
                sentences += [(h, row) for h in sentence_hashes(text, cfg.dedup.min_sentence_chars)]
    num_perm = cfg.dedup.num_perm if hasher else 0
    matrix = np.array(signatures, dtype=np.uint32).reshape(len(meta["ids"]), num_perm)
    np.save(tmp / "minhash.npy", matrix)
    _write_dedup_buckets(tmp, recipe, matrix, meta["sha"], sentences)
    (tmp / "meta.json").write_text(json.dumps(meta))
    result = stats.to_json(files=len(items), file_bytes=sum(x.size for x in items),
                           seconds=time.perf_counter() - started)
    (tmp / "stats.json").write_text(json.dumps(result))
    publish(tmp, final)
    return result


def _write_dedup_buckets(tmp: Path, recipe: Recipe, signatures: np.ndarray, shas: list[str],
                         sentences: list[tuple[int, int]]) -> None:
    """The shard's LSH band keys and sentence hashes, split into the buckets of `jobs.data.buckets`."""
    from jobs.data.buckets import BAND_DTYPE, SENTENCE_DTYPE, write_buckets
    from jobs.data.dedup import band_keys, bucket_of, lsh_bands

    n = recipe.data.num_shards
    dedup = recipe.data.dedup
    bands = np.empty(0, dtype=BAND_DTYPE)
    if dedup.near and len(shas):
        b, r = lsh_bands(dedup.threshold, dedup.num_perm)
        keys = band_keys(signatures, b, r)
        bands = np.empty(keys.size, dtype=BAND_DTYPE)
        bands["key"] = keys.reshape(-1)
        bands["sha"] = np.repeat(np.array([int(h[:16], 16) for h in shas], dtype=np.uint64), b)
        bands["row"] = np.repeat(np.arange(len(shas), dtype=np.uint32), b)
    write_buckets(tmp, "bands", bands, bucket_of(bands["key"], n), n)
    entries = np.empty(len(sentences), dtype=SENTENCE_DTYPE)
    if sentences:
        entries["hash"] = np.array([h for h, _ in sentences], dtype=np.uint64)
        entries["row"] = np.array([r for _, r in sentences], dtype=np.uint32)
    write_buckets(tmp, "sentences", entries, bucket_of(entries["hash"], n), n)


def _documents(items: list[InputFile], progress: Progress, group_field: str | None) -> Iterator[Any]:
    """Every document (or quarantined record) of the shard's files; progress advances by each file's size."""
    for item in items:
        yield from read_documents(item, group_field)
        if progress:
            progress(item.size)


def iter_documents(work_dir: Path, shard_index: int) -> Iterator[tuple[int, str, str]]:
    """(row, id, text) of the documents that passed the shard's filters, in file order."""
    with open(shard_dir(work_dir, shard_index) / "clean" / "docs.jsonl", encoding="utf-8") as fh:
        for row, line in enumerate(fh):
            doc = json.loads(line)
            yield row, doc["id"], doc["text"]


def kept_documents(recipe: Recipe, work_dir: Path, shard_index: int,
                   codes: tuple[int, ...] | None = None) -> Iterator[tuple[int, str]]:
    """(row, text) of the documents the dedup kept (in the splits `codes`, default all), in file order, with
    the repeated sentences the global pass chose removed."""
    from jobs.data.dedup import remove_sentences

    folder = shard_dir(work_dir, shard_index)
    decision = np.load(folder / "decision.npy")
    drops: dict[int, set[int]] = {}
    for entry in np.load(folder / "sentence_drop.npy"):
        drops.setdefault(int(entry["row"]), set()).add(int(entry["hash"]))
    min_chars = recipe.data.dedup.min_sentence_chars
    for row, _, text in iter_documents(work_dir, shard_index):
        if decision[row] < 0 or (codes is not None and decision[row] not in codes):
            continue
        yield row, remove_sentences(text, drops[row], min_chars) if row in drops else text


def tokenize_shard(recipe: Recipe | str | Path, shard_index: int, work_dir: str | Path,
                   progress: Progress = None) -> dict[str, Any]:
    """Token ids of the shard's kept documents, each followed by EOS, with the work directory's tokenizer.

    Writes `shard-NNNNN/tokens/` (tokens.bin in the index dtype, lengths.npy and rows.npy per kept document,
    stats.json with the bytes tokenized); returns the token count. Documents go to the Rust tokenizer in
    batches of ~8 MB, which it spreads over every core: a local run calls this in its own process, one shard
    after the other.
    """
    recipe, work_dir = as_recipe(recipe), Path(work_dir)
    check_plan(recipe, work_dir)
    final = shard_dir(work_dir, shard_index) / "tokens"
    tmp = final.with_name("tokens.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tok = load_work_tokenizer(work_dir)
    rows, lengths, nbytes = [], [], []
    with open(tmp / "tokens.bin", "wb") as out:
        for batch in _batches(kept_documents(recipe, work_dir, shard_index)):
            lengths += _write_tokens(tok, [text for _, text in batch], out)
            rows += [row for row, _ in batch]
            sizes = [len(text.encode("utf-8")) for _, text in batch]
            nbytes += sizes
            if progress:
                progress(sum(sizes))
    np.save(tmp / "lengths.npy", np.asarray(lengths, dtype=np.int64))
    np.save(tmp / "rows.npy", np.asarray(rows, dtype=np.int64))
    np.save(tmp / "bytes.npy", np.asarray(nbytes, dtype=np.int64))
    publish(tmp, final)
    return {"shard": shard_index, "tokens": int(sum(lengths))}


def _batches(docs: Iterator[tuple[int, str]], batch_chars: int = 8_000_000) -> Iterator[list[tuple[int, str]]]:
    """(row, text) pairs in batches of about `batch_chars` characters."""
    batch, size = [], 0
    for row, text in docs:
        batch.append((row, text))
        size += len(text)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _write_tokens(tok: Any, texts: list[str], out: Any) -> list[int]:
    """Append each text's ids and an EOS to `out`; return the lengths (EOS included)."""
    from jobs.data.pack import token_dtype
    from jobs.data.tokenizer import encode_batch

    dtype, eos = token_dtype(len(tok)), tok.eos_token_id
    lengths = []
    for ids in encode_batch(tok, texts):
        np.asarray([*ids, eos], dtype=dtype).tofile(out)
        lengths.append(len(ids) + 1)
    return lengths


def load_work_tokenizer(work_dir: Path) -> Any:
    """The tokenizer in `<work_dir>/tokenizer`, loaded once per version of its files."""
    tok_file = Path(work_dir) / "tokenizer" / "tokenizer.json"
    st = tok_file.stat()
    return _load_tokenizer(str(tok_file.parent), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=1)
def _load_tokenizer(path: str, mtime_ns: int, size: int) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
