"""Exact and near-duplicate detection: planted duplicates found, distinct texts kept, the first one wins."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jobs.data.dedup import MinHasher, exact_duplicates, exact_key, jaccard_estimate, near_duplicates, shingles

HASHER = MinHasher(num_perm=128, shingle_size=5)


def article(seed: int, words: int = 300) -> str:
    rng = random.Random(seed)
    vocab = [f"w{rng.randrange(5000)}" for _ in range(2000)]
    return " ".join(rng.choice(vocab) for _ in range(words))


def edit(text: str, changes: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = text.split()
    for _ in range(changes):
        words[rng.randrange(len(words))] = "changed"
    return " ".join(words)


def signatures(texts: list[str]) -> np.ndarray:
    return np.stack([HASHER.signature(t) for t in texts])


def test_exact_key_and_exact_duplicates_keep_the_first() -> None:
    assert exact_key("a b") == exact_key("a b") != exact_key("a  b")
    ids = ["a", "b", "c", "d"]
    keys = [exact_key(t) for t in ("x", "y", "x", "x")]
    assert exact_duplicates(ids, keys) == {"c": "a", "d": "a"}


def test_shingles() -> None:
    assert shingles("One two, three four", 2) == {b"one two", b"two three", b"three four"}
    assert shingles("short", 5) == {b"short"}


def test_signatures_are_stable_across_instances() -> None:
    text = article(1)
    assert np.array_equal(HASHER.signature(text), MinHasher(128, 5).signature(text))
    assert HASHER.signature(text).dtype == np.uint32 and HASHER.signature(text).shape == (128,)


def test_near_duplicates_found_and_distinct_kept() -> None:
    base = [article(i) for i in range(20)]
    docs = {f"doc{i:02d}": t for i, t in enumerate(base)}
    docs["doc50-near-of-03"] = edit(base[3], 3)  # a few words changed
    docs["doc51-near-of-07"] = edit(base[7], 2, seed=1)
    docs["doc52-far-from-09"] = edit(base[9], 150, seed=2)  # half the words changed: a different text
    ids = sorted(docs)
    dropped = near_duplicates(ids, signatures([docs[i] for i in ids]), threshold=0.8)
    assert dropped == {"doc50-near-of-03": "doc03", "doc51-near-of-07": "doc07"}


def test_first_in_order_is_kept_whatever_the_input_order() -> None:
    text = article(42)
    copy = edit(text, 2)
    assert near_duplicates(["a", "b"], signatures([text, copy]), 0.8) == {"b": "a"}
    assert near_duplicates(["a", "b"], signatures([copy, text]), 0.8) == {"b": "a"}


def test_documents_are_compared_with_kept_ones_only() -> None:
    words = article(7).split()
    a = " ".join(words)
    one, two = [f"new{i}" for i in range(20)], [f"other{i}" for i in range(20)]
    b = " ".join(words[:50] + one + words[70:])  # Jaccard about 0.85 with a
    c = " ".join(words[:50] + one + words[70:200] + two + words[220:])  # 0.85 with b, 0.72 with a
    hasher = MinHasher(num_perm=256, shingle_size=5)
    sigs = np.stack([hasher.signature(t) for t in (a, b, c)])
    assert near_duplicates(["a", "b", "c"], sigs, 0.8) == {"b": "a"}  # c's only near twin, b, was dropped


def test_empty_input() -> None:
    assert near_duplicates([], np.empty((0, 128), dtype=np.uint32), 0.8) == {}


# --- CJK shingles and the bucketed global pass ------------------------------------------------------------------
ZH = ("数据平台团队通常先做一次盘点，列出每个来源的负责人、更新频率和保密等级，再决定哪些数据可以进入训练集。"
      "没有这一步，后面的清洗、去重和脱敏都无从谈起。盘点完成以后，团队会为每个来源写一个读取器，把原始文件统一"
      "转换成每行一条记录的格式，记录里保留来源、路径和更新时间，方便以后追溯。读取器要能够重复运行，同样的输入"
      "必须得到同样的输出，这样才能在出问题时重新构建数据集。")


def zh_edit(text: str, changes: int, seed: int) -> str:
    rng = random.Random(seed)
    chars = list(text)
    for _ in range(changes):
        chars[rng.randrange(len(chars))] = rng.choice("甲乙丙丁戊己庚辛")
    return "".join(chars)


def zh_article(seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.sample(ZH, len(ZH)))


def test_chinese_text_gets_character_shingles() -> None:
    expected = ("我 们", "们 在", "在 北", "北 京", "京 hello", "hello world")
    assert shingles("我们在北京 hello world", 2) == {s.encode() for s in expected}
    assert len(shingles(ZH, 5)) > 150  # to \w+ each clause would be one word
    near = jaccard_estimate(HASHER.signature(ZH), HASHER.signature(zh_edit(ZH, 3, 1)))
    unrelated = jaccard_estimate(HASHER.signature(ZH), HASHER.signature(zh_article(2)))
    assert near >= 0.8 > 0.2 > unrelated


def corpus(root: Path) -> Path:
    """English and Chinese documents with planted near duplicates, chains and exact copies."""
    docs = root / "docs"
    docs.mkdir(parents=True)
    texts = {f"en{i:02d}.txt": article(i) for i in range(14)}
    texts.update({f"zh{i:02d}.txt": zh_article(100 + i) for i in range(8)})
    texts["zz-en03-near.txt"] = edit(texts["en03.txt"], 2, 1)
    texts["zz-en03-near-again.txt"] = edit(texts["en03.txt"], 3, 2)
    texts["zz-en05-far.txt"] = edit(texts["en05.txt"], 60, 3)
    texts["zz-zh01-near.txt"] = zh_edit(texts["zh01.txt"], 2, 4)
    texts["zz-zh02-copy.txt"] = texts["zh02.txt"]
    texts["zz-zh02-copy-near.txt"] = zh_edit(texts["zh02.txt"], 1, 5)
    for name, text in texts.items():
        (docs / name).write_text(text + "\n")
    return docs


def prepared_decisions(docs: Path, work: Path, shards: int, exact: bool) -> tuple[dict[str, int], Any]:
    from jobs.data.buckets import dedup_bucket
    from jobs.data.merge import deduplicate
    from jobs.data.pipeline import plan_shards
    from jobs.data.shard import process_shard, shard_dir
    from jobs.recipe import parse_recipe

    recipe = parse_recipe({"name": "d", "data": {
        "sources": [{"path": str(docs)}], "output_dir": str(work / "out"), "num_shards": shards, "workers": 1,
        "dedup": {"exact": exact, "threshold": 0.7},
        "filters": {"min_chars": 10, "min_words": 5, "min_alpha_word_fraction": 0.0, "max_top_ngram_fraction": 1.0}},
        "training": {"max_steps": 2, "warmup_steps": 1}})
    plan = plan_shards(recipe)
    for s in range(shards):
        process_shard(recipe, s, plan.work_dir)
    for b in range(shards):
        dedup_bucket(recipe, b, plan.work_dir)
    deduplicate(recipe, plan.work_dir)
    out = {}
    for s in range(shards):
        meta = json.loads((shard_dir(plan.work_dir, s) / "clean" / "meta.json").read_text())
        decision = np.load(shard_dir(plan.work_dir, s) / "decision.npy")
        out.update({doc_id: int(d) for doc_id, d in zip(meta["ids"], decision, strict=True)})
    return out, (recipe, plan.work_dir)


def reference_near(recipe: Any, work: Path) -> set[str]:
    """near_duplicates (datasketch's LSH index in one process) over every signature of the work directory."""
    from jobs.data.shard import shard_dir

    rows = []
    for s in range(recipe.data.num_shards):
        meta = json.loads((shard_dir(work, s) / "clean" / "meta.json").read_text())
        sigs = np.load(shard_dir(work, s) / "clean" / "minhash.npy")
        rows += [(tuple(o), i, sha, sig) for o, i, sha, sig in zip(meta["orders"], meta["ids"], meta["sha"], sigs,
                                                                    strict=True)]
    rows.sort(key=lambda r: r[0])
    if recipe.data.dedup.exact:
        dropped = exact_duplicates([r[1] for r in rows], [r[2] for r in rows])
        rows = [r for r in rows if r[1] not in dropped]
    return set(near_duplicates([r[1] for r in rows], np.stack([r[3] for r in rows]), recipe.data.dedup.threshold))


@pytest.mark.parametrize("exact", [True, False])
def test_bucketed_near_dedup_matches_the_one_process_reference(tmp_path: Path, exact: bool) -> None:
    docs = corpus(tmp_path)
    one, _ = prepared_decisions(docs, tmp_path / "one", 1, exact)
    three, (recipe, work) = prepared_decisions(docs, tmp_path / "three", 3, exact)
    assert one == three  # the same decisions whatever the number of shards and buckets
    near = {doc_id for doc_id, d in three.items() if d == -2}
    assert near == reference_near(recipe, work)
    expected = {"s0/zz-en03-near.txt", "s0/zz-en03-near-again.txt", "s0/zz-zh01-near.txt",
                "s0/zz-zh02-copy-near.txt"}
    assert near == (expected if exact else expected | {"s0/zz-zh02-copy.txt"})
    assert three["s0/zz-en05-far.txt"] >= 0
