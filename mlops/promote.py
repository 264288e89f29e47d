"""Promotion by alias: `challenger` on request, `champion` only through the evaluation gate, rollback.

Every promotion is an event stored as its own registered-model tag (`privlm.event.<time>-<id>`: who,
when, why, version, previous champion), so concurrent writers never overwrite each other's history.
The champion is the top of the stack obtained by replaying events (promote pushes, rollback pops);
after each change the alias is set to that top, so racing promoters converge on one consistent
state. Promotions from one host are also serialised by a file lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import json
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from jobs.recipe import DriftPolicy, PromotionPolicy
from mlops.registry import RegistryError, get_version, require_model
from mlops.tracking import client, tracking_uri

EVENT_PREFIX = "privlm.event."
CHAMPION, CHALLENGER = "champion", "challenger"


class PromotionRefused(RegistryError):
    """The challenger did not pass the gate; the message has both numbers."""


@dataclass
class Decision:
    """What a promotion did and why."""

    promoted: bool
    version: str
    previous: str | None
    reason: str


@contextlib.contextmanager
def promotion_lock(name: str, uri: str) -> Iterator[None]:
    """Serialise promotions of one model from this host."""
    folder = Path.home() / ".cache" / "privlm" / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (hashlib.sha256(f"{uri}|{name}".encode()).hexdigest()[:16] + ".lock")
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def events(mlflow_client: Any, name: str) -> list[dict[str, Any]]:
    """Promotion events of a model, oldest first."""
    tags = mlflow_client.get_registered_model(name).tags
    return [json.loads(v) for k, v in sorted(tags.items()) if k.startswith(EVENT_PREFIX)]


def champion_stack(history: list[dict[str, Any]]) -> list[str]:
    """Replay events: promote pushes a version, rollback pops; the top is the champion."""
    stack: list[str] = []
    for ev in history:
        if ev["action"] == "promote" and ev["alias"] == CHAMPION:
            stack.append(ev["version"])
        elif ev["action"] == "rollback" and stack:
            stack.pop()
    return stack


def _record(mlflow_client: Any, name: str, event: dict[str, Any]) -> None:
    key = f"{EVENT_PREFIX}{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
    mlflow_client.set_registered_model_tag(name, key, json.dumps(event))


def _event(action: str, alias: str, version: str, previous: str | None, reason: str) -> dict[str, Any]:
    return {"action": action, "alias": alias, "version": version, "previous": previous, "reason": reason,
            "who": f"{getpass.getuser()}@{socket.gethostname()}", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _alias(mlflow_client: Any, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(mlflow_client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _tag_version(mlflow_client: Any, name: str, event: dict[str, Any]) -> None:
    for key in ("who", "when", "reason", "previous"):
        mlflow_client.set_model_version_tag(name, event["version"], f"promotion.{key}", str(event[key]))


def promote_challenger(name: str, version: str, reason: str = "", uri: str | None = None) -> Decision:
    """Point `challenger` at a version (no gate: the gate is on the way to champion)."""
    uri = uri or tracking_uri()
    mv = get_version(name, version, uri)
    mlflow_client = client(uri)
    with promotion_lock(name, uri):
        previous = _alias(mlflow_client, name, CHALLENGER)
        event = _event("promote", CHALLENGER, str(mv.version), previous, reason or "requested")
        _record(mlflow_client, name, event)
        mlflow_client.set_registered_model_alias(name, CHALLENGER, str(mv.version))
    return Decision(True, str(mv.version), previous, event["reason"])


def _registry_section(mv: Any, key: str) -> dict[str, Any]:
    recipe = yaml.safe_load(mv.tags.get("privlm.recipe_yaml", "") or "{}") or {}
    return (recipe.get("registry") or {}).get(key) or {}


def policy_for(mv: Any) -> PromotionPolicy:
    """The promotion policy of the recipe the version was trained with."""
    return PromotionPolicy.model_validate(_registry_section(mv, "promotion"))


def drift_policy_for(mv: Any) -> DriftPolicy:
    """The drift policy of the recipe the version was trained with (threshold, windows)."""
    return DriftPolicy.model_validate(_registry_section(mv, "drift"))


def _metric(mv: Any, policy: PromotionPolicy) -> float:
    key = f"eval.{policy.metric}"
    if key not in mv.tags:
        have = sorted(k.removeprefix("eval.") for k in mv.tags if k.startswith("eval.")) or "none"
        raise RegistryError(f"{mv.name}/{mv.version} has no {policy.metric!r} (its eval metrics: {have}); "
                            f"run `privlm model evaluate {mv.name} {mv.version}` or pick another --metric")
    return float(mv.tags[key])


def gate(challenger: Any, champion: Any | None, policy: PromotionPolicy) -> tuple[bool, str]:
    """Does the challenger beat the champion by the policy? (verdict, explanation with both numbers)"""
    refused = _quantization_refusal(challenger, policy)
    if refused:
        return False, refused
    c = _metric(challenger, policy)
    if champion is None:
        return True, f"first champion: {policy.metric}={c:.4f}"
    if challenger.tags.get("privlm.quantized_from") == f"{champion.name}/{champion.version}":
        return True, (f"v{challenger.version} is the champion v{champion.version} quantized "
                      f"({challenger.tags.get('privlm.quant_scheme')}), perplexity_delta "
                      f"{float(challenger.tags['eval.perplexity_delta']):.4f} within "
                      f"max_quantized_perplexity_delta {policy.max_quantized_perplexity_delta}")
    p = _metric(champion, policy)
    if challenger.tags.get("eval.dataset") != champion.tags.get("eval.dataset"):
        raise PromotionRefused(
            f"v{challenger.version} and v{champion.version} were evaluated on different data "
            f"({challenger.tags.get('eval.dataset')} vs {champion.tags.get('eval.dataset')}); evaluate both with "
            "the same --data before comparing")
    improvement = (p - c) if policy.direction == "minimize" else (c - p)
    numbers = (f"challenger v{challenger.version} {policy.metric}={c:.4f}, champion v{champion.version} "
               f"{policy.metric}={p:.4f} ({policy.direction}, min_margin {policy.min_margin})")
    if improvement > policy.min_margin:
        return True, f"{numbers}: better by {improvement:.4f}"
    return False, f"{numbers}: improvement {improvement:.4f} is not above the margin"


def _ab_gate(name: str, champion: Any, challenger: Any, policy: PromotionPolicy,
             feedback_url: str | None) -> tuple[bool, str, Any]:
    """The A/B verdict on production feedback: (challenger wins, explanation with the numbers, comparison)."""
    from mlops.compare import compare_versions
    from mlops.feedback import FeedbackStore, default_url

    refused = _quantization_refusal(challenger, policy)
    if refused:
        return False, refused, None
    store = FeedbackStore(feedback_url or default_url())
    ab = compare_versions(store, name, f"{name}/v{champion.version}", f"{name}/v{challenger.version}", policy.ab)
    return ab.challenger_wins, f"A/B: {ab.verdict()}", ab


def _quantization_refusal(challenger: Any, policy: PromotionPolicy) -> str | None:
    """Why a quantized challenger lost too much against its parent, or None (not quantized, or within the cap)."""
    parent = challenger.tags.get("privlm.quantized_from")
    if parent is None:
        return None
    delta = challenger.tags.get("eval.perplexity_delta")
    if delta is None:
        return (f"v{challenger.version} is quantized from {parent} but has no eval.perplexity_delta; "
                f"quantize again with `privlm model quantize {parent.replace('/', ' ')} --scheme ...`")
    cap = policy.max_quantized_perplexity_delta
    if float(delta) <= cap:
        return None
    return (f"v{challenger.version} (quantized from {parent}, {challenger.tags.get('privlm.quant_scheme')}) has "
            f"perplexity_delta {float(delta):.4f} above max_quantized_perplexity_delta {cap}; use a scheme with more "
            "bits, add --calibration, or raise registry.promotion.max_quantized_perplexity_delta in the recipe")


def promote_champion(name: str, overrides: dict[str, Any] | None = None, reason: str = "",
                     uri: str | None = None, feedback_url: str | None = None) -> Decision:
    """Move `champion` to the challenger only if it passes the gate; raise PromotionRefused otherwise.

    With `feedback_url` (or `registry.promotion.ab.required` in the recipe) the gate is the A/B test on
    production feedback (mlops/compare.py): the challenger must win significantly, with enough data.
    """
    uri = uri or tracking_uri()
    mlflow_client = client(uri)
    require_model(name, uri)
    with promotion_lock(name, uri):
        challenger_v = _alias(mlflow_client, name, CHALLENGER)
        if challenger_v is None:
            raise RegistryError(f"{name} has no challenger; run `privlm model promote {name} VERSION` first")
        challenger = mlflow_client.get_model_version(name, challenger_v)
        stack = champion_stack(events(mlflow_client, name))
        current = stack[-1] if stack else _alias(mlflow_client, name, CHAMPION)  # or one set outside privlm
        if current == challenger_v:
            return Decision(False, challenger_v, current, f"v{challenger_v} is already the champion")
        champion = mlflow_client.get_model_version(name, current) if current else None
        policy = policy_for(challenger).model_copy(update={k: v for k, v in (overrides or {}).items() if v is not None})
        ab = None
        if champion is not None and (feedback_url or policy.ab.required):
            ok, why, ab = _ab_gate(name, champion, challenger, policy, feedback_url)
        else:
            ok, why = gate(challenger, champion, policy)
        if not ok:
            raise PromotionRefused(f"refused: {why}")
        event = _event("promote", CHAMPION, challenger_v, current, f"{reason + ': ' if reason else ''}{why}")
        if ab is not None:
            event["ab"] = ab.as_dict()
        _record(mlflow_client, name, event)
        _converge(mlflow_client, name)
        _tag_version(mlflow_client, name, event)
        if ab is not None:  # what the quality-drop alert compares online feedback with from now on
            mlflow_client.set_model_version_tag(name, challenger_v, "privlm.quality_baseline",
                                                f"{ab.challenger.mean:.6f}")
    return Decision(True, challenger_v, current, event["reason"])


def rollback(name: str, reason: str = "", uri: str | None = None) -> Decision:
    """Restore the previous champion."""
    uri = uri or tracking_uri()
    mlflow_client = client(uri)
    require_model(name, uri)
    with promotion_lock(name, uri):
        stack = champion_stack(events(mlflow_client, name))
        if len(stack) < 2:
            raise RegistryError(f"{name} has no previous champion to roll back to (champions so far: {stack})")
        event = _event("rollback", CHAMPION, stack[-2], stack[-1], reason or f"rollback of v{stack[-1]}")
        _record(mlflow_client, name, event)
        _converge(mlflow_client, name)
        _tag_version(mlflow_client, name, event)
    return Decision(True, stack[-2], stack[-1], event["reason"])


def _converge(mlflow_client: Any, name: str) -> None:
    """Set `champion` to the replayed top of the event history."""
    stack = champion_stack(events(mlflow_client, name))
    if stack:
        mlflow_client.set_registered_model_alias(name, CHAMPION, stack[-1])
