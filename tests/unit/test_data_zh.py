"""Chinese and mixed-language corpora through the real pipeline: language ID, t2s, script-aware filters,
Chinese PII, CJK near dedup, repeated sentences, source weights, stratified splits, record schemas."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jobs.data.clean import normalize
from jobs.data.pack import PackedDataset, load_tokenizer
from jobs.data.pipeline import prepare_data
from jobs.data.shard import Cleaner, ShardStats
from jobs.recipe import RecipeError, parse_recipe
from tests.helpers import REPO

ZH_CORPUS = REPO / "recipes" / "data" / "zh" / "corpus.jsonl"
ZH_SCHEMA = REPO / "recipes" / "data" / "zh" / "record.schema.json"
CJK = re.compile(r"[\u4e00-\u9fff]")
ENGLISH = ["quokka", "ledger", "harbour", "lantern", "orchard", "meadow", "copper", "violin", "glacier", "pebble",
           "saddle", "thistle", "falcon", "canyon", "ember", "willow", "beacon", "marble", "tundra", "cobalt"]
# 720 characters of ordinary Chinese prose: one "word" to a whitespace split
ZH_PROSE = "".join(json.loads(line)["text"] for line in ZH_CORPUS.read_text(encoding="utf-8").splitlines()[:3])[:720]


def minimal(data: dict[str, Any]) -> dict[str, Any]:
    return {"name": "t", "data": data, "training": {"max_steps": 2, "warmup_steps": 1}}


def english(seed: int, sentences: int = 24) -> str:
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(ENGLISH) for _ in range(12)).capitalize() + "."
                     for _ in range(sentences)) + "\n"


def zh_records() -> list[dict[str, Any]]:
    """The Chinese records of the demo corpus (its English ones left out), and its two broken records."""
    records = [json.loads(line) for line in ZH_CORPUS.read_text(encoding="utf-8").splitlines()]
    return [r for r in records if not isinstance(r.get("text"), str) or CJK.search(r["text"])]


def recipe(root: Path, out: Path, **data: Any) -> Any:
    return parse_recipe({
        "name": "zh", "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "max_position_embeddings": 64},
        "tokenizer": {"vocab_size": 600},
        "data": {"sources": [{"path": str(root / "en"), "weight": 0.2},
                             {"path": str(root / "zh.jsonl"), "record_schema": str(ZH_SCHEMA), "weight": 0.8}],
                 "output_dir": str(out), "num_shards": 2, "workers": 1,
                 "language": {"candidates": ["zh", "en", "ja"], "t2s": True}, **data},
        "training": {"sequence_length": 32, "micro_batch_size": 1, "global_batch_size": 1, "max_steps": 2,
                     "warmup_steps": 1},
    })


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """English files and the demo's Chinese JSONL records, prepared once with the default filters."""
    root = tmp_path_factory.mktemp("mixed")
    (root / "en").mkdir()
    for i in range(16):
        (root / "en" / f"doc{i:02d}.txt").write_text(english(i))
    lines = [json.dumps(r, ensure_ascii=False) for r in zh_records()]
    lines.insert(3, "{this line is not JSON")
    (root / "zh.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = root / "out"
    prepare_data(recipe(root, out), progress=False)
    return out, json.loads((out / "report.json").read_text())


def stream(out: Path, split: str) -> np.ndarray:
    ds = PackedDataset(out, split)
    return ds.get_blocks(np.arange(len(ds))).reshape(-1)


def all_text(out: Path) -> str:
    tok = load_tokenizer(out)
    return "".join(tok.decode(stream(out, split).tolist()) for split in ("train", "eval", "test"))


def test_chinese_prose_passes_the_default_filters(mixed: tuple[Path, dict[str, Any]]) -> None:
    _, report = mixed
    zh = report["languages"]["zh"]
    assert zh["read_docs"] == 12 and zh["kept_docs"] == 12 and zh["dropped"] == {}
    stats = ShardStats(0)
    default = parse_recipe(minimal({"sources": [{"path": "."}]}))
    assert len(ZH_PROSE) == 720 and len(ZH_PROSE.split()) <= 6
    assert Cleaner(default)(ZH_PROSE, stats) is not None and stats.dropped == {}


def test_mobile_numbers_and_resident_ids_are_redacted_in_the_packed_tokens(
        mixed: tuple[Path, dict[str, Any]]) -> None:
    out, report = mixed
    text = all_text(out)
    assert "13812345678" not in text and "11010519491231002X" not in text and "6222021234567890128" not in text
    assert "62345678" not in text
    assert "手机号码<PHONE>" in text and "身份证号码为<ID_NUMBER>" in text and "办公电话<PHONE>联系" in text
    assert report["pii_redactions"] == {"cn_landline": 1, "cn_mobile": 1, "cn_resident_id": 1, "id_number": 1}


def test_traditional_chinese_is_converted_to_simplified(mixed: tuple[Path, dict[str, Any]]) -> None:
    out, report = mixed
    text = all_text(out)
    assert report["t2s_docs"] == 1
    assert "繁體" not in text and "資料庫" not in text and "开放中文转换工具" in text and "数据库" in text


def test_near_duplicate_chinese_paragraphs_are_found(mixed: tuple[Path, dict[str, Any]]) -> None:
    _, report = mixed
    # the demo corpus's 7th record (8th line here) rewords a few characters of the 6th; to \w+ shingles
    # each of its paragraphs is a single "word"
    assert report["dedup"]["examples"]["near"] == {"s1/zh.jsonl#8": "s1/zh.jsonl#7"}


def test_bad_records_are_quarantined_with_the_reason(mixed: tuple[Path, dict[str, Any]]) -> None:
    out, report = mixed
    assert report["quarantined_records"] == 3
    assert report["quarantined"] == {"data.sources[1]": {"not valid JSON (Expecting property name enclosed in "
                                                         "double quotes)": {"records": 1, "bytes": 22},
                                                         "schema": {"records": 2, "bytes": 95}}}
    quarantined = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert [q["record"] for q in quarantined] == [4, 14, 15]
    assert "not valid JSON" in quarantined[0]["reason"] and quarantined[0]["raw"] == "{this line is not JSON"
    assert quarantined[1]["reason"] == "schema: at text: 42 is not of type 'string'"
    assert "'text' is a required property" in quarantined[2]["reason"]


def test_source_weights_are_honoured_to_within_one_block(mixed: tuple[Path, dict[str, Any]]) -> None:
    out, report = mixed
    train = report["splits"]["train"]
    tok = load_tokenizer(out)
    ids = stream(out, "train")
    # read the packed stream back: documents end in EOS; Chinese ones are the only ones with Han characters
    cuts = np.flatnonzero(ids == tok.eos_token_id)
    pieces = np.split(ids, cuts + 1)
    zh_tokens = sum(len(p) for p in pieces if CJK.search(tok.decode(p.tolist())))
    longest = max(map(len, pieces))  # a source's last document is cut to its share and runs into the next
    total = len(ids)
    assert abs(zh_tokens - 0.8 * total) <= out_block(out) + longest
    natural = train["natural_tokens_per_language"]["zh"] / train["natural_tokens"]
    assert abs(natural - 0.8) > 0.15  # the weights changed the mix
    shares = {k: v / train["tokens"] for k, v in train["tokens_per_source"].items()}
    assert shares == pytest.approx({"0": 0.2, "1": 0.8}, abs=1 / train["tokens"])
    assert train["tokens_per_language"]["zh"] == train["tokens_per_source"]["1"]


def out_block(out: Path) -> int:
    return json.loads((out / "index.json").read_text())["block_size"]


def test_the_split_is_stratified_by_source(mixed: tuple[Path, dict[str, Any]]) -> None:
    _, report = mixed
    per_source: dict[str, int] = {}
    for split in report["splits"].values():
        for source, n in split["docs_per_source"].items():
            per_source[source] = per_source.get(source, 0) + n
    assert per_source == {"0": 16, "1": 11}
    for source, n in per_source.items():
        val, val_test = round(n * 0.1), round(n * 0.2)
        assert report["splits"]["eval"]["docs_per_source"].get(source, 0) == val
        assert report["splits"]["test"]["docs_per_source"].get(source, 0) == val_test - val


def test_repeated_sentences_leave_the_first_document_and_code_alone(tmp_path: Path) -> None:
    notice = "本文件仅供内部培训使用，未经许可不得对外传播。"
    code_line = "        raise ValueError(f'unexpected value {value!r} in the configuration file')"
    root = tmp_path / "c"
    (root / "en").mkdir(parents=True)
    for i in range(3):
        (root / "en" / f"tool{i}.py").write_text(
            f"def check_{i}(value):\n    if value is None:\n{code_line}\n    return value\n\n\n" + english(40 + i, 20))
    records = [{"text": json.loads(line)["text"] + "\n" + notice, "category": "x"}
               for n, line in enumerate(ZH_CORPUS.read_text(encoding="utf-8").splitlines()) if n in (1, 2, 4)]
    (root / "zh.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    out = tmp_path / "out"
    rec = recipe(root, out, eval_fraction=0.0)
    rec.data.sources[0].weight = rec.data.sources[1].weight = None
    report = prepare_data(rec, progress=False).report
    text = all_text(out)
    assert text.count(notice) == 1 and report["dedup"]["sentences"] == {"removed": 2, "docs": 2}
    assert text.count(code_line) == 3


def test_thresholds_per_language_apply_to_that_language_only() -> None:
    rec = parse_recipe(minimal({"sources": [{"path": "."}], "language": {"candidates": ["zh", "en"]},
                                "language_filters": {"zh": {"min_chars": 5000}}}))
    stats = ShardStats(0)
    clean = Cleaner(rec)
    assert clean(ZH_PROSE, stats) is None and clean(english(1), stats) is not None
    assert stats.languages["zh"]["dropped"] == {"too_few_chars": [1, len(normalize(ZH_PROSE).encode())]}
    assert stats.languages["en"]["kept"][0] == 1


@pytest.mark.parametrize(("data", "message"), [
    ({"sources": [{"path": "a", "record_schema": "missing.schema.json"}]},
     r"data.sources.0.record_schema: .*missing.schema.json' does not exist; point record_schema at a JSON Schema"),
    ({"sources": [{"path": "{stdlb}/x"}]}, r"data.sources.0.path: .* has a placeholder other than \{stdlib\}"),
    ({"sources": [{"path": "a", "format": "text", "record_schema": str(ZH_SCHEMA)}]},
     r"data.sources.0: record_schema=.* needs records: format='text' has none"),
    ({"sources": [{"path": "a", "weight": 0.3}, {"path": "b"}]},
     r"data.sources\[0\] have a weight but data.sources\[1\] do not"),
    ({"sources": [{"path": "a"}], "language": {"candidates": ["zh", "xx"]}},
     r"data.language.candidates: unknown language codes \['xx'\]"),
    ({"sources": [{"path": "a"}], "language_filters": {"zh": {"min_chars": -1}}},
     r"language_filters.zh.min_chars: Input should be greater than or equal to 0 \(got -1.0\)"),
    ({"sources": [{"path": "a"}], "eval_fraction": 0.1, "split": {"validation": 0.2}},
     r"eval_fraction=0.1 and split=.* both set the split"),
    ({"sources": [{"path": "a"}], "split": {"by": "category"}}, r"data.split.by: String should match pattern"),
])
def test_bad_data_settings_name_the_field_and_the_fix(data: dict[str, Any], message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        parse_recipe(minimal(data))


def test_an_invalid_schema_is_refused_before_anything_runs(tmp_path: Path) -> None:
    bad = tmp_path / "bad.schema.json"
    bad.write_text(json.dumps({"type": "object", "properties": {"text": {"type": "strnig"}}}))
    with pytest.raises(RecipeError, match=r"data.sources.0.record_schema: .*is not a valid JSON Schema: at "
                                          r"properties/text/type: 'strnig' is not valid"):
        parse_recipe(minimal({"sources": [{"path": str(tmp_path), "record_schema": str(bad)}],
                              "output_dir": str(tmp_path / "out")}))
    assert not (tmp_path / "out").exists()


def test_a_weighted_source_left_empty_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from jobs.recipe import dump_recipe
    from privlm.cli import app

    root = tmp_path / "c"
    (root / "en").mkdir(parents=True)
    for i in range(4):
        (root / "en" / f"doc{i}.txt").write_text(english(i))
    (root / "zh.jsonl").write_text(json.dumps({"text": "太短。", "category": "x"}, ensure_ascii=False) + "\n")
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(dump_recipe(recipe(root, tmp_path / "out")))
    result = CliRunner().invoke(app, ["data", "prepare", str(recipe_file)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert ("data.sources[1].weight=0.8 but the source has no train tokens left after filtering and dedup; remove "
            "its weight or loosen the filters") in result.output
    assert not (tmp_path / "out").exists()
