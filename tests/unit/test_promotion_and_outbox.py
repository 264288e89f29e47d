"""Pure parts of the MLOps station with fakes: the promotion gate, the champion history replay, and how the
tracking outbox batches records and delivers them through an outage exactly once, in order."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from jobs.recipe import PromotionPolicy
from mlops import tracking
from mlops.promote import PromotionRefused, champion_stack, gate
from mlops.tracking import MAX_METRICS, MAX_PARAMS, Outbox


def version(v: str, **tags: str) -> SimpleNamespace:
    return SimpleNamespace(name="m", version=v, tags={"eval.dataset": "held-out", **tags})


def test_the_gate_promotes_only_an_improvement_above_the_margin() -> None:
    policy = PromotionPolicy(min_margin=0.5)
    champion = version("1", **{"eval.eval_perplexity": "10.0"})
    ok, why = gate(version("2", **{"eval.eval_perplexity": "9.0"}), champion, policy)
    assert ok and why.endswith("better by 1.0000")
    ok, why = gate(version("3", **{"eval.eval_perplexity": "9.6"}), champion, policy)
    assert not ok and why == ("challenger v3 eval_perplexity=9.6000, champion v1 eval_perplexity=10.0000 (minimize, "
                              "min_margin 0.5): improvement 0.4000 is not above the margin")
    ok, _ = gate(version("4", **{"eval.eval_perplexity": "11.0"}), champion, PromotionPolicy(direction="maximize"))
    assert ok  # a higher number wins when the metric is maximised
    assert gate(version("5", **{"eval.eval_perplexity": "50.0"}), None, policy) == (
        True, "first champion: eval_perplexity=50.0000")


def test_the_gate_refuses_other_eval_data_and_a_lossy_quantization() -> None:
    champion = version("1", **{"eval.eval_perplexity": "10.0"})
    other = version("2", **{"eval.eval_perplexity": "5.0", "eval.dataset": "other"})
    with pytest.raises(PromotionRefused, match="v2 and v1 were evaluated on different data"):
        gate(other, champion, PromotionPolicy())
    lossy = version("3", **{"eval.eval_perplexity": "5.0", "privlm.quantized_from": "m/2",
                            "privlm.quant_scheme": "w4a16", "eval.perplexity_delta": "0.2"})
    ok, why = gate(lossy, champion, PromotionPolicy())
    assert not ok and "perplexity_delta 0.2000 above max_quantized_perplexity_delta 0.05" in why
    of_champion = version("4", **{"eval.eval_perplexity": "10.1", "privlm.quantized_from": "m/1",
                                  "privlm.quant_scheme": "w8a8", "eval.perplexity_delta": "0.01"})
    ok, why = gate(of_champion, champion, PromotionPolicy())
    assert ok and why.startswith("v4 is the champion v1 quantized (w8a8)")


def test_the_champion_is_the_top_of_the_replayed_history() -> None:
    def ev(action: str, v: str, alias: str = "champion") -> dict[str, str]:
        return {"action": action, "alias": alias, "version": v}

    history = [ev("promote", "1"), ev("promote", "5", "challenger"), ev("promote", "2"), ev("promote", "3"),
               ev("rollback", "2"), ev("promote", "4"), ev("rollback", "3"), ev("rollback", "1")]
    assert champion_stack(history) == ["1"]
    assert champion_stack(history[:6]) == ["1", "2", "4"]
    assert champion_stack([ev("rollback", "1")]) == []  # a rollback with nothing to pop changes nothing


def lines(*records: dict[str, Any]) -> list[bytes]:
    return [(json.dumps(r) + "\n").encode() for r in records]


def metrics(n: int, step: int = 1) -> dict[str, Any]:
    return {"kind": "metrics", "time_ms": 0, "step": step, "data": {f"m{i}": 1.0 for i in range(n)}}


def test_batches_respect_mlflows_limits_per_kind_and_a_status_goes_alone() -> None:
    recs = lines(metrics(400), metrics(400), metrics(400), {"kind": "params", "data": {"a": "1"}},
                 {"kind": "status", "status": "FINISHED"}, metrics(1))
    batch, size = Outbox._take_batch(recs, 0)
    assert [len(r["data"]) for r in batch] == [400, 400] and size == len(recs[0]) + len(recs[1])
    batch, _ = Outbox._take_batch(recs, 2)
    assert [r["kind"] for r in batch] == ["metrics", "params"]  # params count apart from metrics
    assert Outbox._take_batch(recs, 4) == ([{"kind": "status", "status": "FINISHED"}], len(recs[4]))
    assert [r["kind"] for r in Outbox._take_batch(recs, 5)[0]] == ["metrics"]
    params = lines(*({"kind": "params", "data": {f"p{j}-{i}": "v" for i in range(60)}} for j in range(2)))
    assert len(Outbox._take_batch(params, 0)[0]) == 1  # 120 params would pass MAX_PARAMS
    assert MAX_METRICS == 1000 and MAX_PARAMS == 100


class FakeMlflow:
    """log_batch / update_run / create_run as MlflowClient has them; fails while `down` is set."""

    def __init__(self) -> None:
        self.down = threading.Event()
        self.calls: list[tuple[str, Any]] = []

    def create_run(self, experiment: str, run_name: str) -> SimpleNamespace:
        return SimpleNamespace(info=SimpleNamespace(run_id="run-1"))

    def log_batch(self, run_id: str, metrics: list, params: list, tags: list) -> None:
        if self.down.is_set():
            raise ConnectionError("server down")
        assert len(metrics) <= MAX_METRICS and len(params) <= MAX_PARAMS
        self.calls.append(("batch", [(m.key, m.step) for m in metrics]))

    def update_run(self, run_id: str, status: str) -> None:
        if self.down.is_set():
            raise ConnectionError("server down")
        self.calls.append(("status", status))


def test_the_outbox_delivers_every_record_once_in_order_through_an_outage(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeMlflow()
    monkeypatch.setattr(tracking, "client", lambda uri=None: fake)
    monkeypatch.setattr(tracking, "experiment_id", lambda mlflow_client, name: "0")
    fake.down.set()
    box = Outbox(tmp_path, "http://mlflow", "exp", "run", interval_s=0.05)
    for step in range(1, 1201):
        box.put("metrics", step=step, data={"loss": 1.0 / step})
    box.put("status", status="FINISHED")
    assert not box.deliver() and "server down" in (box.last_error or "")
    assert box.pending() == 1201 and fake.calls == []
    fake.down.clear()
    assert box.close(timeout_s=30)
    sent = [s for kind, batch in fake.calls if kind == "batch" for s in batch]
    assert sent == [("loss", step) for step in range(1, 1201)]  # each once, in order
    assert all(len(batch) <= MAX_METRICS for kind, batch in fake.calls if kind == "batch")
    assert fake.calls[-1] == ("status", "FINISHED") and box.state() == {"run_id": "run-1",
                                                                          "offset": box.path.stat().st_size}
