"""Alert delivery: a webhook receiver for Alertmanager that formats e-mail, Slack and DingTalk messages,
and `post_alert` for alerts raised outside Prometheus (e.g. `privlm monitor drift` -> PrivlmOutputDrift).

Why ours: Alertmanager 0.25 has no DingTalk integration (and DingTalk signs each request with an
HMAC of the time), and one formatter for the three kinds keeps the messages alike and testable.
Alertmanager still does grouping, routing by severity, silences and retries: each receiver of ours
is one Alertmanager webhook receiver, POSTing to http://ADDRESS:PORT/receivers/NAME.

Configuration (JSON, written by the monitoring role from `monitoring_receivers`):
    {"receivers": [
      {"name": "ops-mail", "kind": "email", "to": ["ops@example.com"], "from": "privlm@example.com",
       "smtp_host": "127.0.0.1", "smtp_port": 25, "starttls": false, "username": "", "password_file": ""},
      {"name": "ops-slack", "kind": "slack", "url": "https://hooks.slack.com/..."},   # or "url_file"
      {"name": "ops-dingtalk", "kind": "dingtalk", "url": "https://oapi.dingtalk.com/robot/send?access_token=...",
       "secret_file": "/etc/privlm/dingtalk.secret"}]}                                 # secret optional
Run: `python -m mlops.alerts --config FILE --address 127.0.0.1 --port 9095`.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import smtplib
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

DRIFT_ALERT = "PrivlmOutputDrift"
RECEIVER_KINDS = ("email", "slack", "dingtalk")
SEVERITIES = ("critical", "warning", "info")


class ReceiverConfigError(ValueError):
    """A receiver entry with a missing or wrong field; the message names it and the fix."""


@dataclass
class Receiver:
    """One configured destination."""

    name: str
    kind: str
    settings: dict[str, Any] = field(default_factory=dict)

    def secret(self, key: str) -> str:
        """A setting given inline (`key`) or in a file (`key_file`, read at send time)."""
        if self.settings.get(f"{key}_file"):
            return Path(self.settings[f"{key}_file"]).read_text().strip()
        return str(self.settings.get(key) or "")


REQUIRED = {"email": ("to", "smtp_host"), "slack": ("url",), "dingtalk": ("url",)}


def parse_receivers(entries: list[dict[str, Any]], where: str = "monitoring_receivers") -> list[Receiver]:
    """Validate receiver entries; raises ReceiverConfigError naming the entry, the field, the value, the fix."""
    receivers, names = [], set()
    for i, entry in enumerate(entries):
        label = f"{where}[{i}]"
        if not isinstance(entry, dict):
            raise ReceiverConfigError(f"{label}={entry!r}: must be a mapping with name and kind")
        name, kind = entry.get("name"), entry.get("kind")
        if not name or not str(name).replace("-", "").replace("_", "").isalnum():
            raise ReceiverConfigError(f"{label}: field name={name!r} must be letters, digits, - or _, e.g. ops-mail")
        if name in names:
            raise ReceiverConfigError(f"{label}: field name={name!r} is used twice; give each receiver its own")
        if kind not in RECEIVER_KINDS:
            raise ReceiverConfigError(f"{label} ({name}): field kind={kind!r} is unknown; "
                                      f"use one of {', '.join(RECEIVER_KINDS)}")
        for req in REQUIRED[kind]:
            if not entry.get(req) and not entry.get(f"{req}_file"):
                raise ReceiverConfigError(f"{label} ({name}): kind {kind} needs field {req}"
                                          + (f" (or {req}_file)" if req == "url" else ""))
        bad = [s for s in entry.get("severities", SEVERITIES) if s not in SEVERITIES]
        if bad:
            raise ReceiverConfigError(f"{label} ({name}): field severities has {bad}; use {', '.join(SEVERITIES)}")
        names.add(name)
        receivers.append(Receiver(str(name), kind, {k: v for k, v in entry.items() if k not in ("name", "kind")}))
    return receivers


def _alert_line(alert: dict[str, Any]) -> tuple[str, str]:
    labels, notes = alert.get("labels", {}), alert.get("annotations", {})
    title = notes.get("summary") or labels.get("alertname", "alert")
    where = ", ".join(f"{k}={v}" for k, v in sorted(labels.items()) if k not in ("alertname", "severity"))
    extra = "; ".join(f"{k}: {v}" for k, v in sorted(notes.items()) if k != "summary")
    return title, " | ".join(p for p in (where, extra) if p)


def headline(payload: dict[str, Any]) -> str:
    """`[FIRING:2] PrivlmCheckpointStale (critical)`, from the group's common labels."""
    common = payload.get("commonLabels", {})
    n = len(payload.get("alerts", []))
    status = payload.get("status", "firing").upper()
    name = common.get("alertname", "privlm alerts")
    severity = f" ({common['severity']})" if common.get("severity") else ""
    return f"[{status}:{n}] {name}{severity}"


def format_text(payload: dict[str, Any]) -> str:
    """Plain text: the headline, then one line per alert with its labels and annotations."""
    lines = [headline(payload), ""]
    for alert in payload.get("alerts", []):
        title, detail = _alert_line(alert)
        lines.append(f"- [{alert.get('status', '')}] {title}" + (f"\n  {detail}" if detail else ""))
    if payload.get("externalURL"):
        lines += ["", f"Alertmanager: {payload['externalURL']}"]
    return "\n".join(lines)


