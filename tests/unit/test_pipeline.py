"""The data pipeline end to end on a generated corpus of every input format."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.data.pack import PackedDataset, load_tokenizer
from jobs.data.pipeline import prepare_data
from jobs.data.sources import SourceError
from jobs.recipe import parse_recipe


def prose(seed: int, words: int = 250) -> str:
    rng = random.Random(seed)
    vocab = ["data", "model", "cluster", "storage", "network", "training", "budget", "team", "private",
             "server", "review", "quarter", "design", "report", "schedule", "policy", "engineer", "deploy"]
    sentences = []
    for _ in range(words // 10):
        sentences.append(" ".join(rng.choice(vocab) for _ in range(10)).capitalize() + f" {rng.randrange(10**6)}.")
    return "\n".join(sentences)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    (root / "docs").mkdir(parents=True)
    for i in range(12):
        (root / "docs" / f"note{i:02d}.txt").write_text(prose(i))
    (root / "docs" / "readme.md").write_text("# Title\n\n" + prose(100))
    (root / "docs" / "tool.py").write_text("def f(x):\n    return x * 2\n\n" + "# " + prose(101))
    (root / "docs" / "copy-of-note03.txt").write_text(prose(3))  # exact duplicate
    near = prose(4).split(" ")
    near[10] = "changed"
    (root / "docs" / "near-note04.txt").write_text(" ".join(near))  # near duplicate
    (root / "docs" / "contact.txt").write_text("Mail ops@example.com or call +1 415-555-0132.\n" + prose(50))
    (root / "docs" / "tiny.txt").write_text("too short")
    with open(root / "records.jsonl", "w") as fh:
        for i in range(20, 26):
            fh.write(json.dumps({"text": prose(i), "meta": i}) + "\n")
    pq.write_table(pa.table({"content": [prose(i) for i in range(40, 45)]}), root / "table.parquet")
    return root


def recipe_for(corpus: Path, out: Path, **data):
    return parse_recipe({
        "name": "t", "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "max_position_embeddings": 64},
        "tokenizer": {"vocab_size": 400},
        "data": {"sources": [{"path": str(corpus / "docs")}, {"path": str(corpus / "records.jsonl")},
                             {"path": str(corpus / "table.parquet"), "text_field": "content"}],
                 "output_dir": str(out), "num_shards": 3, "workers": 1, "eval_fraction": 0.1,
                 "filters": {"min_chars": 100, "min_words": 20, "max_symbol_ratio": 0.5}, **data},
        "training": {"sequence_length": 32, "micro_batch_size": 1, "global_batch_size": 1, "max_steps": 2,
                     "warmup_steps": 1},
    })


def test_prepare_every_format_with_report_and_manifest(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = prepare_data(recipe_for(corpus, out))
    report = json.loads((out / "report.json").read_text())
    totals = report["totals"]
    # 12 notes, md, py, exact copy, near copy, contact, tiny; 6 JSONL records; 5 Parquet rows
    assert totals["input_docs"] == 12 + 6 + 6 + 5
    assert report["drop_reasons"] == {"too_short_chars": 1}
    stages = {s["stage"]: s for s in report["stages"]}
    assert stages["exact dedup (SHA-256)"]["dropped"] == 1 and stages["near dedup (MinHash LSH)"]["dropped"] == 1
    assert report["pii_redactions"] == {"email": 1, "phone": 1}
    assert totals["kept_docs"] == totals["input_docs"] - 3 and totals["eval_docs"] >= 1
    train, evals = PackedDataset(out, "train"), PackedDataset(out, "eval")
    assert len(train) == totals["train_blocks"] > 0 and len(evals) == totals["eval_blocks"] > 0
    tok = load_tokenizer(out)
    text = "".join(tok.decode(ds.get_blocks(np.arange(len(ds))).reshape(-1)) for ds in (train, evals))
    assert "ops@example.com" not in text and "<EMAIL>" in text and "<PHONE>" in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fingerprint"] and manifest["settings"]["block_size"] == 32
    assert not result.skipped and not any(p.name.startswith(".") for p in out.parent.iterdir())


def test_rerun_skips_and_change_reruns(corpus: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    prepare_data(recipe_for(corpus, out))
    assert prepare_data(recipe_for(corpus, out)).skipped
    assert "up to date" in capsys.readouterr().out
    (corpus / "docs" / "note00.txt").write_text(prose(999))
    assert not prepare_data(recipe_for(corpus, out)).skipped


def test_existing_tokenizer_is_reused(corpus: Path, tmp_path: Path) -> None:
    first = tmp_path / "first"
    prepare_data(recipe_for(corpus, first))
    second = recipe_for(corpus, tmp_path / "second").model_copy(deep=True)
    second.tokenizer.path = str(first / "tokenizer")
    prepare_data(second)
    assert (tmp_path / "second" / "tokenizer" / "tokenizer.json").read_bytes() == \
        (first / "tokenizer" / "tokenizer.json").read_bytes()


def test_missing_source_names_the_field(corpus: Path, tmp_path: Path) -> None:
    recipe = recipe_for(corpus, tmp_path / "out")
    recipe.data.sources[0].path = str(corpus / "nope")
    with pytest.raises(SourceError, match=r"data.sources\[0\].path"):
        prepare_data(recipe)


def test_jsonl_without_text_field(corpus: Path, tmp_path: Path) -> None:
    (corpus / "records.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(SourceError, match="no string field 'text'"):
        prepare_data(recipe_for(corpus, tmp_path / "out"))


def test_failure_midway_keeps_the_previous_output(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare_data(recipe_for(corpus, out))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    (corpus / "table.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(Exception):  # noqa: B017 - pyarrow's own error type
        prepare_data(recipe_for(corpus, out))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
