"""Evaluate a registered version: held-out perplexity and a generation sanity check, logged to it."""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Any

from mlops.registry import RegistryError, get_version, load_components, local_model_dir
from mlops.tracking import client, experiment_id

SANITY_PROMPT = "def "


def eval_data_dir(version: Any, data_dir: Path | None) -> Path:
    """The eval split to use: given, or the one of the recipe the version was trained on."""
    path = Path(data_dir) if data_dir else Path(version.tags.get("privlm.data_dir", ""))
    if not (path / "index.json").is_file():
        raise RegistryError(f"no prepared data at {path!s} for {version.name}/{version.version}; "
                            "run `privlm data prepare` for its recipe or pass --data DIR")
    return path


def perplexity(model: Any, data_dir: Path, max_blocks: int, batch: int = 8) -> tuple[float, int]:
    """exp(eval loss) over the first `max_blocks` eval blocks, with the trainer's own definition of eval
    loss (jobs.train.loss); returns (perplexity, blocks used)."""
    from jobs.data.pack import PackedDataset
    from jobs.train.loss import split_loss

    data = PackedDataset(data_dir, "eval")
    n = min(len(data), max_blocks)
    if n == 0:
        raise RegistryError(f"{data_dir} has no eval blocks; prepare it with data.eval_fraction > 0")
    model.eval()
    total, count = split_loss(lambda inputs: model(**inputs).logits, data, batch, n)
    return math.exp(total / count), n


def preference_accuracy(model: Any, data_dir: Path, max_pairs: int, reference: Any = None,
                        batch: int = 8) -> tuple[float, float, int]:
    """(preference accuracy, mean reward margin, pairs) on the first `max_pairs` held-out pairs: the share of
    pairs whose implicit reward log π(chosen) - log π(rejected), less the reference's, is positive — DPO's own
    measure (the in-run `eval_preference_accuracy`); without a reference, the policy's margin alone."""
    import torch

    from jobs.data.pack import PackedDataset
    from jobs.train.loss import IGNORE, share_batches
    from jobs.train.methods import model_inputs
    from jobs.train.objectives import sequence_logps

    data = PackedDataset(data_dir, "eval")
    n = min(len(data), max_pairs)
    if n == 0:
        raise RegistryError(f"{data_dir} has no held-out pairs; add a source with split: eval")

    def margin(m: Any, t: dict[str, Any]) -> Any:
        sides = [sequence_logps(m(**model_inputs(t, side, torch.float32)).logits, t[f"{side}labels"])
                 for side in ("chosen_", "rejected_")]
        return sides[0] - sides[1]

    wins, margins = 0, []
    with torch.no_grad():
        for ids in share_batches(len(data), 0, 1, batch, n):
            t = {k: torch.from_numpy(v) for k, v in data.get_batch(ids).items()}
            real = (t["chosen_labels"][:, 1:] != IGNORE).any(dim=1)
            m = margin(model, t) - (margin(reference, t) if reference is not None else 0.0)
            wins += int((m[real] > 0).sum())
            margins += m[real].tolist()
    return wins / len(margins), sum(margins) / len(margins), len(margins)


