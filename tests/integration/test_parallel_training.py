"""Real 2-rank DeepSpeed runs on CPU under tensor (AutoTP) and pipeline parallelism, resumes on another
world size, and in-run validation with early stopping and the divergence guard."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import SMALL, merge, privlm, read_losses, read_samples, run_env, write_recipe

pytestmark = pytest.mark.integration


def recipe_at(tmp_path: Path, data: Path, name: str, **sections) -> Path:
    run = tmp_path / name
    base = merge(SMALL, {"name": name, "run_dir": str(run), "data": {"output_dir": str(data)},
                         "checkpoint": {"directory": str(run / "ckpt")}, "training": {"record_samples": True}})
    return write_recipe(tmp_path / f"{name}.yaml", merge(base, sections))


def events(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("event") == kind]


def exported_loss(model_dir: Path, data: Path) -> float:
    """The eval loss of the exported model over the whole held-out split, by mlops' evaluation code."""
    from transformers import AutoModelForCausalLM

    from mlops.evaluate import perplexity

    ppl, _ = perplexity(AutoModelForCausalLM.from_pretrained(model_dir), data, max_blocks=10**9)
    return math.log(ppl)


def same_weights(a: Path, b: Path) -> bool:
    got, want = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("layout", [{"tensor": 2}, {"pipeline": 2}], ids=["tensor2", "pipeline2"])
def test_model_parallel_run_resumes_bitwise_after_a_rank_is_killed(layout: dict, tmp_path: Path,
                                                                   small_data: Path) -> None:
    sections = {"parallel": layout, "deepspeed": {"zero_stage": 1}}
    reference = recipe_at(tmp_path, small_data, "ref", **sections)
    out = privlm("train", "run", str(reference)).stdout
    assert ("tensor 2 x pipeline 1 x data 1" if "tensor" in layout else "tensor 1 x pipeline 2 x data 1") in out
    crashed = recipe_at(tmp_path, small_data, "crash", **sections)
    env = {**run_env(), "PRIVLM_FAULT": "during_checkpoint:8:1"}  # rank 1 SIGKILLed while writing step 8
    assert privlm("train", "run", str(crashed), env=env, check=False).returncode != 0
    assert (tmp_path / "crash" / "ckpt" / "latest").read_text() == "step-00000004"
    assert "at step 4" in privlm("train", "run", str(crashed)).stdout
    ref_losses = read_losses(tmp_path / "ref")
    assert sorted(ref_losses) == list(range(1, 13)) and ref_losses[12] < ref_losses[1] - 0.4
    assert read_losses(tmp_path / "crash") == ref_losses  # bitwise, every step
    assert read_samples(tmp_path / "crash") == read_samples(tmp_path / "ref")
    assert same_weights(tmp_path / "crash", tmp_path / "ref")
    # the export gathers tensor shards / pipeline stages into a plain model: the same loss outside DeepSpeed
    summary = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert exported_loss(tmp_path / "ref" / "model", small_data) == pytest.approx(summary["eval_loss"], rel=1e-4)


@pytest.mark.parametrize("stage", [0, 2])  # ZeRO-1 runs in the test above; 3 is refused with tensor parallelism
def test_tensor_parallel_trains_under_the_other_zero_stages_it_accepts(stage: int, tmp_path: Path,
                                                                     small_data: Path) -> None:
    recipe = recipe_at(tmp_path, small_data, f"tp-zero{stage}", parallel={"tensor": 2},
                       deepspeed={"zero_stage": stage}, training={"max_steps": 6, "warmup_steps": 1})
    out = privlm("train", "run", str(recipe)).stdout
    assert f"ZeRO-{stage}" in out and "tensor 2 x pipeline 1 x data 1" in out
    losses = read_losses(tmp_path / f"tp-zero{stage}")
    assert sorted(losses) == list(range(1, 7)) and losses[6] < losses[1]
    summary = json.loads((tmp_path / f"tp-zero{stage}" / "summary.json").read_text())
    assert exported_loss(tmp_path / f"tp-zero{stage}" / "model", small_data) == pytest.approx(summary["eval_loss"],
                                                                                              rel=1e-4)


@pytest.fixture(scope="module")
def zero1_reference(tmp_path_factory: pytest.TempPathFactory, small_data: Path) -> Path:
    """An uninterrupted 2-rank ZeRO-1 run recording its samples: what every changed-world-size run must see."""
    root = tmp_path_factory.mktemp("reshape-ref")
    privlm("train", "run", str(recipe_at(root, small_data, "ref", deepspeed={"zero_stage": 1})))
    return root / "ref"


