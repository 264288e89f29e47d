"""`privlm monitor up|status|down`: the monitoring stack of playbooks/roles/monitoring, and what reads it.

Also here: the checks of the role's inventory variables (thresholds, durations, receivers), the alert
rules rendered outside Ansible (for `promtool`), a small Prometheus query client, and the metric
names each Grafana dashboard references.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import typer
import yaml

ROLE = Path(__file__).resolve().parents[1] / "playbooks" / "roles" / "monitoring"
DASHBOARDS = ROLE / "files" / "dashboards"
DURATION_RE = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")
# Thresholds that are shares or percentages have an upper bound.
THRESHOLD_MAX = {"gpu_underutilised": 100, "quality_drop": 1, "error_ratio_5xx": 1}
DEFAULT_INVENTORY = Path(__file__).resolve().parents[1] / "playbooks" / "inventories" / "local"

monitor_app = typer.Typer(help="The monitoring stack: Prometheus, Alertmanager, exporters, alert receivers.",
                          no_args_is_help=True)


class MonitoringConfigError(ValueError):
    """A monitoring variable with a wrong value; the message names the field, the value and the fix."""


def role_defaults() -> dict[str, Any]:
    """The role's defaults/main.yml."""
    return yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())


def effective_alerts(overrides: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """monitoring_alert_defaults with monitoring_alert_overrides merged per alert, after checking them."""
    alerts = copy.deepcopy(role_defaults()["monitoring_alert_defaults"])
    for name, values in (overrides or {}).items():
        if name not in alerts:
            raise MonitoringConfigError(f"monitoring_alert_overrides: unknown alert {name!r}; "
                                        f"use one of {', '.join(sorted(alerts))}")
        if not isinstance(values, dict):
            raise MonitoringConfigError(f"monitoring_alert_overrides.{name}={values!r}: must be a mapping, "
                                        "e.g. {threshold: 0.8, for: 10m}")
        unknown = set(values) - set(alerts[name])
        if unknown:
            raise MonitoringConfigError(f"monitoring_alert_overrides.{name}: unknown field(s) {sorted(unknown)}; "
                                        f"use {', '.join(sorted(alerts[name]))}")
        alerts[name].update(values)
    check_alerts(alerts)
    return alerts


def check_alerts(alerts: dict[str, dict[str, Any]]) -> None:
    """Raise MonitoringConfigError on the first bad threshold, duration or severity."""
    from mlops.alerts import SEVERITIES

    for name, a in alerts.items():
        field = f"monitoring_alert_overrides.{name}"
        t = a.get("threshold")
        top = THRESHOLD_MAX.get(name)
        if isinstance(t, bool) or not isinstance(t, int | float) or t < 0 or (top is not None and t > top):
            raise MonitoringConfigError(f"{field}.threshold={t!r}: must be a number from 0"
                                        + (f" to {top}" if top is not None else "")
                                        + f", e.g. {role_defaults()['monitoring_alert_defaults'][name]['threshold']}")
        for key in ("for", "window"):
            if key in a and not DURATION_RE.match(str(a[key])):
                raise MonitoringConfigError(f"{field}.{key}={a[key]!r}: not a Prometheus duration; "
                                            "write e.g. 30s, 5m, 1h")
        if a.get("severity") not in SEVERITIES:
            raise MonitoringConfigError(f"{field}.severity={a.get('severity')!r}: use one of {', '.join(SEVERITIES)}")
        if "min_samples" in a and not (isinstance(a["min_samples"], int) and a["min_samples"] >= 1):
            raise MonitoringConfigError(f"{field}.min_samples={a['min_samples']!r}: must be an integer >= 1")


def render_alert_rules(overrides: dict[str, Any] | None = None) -> str:
    """The role's alert_rules.yml.j2 rendered as the role renders it (same delimiters, same variables)."""
    import jinja2

    header, _, body = (ROLE / "templates" / "alert_rules.yml.j2").read_text().partition("\n")
    assert header.startswith("#jinja2:"), header
    env = jinja2.Environment(variable_start_string="[[", variable_end_string="]]", undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True)
    return env.from_string(body).render(monitoring_alerts=effective_alerts(overrides))


def check_monitoring_vars(hostvars: dict[str, Any], host: str) -> None:
    """Check one monitoring host's variables (as Ansible resolves them) before a playbook runs."""
    from mlops.alerts import ReceiverConfigError, parse_receivers

    effective_alerts(hostvars.get("monitoring_alert_overrides") or {})
    try:
        parse_receivers(hostvars.get("monitoring_receivers") or [])
    except ReceiverConfigError as exc:
        raise MonitoringConfigError(f"host {host}: {exc}") from exc
    for key, value in hostvars.items():
        if key.startswith("monitoring_") and key.endswith("_port") and not (
                isinstance(value, int) and 0 < value < 65536):
            raise MonitoringConfigError(f"host {host}: field {key}={value!r} must be a TCP port (1-65535)")
    for key in ("monitoring_retention_time", "monitoring_scrape_interval", "monitoring_evaluation_interval"):
        if key in hostvars and not DURATION_RE.match(str(hostvars[key])):
            raise MonitoringConfigError(f"host {host}: field {key}={hostvars[key]!r} is not a Prometheus duration; "
                                        "write e.g. 15s, 15d")
    scheme = hostvars.get("monitoring_gateway_scheme", "http")
    if scheme not in ("http", "https"):
        raise MonitoringConfigError(f"host {host}: field monitoring_gateway_scheme={scheme!r}: use http or https")


def monitoring_hosts(inventory: Path) -> dict[str, dict[str, Any]]:
    """Hosts of the `monitoring` group with their variables; raises when the group is missing or empty."""
    from infra.inventory import group_hosts, resolve_inventory

    inv = resolve_inventory(inventory)
    hosts = group_hosts(inv, "monitoring")
    if not hosts:
        raise MonitoringConfigError(f"{inventory}: group monitoring has no hosts; add the head node to it "
                                    "(see playbooks/inventories/example/hosts.yml)")
    return {h: inv["_meta"]["hostvars"].get(h, {}) for h in hosts}


class Prometheus:
    """A Prometheus HTTP API client: instant queries as floats, targets, alerts."""

    def __init__(self, url: str, timeout: float = 10) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _get(self, path: str, **params: str) -> Any:
        import httpx

        try:
            resp = httpx.get(f"{self.url}{path}", params=params, timeout=self.timeout)
        except httpx.HTTPError as exc:
            raise ConnectionError(f"Prometheus at {self.url} is unreachable ({exc}); start it with "
                                  "`privlm monitor up`, or pass --prometheus URL") from exc
        body = resp.json() if resp.headers.get("content-type", "").startswith("application/json") else {}
        if resp.status_code != 200 or body.get("status") != "success":
            raise ValueError(f"Prometheus refused {path} {params}: {body.get('error') or resp.text[:300]}")
        return body["data"]

    def query(self, promql: str, at: float | None = None) -> list[tuple[dict[str, str], float]]:
        """An instant query (now, or at a time in seconds since the epoch): (labels, value) per series
        (a scalar gives one series without labels)."""
        data = self._get("/api/v1/query", query=promql, **({"time": f"{at:.3f}"} if at is not None else {}))
        if data["resultType"] in ("scalar", "string"):
            return [({}, float(data["result"][1]))]
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]

    def value(self, promql: str) -> float | None:
        """The value of a query that yields one series; None when it yields none."""
        result = self.query(promql)
        return result[0][1] if result else None

    def targets(self) -> list[dict[str, Any]]:
        """Active scrape targets: job, instance, health (up/down/unknown), last error."""
        return [{"job": t["labels"].get("job", ""), "instance": t["labels"].get("instance", ""),
                 "health": t["health"], "error": t.get("lastError", ""), "url": t.get("scrapeUrl", "")}
                for t in self._get("/api/v1/targets", state="active")["activeTargets"]]

    def metric_names(self) -> list[str]:
        """Every metric name Prometheus holds series of (a family without samples has none)."""
        return self._get("/api/v1/label/__name__/values")

    def alerts(self) -> list[dict[str, Any]]:
        """Pending and firing alerts with labels and annotations."""
        return self._get("/api/v1/alerts")["alerts"]


