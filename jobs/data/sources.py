"""Find raw inputs (directories of text files, JSONL, Parquet) and read them as documents.

A document's id is `s<source index>/<path relative to the source>` (plus `#<record>` inside JSONL and
Parquet files): it does not depend on where the corpus lies, so shard assignment, the eval split and the
packing order are the same on every machine.

A source with a `record_schema` never stops the run for a bad record: a line that is not JSON, a record that
fails the schema or has no text field comes out as a `Quarantined` item with the reason, instead of a document.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.recipe import DataSource

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson")


class SourceError(ValueError):
    """An input that cannot be read; the message names data.sources[i] and the fix."""


@dataclass(frozen=True)
class InputFile:
    """One file to read, with how to read it."""

    path: str  # absolute
    rel: str  # relative to its source's path
    source: int  # index in data.sources
    format: str  # text | jsonl | parquet
    text_field: str
    size: int
    mtime_ns: int
    record_schema: str | None = None  # absolute path of the JSON Schema its records must satisfy

    @property
    def quarantines(self) -> bool:
        return self.record_schema is not None

    @property
    def doc_prefix(self) -> str:
        return f"s{self.source}/{self.rel}"

    def shard(self, num_shards: int) -> int:
        """Stable shard assignment by the location-independent id."""
        return stable_hash(self.doc_prefix) % num_shards


@dataclass(frozen=True)
class Document:
    """A text with a stable id and its place in the keep-first order (source, path, record)."""

    doc_id: str
    order: tuple[int, str, int]
    text: str
    group: str | None = None  # the value of data.split's record field, for the stratified split


@dataclass(frozen=True)
class Quarantined:
    """A record that is not trained on, with where it was and why."""

    doc_id: str
    order: tuple[int, str, int]
    reason: str
    record: str  # the line or row as it was read (JSON)


def stable_hash(text: str, salt: str = "") -> int:
    """A 64-bit hash that is the same in every process and on every machine (unlike hash())."""
    return int.from_bytes(hashlib.sha256(f"{salt}{text}".encode()).digest()[:8], "big")


def format_of(path: Path, declared: str) -> str:
    """The declared format, or one guessed from the file name."""
    if declared != "auto":
        return declared
    if path.name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if path.suffix == ".parquet":
        return "parquet"
    return "text"


def _matches(rel: str, patterns: list[str]) -> bool:
    """A glob matches the path relative to the source, or the file name alone."""
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def _walk(root: Path) -> Iterator[Path]:
    """Every file under root, without following directory symlinks."""
    for parent, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            yield Path(parent) / name


def discover_source(index: int, src: DataSource) -> list[InputFile]:
    """The files of one source, sorted by relative path, after include/exclude and max_files."""
    root = src.resolved_path()
    where = f"data.sources[{index}].path={src.path!r}"
    if not root.exists():
        raise SourceError(f"{where} resolves to {root}, which does not exist; fix the path or remove the source")
    if root.is_file():
        candidates = [(root.name, root)]
    else:
        candidates = []
        for p in _walk(root):
            rel = p.relative_to(root).as_posix()
            if _matches(rel, src.include) and not _matches(rel, src.exclude) and p.is_file():
                candidates.append((rel, p))
    candidates.sort()
    candidates = candidates[: src.max_files] if src.max_files else candidates
    if not candidates:
        raise SourceError(f"{where}: no file under {root} matches include={src.include} exclude={src.exclude}; "
                          f"fix data.sources[{index}].include")
    out = []
    for rel, p in candidates:
        st = p.stat()
        schema = str(src.resolved_schema()) if src.record_schema else None
        out.append(InputFile(str(p.resolve()), rel, index, format_of(p, src.format), src.text_field,
                             st.st_size, st.st_mtime_ns, schema))
    return out


def discover(sources: list[DataSource]) -> list[InputFile]:
    """Every input file of every source, in source then path order; a file found twice is read once."""
    seen: set[str] = set()
    found = []
    for i, src in enumerate(sources):
        for item in discover_source(i, src):
            if item.path not in seen:
                seen.add(item.path)
                found.append(item)
    return found


def read_documents(item: InputFile, group_field: str | None = None) -> Iterator[Document | Quarantined]:
    """The documents in one input file (and, for a source with a record schema, its quarantined records)."""
    if item.format == "text":
        text = Path(item.path).read_bytes().decode("utf-8", errors="replace")
        yield Document(item.doc_prefix, (item.source, item.rel, 0), text)
    elif item.format == "jsonl":
        yield from _read_jsonl(item, group_field)
    elif item.format == "parquet":
        yield from _read_parquet(item, group_field)
    else:
        raise SourceError(f"data.sources[{item.source}].format={item.format!r} is unknown; "
                          "use auto, text, jsonl or parquet")


def _record(item: InputFile, n: int, record: Any, raw: str, group_field: str | None) -> Document | Quarantined:
    """A record as a Document, or Quarantined when the source has a schema and the record fails it."""
    order = (item.source, item.rel, n)
    doc_id = f"{item.doc_prefix}#{n}"
    if item.record_schema is not None:
        from jobs.data.schema import record_validator, schema_problem

        problem = schema_problem(record_validator(item.record_schema), record)
        if problem:
            return Quarantined(doc_id, order, problem, raw)
    text = record.get(item.text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        if item.quarantines:
            return Quarantined(doc_id, order, f"no string field {item.text_field!r}", raw)
        unit = "line" if item.format == "jsonl" else "row"
        raise SourceError(f"data.sources[{item.source}]: {item.path}, {unit} {n} has no string field "
                          f"{item.text_field!r} (it has {keys}); set data.sources[{item.source}].text_field to the "
                          "field holding the text")
    group = record.get(group_field) if group_field else None
    return Document(doc_id, order, text, None if group is None else str(group))


def _read_jsonl(item: InputFile, group_field: str | None) -> Iterator[Document | Quarantined]:
    import gzip

    opener = gzip.open if item.path.endswith(".gz") else open
    where = f"data.sources[{item.source}]: {item.path}"
    with opener(item.path, "rt", encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                if item.quarantines:
                    yield Quarantined(f"{item.doc_prefix}#{n}", (item.source, item.rel, n),
                                      f"not valid JSON ({exc.msg})", line.rstrip("\n"))
                    continue
                raise SourceError(f"{where}, line {n} is not valid JSON ({exc.msg})") from None
            yield _record(item, n, record, line.rstrip("\n"), group_field)


def _read_parquet(item: InputFile, group_field: str | None) -> Iterator[Document | Quarantined]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(item.path)
    names = table.schema_arrow.names
    if item.text_field not in names:
        raise SourceError(f"data.sources[{item.source}]: {item.path} has no column {item.text_field!r} "
                          f"(columns: {names}); set data.sources[{item.source}].text_field")
    if item.quarantines or (group_field and group_field in names):
        row = 0
        for batch in table.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                row += 1
                if not item.quarantines and not isinstance(record[item.text_field], str):
                    record = {**record, item.text_field: ""}  # an empty cell is an empty document, as below
                yield _record(item, row, record, json.dumps(record, ensure_ascii=False, default=str), group_field)
        return
    row = 0
    for batch in table.iter_batches(columns=[item.text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            row += 1
            yield Document(f"{item.doc_prefix}#{row}", (item.source, item.rel, row), text if isinstance(text, str)
                           else "")
