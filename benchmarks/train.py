"""Training figures: our DeepSpeed trainer vs a plain PyTorch loop, checkpoint cost, data throughput;
ZeRO-1 vs tensor parallel T=2 vs pipeline parallel P=2 on the same model and 2 ranks, and the time to
resume a 2-rank checkpoint on 1 rank (universal conversion + load).

Writes benchmarks/results/train.json. Both loops train the same model on the same blocks with the
same global batch and the same number of threads (2 ranks x 1 thread vs 1 process x 2 threads),
measured one after the other in this run; the ratio is the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobs.recipe import apply_override, dump_recipe, load_recipe, parse_recipe  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def machine() -> dict:
    """Where and when the figures were taken."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "commit": commit.stdout.strip(),
            "date": time.strftime("%Y-%m-%d"), "gpu": None}


def bench_data(recipe_path: Path, work: Path) -> dict:
    """Data pipeline throughput on the demo corpus, from scratch (force)."""
    from jobs.data.pipeline import prepare_data

    data = load_recipe(recipe_path).model_dump(mode="json")
    apply_override(data, f"data.output_dir={work / 'data'}")
    recipe = parse_recipe(data)
    t0 = time.perf_counter()
    prepare_data(recipe, force=True)
    seconds = time.perf_counter() - t0
    report = json.loads((recipe.data_path / "report.json").read_text())
    mb = report.get("input_bytes", 0) / 1e6
    return {"input_mb": mb, "seconds": seconds, "mb_per_s": mb / seconds, "data_dir": str(recipe.data_path)}


def _train(recipe_path: Path, data_dir: str, run: Path, steps: int, extra: list[str], env: dict) -> None:
    overrides = [f"data.output_dir={data_dir}", f"run_dir={run}", f"checkpoint.directory={run / 'ckpt'}",
                 f"training.max_steps={steps}", "training.log_every=5", f"checkpoint.interval={steps}", *extra]
    cmd = [sys.executable, "-m", "privlm.cli", "train", "run", str(recipe_path)]
    for o in overrides:
        cmd += ["--set", o]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, env=env)


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _steady_tokens_per_s(records: list[dict]) -> tuple[float, float]:
    steady = [r for r in records if "loss" in r and r["step"] > 5]
    return sum(r["tokens_per_s"] for r in steady) / len(steady), sum(r["mfu"] for r in steady) / len(steady)


def bench_trainer(recipe_path: Path, data_dir: str, work: Path, steps: int, name: str = "run",
                  extra: list[str] | None = None, resume_on: int | None = None) -> dict:
    """Our trainer through the real CLI; steady-state tokens/s and checkpoint save/load (the rerun resumes
    the final checkpoint and re-exports; with `resume_on`, on that many ranks instead)."""
    run = work / name
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    _train(recipe_path, data_dir, run, steps, list(extra or []), env)
    tokens_per_s, mfu = _steady_tokens_per_s(_records(run))
    shutil.rmtree(run / "model")  # so the rerun resumes from the final checkpoint and re-exports: load time
    rerun = [*(extra or []), *([f"training.processes_per_node={resume_on}"] if resume_on else [])]
    _train(recipe_path, data_dir, run, steps, rerun, env)
    records = _records(run)
    ckpt = next(r for r in records if r.get("event") == "checkpoint")
    resumed = [r for r in records if r.get("event") == "start" and r.get("resumed")][-1]
    return {"tokens_per_s": tokens_per_s, "mfu": mfu, "checkpoint_save_s": ckpt["seconds"],
            "checkpoint_bytes": ckpt["bytes"], "checkpoint_load_s": resumed["load_seconds"],
            "resumed_world_size": resumed["world_size"], "reshaped": resumed.get("reshaped", False)}


def bench_plain_loop(recipe_path: Path, data_dir: str, steps: int) -> dict:
    """The baseline: a minimal PyTorch AdamW loop, one process with as many threads as our ranks in total."""
    import torch

    from jobs.data.pack import PackedDataset, ResumableSampler
    from jobs.train.model import build_model

    recipe = load_recipe(recipe_path)
    t = recipe.training
    torch.set_num_threads(t.world_size * (t.threads_per_process or 1))
    data = PackedDataset(data_dir, "train")
    model = build_model(recipe.model, t.seed, data.eos_id)
    opt = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, betas=t.betas, weight_decay=t.weight_decay)
    sampler = ResumableSampler(len(data), t.seed)
    micro_steps = t.global_batch_size // t.micro_batch_size
    rates = []
    for step in range(steps):
        t0 = time.perf_counter()
        for m in range(micro_steps):
            ids = torch.from_numpy(data.get_blocks(sampler.indices((step * micro_steps + m) * t.micro_batch_size,
                                                                   t.micro_batch_size)))
            (model(input_ids=ids, labels=ids).loss / micro_steps).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= 5:
            rates.append(t.tokens_per_step / (time.perf_counter() - t0))
    return {"tokens_per_s": sum(rates) / len(rates), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "tiny-cpu.yaml")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="privlm-bench-"))
    try:
        data = bench_data(args.recipe, work)
        ours = bench_trainer(args.recipe, data["data_dir"], work, args.steps, resume_on=1)
        plain = bench_plain_loop(args.recipe, data["data_dir"], args.steps)
        layouts = {"zero1": ours,
                   "tensor2": bench_trainer(args.recipe, data["data_dir"], work, args.steps, "tp",
                                            ["parallel.tensor=2", "deepspeed.zero_stage=1"]),
                   "pipeline2": bench_trainer(args.recipe, data["data_dir"], work, args.steps, "pp",
                                              ["parallel.pipeline=2", "deepspeed.zero_stage=1"])}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    recipe = load_recipe(args.recipe)
    result = {
        "machine": machine(),
        "recipe": dump_recipe(recipe),
        "trainer": {**ours, "zero_stage": recipe.deepspeed.zero_stage, "ranks": recipe.training.world_size},
        "baseline_plain_pytorch": plain,
        "ratio_tokens_per_s": ours["tokens_per_s"] / plain["tokens_per_s"],
        "target_ratio": 0.95,
        "parallel_layouts_2_ranks": {
            k: {"tokens_per_s": v["tokens_per_s"], "ratio_to_zero1": v["tokens_per_s"] / ours["tokens_per_s"],
                "checkpoint_save_s": v["checkpoint_save_s"], "checkpoint_load_s": v["checkpoint_load_s"]}
            for k, v in layouts.items()},
        "resume_2_to_1_ranks_s": ours["checkpoint_load_s"] if ours["reshaped"] else None,
        "data_pipeline": {k: v for k, v in data.items() if k != "data_dir"},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "recipe"}, indent=1))


if __name__ == "__main__":
    main()