def dashboard_metric_names(dashboard: str | Path) -> set[str]:
    """Metric names the PromQL expressions of a Grafana dashboard JSON reference (a name or a path).

    `serving`, `training` and `cluster` name the role's dashboards. Functions, keywords, label names and
    histogram suffixes of a name are told apart by PromQL's syntax: a name is an identifier that is not
    followed by `(` and not inside `{...}`, `by (...)`, `on (...)` or `[...]`."""
    path = Path(dashboard) if str(dashboard).endswith(".json") else DASHBOARDS / f"{dashboard}.json"
    names: set[str] = set()
    for expr in _dashboard_exprs(json.loads(path.read_text())):
        names |= promql_metric_names(expr)
    return names


def _dashboard_exprs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [e for v in node.values() for e in _dashboard_exprs(v)]
    if isinstance(node, list):
        return [e for v in node for e in _dashboard_exprs(v)]
    return []


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (see dashboard_metric_names)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\$\w+", "", text)  # Grafana variables such as $__rate_interval
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word, rest = m.group(0), text[m.end():].lstrip()
        if word.lower() in PROMQL_WORDS or rest.startswith("(") or text[max(m.start() - 1, 0)].isdigit():
            continue
        names.add(word)
    return names


def exposed_metric_names(metrics_text: str) -> set[str]:
    """Names a /metrics page (Prometheus text format) declares or has samples of, with or without samples."""
    names = set(re.findall(r"^# TYPE (\S+)", metrics_text, re.MULTILINE))
    return names | set(re.findall(r"^([A-Za-z_:][A-Za-z0-9_:]*)[{ ]", metrics_text, re.MULTILINE))


