"""The data pipeline end to end on a generated corpus of every input format, with planted problems."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.data import merge
from jobs.data.clean import normalize
from jobs.data.pack import PackedDataset, load_tokenizer
from jobs.data.pii import redact
from jobs.data.pipeline import OutputDirError, finalize, plan_shards, prepare_data
from jobs.data.shard import process_shard
from jobs.data.sources import SourceError
from jobs.data.tokenizer import EOS, TokenizerError
from jobs.recipe import PIIConfig, dump_recipe, parse_recipe

WORDS = ["data", "model", "cluster", "storage", "network", "training", "budget", "team", "private", "server",
         "review", "quarter", "design", "report", "schedule", "policy", "engineer", "deploy", "invoice", "window"]
CONTACT = ("Mail ops@example.com or call +1 415-555-0132 from 192.168.10.23, card 4111 1111 1111 1111.\n")


def prose(seed: int, words: int = 250) -> str:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(10)).capitalize() + f" {rng.randrange(10**6)}."
             for _ in range(words // 10)]
    return "\n".join(lines) + "\n"


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, list[str]]:
    """A corpus and the raw texts of every document in it."""
    root = tmp_path / "corpus"
    docs = root / "docs"
    docs.mkdir(parents=True)
    texts: dict[str, str] = {f"note{i:02d}.txt": prose(i) for i in range(12)}
    texts["readme.md"] = "# Title\n\n" + prose(100)
    texts["tool.py"] = "def double(x):\n    return x * 2\n\n\n" + prose(101)
    texts["zz-copy-of-note03.txt"] = texts["note03.txt"]  # exact duplicate
    texts["zz-note05-crlf.txt"] = texts["note05.txt"].replace("\n", "  \r\n")  # equal once normalised
    near = texts["note04.txt"].split(" ")
    near[5], near[40] = "changed", "edited"
    texts["zz-near-note04.txt"] = " ".join(near)  # near duplicate
    texts["contact.txt"] = CONTACT + prose(50)
    texts["tiny.txt"] = "too short"
    texts["spam.txt"] = "buy cheap watches now at our store\n" * 30
    for name, text in texts.items():
        (docs / name).write_text(text)
    (docs / "blob.txt").write_bytes(b"\x7fELF\x00\x00\x01\x02binary" * 50)
    records = [prose(i) for i in range(20, 26)] + [texts["note07.txt"]]  # the last one duplicates a file
    (docs / "records.jsonl").write_text("".join(json.dumps({"text": t, "meta": 1}) + "\n" for t in records))
    packed = [prose(i) for i in range(30, 32)]
    with gzip.open(docs / "more.jsonl.gz", "wt") as fh:
        fh.write("".join(json.dumps({"text": t}) + "\n" for t in packed))
    rows = [prose(i) for i in range(40, 44)] + [None]
    pq.write_table(pa.table({"content": rows}), root / "table.parquet")
    return root, [*texts.values(), *records, *packed, *[r for r in rows if r]]


def recipe_for(corpus: tuple[Path, list[str]] | Path, out: Path, tokenizer: dict[str, Any] | None = None,
               **data: Any):
    root = corpus[0] if isinstance(corpus, tuple) else corpus
    return parse_recipe({
        "name": "t", "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "max_position_embeddings": 64},
        "tokenizer": tokenizer or {"vocab_size": 400},
        "data": {"sources": [{"path": str(root / "docs")}, {"path": str(root / "table.parquet"),
                                                               "text_field": "content"}],
                 "output_dir": str(out), "num_shards": 3, "workers": 1, "eval_fraction": 0.1,
                 "filters": {"min_chars": 100, "min_words": 20, "max_symbol_ratio": 0.5}, **data},
        "training": {"sequence_length": 32, "micro_batch_size": 1, "global_batch_size": 1, "max_steps": 2,
                     "warmup_steps": 1},
    })


def files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def bins(out: Path) -> dict[str, bytes]:
    return {k: v for k, v in files(out).items() if k.endswith(".bin")}


@pytest.fixture
def prepared(corpus: tuple[Path, list[str]], tmp_path: Path) -> Path:
    out = tmp_path / "data" / "out"
    prepare_data(recipe_for(corpus, out), progress=False)
    return out


def test_report_counts_every_stage(prepared: Path) -> None:
    report = json.loads((prepared / "report.json").read_text())
    # 21 files + 7 JSONL records + 2 gzipped records in docs/, 5 Parquet rows
    kept = {row["stage"]: row["docs"] for row in report["stages"]}
    assert kept == {"read": 35, "normalise": 34, "language": 34, "length filter": 32, "quality filter": 31,
                    "pii redaction": 31, "exact dedup": 28, "near dedup": 27}
    assert {k: v["docs"] for k, v in report["drop_reasons"].items()} == \
        {"binary": 1, "too_few_chars": 2, "duplicate_lines": 1}
    assert report["pii_redactions"] == {"email": 1, "phone": 1, "ip_address": 1, "id_number": 1}
    assert report["dedup"]["examples"] == {
        "exact": {"s0/records.jsonl#7": "s0/note07.txt", "s0/zz-copy-of-note03.txt": "s0/note03.txt",
                  "s0/zz-note05-crlf.txt": "s0/note05.txt"},
        "near": {"s0/zz-near-note04.txt": "s0/note04.txt"}}
    splits = report["splits"]
    assert splits["train"]["docs"] + splits["eval"]["docs"] == 27 and splits["eval"]["docs"] >= 1
    assert report["input_files"] == 24 and report["mb_per_s"] > 0 and report["block_size"] == 32
    for row in report["stages"]:
        assert row["bytes"] > 0 and row["dropped_bytes"] >= 0


def decoded_documents(out: Path) -> tuple[str, set[str]]:
    """All packed text of both splits, checking that every whole document in it is a cleaned input."""
    report = json.loads((out / "report.json").read_text())
    tok = load_tokenizer(out)
    texts = []
    for split in ("train", "eval"):
        ds = PackedDataset(out, split)
        assert len(ds) == report["splits"][split]["blocks"] > 0 and ds.block_size == 32
        assert ds.eos_id == tok.eos_token_id and ds.vocab_size == len(tok) <= 400
        texts.append(tok.decode(ds.get_blocks(np.arange(len(ds))).reshape(-1)))
    return "".join(texts), {seg for t in texts for seg in t.split(EOS)[:-1]}  # the last one is cut off


def cleaned(raw: list[str]) -> set[str]:
    return {redact(normalize(t), PIIConfig())[0] for t in raw}


def test_blocks_decode_to_the_cleaned_documents(prepared: Path, corpus: tuple[Path, list[str]]) -> None:
    text, documents = decoded_documents(prepared)
    assert documents <= cleaned(corpus[1]) and len(documents) >= 20
    assert "ops@example.com" not in text and "4111 1111" not in text
    assert "<EMAIL>" in text and "<PHONE>" in text and "<IP_ADDRESS>" in text and "<ID_NUMBER>" in text


def test_index_and_manifest(prepared: Path) -> None:
    index = json.loads((prepared / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["block_size"] == 32
    assert set(index["splits"]) == {"train", "eval", "test"}
    assert index["splits"]["train"][0]["file"] == "train-00000.bin"
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["fingerprint"] and manifest["privlm_version"] and manifest["created"]
    assert manifest["inputs"]["files"] == 24 and manifest["inputs"]["sources"][1]["formats"] == ["parquet"]
    assert manifest["settings"]["sequence_length"] == 32 and manifest["settings"]["tokenizer"]["vocab_size"] == 400
    assert manifest["splits"]["train"]["blocks"] == index["splits"]["train"][0]["blocks"]
    assert manifest["counts"]["near dedup"]["docs"] == 27
    assert sorted(p.name for p in prepared.parent.iterdir()) == ["out"]  # no work or temporary directory left


def test_rerun_skips_until_inputs_or_settings_change(prepared: Path, corpus: tuple[Path, list[str]],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    before = files(prepared)
    capsys.readouterr()
    result = prepare_data(recipe_for(corpus, prepared), progress=False)
    assert result.skipped and "up to date" in capsys.readouterr().out and files(prepared) == before
    assert not prepare_data(recipe_for(corpus, prepared), force=True, progress=False).skipped
    assert not prepare_data(recipe_for(corpus, prepared, eval_fraction=0.2), progress=False).skipped
    assert decoded_documents(prepared)[1] <= cleaned(corpus[1])  # a retrained tokenizer, used for the ids too
    (corpus[0] / "docs" / "note00.txt").write_text(prose(999))
    assert not prepare_data(recipe_for(corpus, prepared, eval_fraction=0.2), progress=False).skipped


def test_output_does_not_depend_on_workers_or_shards(prepared: Path, corpus: tuple[Path, list[str]],
                                                     tmp_path: Path) -> None:
    pooled = tmp_path / "pooled"
    prepare_data(recipe_for(corpus, pooled, workers=2, num_shards=5), progress=False)
    assert bins(pooled) == bins(prepared)
    assert files(pooled)["tokenizer/tokenizer.json"] == files(prepared)["tokenizer/tokenizer.json"]


def test_steps_run_separately_like_array_tasks(prepared: Path, corpus: tuple[Path, list[str]],
                                               tmp_path: Path) -> None:
    recipe = recipe_for(corpus, tmp_path / "stepwise")
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(dump_recipe(recipe))
    plan = plan_shards(recipe)
    for shard in reversed(range(plan.num_shards)):  # any order, from a recipe file, as separate tasks would
        process_shard(recipe_file, shard, plan.work_dir)
    again = process_shard(recipe_file, 0, plan.work_dir)  # a requeued task finds its shard done
    assert again["kept"]["read"][0] > 0
    finalize(recipe_file, plan.work_dir)
    assert bins(tmp_path / "stepwise") == bins(prepared) and not plan.work_dir.exists()


def test_missing_source_names_the_field(corpus: tuple[Path, list[str]], tmp_path: Path) -> None:
    recipe = recipe_for(corpus, tmp_path / "out")
    recipe.data.sources[0].path = str(corpus[0] / "nope")
    with pytest.raises(SourceError, match=r"data.sources\[0\].path=.*does not exist"):
        prepare_data(recipe, progress=False)
    assert not (tmp_path / "out").exists()


def test_jsonl_without_text_field(corpus: tuple[Path, list[str]], tmp_path: Path) -> None:
    (corpus[0] / "docs" / "records.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(SourceError, match=r"data.sources\[0\].*line 1 has no string field 'text'.*text_field"):
        prepare_data(recipe_for(corpus, tmp_path / "out"), progress=False)


def test_existing_tokenizer_is_copied(prepared: Path, corpus: tuple[Path, list[str]], tmp_path: Path) -> None:
    out = tmp_path / "second"
    prepare_data(recipe_for(corpus, out, {"path": str(prepared / "tokenizer"), "vocab_size": 400}), progress=False)
    assert files(out)["tokenizer/tokenizer.json"] == files(prepared)["tokenizer/tokenizer.json"]
    assert json.loads((out / "report.json").read_text())["tokenizer"]["source"] == str(prepared / "tokenizer")


def test_missing_tokenizer_says_how_to_make_it(corpus: tuple[Path, list[str]], tmp_path: Path) -> None:
    recipe = recipe_for(corpus, tmp_path / "out", {"path": str(tmp_path / "nowhere"), "vocab_size": 400})
    with pytest.raises(TokenizerError, match=r"tokenizer.path=.*nowhere.*privlm data prepare recipes/tiny-cpu.yaml"):
        prepare_data(recipe, progress=False)


def test_tokenizer_larger_than_the_model_vocabulary(prepared: Path, corpus: tuple[Path, list[str]],
                                                    tmp_path: Path) -> None:
    recipe = recipe_for(corpus, tmp_path / "out", {"path": str(prepared / "tokenizer"), "vocab_size": 300})
    recipe.model.vocab_size = 300
    with pytest.raises(TokenizerError, match=r"has 400 tokens but model.vocab_size=300"):
        prepare_data(recipe, progress=False)


def test_failure_while_cleaning_keeps_the_previous_output(prepared: Path, corpus: tuple[Path, list[str]]) -> None:
    before = files(prepared)
    (corpus[0] / "table.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(Exception, match="Parquet"):
        prepare_data(recipe_for(corpus, prepared), progress=False)
    assert files(prepared) == before


def test_failure_while_packing_keeps_the_previous_output(prepared: Path, corpus: tuple[Path, list[str]],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    before = files(prepared)
    real_pack = merge.pack

    def pack_then_fail(*args: Any, **kwargs: Any) -> Any:
        real_pack(*args, **kwargs)  # the new shards are written, then the run dies
        raise KeyboardInterrupt

    monkeypatch.setattr(merge, "pack", pack_then_fail)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(recipe_for(corpus, prepared), force=True, progress=False)
    assert files(prepared) == before
    assert not Path(f"{prepared}.tmp").exists()


def test_interrupted_publish_is_restored(prepared: Path, corpus: tuple[Path, list[str]]) -> None:
    before = files(prepared)
    prepared.rename(prepared.with_name(f".{prepared.name}.old"))  # a crash between the two renames
    assert prepare_data(recipe_for(corpus, prepared), progress=False).skipped
    assert files(prepared) == before


def test_refuses_to_replace_a_foreign_directory(corpus: tuple[Path, list[str]], tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(OutputDirError, match=r"data\.output_dir"):
        prepare_data(recipe_for(corpus, tmp_path / "mine"), progress=False)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_eval_gets_a_block_and_files_roll_over(corpus: tuple[Path, list[str]], tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare_data(recipe_for(corpus, out, eval_fraction=0.001, output_file_mb=0.004), progress=False)
    report = json.loads((out / "report.json").read_text())
    assert report["eval_topped_up_docs"] >= 1 and len(PackedDataset(out, "eval")) >= 1
    assert report["splits"]["train"]["files"] > 1
    ds = PackedDataset(out, "train")
    assert len(ds) == report["splits"]["train"]["blocks"] and ds.get_blocks(np.arange(len(ds))).shape == (len(ds), 32)
    no_eval = tmp_path / "no-eval"
    prepare_data(recipe_for(corpus, no_eval, eval_fraction=0.0), progress=False)
    assert len(PackedDataset(no_eval, "eval")) == 0


def test_cli_prepares_then_skips(corpus: tuple[Path, list[str]], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from privlm.cli import app

    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(dump_recipe(recipe_for(corpus, tmp_path / "out")))
    first = CliRunner().invoke(app, ["data", "prepare", str(recipe_file)])
    assert first.exit_code == 0, first.output
    assert "near dedup" in first.output and f"shards in {tmp_path / 'out'}" in first.output
    second = CliRunner().invoke(app, ["data", "prepare", str(recipe_file)])
    assert second.exit_code == 0 and "up to date" in second.output


def test_heavy_libraries_load_only_when_used() -> None:
    import subprocess
    import sys

    code = ("import sys, jobs.cli, jobs.data.pipeline, jobs.data.pack; "
            "print(sorted(m for m in ('transformers', 'tokenizers', 'datasketch', 'pyarrow', 'torch') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