@pytest.mark.parametrize("stage", [2, 3])  # ZeRO-1 reshapes through the same path as ZeRO-2
def test_resume_on_another_world_size_sees_the_same_samples(stage: int, tmp_path: Path, small_data: Path,
                                                            zero1_reference: Path) -> None:
    """2 ranks to step 4, killed; 1 rank to step 8, killed; 2 ranks to the end (ZeRO partitions reshaped
    through DeepSpeed's universal checkpoint)."""
    changed = recipe_at(tmp_path, small_data, "changed", deepspeed={"zero_stage": stage})
    two = {**run_env(), "PRIVLM_FAULT": "during_checkpoint:8:1"}
    assert privlm("train", "run", str(changed), env=two, check=False).returncode != 0
    one = {**run_env(), "PRIVLM_FAULT": "during_checkpoint:12:0"}
    out = privlm("train", "run", str(changed), "--set", "training.processes_per_node=1", env=one, check=False)
    assert "at step 4" in out.stdout and "reshaped from 2 ranks" in out.stdout, out.stdout[-2000:]
    out = privlm("train", "run", str(changed))
    assert "at step 8" in out.stdout and "reshaped from 1 ranks" in out.stdout
    assert read_samples(tmp_path / "changed") == read_samples(zero1_reference)  # nothing skipped or repeated
    ref, got = read_losses(zero1_reference), read_losses(tmp_path / "changed")
    assert sorted(got) == sorted(ref) == list(range(1, 13))
    if stage == 1:
        assert all(got[s] == ref[s] for s in range(1, 5))  # before the change: bitwise
    # the same math summed in another order than the ZeRO-1 reference; measured: ZeRO-1 and -2 within 4e-8 at
    # every step; ZeRO-3 matches up to the first step after the change, then drifts to ~9e-4 (its optimizer
    # state does not come back exactly through the universal checkpoint: a known gap, bounded here)
    drift = max(abs(got[s] - ref[s]) / ref[s] for s in ref)
    print(f"ZeRO-{stage}: largest relative loss difference to the uninterrupted run: {drift:.2e}")
    assert drift < (1e-4 if stage < 3 else 3e-3), drift
    starts = events(tmp_path / "changed", "start")
    assert [s["world_size"] for s in starts] == [2, 1, 2] and [s["reshaped"] for s in starts] == [False, True, True]


def test_validation_early_stopping_and_a_bad_batch(tmp_path: Path, small_data: Path) -> None:
    """eval every 2 steps; min_delta so large that only the first eval counts as best; a NaN injected at step
    6 rolls back to the step-4 checkpoint and skips that batch; patience 3 stops the run at step 8."""
    from jobs.data.pack import PackedDataset, ResumableSampler

    recipe = recipe_at(tmp_path, small_data, "guarded", training={"eval_every": 2, "max_steps": 20,
                                                                  "early_stopping": {"patience": 3, "min_delta": 10}})
    env = {**run_env(), "PRIVLM_FAULT": "bad_batch:6:1"}
    out = privlm("train", "run", str(recipe), env=env).stdout
    run = tmp_path / "guarded"
    guard = events(run, "guard")
    assert len(guard) == 1 and guard[0]["step"] == 6 and guard[0]["to_step"] == 4, out[-2000:]
    assert guard[0]["skipped_samples"] == [5 * 16, 6 * 16]
    assert "tripped the divergence guard" in out and "early stopping at step 8" in out
    losses = read_losses(run)
    assert sorted(losses) == list(range(1, 9)) and all(math.isfinite(v) for v in losses.values())
    sampler = ResumableSampler(len(PackedDataset(small_data, "train")), 7)
    seen = read_samples(run)
    assert seen[5] == sorted(sampler.indices(4 * 16, 16).tolist())
    assert seen[6] == sorted(sampler.indices(6 * 16, 16).tolist())  # the bad batch (samples 80..95) is skipped
    evals = events(run, "eval")
    assert [e["step"] for e in evals if e["step"] != 4] == [2, 6, 8]  # step 4 was evaluated again after the rollback
    summary = json.loads((run / "summary.json").read_text())
    assert summary["early_stopped"] and summary["step"] == 8 and summary["best_step"] == 2
    assert summary["guard_rollbacks"] == 1 and summary["skipped_batches"] == 1
    lineage = json.loads((run / "model" / "privlm.json").read_text())
    assert lineage["step"] == 2  # the best checkpoint is the model, not the last one
    assert (run / "ckpt" / "best").read_text() == "step-00000002" and (run / "ckpt" / "step-00000002").is_dir()
    best_eval = next(e["eval_loss"] for e in evals if e["step"] == 2)
    assert exported_loss(run / "model", small_data) == pytest.approx(best_eval, rel=1e-5)
    assert summary["eval_loss"] == pytest.approx(best_eval, rel=1e-9)
    again = privlm("train", "run", str(recipe)).stdout
    assert "nothing to do" in again
