"""Output drift of a served version: the KL divergence of its recent outputs to its reference.

The gateway counts, per version, generated token ids (by bucket), completion lengths, finish reasons
and refusals as Prometheus metrics (serving/metrics.py); Prometheus keeps the windows. The reference
is the version's traffic over `reference_window` after its promotion to champion, read once and
stored on the version (tag `privlm.drift.reference`), so it outlives Prometheus' retention. Each
measure's divergence is KL(recent || reference) with add-half smoothing over the union of bins; the
drift score is the largest. Above the threshold (`registry.drift.threshold` in the version's recipe,
0.15 by default) `privlm monitor drift` posts a `PrivlmOutputDrift` alert to Alertmanager and, when
asked, starts the retraining loop (mlops/loop.py).

Our own code: Evidently/alibi-detect compare feature tables of raw samples; here the samples are
counters already aggregated by Prometheus across gateway replicas, and the divergence is four sums.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from jobs.recipe import DriftPolicy
from mlops.monitor import Prometheus
from mlops.registry import RegistryError

REFERENCE_TAG = "privlm.drift.reference"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
SMOOTHING = 0.5


def seconds(window: str) -> float:
    return float(window[:-1]) * _UNITS[window[-1]]


def _queries(version: str, window: str) -> dict[str, str]:
    v = json.dumps(version)
    return {
        "tokens": f'sum by (bucket) (increase(privlm_output_tokens_total{{version={v}}}[{window}]))',
        "length": f'sum by (le) (increase(privlm_completion_length_tokens_bucket{{version={v}}}[{window}]))',
        "finish": f'sum by (reason) (increase(privlm_finish_reasons_total{{version={v}}}[{window}]))',
        "refusal": f'sum(increase(privlm_refusals_total{{version={v}}}[{window}]))',
    }


def distributions(prom: Prometheus, version: str, window: str, at: float | None = None) -> dict[str, dict[str, float]]:
    """Counts per bin of each measure over the window ending at `at` (default now)."""
    queries = _queries(version, window)
    out = {measure: {labels.get(key, ""): value for labels, value in prom.query(queries[measure], at)}
           for measure, key in (("tokens", "bucket"), ("length", "le"), ("finish", "reason"))}
    out["length"] = _bins(out["length"])
    refused = sum(value for _, value in prom.query(queries["refusal"], at))
    out["refusal"] = {"refused": refused, "answered": max(sum(out["finish"].values()) - refused, 0.0)}
    return out


def _bins(cumulative: dict[str, float]) -> dict[str, float]:
    """Histogram buckets (cumulative, by `le`) as counts per bin."""
    edges = sorted(cumulative, key=lambda le: math.inf if le == "+Inf" else float(le))
    out, below = {}, 0.0
    for le in edges:
        out[le] = max(cumulative[le] - below, 0.0)
        below = cumulative[le]
    return out


def kl(recent: dict[str, float], reference: dict[str, float]) -> float:
    """KL(recent || reference) over the union of bins, add-half smoothed (an empty bin is not infinite)."""
    keys = sorted(set(recent) | set(reference))
    n_p, n_q = sum(recent.values()), sum(reference.values())
    k = len(keys)
    total = 0.0
    for key in keys:
        p = (recent.get(key, 0.0) + SMOOTHING) / (n_p + SMOOTHING * k)
        q = (reference.get(key, 0.0) + SMOOTHING) / (n_q + SMOOTHING * k)
        total += p * math.log(p / q)
    return max(total, 0.0)


@dataclass
class DriftReport:
    model: str
    version: str
    threshold: float
    window: str
    divergences: dict[str, float] = field(default_factory=dict)
    recent_tokens: float = 0.0
    reference_tokens: float = 0.0
    verdict: str = ""

    @property
    def score(self) -> float:
        return max(self.divergences.values(), default=0.0)

    @property
    def drifted(self) -> bool:
        return bool(self.divergences) and self.score > self.threshold

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "threshold": self.threshold, "window": self.window,
                "divergences": self.divergences, "score": self.score, "drifted": self.drifted,
                "recent_tokens": self.recent_tokens, "reference_tokens": self.reference_tokens,
                "verdict": self.verdict}


def promoted_at(mlflow_client: Any, name: str, version: str) -> float | None:
    """When the version last became champion (its latest promotion event), in seconds since the epoch."""
    from mlops.promote import EVENT_PREFIX

    when = None
    for key, value in sorted(mlflow_client.get_registered_model(name).tags.items()):
        if key.startswith(EVENT_PREFIX):
            ev = json.loads(value)
            if ev["action"] in ("promote", "rollback") and ev["alias"] == "champion" and ev["version"] == version:
                when = int(key.removeprefix(EVENT_PREFIX).split("-")[0]) / 1e9
    return when


def reference(prom: Prometheus, mv: Any, policy: DriftPolicy, capture_now: bool = False,
              uri: str | None = None) -> dict[str, Any]:
    """The version's stored reference; captured from Prometheus (and stored) on first use."""
    from mlops.tracking import client

    mlflow_client = client(uri)
    stored = mlflow_client.get_model_version(mv.name, str(mv.version)).tags.get(REFERENCE_TAG)  # fresh
    if stored and not capture_now:
        return json.loads(stored)
    label = f"{mv.name}/v{mv.version}"
    if capture_now:
        end = time.time()
    else:
        start = promoted_at(mlflow_client, mv.name, str(mv.version))
        if start is None:
            raise RegistryError(f"{label} has no promotion to champion on record, so no reference window; capture "
                                f"the last {policy.reference_window} as its reference with `privlm monitor drift "
                                f"{mv.name} --capture-reference`")
        end = start + seconds(policy.reference_window)
        if end > time.time():
            raise RegistryError(f"{label}'s reference is still being captured (its first {policy.reference_window} "
                                f"as champion end at {time.strftime('%H:%M:%S', time.localtime(end))})")
    dists = distributions(prom, label, policy.reference_window, end)
    tokens = sum(dists["tokens"].values())
    if tokens < policy.min_tokens:
        raise RegistryError(f"{label} generated {tokens:.0f} tokens in its reference window (fewer than "
                            f"registry.drift.min_tokens={policy.min_tokens}); capture a busier window with "
                            "--capture-reference")
    ref = {"end": end, "window": policy.reference_window, "distributions": dists}
    mlflow_client.set_model_version_tag(mv.name, str(mv.version), REFERENCE_TAG, json.dumps(ref))
    return ref


