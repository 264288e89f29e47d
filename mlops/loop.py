"""The loop from production back to training: export well-rated answers, decide when to retrain,
fine-tune, gate offline, and hand the result to A/B as the challenger.

One `check` is one turn of the loop (run it from cron or a Slurm scron job):
1. a challenger that has won its A/B test (mlops/compare.py) becomes champion (`promote_champion`
   with the feedback store: the decision and its numbers are a promotion event);
2. otherwise, when a trigger fires (output drift above its threshold, N new rated answers, or a
   schedule), the rated answers become a fine-tuning source (PII-redacted, deduplicated against the
   training data and each other), the fine-tune recipe runs as a job (Slurm or local), the new version
   is registered and evaluated beside the champion on the same data, and, past the offline gate,
   becomes the challenger; the gateway then gives it the A/B share of traffic.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlops.feedback import FeedbackStore

LAST_RETRAIN_TAG = "privlm.loop.last_retrain"


@dataclass
class Export:
    path: Path
    considered: int = 0
    kept: int = 0
    below_score: int = 0
    duplicates: int = 0
    redactions: dict[str, int] = field(default_factory=dict)


def export_feedback(store: FeedbackStore, model: str, out: Path, min_score: float = 0.75,
                    since: float | None = None, against: list[Path] | None = None) -> Export:
    """Rated answers with score >= min_score as JSONL records (`text`, `prompt`, `response`; a user's
    correction replaces the answer), PII-redacted, minus exact duplicates of each other and of the
    documents in `against` (the training data's files). Written atomically."""
    from collections import Counter

    from jobs.data.dedup import exact_key
    from jobs.data.pii import redact
    from jobs.files import atomic_write_text
    from jobs.recipe import PIIConfig

    report, pii, counts = Export(out), PIIConfig(), Counter[str]()
    seen = {exact_key(_norm(doc)) for doc in _documents(against or [])}
    lines = []
    for r in store.rated(model, since=since):
        report.considered += 1
        if r.score < min_score or not (r.correction or r.completion):
            report.below_score += 1
            continue
        prompt, c1 = redact(r.prompt or "", pii)
        response, c2 = redact(r.correction or r.completion or "", pii)
        text = f"{prompt}\n{response}"
        key = exact_key(_norm(text))
        if key in seen:
            report.duplicates += 1
            continue
        seen.add(key)
        counts.update(c1 + c2)
        lines.append(json.dumps({"text": text, "prompt": prompt, "response": response, "id": r.id,
                                 "version": r.version, "score": r.score}, ensure_ascii=False))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "".join(line + "\n" for line in lines))
    report.kept, report.redactions = len(lines), dict(counts)
    return report


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def _documents(paths: list[Path]) -> list[str]:
    from jobs.data.sources import discover, read_documents
    from jobs.recipe import DataSource

    docs = []
    for item in discover([DataSource(path=str(p)) for p in paths]):
        docs.extend(d.text for d in read_documents(item))
    return docs


@dataclass
class Trigger:
    """Which conditions start a retraining (any of them)."""

    drift: bool = False
    feedback_count: int | None = None
    every_s: float | None = None


def due(trigger: Trigger, store: FeedbackStore, model: str, last_retrain: float | None,
        drifted: bool = False) -> str | None:
    """Why a retraining is due now, or None."""
    if trigger.drift and drifted:
        return "output drift above its threshold"
    if trigger.feedback_count is not None:
        n = len(store.rated(model, since=last_retrain))
        if n >= trigger.feedback_count:
            return f"{n} rated answers since the last retraining (trigger: {trigger.feedback_count})"
    if trigger.every_s is not None and (last_retrain is None or time.time() - last_retrain >= trigger.every_s):
        return f"schedule: every {trigger.every_s / 3600:g} h"
    return None


def last_retrain(mlflow_client: Any, name: str) -> float | None:
    value = mlflow_client.get_registered_model(name).tags.get(LAST_RETRAIN_TAG)
    return float(value) if value else None


def retrain(name: str, recipe_path: Path, data_file: Path, overrides: list[str] | None = None,
            executor: str | None = None, console: Any = None, uri: str | None = None,
            as_adapter: bool = True) -> dict[str, Any]:
    """Fine-tune the champion's base model (finetune.base is set to it) on the exported answers, register
    the result (a LoRA run as an adapter on that base unless `as_adapter` is false), evaluate it beside
    the champion on the same held-out data, and make it the challenger if it passes the offline gate.
    Returns what happened, with the gate's explanation."""
    from jobs.data.pipeline import prepare_data
    from jobs.launch.submit import follow, submit_training
    from jobs.recipe import load_recipe
    from mlops.evaluate import evaluate_version
    from mlops.promote import gate, policy_for, promote_challenger
    from mlops.registry import (
        RegistryError,
        alias_version,
        get_version,
        local_model_dir,
        register_adapter,
        register_run,
    )
    from mlops.tracking import client

    champion = alias_version(name, "champion", uri)
    base_version = (champion.tags.get("privlm.adapter_of") or f"{name}/{champion.version}").split("/")[-1]
    base_dir = local_model_dir(f"models:/{name}/{base_version}", uri)
    source = json.dumps([{"path": str(data_file.resolve()), "format": "jsonl"}])
    recipe = load_recipe(recipe_path, [*(overrides or []), f"data.sources={source}", f"finetune.base={base_dir}"])
    if recipe.finetune is None:
        raise RegistryError(f"{recipe_path} has no finetune section; the loop fine-tunes the champion "
                            "(e.g. recipes/tiny-cpu-lora.yaml)")
    prepare_data(recipe, console=console, progress=console is not None)
    follow(submit_training(recipe, executor), recipe, console)
    if as_adapter and recipe.finetune.method == "lora":
        reg = register_adapter(recipe.run_path, name, uri, base_version=base_version)
    else:
        reg = register_run(recipe.run_path, name, uri)
    client(uri).set_registered_model_tag(name, LAST_RETRAIN_TAG, f"{time.time():.3f}")
    for version in (champion.version, reg.version):  # like with like: both on the new held-out split
        evaluate_version(name, str(version), data_dir=recipe.data_path, uri=uri)
    challenger, champion = get_version(name, reg.version, uri), get_version(name, champion.version, uri)
    ok, why = gate(challenger, champion, policy_for(challenger))
    if ok:
        promote_challenger(name, str(reg.version), reason=f"retrained on production feedback: {why}", uri=uri)
    return {"version": str(reg.version), "challenger": ok, "gate": why, "run": str(recipe.run_path)}
