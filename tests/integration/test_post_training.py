"""Post-training on real 2-rank DeepSpeed: chat SFT with loss masks, DPO against a frozen reference, and
distillation from a registered teacher; each resumes bit for bit after SIGKILL and records its lineage."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO, SMALL, merge, privlm, read_losses, run_env, start_run, wait_for_step, write_recipe

pytestmark = pytest.mark.integration

CHAT = {"sources": [{"path": str(REPO / "recipes/data/chat/train.jsonl"), "split": "train"},
                    {"path": str(REPO / "recipes/data/chat/heldout.jsonl"), "split": "eval"}],
        "format": "chat", "chat": {"truncate": True}, "num_shards": 1, "workers": 1}
PREFERENCE = {**CHAT, "format": "preference",
              "sources": [{"path": str(REPO / "recipes/data/preference/train.jsonl"), "split": "train"},
                          {"path": str(REPO / "recipes/data/preference/heldout.jsonl"), "split": "eval"}]}
STEPS = {"training": {"sequence_length": 128, "max_steps": 6, "warmup_steps": 1, "learning_rate": 3e-3,
                      "micro_batch_size": 4, "global_batch_size": 8},
         "deepspeed": {"zero_stage": 2}, "checkpoint": {"interval": 3, "keep": 2},
         "registry": {"tracking": False}}  # tracking is the same code path as every run's (test_mlops)


def post_recipe(root: Path, name: str, tokenizer: Path, data: dict[str, Any], finetune: dict[str, Any],
                **extra: Any) -> Path:
    run = root / name
    body = merge(SMALL, merge(STEPS, {"name": name, "run_dir": str(run), "tokenizer": {"path": str(tokenizer)},
                                      "data": {**data, "output_dir": str(root / f"data-{data['format']}")},
                                      "checkpoint": {"directory": str(run / "ckpt")}, "finetune": finetune}))
    return write_recipe(root / f"{name}.yaml", merge(body, extra))


def train_twice(recipe: Path, run: Path, kill_at: int) -> tuple[dict, dict]:
    """(losses of the run SIGKILLed after `kill_at` and resumed, losses of an uninterrupted copy)."""
    proc = start_run(recipe)
    wait_for_step(run, kill_at, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    privlm("train", "run", str(recipe))
    resumed = read_losses(run)
    fresh = recipe.with_name(recipe.stem + "-fresh.yaml")
    body = recipe.read_text().replace(str(run), str(run) + "-fresh")
    fresh.write_text(body)
    privlm("train", "run", str(fresh))
    return resumed, read_losses(Path(str(run) + "-fresh"))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, small_data: Path) -> tuple[Path, Path]:
    """(a pretrained base model, its tokenizer): 6 steps of SMALL."""
    root = tmp_path_factory.mktemp("post-base")
    recipe = write_recipe(root / "base.yaml", merge(SMALL, {
        "name": "base", "run_dir": str(root / "base"), "data": {"output_dir": str(small_data)},
        "training": {"max_steps": 6}, "checkpoint": {"directory": str(root / "base" / "ckpt")}}))
    privlm("train", "run", str(recipe))
    return root / "base" / "model", small_data / "tokenizer"


@pytest.fixture(scope="module")
def sft(tmp_path_factory: pytest.TempPathFactory, base: tuple[Path, Path]) -> dict[str, Any]:
    """Chat SFT of the base, SIGKILLed at step 4 and resumed, beside an uninterrupted copy."""
    root = tmp_path_factory.mktemp("post-sft")
    recipe = post_recipe(root, "sft", base[1], CHAT, {"method": "full", "base": str(base[0])})
    privlm("data", "prepare", str(recipe))
    resumed, fresh = train_twice(recipe, root / "sft", 4)
    return {"root": root, "run": root / "sft", "resumed": resumed, "fresh": fresh, "tokenizer": base[1]}


def test_chat_sft_resumes_bitwise_and_ships_its_chat_template(sft: dict[str, Any]) -> None:
    assert sft["resumed"] == sft["fresh"] and len(sft["fresh"]) == 6  # every step's loss, bit for bit
    model = sft["run"] / "model"
    lineage = json.loads((model / "privlm.json").read_text())
    assert lineage["method"] == "full" and lineage["data_format"] == "chat"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)  # the template serving renders chats with
    text = tok.apply_chat_template([{"role": "user", "content": "2+3?"}], tokenize=False, add_generation_prompt=True)
    assert "2+3?" in text and (model / "chat_template.jinja").is_file()
    summary = json.loads((sft["run"] / "summary.json").read_text())
    assert summary["eval_loss"] > 0  # assistant-token loss on the held-out chats


@pytest.fixture(scope="module")
def dpo(sft: dict[str, Any]) -> dict[str, Any]:
    """DPO of the SFT model (its own frozen reference), SIGKILLed at step 4 and resumed, beside a fresh copy."""
    root = sft["root"]
    finetune = {"method": "dpo", "base": str(sft["run"] / "model"), "dpo": {"beta": 0.1}}
    recipe = post_recipe(root, "dpo", sft["tokenizer"], PREFERENCE, finetune, training={"eval_every": 3})
    privlm("data", "prepare", str(recipe))
    resumed, fresh = train_twice(recipe, root / "dpo", 4)
    return {"run": root / "dpo", "resumed": resumed, "fresh": fresh}


def test_dpo_logs_margin_and_accuracy_and_resumes_bitwise(sft: dict[str, Any], dpo: dict[str, Any]) -> None:
    root = sft["root"]
    assert dpo["resumed"] == dpo["fresh"] and len(dpo["fresh"]) == 6
    records = [json.loads(x) for x in (root / "dpo" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward_margin" in r]
    # step 1: the policy is the reference, so every implicit reward is 0; then it moves away from it
    assert steps[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert steps[-1]["reward_margin"] > 0 and 0.0 <= steps[-1]["preference_accuracy"] <= 1.0
    evals = [r for r in records if r.get("event") == "eval"]
    assert evals and "eval_preference_accuracy" in evals[-1]
    lineage = json.loads((root / "dpo" / "model" / "privlm.json").read_text())
    assert lineage["method"] == "dpo" and 0.0 <= lineage["eval_preference_accuracy"] <= 1.0
    assert lineage["reference_model"] == str(sft["run"] / "model")


def test_each_method_is_registered_with_lineage_and_evaluated_its_way(sft: dict[str, Any], dpo: dict[str, Any],
                                                                     mlflow_server) -> None:
    """SFT: assistant-token perplexity on held-out chats; DPO: preference accuracy against its reference on
    held-out pairs, the same measure as in the run (same model, same pairs: the same number)."""
    from mlflow import MlflowClient

    env = {**run_env(), "MLFLOW_TRACKING_URI": mlflow_server.uri}
    client = MlflowClient(mlflow_server.uri)
    for run in (sft["run"], dpo["run"]):
        privlm("model", "register", str(run), "--name", "post-methods", env=env)
    chat_v, dpo_v = sorted(int(v.version) for v in client.search_model_versions("name='post-methods'"))[-2:]
    for v in (chat_v, dpo_v):
        privlm("model", "evaluate", "post-methods", str(v), env=env)
    chat, pref = (client.get_model_version("post-methods", str(v)).tags for v in (chat_v, dpo_v))
    assert chat["privlm.method"] == "full" and chat["privlm.data_format"] == "chat"
    assert float(chat["eval.eval_perplexity"]) > 1 and "eval.eval_preference_accuracy" not in chat
    assert pref["privlm.method"] == "dpo" and pref["privlm.parent"] == f"post-methods/{chat_v}"
    in_run = json.loads((dpo["run"] / "model" / "privlm.json").read_text())["eval_preference_accuracy"]
    assert float(pref["eval.eval_preference_accuracy"]) == pytest.approx(in_run, abs=1e-4)


def test_distillation_from_a_registered_teacher_into_a_smaller_student(sft: dict[str, Any], mlflow_server,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    env = {**run_env(), "MLFLOW_TRACKING_URI": mlflow_server.uri}
    out = privlm("model", "register", str(sft["run"]), "--name", "post-teacher", env=env).stdout
    client = MlflowClient(mlflow_server.uri)
    version = max(int(v.version) for v in client.search_model_versions("name='post-teacher'"))
    client.set_registered_model_alias("post-teacher", "champion", str(version))
    root = sft["root"]
    finetune = {"method": "distill", "distill": {"teacher": "models:/post-teacher@champion", "temperature": 2.0,
                                                 "alpha": 0.5}}
    recipe = post_recipe(root, "distill", sft["tokenizer"], CHAT, finetune,
                         model={"hidden_size": 32, "num_layers": 1, "intermediate_size": 64})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)  # the ranks resolve the alias in the registry
    resumed, fresh = train_twice(recipe, root / "distill", 4)
    assert resumed == fresh and len(fresh) == 6, out
    summary = json.loads((root / "distill" / "summary.json").read_text())
    lineage = json.loads((root / "distill" / "model" / "privlm.json").read_text())
    assert lineage["method"] == "distill" and lineage["teacher"] == f"post-teacher/{version}"
    assert summary["teacher_eval_loss"] > 0 and summary["eval_loss"] > 0  # student vs teacher, same split
    from safetensors.torch import load_file

    student = load_file(root / "distill" / "model" / "model.safetensors")
    teacher = load_file(sft["run"] / "model" / "model.safetensors")
    assert sum(v.numel() for v in student.values()) < sum(v.numel() for v in teacher.values())
