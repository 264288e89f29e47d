"""Chat and preference data: records checked and skipped with counts, the chat template saved with the
tokenizer, assistant-only labels, packing with reset positions, and the round trip through get_batch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jobs.data.chat import (
    DEFAULT_CHAT_TEMPLATE,
    RecordError,
    parse_chat,
    parse_preference,
    set_chat_template,
    tokenize_chat,
)
from jobs.data.pack import IGNORE, PackedDataset, load_tokenizer
from jobs.data.pipeline import prepare_data
from jobs.data.tokenizer import train_tokenizer
from jobs.recipe import RecipeError, parse_recipe

CORPUS = ["What is 2 plus 3? 2 + 3 = 5. The answer is five. 你好，世界。谢谢。", "Python len() returns the count."]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(iter(CORPUS * 20), vocab_size=320, min_frequency=2, out_dir=out)
    return out


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n" for x in lines),
                    encoding="utf-8")
    return path


def recipe_for(tmp: Path, tok: Path, fmt: str, sources: list[dict[str, Any]], length: int = 64, **chat: Any) -> Any:
    return parse_recipe({
        "name": f"t-{fmt}", "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2,
                                      "max_position_embeddings": 128},
        "tokenizer": {"path": str(tok)},
        "data": {"format": fmt, "sources": sources, "output_dir": str(tmp / "out"), "chat": chat},
        "training": {"sequence_length": length, "max_steps": 2, "warmup_steps": 0},
        **({"finetune": {"method": "dpo", "base": str(tok)}} if fmt == "preference" else {}),
    })


CHAT_OK = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 3?"},
                  {"role": "assistant", "content": "2 + 3 = 5."}]},
    {"prompt": "你好", "response": "你好，世界。"},
    {"messages": [{"role": "user", "content": "len?"}, {"role": "assistant", "content": "The count."},
                  {"role": "user", "content": "And 2 plus 3?"}, {"role": "assistant", "content": "five"}]},
]
CHAT_BAD = [
    '{"messages": [{"role": "user", "content": "hi"}',                                       # invalid JSON
    {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},  # unknown role
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},  # empty turn
    {"messages": [{"role": "user", "content": "hi"}]},                                         # no assistant
    {"prompt": "What is 2 plus 3? " * 20, "response": "five"},                                 # too long
    CHAT_OK[1],                                                                                # duplicate
]


def test_chat_records_are_checked_and_bad_ones_counted(tmp_path: Path, tokenizer_dir: Path) -> None:
    src = write_jsonl(tmp_path / "chat.jsonl", CHAT_OK + CHAT_BAD)
    held = write_jsonl(tmp_path / "held.jsonl", [CHAT_OK[0] | {"messages": CHAT_OK[0]["messages"][1:]}])
    recipe = recipe_for(tmp_path, tokenizer_dir, "chat", [{"path": str(src), "split": "train"},
                                                          {"path": str(held), "split": "eval"}])
    result = prepare_data(recipe, progress=False)
    records = result.report["records"]
    assert records["read"] == 10 and records["kept"] == 4
    assert records["skipped"] == {"invalid JSON": 1, "unknown role": 1, "empty assistant turn": 1,
                                  "no assistant turn": 1, "longer than training.sequence_length": 1, "duplicate": 1}
    quarantined = [json.loads(x) for x in (result.output_dir / "quarantine.jsonl").read_text().splitlines()]
    assert sorted(q["reason"] for q in quarantined) == sorted(records["skipped"])
    manifest = json.loads((result.output_dir / "manifest.json").read_text())
    assert manifest["skipped"] == records["skipped"] and manifest["data_format"] == "chat"
    assert prepare_data(recipe, progress=False).skipped  # unchanged inputs: up to date


def test_prepared_chat_round_trips_through_get_batch(tmp_path: Path, tokenizer_dir: Path) -> None:
    src = write_jsonl(tmp_path / "chat.jsonl", CHAT_OK)
    recipe = recipe_for(tmp_path, tokenizer_dir, "chat", [{"path": str(src), "split": "train"}])
    out = prepare_data(recipe, progress=False).output_dir
    ds = PackedDataset(out)
    tok = load_tokenizer(out)
    assert ds.format == "chat" and len(ds) >= 1
    batch = ds.get_batch(np.arange(len(ds)))
    assert set(batch) == {"input_ids", "labels", "position_ids", "segment_ids"}
    assert np.array_equal(batch["input_ids"], ds.get_blocks(np.arange(len(ds))))
    trained, texts = [], []
    for row in range(len(ds)):
        ids, labels, pos, seg = (batch[k][row] for k in ("input_ids", "labels", "position_ids", "segment_ids"))
        for s in np.unique(seg[seg > 0]):
            where = np.nonzero(seg == s)[0]
            assert np.array_equal(pos[where], np.arange(len(where)))  # positions restart in each sample
            texts.append(tok.decode(ids[where]))
        assert np.all(labels[seg == 0] == IGNORE)  # padding is never trained on
        trained.append(tok.decode(ids[labels != IGNORE]))
    eos = tok.eos_token
    assert "".join(trained) == f"2 + 3 = 5.{eos}你好，世界。{eos}The count.{eos}five{eos}"
    assert texts[0] == tok.apply_chat_template(CHAT_OK[0]["messages"], tokenize=False)
    padded = ds.get_batch([-1])
    assert np.all(padded["labels"] == IGNORE) and padded["input_ids"].shape == (1, ds.block_size)


def test_samples_pack_into_blocks_and_are_not_split(tmp_path: Path, tokenizer_dir: Path) -> None:
    records = [{"prompt": f"What is {i} plus 3?", "response": f"{i} + 3 = {i + 3}."} for i in range(30)]
    src = write_jsonl(tmp_path / "chat.jsonl", records)
    recipe = recipe_for(tmp_path, tokenizer_dir, "chat", [{"path": str(src), "split": "train"}], length=128)
    out = prepare_data(recipe, progress=False).output_dir
    ds = PackedDataset(out)
    seg = ds.get_batch(np.arange(len(ds)))["segment_ids"]
    assert seg.max() > 1  # several samples share a block
    assert int(sum(len(np.unique(r[r > 0])) for r in seg)) == 30  # every sample whole, in exactly one block
    index = json.loads((out / "index.json").read_text())
    assert index["format"] == "chat" and index["arrays"] == {"file": "uint16", "mask": "uint8",
                                                             "segments": "uint16"}
    entry = index["splits"]["train"][0]
    assert (out / entry["mask"]).stat().st_size == entry["blocks"] * 128
    (out / entry["segments"]).write_bytes(b"\0")
    with pytest.raises(OSError, match="--force"):
        PackedDataset(out).get_batch([0])


def test_long_samples_are_truncated_when_the_recipe_says_so(tmp_path: Path, tokenizer_dir: Path) -> None:
    src = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "hi", "response": "The answer is five. " * 30},
                                                {"prompt": "What is 2 plus 3? " * 30, "response": "five"}])
    recipe = recipe_for(tmp_path, tokenizer_dir, "chat", [{"path": str(src), "split": "train"}], truncate=True)
    report = prepare_data(recipe, progress=False).report
    assert report["records"]["kept"] == 1  # the second loses its whole answer to the cut
    assert report["records"]["skipped"] == {"no assistant tokens within training.sequence_length": 1}
    assert report["splits"]["train"]["tokens"] == 64


def test_preference_pairs_round_trip_and_bad_pairs_are_skipped(tmp_path: Path, tokenizer_dir: Path) -> None:
    pairs = [{"prompt": "What is 2 plus 3?", "chosen": "2 + 3 = 5.", "rejected": "2 + 3 = 6."},
             {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"}],
              "chosen": [{"role": "assistant", "content": "你好，世界。"}], "rejected": "Python"},
             {"prompt": "What is 2 plus 3?", "chosen": "five"},                     # no rejected
             {"prompt": "hi", "chosen": "five", "rejected": "five"},                # no preference
             {"prompt": [{"role": "wizard", "content": "hi"}], "chosen": "a", "rejected": "b"},
             {"chosen": "a", "rejected": "b"}]
    src = write_jsonl(tmp_path / "pref.jsonl", pairs)
    recipe = recipe_for(tmp_path, tokenizer_dir, "preference", [{"path": str(src), "split": "train"}])
    result = prepare_data(recipe, progress=False)
    assert result.report["records"]["skipped"] == {"missing rejected": 1, "chosen equals rejected": 1,
                                                   "unknown role": 1, "missing prompt": 1}
    ds = PackedDataset(result.output_dir)
    tok = load_tokenizer(result.output_dir)
    assert ds.format == "preference" and len(ds) == 2
    batch = ds.get_batch([0, 1])
    assert set(batch) == {f"{side}_{k}" for side in ("chosen", "rejected")
                          for k in ("input_ids", "labels", "position_ids", "segment_ids")}
    eos = tok.eos_token
    answers = [[tok.decode(batch[f"{side}_input_ids"][i][batch[f"{side}_labels"][i] != IGNORE]) for i in (0, 1)]
               for side in ("chosen", "rejected")]
    assert answers == [[f"2 + 3 = 5.{eos}", f"你好，世界。{eos}"], [f"2 + 3 = 6.{eos}", f"Python{eos}"]]
    for side in ("chosen", "rejected"):  # one sequence per row, right-padded, positions from 0
        seg = batch[f"{side}_segment_ids"]
        assert set(np.unique(seg)) == {0, 1} and np.all(seg[:, 0] == 1)
        assert np.array_equal(batch[f"{side}_position_ids"][seg == 1], np.concatenate(
            [np.arange(n) for n in (seg == 1).sum(1)]))
    prompt = tok.apply_chat_template(pairs[1]["prompt"], tokenize=False, add_generation_prompt=True)
    assert tok.decode(batch["chosen_input_ids"][1][batch["chosen_segment_ids"][1] == 1]).startswith(prompt)


def test_all_records_rejected_names_the_file_and_the_fix(tmp_path: Path, tokenizer_dir: Path) -> None:
    src = write_jsonl(tmp_path / "bad.jsonl", ["not json", {"text": "plain text"}])
    recipe = recipe_for(tmp_path, tokenizer_dir, "chat", [{"path": str(src)}])
    with pytest.raises(ValueError, match=r"none of the 2 records in .*bad\.jsonl.*invalid JSON: 1.*\"messages\""):
        prepare_data(recipe, progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_the_default_template_is_saved_and_reloads(tmp_path: Path, tokenizer_dir: Path) -> None:
    src = write_jsonl(tmp_path / "chat.jsonl", CHAT_OK)
    recipe = recipe_for(tmp_path, tokenizer_dir, "chat", [{"path": str(src), "split": "train"}])
    report = prepare_data(recipe, progress=False).report
    assert report["tokenizer"]["chat_template"] == "privlm default"
    saved = tmp_path / "out" / "tokenizer"
    assert (saved / "chat_template.jinja").read_text() == DEFAULT_CHAT_TEMPLATE
    tok = load_tokenizer(tmp_path / "out")
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>\nhi<|endoftext|>\n<|assistant|>\n"
    # a tokenizer that has a template keeps it (the base model's, as serving expects)
    assert set_chat_template(tok) == "tokenizer" and tok.chat_template == DEFAULT_CHAT_TEMPLATE
    custom = tmp_path / "t.jinja"
    custom.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    assert set_chat_template(tok, custom).startswith("file")
    custom.write_text("{% for m in messages %}")
    with pytest.raises(ValueError, match=r"data\.chat\.template"):
        set_chat_template(tok, custom)


def test_templates_without_generation_blocks_get_the_same_mask(tokenizer_dir: Path) -> None:
    """The fallback (render up to each turn) marks what transformers' {% generation %} mechanism marks."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    messages = CHAT_OK[2]["messages"]
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    ids, mask = tokenize_chat(tok, messages)
    tok.chat_template = DEFAULT_CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    ids2, mask2 = tokenize_chat(tok, messages)
    assert np.array_equal(ids, ids2) and np.array_equal(mask, mask2) and mask.sum() > 0


