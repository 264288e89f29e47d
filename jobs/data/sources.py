"""Find raw inputs (directories of text files, JSONL, Parquet), assign them to shards, read documents."""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from jobs.recipe import DataSource

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst"}


class SourceError(ValueError):
    """An input that cannot be read; the message names data.sources[i] and the fix."""


@dataclass(frozen=True)
class InputFile:
    """One file to read, with how to read it."""

    path: str
    format: str  # text | jsonl | parquet
    text_field: str
    size: int
    mtime_ns: int

    def shard(self, num_shards: int) -> int:
        """Stable shard assignment by path."""
        return int.from_bytes(hashlib.sha1(self.path.encode()).digest()[:8], "big") % num_shards


@dataclass(frozen=True)
class Document:
    """A text with a stable id (`path` or `path#record`)."""

    doc_id: str
    text: str


def _format_of(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    if path.suffix == ".jsonl" or path.name.endswith(".jsonl.gz"):
        return "jsonl"
    if path.suffix == ".parquet":
        return "parquet"
    return "text"


def _matches(rel: str, patterns: list[str]) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p) for p in patterns)


def discover(sources: list[DataSource]) -> list[InputFile]:
    """Every input file of every source, sorted by path; raises SourceError for a missing source."""
    found: dict[str, InputFile] = {}
    for i, src in enumerate(sources):
        root = src.resolved_path()
        if not root.exists():
            raise SourceError(f"data.sources[{i}].path={src.path!r} resolves to {root}, which does not exist; "
                              "fix the path or remove the source")
        if root.is_file():
            candidates = [root]
        else:
            candidates = sorted(p for p in root.rglob("*") if p.is_file() and
                                _matches(p.relative_to(root).as_posix(), src.include) and
                                not _matches(p.relative_to(root).as_posix(), src.exclude))
        if src.max_files:
            candidates = candidates[: src.max_files]
        if not candidates:
            raise SourceError(f"data.sources[{i}]: no file under {root} matches include={src.include} "
                              f"(exclude={src.exclude})")
        for p in candidates:
            st = p.stat()
            found[str(p)] = InputFile(str(p), _format_of(p, src.format), src.text_field, st.st_size, st.st_mtime_ns)
    return [found[k] for k in sorted(found)]


def read_documents(item: InputFile) -> Iterator[Document]:
    """The documents in one input file."""
    path = Path(item.path)
    if item.format == "text":
        yield Document(item.path, path.read_text(encoding="utf-8", errors="replace"))
    elif item.format == "jsonl":
        yield from _read_jsonl(item)
    elif item.format == "parquet":
        yield from _read_parquet(item)
    else:
        raise SourceError(f"{item.path}: unknown format {item.format!r} (use auto, text, jsonl or parquet)")


def _read_jsonl(item: InputFile) -> Iterator[Document]:
    import gzip

    opener = gzip.open if item.path.endswith(".gz") else open
    with opener(item.path, "rt", encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SourceError(f"{item.path}:{n} is not valid JSON ({exc.msg})") from None
            text = record.get(item.text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise SourceError(f"{item.path}:{n} has no string field {item.text_field!r}; set "
                                  "data.sources[].text_field to the field holding the text")
            yield Document(f"{item.path}#{n}", text)


def _read_parquet(item: InputFile) -> Iterator[Document]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(item.path)
    if item.text_field not in table.schema_arrow.names:
        raise SourceError(f"{item.path} has no column {item.text_field!r} (columns: {table.schema_arrow.names}); "
                          "set data.sources[].text_field")
    row = 0
    for batch in table.iter_batches(columns=[item.text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            row += 1
            if isinstance(text, str):
                yield Document(f"{item.path}#{row}", text)
