"""The spot watcher against a local IMDSv2 server: tokens required, 404 means no notice, a notice stops once."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from jobs.launch.spot import Notice, SpotWatcher
from tests.helpers import FakeIMDS, fake_imds


@pytest.fixture
def imds() -> Iterator[tuple[str, type[FakeIMDS]]]:
    with fake_imds() as url:
        yield url, FakeIMDS


def test_no_notice_then_instance_action(imds) -> None:
    url, handler = imds
    watcher = SpotWatcher(lambda n: None, url)
    assert watcher.check() is None
    handler.notices["spot/instance-action"] = {"action": "terminate", "time": "2026-11-22T12:00:00Z"}
    assert watcher.check() == Notice("instance-action", {"action": "terminate", "time": "2026-11-22T12:00:00Z"})


def test_rebalance_recommendation(imds) -> None:
    url, handler = imds
    handler.notices["events/recommendations/rebalance"] = {"noticeTime": "2026-11-22T12:00:00Z"}
    assert SpotWatcher(lambda n: None, url).check().kind == "rebalance"
    assert SpotWatcher(lambda n: None, url, include_rebalance=False).check() is None


def test_background_watcher_calls_back_once(imds) -> None:
    url, handler = imds
    seen: list[Notice] = []
    done = threading.Event()
    watcher = SpotWatcher(lambda n: (seen.append(n), done.set()), url, poll_s=0.05).start()
    handler.notices["spot/instance-action"] = {"action": "stop"}
    assert done.wait(5)
    watcher.stop()
    assert [n.kind for n in seen] == ["instance-action"]


def test_unreachable_endpoint_keeps_polling_without_a_notice() -> None:
    watcher = SpotWatcher(lambda n: None, "http://127.0.0.1:9", poll_s=0.05).start()
    threading.Event().wait(0.3)
    watcher.stop()
    assert watcher.unreachable and watcher.notice is None