def measure(prom: Prometheus, mv: Any, policy: DriftPolicy, capture_reference: bool = False,
            uri: str | None = None) -> DriftReport:
    """Drift of version `mv` now, against its reference."""
    label = f"{mv.name}/v{mv.version}"
    ref = reference(prom, mv, policy, capture_reference, uri)
    recent = distributions(prom, label, policy.window)
    report = DriftReport(mv.name, label, policy.threshold, policy.window,
                         recent_tokens=sum(recent["tokens"].values()),
                         reference_tokens=sum(ref["distributions"]["tokens"].values()))
    if report.recent_tokens < policy.min_tokens:
        report.verdict = (f"no verdict: {report.recent_tokens:.0f} tokens in the last {policy.window} (fewer than "
                          f"registry.drift.min_tokens={policy.min_tokens})")
        return report
    report.divergences = {m: kl(recent[m], ref["distributions"][m]) for m in ("tokens", "length", "finish", "refusal")}
    worst = max(report.divergences, key=report.divergences.get)
    report.verdict = (f"{'DRIFT' if report.drifted else 'no drift'}: KL {report.score:.3f} ({worst}) "
                      f"{'above' if report.drifted else 'within'} the threshold {policy.threshold}")
    return report


def alert(alertmanager: str, report: DriftReport) -> None:
    """Post the drift as a `PrivlmOutputDrift` alert to Alertmanager (it routes it to the receivers)."""
    from mlops.alerts import DRIFT_ALERT, post_alert

    post_alert(alertmanager, DRIFT_ALERT, {"model": report.model, "version": report.version, "severity": "warning"},
               {"summary": f"{report.version}: {report.verdict}", "kl": f"{report.score:.4f}"})
