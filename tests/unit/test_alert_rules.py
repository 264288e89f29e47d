"""The alert rules of roles/monitoring: every alert fires and stays silent where it must (real promtool),
thresholds and durations come from the role's variables, bad values are refused by name."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from mlops.monitor import ROLE, MonitoringConfigError, effective_alerts, promql_metric_names, render_alert_rules

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
TESTS = ROLE / "tests" / "alert_rules_test.yml"


def rules(text: str) -> dict[str, dict]:
    return {r["alert"]: r for g in yaml.safe_load(text)["groups"] for r in g["rules"]}


@pytest.fixture(scope="module")
def promtool() -> str:
    if not Path(PROMTOOL).exists():
        pytest.fail("promtool is missing: `apt-get install prometheus` (scripts/install-system.sh installs it)")
    return PROMTOOL


def test_every_alert_passes_its_promtool_unit_test(promtool: str, tmp_path: Path) -> None:
    (tmp_path / "alert_rules.yml").write_text(render_alert_rules())
    shutil.copy(TESTS, tmp_path / "alert_rules_test.yml")
    check = subprocess.run([promtool, "check", "rules", "alert_rules.yml"], capture_output=True, text=True,
                           cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run([promtool, "test", "rules", "alert_rules_test.yml"], capture_output=True, text=True,
                          cwd=tmp_path)
    assert test.returncode == 0, test.stdout + test.stderr
    # each alert of the rules has a test in which it fires
    fired = {case["alertname"] for t in yaml.safe_load(TESTS.read_text())["tests"]
             for case in t["alert_rule_test"] if case.get("exp_alerts")}
    assert fired == set(rules(render_alert_rules())), "an alert without a firing promtool test"


def test_the_guides_thresholds_are_the_defaults() -> None:
    r = rules(render_alert_rules())
    assert r["PrivlmGpuUnderutilised"]["expr"].startswith("DCGM_FI_DEV_GPU_UTIL < 30 ")
    assert r["PrivlmGpuUnderutilised"]["for"] == "15m"
    assert r["PrivlmP99LatencyHigh"]["expr"].endswith("> 0.5") and r["PrivlmP99LatencyHigh"]["for"] == "5m"
    assert "* (1 - 0.05)" in r["PrivlmQualityDrop"]["expr"]
    assert r["PrivlmGpuTemperatureHigh"]["expr"] == "DCGM_FI_DEV_GPU_TEMP > 85"
    assert {x["labels"]["severity"] for x in r.values()} == {"critical", "warning", "info"}


def test_overrides_change_threshold_duration_and_severity(promtool: str, tmp_path: Path) -> None:
    text = render_alert_rules({"p99_latency": {"threshold": 0.8, "for": "10s"},
                               "checkpoint_stale": {"severity": "critical"}})
    r = rules(text)
    assert r["PrivlmP99LatencyHigh"]["expr"].endswith("> 0.8") and r["PrivlmP99LatencyHigh"]["for"] == "10s"
    assert r["PrivlmCheckpointStale"]["labels"]["severity"] == "critical"
    assert r["PrivlmGpuTemperatureHigh"]["for"] == "2m"  # the others keep their defaults
    (tmp_path / "rules.yml").write_text(text)
    assert subprocess.run([promtool, "check", "rules", str(tmp_path / "rules.yml")],
                          capture_output=True).returncode == 0


@pytest.mark.parametrize(("overrides", "message"), [
    ({"p99_latency": {"threshold": "fast"}},
     "monitoring_alert_overrides.p99_latency.threshold='fast': must be a number"),
    ({"gpu_underutilised": {"threshold": 130}}, "gpu_underutilised.threshold=130: must be a number from 0 to 100"),
    ({"p99_latency": {"for": "5 minutes"}}, "p99_latency.for='5 minutes': not a Prometheus duration; write e.g. 30s"),
    ({"p99_latncy": {"for": "5m"}}, "unknown alert 'p99_latncy'; use one of checkpoint_stale"),
    ({"p99_latency": {"treshold": 1}}, "p99_latency: unknown field(s) ['treshold']"),
    ({"node_drained": {"severity": "page"}}, "node_drained.severity='page': use one of critical, warning, info"),
])
def test_bad_overrides_name_the_field_the_value_and_the_fix(overrides: dict, message: str) -> None:
    with pytest.raises(MonitoringConfigError) as err:
        effective_alerts(overrides)
    assert message in str(err.value)


def test_promql_metric_names_skip_functions_labels_and_keywords() -> None:
    assert promql_metric_names(
        'histogram_quantile(0.99, sum by (le, version) (rate(privlm_request_latency_seconds_bucket{a="x:y"}[5m])))'
    ) == {"privlm_request_latency_seconds_bucket"}
    assert promql_metric_names("a_total / on (run) group_left b > bool 1 and vllm:num_requests_running") == {
        "a_total", "b", "vllm:num_requests_running"}
