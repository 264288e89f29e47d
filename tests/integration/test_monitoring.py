"""The monitoring stack for real: the role starts Prometheus, Alertmanager, node exporter and our exporters
and receiver on 127.0.0.1; a stale checkpoint in a run directory becomes an alert delivered by e-mail,
Slack and DingTalk; a rerun changes nothing; `privlm monitor status` reads it; bad input is refused."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from mlops.alerts import DRIFT_ALERT, post_alert
from mlops.exporters import GPU_METRICS
from mlops.monitor import dashboard_metric_names, exposed_metric_names
from tests.helpers import privlm, run_env
from tests.integration.monitoring_fixture import MonitoringStack, wait_until
from tests.integration.slurm_fixture import SlurmCluster

pytestmark = pytest.mark.integration
OWN_JOBS = {"prometheus", "alertmanager", "node", "privlm-health", "privlm-jobs", "privlm-slurm"}


def write_run(runs: Path, name: str, checkpoint_age_s: float, interval_s: float = 10) -> Path:
    """A run directory as jobs/train writes it: metrics.jsonl records and checkpoints/latest."""
    run, now = runs / name, time.time()
    (run / "checkpoints").mkdir(parents=True)
    start = now - checkpoint_age_s - 2 * interval_s
    records = [{"time": start, "event": "start", "step": 0},
               {"time": start + interval_s, "event": "checkpoint", "step": 10},
               {"time": start + 2 * interval_s, "event": "checkpoint", "step": 20},
               {"time": now - 2, "step": 29, "loss": 3.5, "lr": 1e-3, "tokens": 1000, "grad_norm": 1.0,
                "tokens_per_s": 1234.5, "mfu": 0.41},
               {"time": now - 1, "step": 30, "loss": 3.4, "lr": 1e-3, "tokens": 1100, "grad_norm": 1.0,
                "tokens_per_s": 1300.0, "mfu": 0.42}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    latest = run / "checkpoints" / "latest"
    latest.write_text("step-00000020")
    os.utime(latest, (start + 2 * interval_s, start + 2 * interval_s))
    return run


def test_the_role_starts_every_daemon_and_prometheus_scrapes_them(monitoring_stack: MonitoringStack) -> None:
    stack = monitoring_stack
    assert wait_until(lambda: {t["job"] for t in stack.prometheus.targets() if t["health"] == "up"} >= OWN_JOBS, 30), \
        stack.prometheus.targets()
    assert stack.prometheus.value('up{job="node"}') == 1.0
    assert stack.prometheus.value("privlm_slurm_up") in (0.0, 1.0)  # Slurm may not run in this session
    assert "GPU telemetry skipped on localhost: no NVIDIA GPU on the PCI bus" in stack.first_output
    assert all(p.startswith("127.0.0.1:") for p in (t["instance"] for t in stack.prometheus.targets()))


@contextlib.contextmanager
def https_metrics_server(tmp_path: Path, token: str) -> Iterator[tuple[str, Path]]:
    """A /metrics over HTTPS that wants `Authorization: Bearer TOKEN` (the gateway's shape); (host:port, CA)."""
    import ssl

    import trustme
    from prometheus_client import CollectorRegistry, Counter, generate_latest

    registry = CollectorRegistry()
    Counter("privlm_requests", "Requests", ["endpoint", "status", "version"], registry=registry).labels(
        "chat", "200", "1").inc(5)

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.headers.get("Authorization") == f"Bearer {token}"
            self.send_response(200 if ok else 401)
            self.end_headers()
            self.wfile.write(generate_latest(registry) if ok else b"")

        def log_message(self, *args: object) -> None:
            pass

    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_port}", tmp_path / "ca.pem"
    finally:
        server.shutdown()