def format_slack(payload: dict[str, Any]) -> dict[str, Any]:
    """Slack incoming-webhook JSON: `text` (notifications) and a mrkdwn section block."""
    body = "\n".join(f"• *{t}*" + (f"\n  `{d}`" if d else "")
                     for t, d in map(_alert_line, payload.get("alerts", [])))
    return {"text": headline(payload),
            "blocks": [{"type": "header", "text": {"type": "plain_text", "text": headline(payload)}},
                       {"type": "section", "text": {"type": "mrkdwn", "text": body or "(no alerts)"}}]}


def format_dingtalk(payload: dict[str, Any]) -> dict[str, Any]:
    """DingTalk robot JSON with msgtype markdown."""
    items = "\n".join(f"- **{t}**" + (f"  \n  {d}" if d else "")
                      for t, d in map(_alert_line, payload.get("alerts", [])))
    return {"msgtype": "markdown", "markdown": {"title": headline(payload),
                                                "text": f"### {headline(payload)}\n\n{items}"}}


def dingtalk_signed_url(url: str, secret: str, now_ms: int | None = None) -> str:
    """The robot URL with `timestamp` and `sign` = base64(HMAC-SHA256(secret, f"{timestamp}\\n{secret}"))."""
    timestamp = str(now_ms if now_ms is not None else int(time.time() * 1000))
    digest = hmac.new(secret.encode(), f"{timestamp}\n{secret}".encode(), hashlib.sha256).digest()
    sign = urllib.parse.quote_plus(base64.b64encode(digest).decode())
    return f"{url}{'&' if '?' in url else '?'}timestamp={timestamp}&sign={sign}"


def send_email(receiver: Receiver, payload: dict[str, Any]) -> None:
    s = receiver.settings
    msg = EmailMessage()
    msg["Subject"] = headline(payload)
    msg["From"] = s.get("from", "privlm-alerts@localhost")
    to = s["to"] if isinstance(s["to"], list) else [s["to"]]
    msg["To"] = ", ".join(to)
    msg.set_content(format_text(payload))
    with smtplib.SMTP(s["smtp_host"], int(s.get("smtp_port", 25)), timeout=20) as smtp:
        if s.get("starttls"):
            smtp.starttls()
        if s.get("username"):
            smtp.login(s["username"], receiver.secret("password"))
        smtp.send_message(msg)


def _post_json(url: str, body: dict[str, Any]) -> None:
    httpx.post(url, json=body, timeout=20).raise_for_status()


def send_slack(receiver: Receiver, payload: dict[str, Any]) -> None:
    _post_json(receiver.secret("url"), format_slack(payload))


def send_dingtalk(receiver: Receiver, payload: dict[str, Any]) -> None:
    url, secret = receiver.secret("url"), receiver.secret("secret")
    _post_json(dingtalk_signed_url(url, secret) if secret else url, format_dingtalk(payload))


SENDERS: dict[str, Callable[[Receiver, dict[str, Any]], None]] = {
    "email": send_email, "slack": send_slack, "dingtalk": send_dingtalk}


def deliver(receiver: Receiver, payload: dict[str, Any]) -> None:
    """Format and send one Alertmanager webhook payload to one receiver (raises on failure)."""
    SENDERS[receiver.kind](receiver, payload)


def make_server(receivers: list[Receiver], address: str, port: int) -> ThreadingHTTPServer:
    """HTTP server: POST /receivers/NAME with Alertmanager's webhook JSON; GET /-/healthy."""
    by_name = {r.name: r for r in receivers}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._reply(200 if self.path == "/-/healthy" else 404, "ok\n")

        def do_POST(self) -> None:
            name = self.path.removeprefix("/receivers/")
            if name not in by_name:
                return self._reply(404, f"no receiver {name!r}; configured: {', '.join(by_name)}\n")
            try:
                payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                deliver(by_name[name], payload)
            except Exception as exc:  # Alertmanager retries on a 5xx: say why in its log and ours
                self.log_message("delivery to %s failed: %s", name, exc)
                return self._reply(502, f"delivery to {name} failed: {exc}\n")
            self._reply(200, "delivered\n")

        def _reply(self, code: int, text: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(text.encode())

    return ThreadingHTTPServer((address, port), Handler)


def post_alert(alertmanager_url: str, name: str, labels: dict[str, str], annotations: dict[str, str],
               ends_in_s: float | None = None) -> None:
    """Raise an alert straight in Alertmanager (API v2), e.g. post_alert(url, DRIFT_ALERT,
    {"model": m, "version": v, "severity": "warning"}, {"summary": ..., "kl": "0.21"})."""
    alert: dict[str, Any] = {"labels": {"alertname": name, **labels}, "annotations": annotations}
    if ends_in_s is not None:
        alert["endsAt"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + ends_in_s))
    try:
        httpx.post(f"{alertmanager_url.rstrip('/')}/api/v2/alerts", json=[alert], timeout=10).raise_for_status()
    except httpx.HTTPError as exc:
        raise ConnectionError(f"Alertmanager at {alertmanager_url} did not take the alert ({exc}); "
                              "is it running? `privlm monitor status` shows it") from exc


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m mlops.alerts", description="Alertmanager webhook receiver")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    receivers = parse_receivers(json.loads(args.config.read_text()).get("receivers", []), str(args.config))
    server = make_server(receivers, args.address, args.port)
    import signal
    import threading

    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever()


if __name__ == "__main__":
    main()
