"""Real 2-rank DeepSpeed training on CPU: ZeRO 1-3, export, kill-and-resume equality, signals."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import SMALL, merge, privlm, read_losses, run_env, start_run, wait_for_step, write_recipe

pytestmark = pytest.mark.integration


def exported_eval_loss(model_dir: Path, data_dir: Path) -> float:
    """Loss of the exported Hugging Face model on the first eval blocks, computed outside DeepSpeed."""
    from transformers import AutoModelForCausalLM

    from jobs.data.pack import PackedDataset

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    blocks = torch.from_numpy(PackedDataset(data_dir, "eval").get_blocks(list(range(4))))
    with torch.no_grad():
        return float(model(input_ids=blocks, labels=blocks).loss)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_trains_and_exports_a_loadable_model(stage: int, make_recipe, small_data: Path) -> None:
    recipe = make_recipe(f"zero{stage}", deepspeed={"zero_stage": stage}, training={"max_steps": 10})
    privlm("train", "run", str(recipe))
    run = recipe.parent / f"zero{stage}"
    losses = read_losses(run)
    assert sorted(losses) == list(range(1, 11))
    assert losses[10] < losses[1] - 0.4, losses
    model_dir = run / "model"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "privlm.json"):
        assert (model_dir / name).is_file(), name
    lineage = json.loads((model_dir / "privlm.json").read_text())
    assert lineage["step"] == 10 and lineage["zero_stage"] == stage and lineage["data_fingerprint"]
    # The export holds the trained weights (gathered from ZeRO partitions): same loss outside DeepSpeed.
    assert exported_eval_loss(model_dir, small_data) < losses[1] - 0.4
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in records if r.get("step") == 10 and "loss" in r)
    assert step["tokens_per_s"] > 0 and 0 < step["mfu"] < 1.5 and step["grad_norm"] > 0


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory, small_data: Path) -> tuple[dict, Path]:
    """An uninterrupted 12-step ZeRO-2 run: the losses and final weights every resume must equal."""
    root = tmp_path_factory.mktemp("reference")
    run = root / "ref"
    data = merge(SMALL, {"name": "ref", "run_dir": str(run), "data": {"output_dir": str(small_data)},
                         "deepspeed": {"zero_stage": 2}, "checkpoint": {"directory": str(run / "ckpt")}})
    privlm("train", "run", str(write_recipe(root / "ref.yaml", data)))
    return read_losses(run), run / "model" / "model.safetensors"


def resumable_recipe(tmp_path: Path, small_data: Path, name: str) -> Path:
    run = tmp_path / name
    data = merge(SMALL, {"name": name, "run_dir": str(run), "data": {"output_dir": str(small_data)},
                         "deepspeed": {"zero_stage": 2}, "checkpoint": {"directory": str(run / "ckpt")}})
    return write_recipe(tmp_path / f"{name}.yaml", data)


def assert_same_as_reference(run: Path, reference: tuple[dict, Path]) -> None:
    ref_losses, ref_weights = reference
    losses = read_losses(run)
    assert losses == ref_losses  # bitwise: float equality on every step
    got, want = load_file(run / "model" / "model.safetensors"), load_file(ref_weights)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_kill_during_checkpoint_write_resumes_bitwise(tmp_path: Path, small_data: Path, reference_run) -> None:
    recipe = resumable_recipe(tmp_path, small_data, "crash")
    env = {**run_env(), "PRIVLM_FAULT": "during_checkpoint:8:1"}  # rank 1 SIGKILLed mid-write of step 8
    crashed = privlm("train", "run", str(recipe), env=env, check=False)
    assert crashed.returncode != 0
    ckpt = tmp_path / "crash" / "ckpt"
    assert (ckpt / "latest").read_text() == "step-00000004"  # the half-written step 8 was never published
    assert not (ckpt / "step-00000008").exists() and (ckpt / ".staging" / "step-00000008").exists()
    resumed = privlm("train", "run", str(recipe))
    assert "resumed from" in resumed.stdout and "at step 4" in resumed.stdout
    assert not (ckpt / ".staging" / "step-00000008").exists()
    assert_same_as_reference(tmp_path / "crash", reference_run)


def test_sigkill_of_the_whole_job_resumes_bitwise(tmp_path: Path, small_data: Path, reference_run) -> None:
    recipe = resumable_recipe(tmp_path, small_data, "killed")
    proc = start_run(recipe)
    wait_for_step(tmp_path / "killed", 6, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "model").exists()
    privlm("train", "run", str(recipe))
    assert_same_as_reference(tmp_path / "killed", reference_run)


def test_sigterm_checkpoints_at_the_step_and_exits_143(tmp_path: Path, small_data: Path, reference_run) -> None:
    recipe = resumable_recipe(tmp_path, small_data, "term")
    proc = start_run(recipe)
    wait_for_step(tmp_path / "term", 5, proc)
    proc.send_signal(signal.SIGTERM)  # to the launcher only: it forwards to the ranks
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    latest = (tmp_path / "term" / "ckpt" / "latest").read_text()
    stopped_at = max(read_losses(tmp_path / "term"))
    assert latest == f"step-{stopped_at:08d}"  # nothing lost: the checkpoint is the last completed step
    privlm("train", "run", str(recipe))
    assert_same_as_reference(tmp_path / "term", reference_run)


def test_lora_finetune_resumes_and_merges(tmp_path: Path, small_data: Path, reference_run) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = reference_run[1].parent
    run = tmp_path / "lora"
    data = merge(SMALL, {"name": "lora", "run_dir": str(run), "data": {"output_dir": str(small_data)},
                         "deepspeed": {"zero_stage": 2}, "checkpoint": {"directory": str(run / "ckpt")},
                         "training": {"max_steps": 8, "learning_rate": 1e-2},
                         "finetune": {"base": str(base), "method": "lora",
                                      "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}})
    recipe = write_recipe(tmp_path / "lora.yaml", data)
    env = {**run_env(), "PRIVLM_FAULT": "during_checkpoint:8:0"}
    assert privlm("train", "run", str(recipe), env=env, check=False).returncode != 0
    privlm("train", "run", str(recipe))
    uninterrupted = tmp_path / "lora-ref"
    privlm("train", "run", str(write_recipe(tmp_path / "lora-ref.yaml", merge(data, {
        "name": "lora-ref", "run_dir": str(uninterrupted), "checkpoint": {"directory": str(uninterrupted / "c")}}))))
    assert read_losses(run) == read_losses(uninterrupted)

    ckpt_bytes = sum(f.stat().st_size for f in (run / "ckpt" / "step-00000004").iterdir())
    full_bytes = sum(f.stat().st_size for f in (reference_run[1].parent.parent / "ckpt" / "step-00000012").iterdir())
    assert ckpt_bytes < full_bytes / 2  # frozen base weights are not checkpointed
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    ids = torch.arange(1, 33).unsqueeze(0)
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(run / "model").eval()(ids).logits
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run / "adapter").eval()(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base).eval()(ids).logits
    assert torch.allclose(merged, peft, atol=1e-4)
    assert not torch.allclose(merged, plain, atol=1e-4)  # the fine-tune changed the model


def test_a_resume_inside_a_log_interval_logs_the_uninterrupted_mean(tmp_path: Path, small_data: Path,
                                                                     reference_run) -> None:
    run = tmp_path / "interval"
    data = merge(SMALL, {"name": "interval", "run_dir": str(run), "data": {"output_dir": str(small_data)},
                         "deepspeed": {"zero_stage": 2}, "checkpoint": {"directory": str(run / "ckpt")},
                         "training": {"log_every": 4}})
    recipe = write_recipe(tmp_path / "interval.yaml", data)
    proc = start_run(recipe)
    wait_for_step(run, 4, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    stopped = int((run / "ckpt" / "latest").read_text().removeprefix("step-"))
    assert stopped % 4, f"stopped at step {stopped}, on a log step: nothing to carry over"
    privlm("train", "run", str(recipe))
    ref = reference_run[0]
    for step, loss in read_losses(run).items():  # each logged value is the mean of its 4 steps, resumed or not
        assert loss == pytest.approx(sum(ref[s] for s in range(step - 3, step + 1)) / 4, rel=1e-9), step
