"""A real monitoring stack on 127.0.0.1, started through playbooks/monitoring.yml (the monitoring role).

    with MonitoringStack(tmp_dir, rule_overrides={"p99_latency": {"for": "10s"}}) as stack:
        stack.add_gateway("127.0.0.1:8000", token_file=..., ca_file=..., scheme="https")  # reruns the role
        stack.prometheus.value('sum(rate(privlm_requests_total[1m]))')              # a float, or None
        alert = stack.wait_for_alert("PrivlmP99LatencyHigh", timeout=120)   # delivered to our receiver

Interface:
- `MonitoringStack(root, rule_overrides=None, extra_scrape_configs=None, extravars=None)`: `root` holds the
  run directories the jobs exporter reads (`stack.runs_dir`), the capture servers and the receiver's
  config. `rule_overrides` is `monitoring_alert_overrides` ({alert: {threshold, for, severity}}; names
  in roles/monitoring/defaults/main.yml). `extra_scrape_configs`: Prometheus scrape_configs entries.
- `start()` / `stop()` (or `with`): `privlm monitor up` / `down` on `stack.inventory` (inventories/local
  with the stack's variables in group_vars; `first_output` is up's output); any daemon left is stopped
  by its PID file and stop() then raises. Ports are free ones picked at start (`stack.ports`); its own
  instance name (`privlm-test-PID`), so it runs beside a developer's `privlm monitor up`.
- `reconfigure(**extravars)`: rerun the role with more variables (scrape targets, overrides); returns
  the RunResult. `override_rules({"p99_latency": {"for": "10s"}})` merges alert overrides and reruns;
  `add_gateway(target, token_file="", ca_file="", scheme="http")` adds the gateway job.
- `prometheus`: mlops.monitor.Prometheus (`query(promql)` -> [(labels, float)], `value(promql)` ->
  float | None, `targets()`, `alerts()`); `prometheus_url`, `alertmanager_url`.
- `wait_for_target(job, timeout)`: until a target of that job is up.
- Receivers: one of each kind (email via an aiosmtpd server, slack and dingtalk via HTTP capture
  servers; DingTalk signed with `dingtalk_secret`). `wait_for_alert(alertname, timeout, kind="slack")`
  returns the first captured message naming that alert: a dict (Slack/DingTalk JSON body, plus
  `_path` with the query string) or, for kind="email", {"subject", "body", "to"}. `captured[kind]`
  holds everything received.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from infra.cluster import PLAYBOOKS, RunResult, configure
from mlops.monitor import Prometheus

DAEMON = "/usr/local/sbin/privlm-daemon"
PORT_NAMES = ("prometheus", "alertmanager", "receiver", "node_exporter", "jobs_exporter", "slurm_exporter",
              "health_exporter")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
    """The first truthy value of predicate() within timeout seconds, else None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if value := predicate():
                return value
        except (OSError, ValueError):
            pass
        time.sleep(every)
    return None


class _Capture(BaseHTTPRequestHandler):
    sink: list[dict[str, Any]]

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        self.sink.append({**body, "_path": self.path})
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b'{"errcode": 0, "ok": true}')

    def log_message(self, *args: object) -> None:
        pass


