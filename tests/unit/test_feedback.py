"""The feedback store and the A/B statistics on it (real SQLite, real scipy)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from jobs.recipe import ABPolicy
from mlops.compare import compare_scores, compare_versions, min_sample_size
from mlops.feedback import FeedbackError, FeedbackStore, score_of
from mlops.registry import RegistryError
from serving.api import ApiError, FeedbackRequest, parse


def store(tmp_path: Path) -> FeedbackStore:
    return FeedbackStore(f"sqlite:///{tmp_path / 'sub' / 'feedback.db'}")


def answer(s: FeedbackStore, id: str, version: str, arm: str = "champion") -> None:
    s.record(id=id, model="m", version=version, arm=arm, endpoint="chat", caller="key-1", prompt="p " + id,
             completion="c " + id)


def test_a_rated_answer_keeps_its_version_arm_and_latest_rating(tmp_path: Path) -> None:
    s = store(tmp_path)
    answer(s, "a1", "m/v1")
    answer(s, "a2", "m/v2", "challenger")
    answer(s, "a3", "m/v2", "challenger")  # never rated
    s.add("a1", 0.0, "key-1")
    s.add("a1", 1.0, "key-1", correction="better")  # rated again: the latest counts
    s.add("a2", 0.25, "key-2")
    rated = {r.id: r for r in FeedbackStore(s.engine.url.render_as_string()).rated("m")}  # reopened: durable
    assert set(rated) == {"a1", "a2"}
    assert (rated["a1"].score, rated["a1"].correction, rated["a1"].version) == (1.0, "better", "m/v1")
    assert (rated["a2"].arm, rated["a2"].completion) == ("challenger", "c a2")
    assert [r.id for r in s.rated("m", ["m/v2"])] == ["a2"]


def test_feedback_for_an_unknown_answer_and_a_bad_url_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FeedbackError, match="id='nope'"):
        store(tmp_path).add("nope", 1.0, "key-1")
    with pytest.raises(FeedbackError, match=r"feedback\.url='nowhere'"):
        FeedbackStore("nowhere")


def test_ratings_on_one_scale() -> None:
    assert [score_of(rating=r) for r in (1, 3, 5)] == [0.0, 0.5, 1.0]
    assert (score_of(thumbs="up"), score_of(thumbs="down"), score_of(score=0.7)) == (1.0, 0.0, 0.7)


@pytest.mark.parametrize("body, param", [
    (b'{"id": "x"}', None), (b'{"id": "x", "rating": 6}', "rating"), (b'{"id": "x", "thumbs": "meh"}', "thumbs"),
    (b'{"id": "x", "rating": 5, "thumbs": "up"}', None), (b'{"rating": 5}', "id"),
    (b'{"id": "x", "score": 1, "extra": 1}', "extra")])
def test_bad_feedback_gets_a_400_naming_the_field(body: bytes, param: str | None) -> None:
    with pytest.raises(ApiError) as err:
        parse(body, FeedbackRequest)
    assert err.value.status == 400 and err.value.param == param


def test_min_sample_size_is_the_normal_approximation() -> None:
    # 2 * ((z_0.975 + z_0.8) / 0.5)^2 = 62.8
    assert min_sample_size(ABPolicy(alpha=0.05, power=0.8, min_effect=0.5)) == 63


def test_welch_test_matches_scipy_and_decides_only_with_enough_data() -> None:
    from scipy.stats import ttest_ind

    rng = random.Random(0)
    policy = ABPolicy(min_effect=0.8)  # 25 per arm
    worse = [min(1.0, max(0.0, rng.gauss(0.5, 0.2))) for _ in range(40)]
    better = [min(1.0, max(0.0, rng.gauss(0.8, 0.2))) for _ in range(40)]
    c = compare_scores(("m/v1", worse), ("m/v2", better), policy)
    assert c.p_value == pytest.approx(ttest_ind(better, worse, equal_var=False).pvalue)
    assert c.min_n == 25 and c.challenger_wins and c.effect_size > 1
    few = compare_scores(("m/v1", worse[:10]), ("m/v2", better[:10]), policy)
    assert few.significant and not few.enough_data and not few.challenger_wins
    assert "not enough data: 25" in few.verdict()
    same = compare_scores(("m/v1", worse), ("m/v2", [min(1.0, max(0.0, rng.gauss(0.5, 0.2))) for _ in range(40)]),
                          policy)
    assert not same.challenger_wins and "not significant" in same.verdict()
    loses = compare_scores(("m/v1", better), ("m/v2", worse), policy)
    assert loses.significant and not loses.challenger_wins and "the champion is significantly better" in loses.verdict()


def test_compare_reads_the_store_and_says_when_nothing_is_rated(tmp_path: Path) -> None:
    s = store(tmp_path)
    with pytest.raises(RegistryError, match="no rated answers"):
        compare_versions(s, "m", "m/v1", "m/v2", ABPolicy())
    for i in range(30):
        answer(s, f"c{i}", "m/v1")
        answer(s, f"h{i}", "m/v2", "challenger")
        s.add(f"c{i}", 0.0 if i % 3 else 1.0, "k")
        s.add(f"h{i}", 1.0 if i % 5 else 0.0, "k")
    c = compare_versions(s, "m", "m/v1", "m/v2", ABPolicy(min_effect=0.8))
    assert (c.champion.n, c.challenger.n) == (30, 30)
    assert c.champion.mean == pytest.approx(10 / 30) and c.challenger.mean == pytest.approx(24 / 30)
    assert c.challenger_wins


def test_export_keeps_well_rated_answers_redacted_and_deduplicated(tmp_path: Path) -> None:
    import json

    from mlops.loop import Trigger, due, export_feedback

    s = store(tmp_path)
    rows = [("good", "write me a mail to bob@example.com", "Dear Bob, see you at 10.", 1.0, None),
            ("fixed", "capital of France?", "Lyon", 0.0, None),
            ("bad", "2+2?", "5", 0.0, None),
            ("dup", "write me a mail to bob@example.com", "Dear Bob, see you at 10.", 1.0, None),
            ("known", "print hello", "print('hello')", 1.0, None)]
    for id, prompt, completion, score, _ in rows:
        s.record(id=id, model="m", version="m/v1", arm="champion", endpoint="chat", caller="k", prompt=prompt,
                 completion=completion)
        s.add(id, score, "k")
    s.add("fixed", 1.0, "k", correction="Paris")  # the user's correction replaces the answer
    training = tmp_path / "train"
    training.mkdir()
    (training / "seen.txt").write_text("print hello print('hello')")
    report = export_feedback(s, "m", tmp_path / "out" / "feedback.jsonl", against=[training])
    records = [json.loads(line) for line in report.path.read_text().splitlines()]
    assert [r["id"] for r in records] == ["good", "fixed"]
    assert "bob@example.com" not in records[0]["text"] and report.redactions == {"email": 1}
    assert records[1]["response"] == "Paris"
    assert (report.considered, report.below_score, report.duplicates, report.kept) == (5, 1, 2, 2)
    assert due(Trigger(feedback_count=5), s, "m", None) == "5 rated answers since the last retraining (trigger: 5)"
    assert due(Trigger(feedback_count=6), s, "m", None) is None
    assert due(Trigger(drift=True), s, "m", None, drifted=True) == "output drift above its threshold"


def test_kl_divergence_and_histogram_bins() -> None:
    import math

    from mlops.drift import _bins, kl

    same = {"a": 30.0, "b": 70.0}
    assert kl(same, same) == 0.0
    p, q = {"a": 50.0, "b": 50.0}, {"a": 90.0, "b": 10.0}
    pa, pb, qa, qb = 50.5 / 101, 50.5 / 101, 90.5 / 101, 10.5 / 101
    assert kl(p, q) == pytest.approx(pa * math.log(pa / qa) + pb * math.log(pb / qb))
    assert kl({"new": 100.0}, {"old": 100.0}) > 3  # disjoint: large, finite
    assert _bins({"1": 2.0, "4": 5.0, "+Inf": 9.0}) == {"1": 2.0, "4": 3.0, "+Inf": 4.0}
