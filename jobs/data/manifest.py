"""Fingerprints of the inputs and settings, the manifest written beside the shards, and the up-to-date check.

A prepared directory is current when its manifest's fingerprint equals the fingerprint of the files the
recipe's sources now resolve to (path, size, mtime) and of the settings that shape the output.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from jobs.data.sources import InputFile
from jobs.recipe import Recipe

# Bump when the pipeline's output for the same inputs and settings changes (cleaning rules, packing order...).
PIPELINE_VERSION = 3
MANIFEST = "manifest.json"
REPORT = "report.json"
QUARANTINE = "quarantine.jsonl"


def settings(recipe: Recipe) -> dict[str, Any]:
    """Everything besides the input files that changes the output: data and tokenizer sections, block size."""
    data = recipe.data.model_dump(mode="json", exclude={"workers", "output_dir"})
    return {"data": data, "tokenizer": recipe.tokenizer.model_dump(mode="json"),
            "sequence_length": recipe.training.sequence_length, "model_vocab_size": recipe.model.vocab_size,
            "pipeline_version": PIPELINE_VERSION}


def _sha(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def settings_hash(recipe: Recipe) -> str:
    """Hash of `settings(recipe)`: a work directory planned under other settings must not be reused."""
    return _sha(settings(recipe))


def tokenizer_source_hash(recipe: Recipe) -> str | None:
    """Content hash of an existing tokenizer's files (tokenizer.path), so replacing it invalidates the output."""
    if not recipe.tokenizer.path:
        return None
    from jobs.data.tokenizer import TOKENIZER_FILES

    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        f = Path(recipe.tokenizer.path) / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def input_summary(recipe: Recipe, inputs: list[InputFile]) -> dict[str, Any]:
    """Per source: where it resolved, how many files and bytes; plus a hash of every (path, size, mtime)."""
    h = hashlib.sha256()
    for item in sorted(inputs, key=lambda x: (x.source, x.rel)):
        h.update(f"{item.path}\0{item.size}\0{item.mtime_ns}\n".encode())
    sources = []
    for i, src in enumerate(recipe.data.sources):
        mine = [x for x in inputs if x.source == i]
        sources.append({"path": src.path, "resolved": str(src.resolved_path()), "files": len(mine),
                        "bytes": sum(x.size for x in mine), "formats": sorted({x.format for x in mine})})
    return {"fingerprint": h.hexdigest(), "files": len(inputs), "bytes": sum(x.size for x in inputs),
            "sources": sources}


def fingerprint(recipe: Recipe, inputs: list[InputFile]) -> dict[str, str | None]:
    """The inputs', the settings' and the tokenizer source's hashes, and one over all three."""
    parts = {"inputs": input_summary(recipe, inputs)["fingerprint"], "settings": settings_hash(recipe),
             "tokenizer_source": tokenizer_source_hash(recipe)}
    schemas = [src.resolved_schema() for src in recipe.data.sources if src.record_schema]
    if schemas:  # an edited schema quarantines other records: the output is out of date
        parts["record_schemas"] = _sha([hashlib.sha256(p.read_bytes()).hexdigest() for p in schemas])
    return {**parts, "fingerprint": _sha(parts)[:24]}


def privlm_version() -> str:
    from privlm import __version__

    return __version__


def build_manifest(recipe: Recipe, inputs: list[InputFile], fps: dict[str, Any], report: dict[str, Any],
                   index: dict[str, Any]) -> dict[str, Any]:
    """What was made, from what, with which settings, when, by which privlm."""
    return {
        "fingerprint": fps["fingerprint"], "fingerprints": fps, "recipe": recipe.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "privlm_version": privlm_version(),
        "inputs": input_summary(recipe, inputs), "settings": settings(recipe),
        "counts": {row["stage"]: {"docs": row["docs"], "bytes": row["bytes"]} for row in report["stages"]},
        "splits": {name: {k: split[k] for k in ("docs", "tokens", "blocks")}
                   for name, split in report["splits"].items()},
        "tokenizer": report["tokenizer"],
        "index": {"dtype": index["dtype"], "block_size": index["block_size"], "vocab_size": index["vocab_size"],
                  "eos_id": index["eos_id"]},
    }


def current_manifest(out: Path, fp: str) -> dict[str, Any] | None:
    """The manifest of `out` if it has fingerprint `fp` and every file the index names is whole; else None."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        index = json.loads((out / "index.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("fingerprint") != fp or not (out / "tokenizer" / "tokenizer.json").is_file():
        return None
    import numpy as np

    arrays = {key: np.dtype(name).itemsize for key, name in index.get("arrays", {"file": index["dtype"]}).items()}
    for entries in index["splits"].values():
        for e in entries:
            for key, item in arrays.items():
                f = out / e[key]
                if not f.is_file() or f.stat().st_size != e["blocks"] * index["block_size"] * item:
                    return None
    return manifest