def capture_server(sink: list[dict[str, Any]]) -> ThreadingHTTPServer:
    """An HTTP server on 127.0.0.1 that keeps every JSON body POSTed to it (a Slack or DingTalk stand-in)."""
    handler = type("Capture", (_Capture,), {"sink": sink})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class MonitoringStack:
    """See the module docstring."""

    dingtalk_secret = "SECtest-secret"

    def __init__(self, root: Path, rule_overrides: dict[str, Any] | None = None,
                 extra_scrape_configs: list[dict[str, Any]] | None = None,
                 extravars: dict[str, Any] | None = None) -> None:
        self.root = Path(root)
        self.runs_dir = self.root / "runs"
        self.instance = f"privlm-test-{int(time.time() * 1000) % 10**8}"
        self.ports = {name: free_port() for name in PORT_NAMES}
        self.captured: dict[str, list[dict[str, Any]]] = {"slack": [], "dingtalk": [], "email": []}
        self._servers: list[ThreadingHTTPServer] = []
        self._smtp: Any = None
        self.vars: dict[str, Any] = {
            "monitoring_instance": self.instance, "monitoring_listen_address": "127.0.0.1",
            **{f"monitoring_{name}_port": port for name, port in self.ports.items()},
            "monitoring_scrape_interval": "1s", "monitoring_evaluation_interval": "1s",
            "monitoring_group_wait": "1s", "monitoring_group_interval": "1s", "monitoring_repeat_interval": "1h",
            "monitoring_retention_time": "1d", "monitoring_health_interval": 2,
            "monitoring_user": "root", "monitoring_exporter_user": "root",  # test files live in private tmp dirs
            "monitoring_run_globs": [str(self.runs_dir / "*")],
            "monitoring_ray_sd_file": str(self.root / "ray_sd.json"),
            "monitoring_alert_overrides": rule_overrides or {},
            "monitoring_extra_scrape_configs": extra_scrape_configs or [],
            **(extravars or {}),
        }
        self.prometheus_url = f"http://127.0.0.1:{self.ports['prometheus']}"
        self.alertmanager_url = f"http://127.0.0.1:{self.ports['alertmanager']}"
        self.prometheus = Prometheus(self.prometheus_url)
        self.inventory = self.root / "inventory"
        self.first_output = ""

    # ---- receivers ---------------------------------------------------------------------------------------------
    def _start_receivers(self) -> list[dict[str, Any]]:
        from aiosmtpd.controller import Controller

        slack, dingtalk = capture_server(self.captured["slack"]), capture_server(self.captured["dingtalk"])
        self._servers += [slack, dingtalk]
        sink = self.captured["email"]

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                msg = message_from_bytes(envelope.content)
                sink.append({"subject": msg["Subject"], "to": envelope.rcpt_tos,
                             "body": msg.get_payload(decode=True).decode()})
                return "250 OK"

        self._smtp = Controller(Handler(), hostname="127.0.0.1", port=free_port())
        self._smtp.start()
        return [
            {"name": "test-mail", "kind": "email", "to": ["ops@example.com"], "from": "privlm@example.com",
             "smtp_host": "127.0.0.1", "smtp_port": self._smtp.port},
            {"name": "test-slack", "kind": "slack", "url": f"http://127.0.0.1:{slack.server_port}/hook"},
            {"name": "test-dingtalk", "kind": "dingtalk", "severities": ["critical", "warning"],
             "url": f"http://127.0.0.1:{dingtalk.server_port}/robot/send?access_token=t",
             "secret": self.dingtalk_secret},
        ]

    # ---- life cycle --------------------------------------------------------------------------------------------
    def start(self) -> MonitoringStack:
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.vars["monitoring_receivers"] = self._start_receivers()
        self.first_output = self._cli("up")
        self.vars["common_applied"] = True  # the base role ran once; later runs touch only the monitoring role
        if not wait_until(lambda: self.prometheus.targets(), 30):
            raise RuntimeError(f"Prometheus at {self.prometheus_url} did not answer:\n{self.logs()}")
        return self

    def write_inventory(self) -> Path:
        """inventories/local with this stack's variables in its group_vars: what `privlm monitor` reads."""
        local = PLAYBOOKS / "inventories" / "local"
        (self.inventory / "group_vars").mkdir(parents=True, exist_ok=True)
        shutil.copy(local / "hosts.yml", self.inventory / "hosts.yml")
        group_vars = {**yaml.safe_load((local / "group_vars" / "all.yml").read_text()), **self.vars}
        (self.inventory / "group_vars" / "all.yml").write_text(yaml.safe_dump(group_vars))
        return self.inventory

    def _cli(self, command: str) -> str:
        """`privlm monitor COMMAND --inventory` on this stack's inventory; its output (raises when it fails)."""
        self.write_inventory()
        proc = subprocess.run([sys.executable, "-m", "privlm.cli", "monitor", command, "--inventory",
                               str(self.inventory)], capture_output=True, text=True, timeout=600,
                              cwd=PLAYBOOKS.parent, env={**os.environ, "PYTHONPATH": str(PLAYBOOKS.parent)})
        if proc.returncode != 0:
            raise RuntimeError(f"privlm monitor {command} exited {proc.returncode}: {proc.stdout[-4000:]}"
                               f"{proc.stderr[-2000:]}")
        return proc.stdout

    def reconfigure(self, **extravars: Any) -> RunResult:
        """Rerun the role (state started) with these variables added to the stack's; raises when it fails."""
        self.vars.update(extravars)
        result = configure(self.write_inventory(), "monitoring.yml", quiet=True,
                           extravars={**self.vars, "monitoring_state": "started"})
        if not result.ok:
            raise RuntimeError(f"monitoring playbook failed: {result.output[-4000:]}")
        return result

    def override_rules(self, overrides: dict[str, Any]) -> RunResult:
        """Merge alert overrides ({alert: {threshold, for, severity}}) into the stack's, rerun the role."""
        merged = {k: dict(v) for k, v in self.vars["monitoring_alert_overrides"].items()}
        for name, values in overrides.items():
            merged.setdefault(name, {}).update(values)
        return self.reconfigure(monitoring_alert_overrides=merged)

    def add_gateway(self, target: str, token_file: str = "", ca_file: str = "", scheme: str = "http") -> RunResult:
        """Scrape the gateway's /metrics at host:port (job `privlm-gateway`), with a bearer token file and a CA."""
        return self.reconfigure(monitoring_gateway_targets=[target], monitoring_gateway_token_file=str(token_file),
                                monitoring_gateway_ca_file=str(ca_file), monitoring_gateway_scheme=scheme)

    def stop(self) -> str:
        """`privlm monitor down`, then any PID file left is stopped; the capture servers; this instance's files.

        Raises when a daemon of the stack outlived `down` (the role must stop what it started)."""
        output: str | None = None
        left: list[str] = []
        try:
            output = self._cli("down")
        finally:
            for pidfile in Path(f"/run/privlm-monitoring/{self.instance}").glob("*.pid"):
                if subprocess.run([DAEMON, "stop", str(pidfile)], capture_output=True, text=True,
                                  timeout=30).stdout.startswith("stopped"):
                    left.append(pidfile.name)
            for server in self._servers:
                server.shutdown()
            if self._smtp is not None:
                self._smtp.stop()
        if left or output is None:
            raise RuntimeError(f"`privlm monitor down` left {left} running: {output}")
        for kind in ("etc", "var/lib", "var/log", "run"):  # this instance's configuration, data, logs, PIDs
            shutil.rmtree(f"/{kind}/privlm-monitoring/{self.instance}", ignore_errors=True)
        return output

    def __enter__(self) -> MonitoringStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- waiting -----------------------------------------------------------------------------------------------
    def wait_for_target(self, job: str, timeout: float = 30) -> bool:
        return bool(wait_until(lambda: any(t["job"] == job and t["health"] == "up"
                                           for t in self.prometheus.targets()), timeout))

    def wait_for_alert(self, alertname: str, timeout: float = 120, kind: str = "slack") -> dict[str, Any]:
        """The first message of `kind` (slack, dingtalk, email) that names the alert; raises on timeout."""
        def found() -> dict[str, Any] | None:
            return next((m for m in self.captured[kind] if alertname in json.dumps(m)), None)

        message = wait_until(found, timeout)
        if message is None:
            raise TimeoutError(f"no {kind} message for {alertname} within {timeout} s; Prometheus alerts: "
                               f"{self.prometheus.alerts()}\n{self.logs()}")
        return message

    def logs(self, lines: int = 15) -> str:
        parts = []
        for log in sorted(Path(f"/var/log/privlm-monitoring/{self.instance}").glob("*.log")):
            parts.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(parts)
