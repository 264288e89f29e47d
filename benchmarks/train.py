"""Training figures: our DeepSpeed trainer vs a plain PyTorch loop, checkpoint cost, data throughput.

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


def bench_trainer(recipe_path: Path, data_dir: str, work: Path, steps: int) -> dict:
    """Our trainer through the real CLI; steady-state tokens/s and checkpoint save/load."""
    run = work / "run"
    overrides = [f"data.output_dir={data_dir}", f"run_dir={run}", f"checkpoint.directory={run / 'ckpt'}",
                 f"training.max_steps={steps}", "training.log_every=5", f"checkpoint.interval={steps}"]
    cmd = [sys.executable, "-m", "privlm.cli", "train", "run", str(recipe_path)]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, env=env)
    shutil.rmtree(run / "model")  # so the rerun resumes from the final checkpoint and re-exports: load time
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, env=env)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steady_records = [r for r in records if "loss" in r and r["step"] > 5]
    steady = [r["tokens_per_s"] for r in steady_records]
    ckpt = next(r for r in records if r.get("event") == "checkpoint")
    resumed = [r for r in records if r.get("event") == "start" and r.get("resumed")][-1]
    return {"tokens_per_s": sum(steady) / len(steady), "mfu": sum(r["mfu"] for r in steady_records) / len(steady),
            "checkpoint_save_s": ckpt["seconds"], "checkpoint_bytes": ckpt["bytes"],
            "checkpoint_load_s": resumed["load_seconds"]}


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
        ours = bench_trainer(args.recipe, data["data_dir"], work, args.steps)
        plain = bench_plain_loop(args.recipe, data["data_dir"], args.steps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    recipe = load_recipe(args.recipe)
    result = {
        "machine": machine(),
        "recipe": dump_recipe(recipe),
        "trainer": {**ours, "zero_stage": recipe.deepspeed.zero_stage, "ranks": recipe.training.world_size},
        "baseline_plain_pytorch": plain,
        "ratio_tokens_per_s": ours["tokens_per_s"] / plain["tokens_per_s"],
        "target_ratio": 0.9,
        "data_pipeline": {k: v for k, v in data.items() if k != "data_dir"},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "recipe"}, indent=1))


if __name__ == "__main__":
    main()