def test_the_gateway_job_scrapes_https_with_a_bearer_token_file_and_a_ca(monitoring_stack: MonitoringStack,
                                                                         tmp_path: Path) -> None:
    token = tmp_path / "metrics.token"
    token.write_text("sk-metrics-read\n")
    with https_metrics_server(tmp_path, "sk-metrics-read") as (target, ca):
        monitoring_stack.add_gateway(target, token_file=str(token), ca_file=str(ca), scheme="https")
        assert monitoring_stack.wait_for_target("privlm-gateway", 30), monitoring_stack.prometheus.targets()
        assert monitoring_stack.prometheus.value('privlm_requests_total{job="privlm-gateway"}') == 5.0


def test_a_second_run_changes_nothing(monitoring_stack: MonitoringStack) -> None:
    result = monitoring_stack.reconfigure()
    assert result.changed == 0, result.output[-3000:]


def test_a_stale_checkpoint_fires_and_is_delivered_by_mail_slack_and_dingtalk(
        monitoring_stack: MonitoringStack) -> None:
    stack = monitoring_stack
    write_run(stack.runs_dir, "stale-run", checkpoint_age_s=120)
    write_run(stack.runs_dir, "fresh-run", checkpoint_age_s=5)
    assert wait_until(lambda: stack.prometheus.value('privlm_train_mfu{run="stale-run"}') == 0.42, 30)
    assert stack.prometheus.value('privlm_train_tokens_per_second{run="stale-run"}') == 1300.0
    assert stack.prometheus.value('privlm_train_step_seconds{run="stale-run"}') == pytest.approx(1.0, abs=0.01)
    assert stack.prometheus.value('privlm_train_checkpoint_interval_seconds{run="stale-run"}') == pytest.approx(10)
    assert stack.prometheus.value('privlm_train_checkpoint_age_seconds{run="stale-run"}') > 120

    slack = stack.wait_for_alert("PrivlmCheckpointStale", 90)
    assert slack["text"].startswith("[FIRING:") and "(warning)" in slack["text"]
    assert "Run stale-run has not checkpointed for" in slack["blocks"][1]["text"]["text"]
    assert "fresh-run" not in json.dumps(slack)
    ding = stack.wait_for_alert("PrivlmCheckpointStale", 30, kind="dingtalk")
    assert ding["msgtype"] == "markdown" and "sign=" in ding["_path"] and "timestamp=" in ding["_path"]
    mail = stack.wait_for_alert("PrivlmCheckpointStale", 30, kind="email")
    assert mail["to"] == ["ops@example.com"] and "stale-run" in mail["body"]


def test_a_drift_alert_posted_to_alertmanager_reaches_the_receivers(monitoring_stack: MonitoringStack) -> None:
    post_alert(monitoring_stack.alertmanager_url, DRIFT_ALERT,
               {"model": "tiny", "version": "3", "severity": "warning"},
               {"summary": "Output drift of tiny v3: KL 0.21 above 0.15", "kl": "0.21"}, ends_in_s=300)
    message = monitoring_stack.wait_for_alert(DRIFT_ALERT, 30)
    text = message["blocks"][1]["text"]["text"]
    assert "Output drift of tiny v3" in text and "kl: 0.21" in text and "model=tiny" in text
    with pytest.raises(ConnectionError, match="did not take the alert"):
        post_alert("http://127.0.0.1:9", DRIFT_ALERT, {}, {})


def test_monitor_status_shows_targets_and_firing_alerts(monitoring_stack: MonitoringStack) -> None:
    assert wait_until(lambda: any(a["state"] == "firing" for a in monitoring_stack.prometheus.alerts()), 60)
    wide = {**run_env(), "COLUMNS": "220"}
    out = privlm("monitor", "status", "--inventory", str(monitoring_stack.write_inventory()), env=wide, check=False)
    assert out.returncode in (0, 1), out.stderr
    assert "privlm-jobs" in out.stdout and "127.0.0.1" in out.stdout and "up" in out.stdout
    assert "PrivlmCheckpointStale" in out.stdout and "firing" in out.stdout
    gone = privlm("monitor", "status", "--prometheus", "http://127.0.0.1:9", env=wide, check=False)
    assert gone.returncode == 2
    assert "Prometheus at http://127.0.0.1:9 is unreachable" in gone.stderr and "privlm monitor up" in gone.stderr