@pytest.mark.parametrize(("record", "reason"), [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "system message not first"),
    ({"messages": "hi"}, "messages is not a non-empty list"),
    ({"prompt": "hi"}, "missing response"),
    ([1, 2], "record is not an object"),
])
def test_chat_record_reasons(record: Any, reason: str) -> None:
    with pytest.raises(RecordError, match=reason):
        parse_chat(record)


def test_preference_prompt_must_not_end_with_the_answer() -> None:
    with pytest.raises(RecordError, match="prompt ends with an assistant turn"):
        parse_preference({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                          "chosen": "x", "rejected": "y"})


def test_recipe_checks_the_data_format(tmp_path: Path, tokenizer_dir: Path) -> None:
    base = {"name": "t", "data": {"format": "chat", "sources": [{"path": str(tmp_path)}]},
            "training": {"max_steps": 2, "warmup_steps": 0}}
    with pytest.raises(RecipeError, match=r"needs tokenizer\.path"):
        parse_recipe(base)
    text = {**base, "data": {"sources": [{"path": str(tmp_path), "split": "eval"}]}}
    with pytest.raises(RecipeError, match="only chat and preference data take"):
        parse_recipe(text)
    with pytest.raises(RecipeError, match=r"data\.format"):
        parse_recipe({**base, "data": {"format": "dialogue", "sources": [{"path": str(tmp_path)}]}})
    missing = {**base, "tokenizer": {"path": str(tokenizer_dir)},
               "data": {**base["data"], "chat": {"template": str(tmp_path / "none.jinja")}}}
    with pytest.raises(RecipeError, match=r"data\.chat\.template"):
        parse_recipe(missing)
