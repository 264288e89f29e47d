"""`privlm data submit`: data preparation as a Slurm array (one task per shard), then the global pass.

The plan is made here (it is quick: it lists and fingerprints the inputs); task i of the first array runs
`process_shard(recipe, i, work_dir)`; task j of a second array, once every shard succeeded, runs
`dedup_bucket(recipe, j, work_dir)` (the LSH bands and sentence hashes of bucket j: no task holds every
signature); one dependent job runs `finalize` (dedup decisions, split, tokenizer, packing) once every bucket
succeeded. A requeued or resubmitted task skips a shard or bucket that is already done, and an unchanged
corpus is not resubmitted at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from jobs.files import atomic_write_text
from jobs.launch.records import record_job
from jobs.launch.slurm import choose_partition, partitions, sbatch_options
from jobs.recipe import Recipe


@dataclass
class DataSubmission:
    """The jobs of one data preparation (none when the output is already current)."""

    shards: list[Any]
    finalize: Any | None
    output_dir: Path
    buckets: list[Any] = field(default_factory=list)


def _executor(recipe: Recipe, kind: str, folder: Path) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster=kind)
    executor.update_parameters(timeout_min=recipe.slurm.time_limit_min, nodes=1, tasks_per_node=1,
                               cpus_per_task=1, name=f"privlm-data-{recipe.name}", stderr_to_stdout=True)
    if kind == "slurm":
        executor.update_parameters(slurm_partition=choose_partition(recipe, partitions()).name,
                                   slurm_array_parallelism=recipe.data.num_shards,
                                   slurm_additional_parameters=sbatch_options(recipe),
                                   slurm_setup=list(recipe.slurm.setup))
    return executor


def submit_data(recipe: Recipe, kind: str) -> DataSubmission:
    """Plan the shards, submit the array and the dependent global pass; record both for `privlm jobs`."""
    from jobs.data.buckets import dedup_bucket
    from jobs.data.pipeline import finalize, plan_shards
    from jobs.data.shard import process_shard

    plan = plan_shards(recipe)
    if plan.current:
        return DataSubmission([], None, recipe.data_path)
    recipe_file = (plan.work_dir / "recipe.json").resolve()
    atomic_write_text(recipe_file, json.dumps(recipe.model_dump(mode="json")))
    work = str(plan.work_dir.resolve())
    folder = (recipe.run_path / "submitit-data").resolve()
    executor = _executor(recipe, kind, folder)
    n = plan.num_shards
    shards = executor.map_array(process_shard, [str(recipe_file)] * n, list(range(n)), [work] * n)
    record_job(shards[0], kind, "data-shards", recipe, folder)
    _after(executor, recipe, kind, shards)
    buckets = executor.map_array(dedup_bucket, [str(recipe_file)] * n, list(range(n)), [work] * n)
    record_job(buckets[0], kind, "data-buckets", recipe, folder)
    _after(executor, recipe, kind, shards, buckets)
    final = executor.submit(finalize, str(recipe_file), work)
    record_job(final, kind, "data", recipe, folder)
    return DataSubmission(shards, final, recipe.data_path, buckets)


def _after(executor: submitit.AutoExecutor, recipe: Recipe, kind: str, *arrays: list[Any]) -> None:
    """Make the next submission wait until every task of `arrays` succeeded (the local executor: wait here)."""
    if kind == "slurm":
        ids = ":".join(array[0].job_id.split("_")[0] for array in arrays)
        executor.update_parameters(slurm_additional_parameters={**sbatch_options(recipe),
                                                                "dependency": f"afterok:{ids}",
                                                                "kill_on_invalid_dep": "yes"})
    else:  # the local executor has no dependencies: the earlier tasks finish first
        for job in arrays[-1]:
            job.result()