def test_dashboards_reference_only_names_the_stack_exposes(monitoring_stack: MonitoringStack) -> None:
    """Names in Prometheus, or declared on a live exporter's /metrics (a family may have no samples yet, e.g.
    drained nodes). Gateway (privlm_* of serving/metrics.py) and vLLM names are the serving tests' to
    check against the live endpoint; GPU names are the gpu exporter's (GPU nodes only)."""
    import httpx

    prom = monitoring_stack.prometheus
    assert wait_until(lambda: "privlm_train_mfu" in prom.metric_names(), 30)
    live = set(prom.metric_names())
    for target in prom.targets():
        if target["health"] == "up":
            live |= exposed_metric_names(httpx.get(target["url"], timeout=10).text)
    served_elsewhere = {n for n in dashboard_metric_names("serving") if n.startswith(("privlm_", "vllm:"))}
    names = dashboard_metric_names("training") | dashboard_metric_names("cluster") | (
        dashboard_metric_names("serving") - served_elsewhere)
    assert names - live - set(GPU_METRICS.values()) == set()
    assert {"privlm_slurm_node_drained", "privlm_train_checkpoint_age_seconds", "ALERTS"} <= names
    assert served_elsewhere >= {"privlm_requests_total", "privlm_request_latency_seconds_bucket"}


def test_slurm_and_node_health_exporters_report_the_local_cluster(monitoring_stack: MonitoringStack,
                                                                 slurm_cluster: SlurmCluster) -> None:
    prom = monitoring_stack.prometheus
    assert wait_until(lambda: prom.value("privlm_slurm_up") == 1.0, 30)
    assert wait_until(lambda: prom.value('privlm_slurm_node_state{node="localnode",state="idle"}') == 1.0, 30)
    assert prom.value("privlm_slurm_queue_pending") == 0.0
    health = subprocess.run(["/usr/local/sbin/privlm-node-health"], capture_output=True).returncode
    assert wait_until(lambda: prom.value('privlm_node_health_status{node="localnode"}') == health, 30)
    try:
        slurm_cluster.run("scontrol", "update", "nodename=localnode", "state=drain", "reason=monitoring test",
                          check=True)
        assert wait_until(lambda: prom.value('privlm_slurm_node_drained{node="localnode",reason="monitoring test"}')
                          == 1.0, 30), prom.query("privlm_slurm_node_drained")
    finally:
        slurm_cluster.run("scontrol", "update", "nodename=localnode", "state=resume")
    assert wait_until(lambda: slurm_cluster.node_states() == {"localnode": "idle"}, 30)


def test_monitor_up_refuses_a_bad_threshold_before_running_anything(tmp_path: Path) -> None:
    inventory = tmp_path / "inv"
    (inventory / "group_vars").mkdir(parents=True)
    local = Path(__file__).resolve().parents[2] / "playbooks" / "inventories" / "local"
    (inventory / "hosts.yml").write_text((local / "hosts.yml").read_text())
    group_vars = yaml.safe_load((local / "group_vars" / "all.yml").read_text())
    group_vars["monitoring_alert_overrides"] = {"p99_latency": {"threshold": "fast"}}
    (inventory / "group_vars" / "all.yml").write_text(yaml.safe_dump(group_vars))
    out = privlm("monitor", "up", "--inventory", str(inventory), env=run_env(), check=False)
    assert out.returncode == 2
    assert "monitoring_alert_overrides.p99_latency.threshold='fast': must be a number" in out.stderr
    group_vars["monitoring_alert_overrides"] = {}
    group_vars["monitoring_receivers"] = [{"name": "pager", "kind": "pagerduty"}]
    (inventory / "group_vars" / "all.yml").write_text(yaml.safe_dump(group_vars))
    out = privlm("monitor", "up", "--inventory", str(inventory), env=run_env(), check=False)
    assert out.returncode == 2 and "field kind='pagerduty' is unknown" in out.stderr
