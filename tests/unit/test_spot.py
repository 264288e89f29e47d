"""The spot watcher against a local IMDSv2 server: tokens required, 404 means no notice, a notice stops once."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from jobs.launch.spot import Notice, SpotWatcher


class FakeIMDS(BaseHTTPRequestHandler):
    notices: ClassVar[dict[str, dict]] = {}
    token = "tok-123"

    def do_PUT(self) -> None:
        ok = self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
        self._send(200 if ok else 400, self.token if ok else "")

    def do_GET(self) -> None:
        if self.headers.get("X-aws-ec2-metadata-token") != self.token:
            return self._send(401, "")
        path = self.path.removeprefix("/latest/meta-data/")
        if path in self.notices:
            return self._send(200, json.dumps(self.notices[path]))
        return self._send(404, "")

    def _send(self, code: int, body: str) -> None:
        self.send_response(code)
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def imds() -> Iterator[tuple[str, type[FakeIMDS]]]:
    FakeIMDS.notices = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeIMDS)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", FakeIMDS
    server.shutdown()


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