def generation_check(model: Any, tokenizer: Any, new_tokens: int = 24) -> dict[str, Any]:
    """Greedy continuation of a fixed prompt: it must produce tokens, and not one token repeated."""
    import torch

    ids = tokenizer(SANITY_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    generated = out[0, ids.shape[1]:].tolist()
    distinct = len(set(generated)) / max(len(generated), 1)
    return {"text": tokenizer.decode(generated), "tokens": len(generated), "distinct_ratio": distinct,
            "passed": len(generated) > 0 and distinct > 0.1}


def score(model: Any, tokenizer: Any, data: Path, max_blocks: int,
          reference: Any = None) -> tuple[dict[str, float], str]:
    """The measure the data calls for, and the generation check of a loaded model: (metrics, generated sample).
    Text: perplexity; chat: perplexity of the assistant's tokens; preference pairs: preference accuracy."""
    from jobs.data.pack import PackedDataset

    t0 = time.perf_counter()
    sanity = generation_check(model, tokenizer)
    if PackedDataset(data, "eval").format == "preference":
        accuracy, margin, pairs = preference_accuracy(model, data, max_blocks, reference)
        return ({"eval_preference_accuracy": accuracy, "eval_reward_margin": margin, "eval_pairs": pairs,
                 "generation_ok": float(sanity["passed"]), "generation_distinct_ratio": sanity["distinct_ratio"],
                 "eval_seconds": time.perf_counter() - t0}, sanity["text"])
    ppl, blocks = perplexity(model, data, max_blocks)
    return ({"eval_perplexity": ppl, "eval_loss": math.log(ppl), "eval_blocks": blocks,
             "generation_ok": float(sanity["passed"]), "generation_distinct_ratio": sanity["distinct_ratio"],
             "eval_seconds": time.perf_counter() - t0}, sanity["text"])


def log_evaluation(name: str, version: str, result: dict[str, float], data: Path, sample: str,
                   uri: str | None = None) -> str:
    """Record eval metrics on the version (tags `eval.*`) and in an evaluation run (metrics); returns the dataset id."""
    dataset = _dataset_id(data)
    mlflow_client = client(uri)
    for key, value in result.items():
        mlflow_client.set_model_version_tag(name, version, f"eval.{key}", f"{value:.6g}")
    mlflow_client.set_model_version_tag(name, version, "eval.dataset", dataset)
    mlflow_client.set_model_version_tag(name, version, "eval.sample", sample[:500])
    run = mlflow_client.create_run(experiment_id(mlflow_client, "privlm-evaluations"),
                                   run_name=f"eval-{name}-v{version}",
                                   tags={"privlm.model": name, "privlm.version": str(version),
                                         "privlm.eval_dataset": dataset})
    for key, value in result.items():
        mlflow_client.log_metric(run.info.run_id, key, value)
    mlflow_client.set_terminated(run.info.run_id)
    return dataset


def evaluate_version(name: str, version: str, data_dir: Path | None = None, max_blocks: int = 64,
                     uri: str | None = None) -> dict[str, Any]:
    """Compute and log eval metrics to the version (tags) and to an evaluation run (metrics)."""
    mv = get_version(name, version, uri)
    data = eval_data_dir(mv, data_dir)
    model, tokenizer = _load_for_eval(mv, uri)
    result, sample = score(model, tokenizer, data, max_blocks, _reference_for(mv))
    dataset = log_evaluation(name, str(mv.version), result, data, sample, uri)
    return {**result, "dataset": dataset, "sample": sample, "version": str(mv.version)}


def _reference_for(mv: Any) -> Any:
    """A DPO version's frozen reference (its base model directory, when still on disk), else None."""
    base = mv.tags.get("privlm.reference_model_dir") or mv.tags.get("privlm.base_model_dir")
    if mv.tags.get("privlm.method") != "dpo" or not base or not (Path(base) / "config.json").is_file():
        return None
    from jobs.train.model import load_pretrained

    return load_pretrained(base).eval()


def _load_for_eval(mv: Any, uri: str | None) -> tuple[Any, Any]:
    """(model, tokenizer): the transformers flavor; for a quantized version its plain checkpoint directory;
    for a LoRA adapter version, its base with the adapter applied (peft)."""
    adapter_of = mv.tags.get("privlm.adapter_of")
    if adapter_of:
        from peft import PeftModel

        base, tokenizer = load_components(f"models:/{adapter_of}", uri)
        adapter = local_model_dir(f"models:/{mv.name}/{mv.version}", uri)
        return PeftModel.from_pretrained(base, str(adapter)).eval(), tokenizer
    if "privlm.quantized_from" not in mv.tags:
        return load_components(f"models:/{mv.name}/{mv.version}", uri)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = local_model_dir(f"models:/{mv.name}/{mv.version}", uri)
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _dataset_id(data_dir: Path) -> str:
    """Which eval set: the data manifest's fingerprint, or a hash of the index."""
    import json

    manifest = data_dir / "manifest.json"
    if manifest.is_file():
        fp = json.loads(manifest.read_text()).get("fingerprint")
        if fp:
            return f"{fp}:eval"
    return hashlib.sha256((data_dir / "index.json").read_bytes()).hexdigest()[:16] + ":eval"
