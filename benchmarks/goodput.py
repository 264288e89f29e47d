"""Goodput under preemption: the same job through the job runner, uninterrupted and preempted at a fixed rate.

Writes benchmarks/results/goodput.json. Both runs go through `submit_training` with the local executor
(the same TrainJob that runs on Slurm). The preempted run gets the preemption signal every
`--every` seconds, checkpoints, requeues and resumes. Goodput is the uninterrupted wall time (the work
the job needs) over the preempted run's wall time; the step-time fraction of each run is reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.train import RESULTS, machine  # noqa: E402
from jobs.recipe import apply_override, load_recipe, parse_recipe  # noqa: E402


def make_recipe(recipe_path: Path, work: Path, name: str, steps: int, rate_per_hour: float):
    data = load_recipe(recipe_path).model_dump(mode="json")
    for o in [f"name={name}", f"run_dir={work / name}", f"data.output_dir={work / 'data'}",
              f"checkpoint.directory={work / name / 'ckpt'}",
              f"training.max_steps={steps}", "checkpoint.interval=auto",
              f"checkpoint.interruptions_per_hour={rate_per_hour}", "training.log_every=10"]:
        apply_override(data, o)
    return parse_recipe(data)


def step_seconds(run: Path) -> float:
    """Time the run spent in steps that count: each logged interval's tokens over its tokens/s."""
    total, last_step = 0.0, {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("tokens_per_s"):
            last_step[rec["step"]] = rec  # a step redone after a resume counts once
    prev = 0
    for step in sorted(last_step):
        rec = last_step[step]
        total += (step - prev) * (rec["tokens"] / rec["step"]) / rec["tokens_per_s"]
        prev = step
    return total


def run_job(recipe, every: float | None) -> dict:
    """Submit through the local executor; send the preemption signal to its ranks every EVERY seconds."""
    from jobs.launch.records import find, preempt
    from jobs.launch.submit import submit_training

    t0 = time.perf_counter()
    job = submit_training(recipe, "local")
    preemptions, next_at = 0, (t0 + every) if every else None
    metrics = recipe.run_path / "metrics.jsonl"
    while not job.done():
        time.sleep(0.2)
        if next_at and time.perf_counter() >= next_at and metrics.exists():
            preemptions += bool(preempt(find(job.job_id)))  # what `privlm jobs preempt` does
            next_at += every
    wall = time.perf_counter() - t0
    result = job.results()[0]
    steps = step_seconds(recipe.run_path)
    return {"wall_s": wall, "step_s": steps, "step_fraction": steps / wall, "preemptions": preemptions,
            "resumes": result["resumes"], "final_eval_loss": result["eval_loss"], "steps": result["step"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--recipe", type=Path, default=REPO / "recipes" / "tiny-cpu.yaml")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--every", type=float, default=120.0, help="seconds between preemptions")
    args = ap.parse_args()
    os.environ.setdefault("PRIVLM_JOBS_DIR", tempfile.mkdtemp(prefix="privlm-goodput-jobs-"))
    with tempfile.TemporaryDirectory(prefix="privlm-goodput-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
        rate = 3600 / args.every
        base_recipe = make_recipe(args.recipe, work, "baseline", args.steps, rate)
        from jobs.data.pipeline import prepare_data

        prepare_data(base_recipe, progress=False)
        baseline = run_job(base_recipe, None)
        preempted = run_job(make_recipe(args.recipe, work, "preempted", args.steps, rate), args.every)
    goodput = baseline["wall_s"] / preempted["wall_s"]
    out = {"machine": machine(), "recipe": str(args.recipe.relative_to(REPO)), "steps": args.steps,
           "preempt_every_s": args.every, "baseline": baseline, "preempted": preempted,
           "goodput": goodput, "target": 0.9, "meets_target": goodput >= 0.9,
           "same_final_eval_loss": abs(baseline["final_eval_loss"] - preempted["final_eval_loss"]) < 1e-6}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "goodput.json").write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("goodput", "meets_target", "same_final_eval_loss")}, indent=1))
    print(f"baseline {baseline['wall_s']:.0f}s, preempted {preempted['wall_s']:.0f}s with "
          f"{preempted['preemptions']} preemption(s)")


if __name__ == "__main__":
    main()