# ---- the CLI --------------------------------------------------------------------------------------------------

def _fail(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"error: {message}", style="red", highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(2)


def _prometheus_url(inventory: Path) -> str:
    host, hv = next(iter(monitoring_hosts(inventory).items()))
    address = hv.get("monitoring_listen_address", hv.get("ansible_host", host))
    address = address if "{{" not in str(address) else hv.get("ansible_host", "127.0.0.1")
    return f"http://{address}:{hv.get('monitoring_prometheus_port', 9090)}"


def _configure(inventory: Path, state: str, quiet: bool) -> None:
    from infra.cluster import configure
    from infra.inventory import InventoryError

    try:
        for host, hv in monitoring_hosts(inventory).items():
            check_monitoring_vars(hv, host)
        result = configure(inventory, "monitoring.yml", quiet=quiet, extravars={"monitoring_state": state})
    except (MonitoringConfigError, InventoryError) as exc:
        _fail(str(exc))
    if not result.ok:
        _fail(f"the monitoring playbook failed (rc {result.rc}); its output above says where")
    typer.echo(f"monitoring {state}: {result.changed} change(s)")


@monitor_app.command("up")
def up(inventory: Path = typer.Option(DEFAULT_INVENTORY, help="Ansible inventory (directory or hosts.yml)"),
       quiet: bool = typer.Option(False, help="hide the playbook's progress")) -> None:
    """Start (or update) Prometheus, Alertmanager, the exporters and the receiver: playbooks/monitoring.yml."""
    _configure(inventory, "started", quiet)


@monitor_app.command("down")
def down(inventory: Path = typer.Option(DEFAULT_INVENTORY, help="Ansible inventory (directory or hosts.yml)"),
         quiet: bool = typer.Option(False, help="hide the playbook's progress")) -> None:
    """Stop every daemon `privlm monitor up` started (their data stays)."""
    _configure(inventory, "stopped", quiet)


@monitor_app.command("status")
def status(prometheus: str = typer.Option("", help="Prometheus URL (default: from the inventory)"),
           inventory: Path = typer.Option(DEFAULT_INVENTORY, help="Ansible inventory, for the default URL")) -> None:
    """Scrape targets up or down, and the alerts pending or firing. Exit 1 when a target is down."""
    from rich.console import Console
    from rich.table import Table

    try:
        prom = Prometheus(prometheus or _prometheus_url(inventory))
        targets, alerts = prom.targets(), prom.alerts()
    except (ConnectionError, ValueError) as exc:
        _fail(str(exc))
    console = Console()
    table = Table(title=f"Scrape targets of {prom.url}")
    for column in ("job", "instance", "health", "last error"):
        table.add_column(column)
    for t in sorted(targets, key=lambda t: (t["job"], t["instance"])):
        colour = "green" if t["health"] == "up" else "red"
        table.add_row(t["job"], t["instance"], f"[{colour}]{t['health']}[/{colour}]", t["error"][:80])
    console.print(table)
    table = Table(title="Alerts")
    for column in ("alert", "state", "severity", "labels", "summary"):
        table.add_column(column)
    for a in alerts:
        labels = a["labels"]
        rest = ", ".join(f"{k}={v}" for k, v in sorted(labels.items()) if k not in ("alertname", "severity"))
        table.add_row(labels.get("alertname", ""), a["state"], labels.get("severity", ""), rest,
                      a.get("annotations", {}).get("summary", ""))
    console.print(table if alerts else "no alerts pending or firing")
    raise typer.Exit(1 if any(t["health"] != "up" for t in targets) else 0)


def _register_operate_commands() -> None:
    """`privlm monitor drift|loop`: the served model's drift and the retraining loop (mlops/cli.py)."""
    from mlops.cli import drift_cmd, loop_cmd

    monitor_app.command("drift")(drift_cmd)
    monitor_app.command("loop")(loop_cmd)


_register_operate_commands()
