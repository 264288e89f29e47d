"""Our Alertmanager webhook receiver: real HTTP and SMTP servers on loopback receive what it formats."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from email import message_from_bytes
from typing import Any

import pytest

from mlops.alerts import ReceiverConfigError, dingtalk_signed_url, make_server, parse_receivers
from tests.integration.monitoring_fixture import capture_server, free_port

PAYLOAD = {  # Alertmanager's webhook JSON (version 4)
    "version": "4", "status": "firing", "receiver": "x", "groupKey": "{}:{alertname=\"PrivlmCheckpointStale\"}",
    "commonLabels": {"alertname": "PrivlmCheckpointStale", "severity": "warning"},
    "externalURL": "http://127.0.0.1:9093",
    "alerts": [{"status": "firing", "labels": {"alertname": "PrivlmCheckpointStale", "severity": "warning",
                                               "run": "llama-1b"},
                "annotations": {"summary": "Run llama-1b has not checkpointed for 2h"}}],
}


@pytest.fixture(scope="module")
def receiver() -> Iterator[dict[str, Any]]:
    """Our receiver with one receiver of each kind, pointing at capture servers and an aiosmtpd server
    (one per module: each test posts to its own kinds)."""
    from aiosmtpd.controller import Controller

    captured: dict[str, list] = {"slack": [], "dingtalk": [], "email": []}
    slack, ding = capture_server(captured["slack"]), capture_server(captured["dingtalk"])

    class Mail:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            captured["email"].append((envelope.rcpt_tos, message_from_bytes(envelope.content)))
            return "250 OK"

    smtp = Controller(Mail(), hostname="127.0.0.1", port=free_port())
    smtp.start()
    receivers = parse_receivers([
        {"name": "mail", "kind": "email", "to": ["ops@example.com"], "smtp_host": "127.0.0.1", "smtp_port": smtp.port},
        {"name": "slack", "kind": "slack", "url": f"http://127.0.0.1:{slack.server_port}/hook"},
        {"name": "ding", "kind": "dingtalk", "url": f"http://127.0.0.1:{ding.server_port}/robot/send?access_token=t",
         "secret": "SEC123"},
        {"name": "ding-unsigned", "kind": "dingtalk", "url": f"http://127.0.0.1:{ding.server_port}/robot/send"},
    ])
    server = make_server(receivers, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"url": f"http://127.0.0.1:{server.server_port}", "captured": captured}
    server.shutdown()
    for s in (slack, ding):
        s.shutdown()
    smtp.stop()


def post(url: str, body: dict) -> int:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(req, timeout=10).status
    except urllib.error.HTTPError as err:
        return err.code


def test_email_has_the_alert_in_subject_and_body(receiver: dict) -> None:
    assert post(f"{receiver['url']}/receivers/mail", PAYLOAD) == 200
    [(to, msg)] = receiver["captured"]["email"]
    assert to == ["ops@example.com"]
    assert msg["Subject"] == "[FIRING:1] PrivlmCheckpointStale (warning)"
    body = msg.get_payload(decode=True).decode()
    assert "Run llama-1b has not checkpointed for 2h" in body and "run=llama-1b" in body


def test_slack_gets_incoming_webhook_json(receiver: dict) -> None:
    assert post(f"{receiver['url']}/receivers/slack", PAYLOAD) == 200
    [msg] = receiver["captured"]["slack"]
    assert msg["text"] == "[FIRING:1] PrivlmCheckpointStale (warning)"
    assert msg["blocks"][0]["type"] == "header"
    assert "*Run llama-1b has not checkpointed for 2h*" in msg["blocks"][1]["text"]["text"]


def test_dingtalk_gets_markdown_signed_as_dingtalk_documents(receiver: dict) -> None:
    assert post(f"{receiver['url']}/receivers/ding", PAYLOAD) == 200
    assert post(f"{receiver['url']}/receivers/ding-unsigned", PAYLOAD) == 200
    signed, unsigned = receiver["captured"]["dingtalk"]
    assert signed["msgtype"] == "markdown" and signed["markdown"]["title"].startswith("[FIRING:1]")
    assert "**Run llama-1b has not checkpointed for 2h**" in signed["markdown"]["text"]
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(signed["_path"]).query)
    assert query["access_token"] == ["t"]
    # DingTalk: sign = urlencode(base64(HmacSHA256(key=secret, msg=timestamp + "\n" + secret)))
    expected = base64.b64encode(hmac.new(b"SEC123", f"{query['timestamp'][0]}\nSEC123".encode(),
                                         hashlib.sha256).digest()).decode()
    assert query["sign"] == [expected]
    assert "sign" not in unsigned["_path"]
    assert dingtalk_signed_url("https://x/send?access_token=a", "s", 1700000000000).startswith(
        "https://x/send?access_token=a&timestamp=1700000000000&sign=")


def test_unknown_receiver_and_failed_delivery_answer_errors(receiver: dict) -> None:
    assert post(f"{receiver['url']}/receivers/pager", PAYLOAD) == 404
    broken = parse_receivers([{"name": "gone", "kind": "slack", "url": f"http://127.0.0.1:{free_port()}/hook"}])
    server = make_server(broken, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:  # a 5xx makes Alertmanager retry
        assert post(f"http://127.0.0.1:{server.server_port}/receivers/gone", PAYLOAD) == 502
    finally:
        server.shutdown()


@pytest.mark.parametrize(("entry", "message"), [
    ({"name": "pager", "kind": "pagerduty"}, "field kind='pagerduty' is unknown; use one of email, slack, dingtalk"),
    ({"name": "s", "kind": "slack"}, "kind slack needs field url (or url_file)"),
    ({"name": "m", "kind": "email", "to": ["a@b"]}, "kind email needs field smtp_host"),
    ({"name": "s", "kind": "slack", "url": "u", "severities": ["page"]}, "field severities has ['page']"),
])
def test_bad_receivers_name_the_field_the_value_and_the_fix(entry: dict, message: str) -> None:
    with pytest.raises(ReceiverConfigError) as err:
        parse_receivers([entry])
    assert message in str(err.value) and "monitoring_receivers[0]" in str(err.value)
