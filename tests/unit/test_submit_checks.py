"""The job runner's checks before submission, and its rank environment, without a cluster."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from jobs.launch.slurm import Partition, check_fits, gpus_in_gres, gpus_per_node, parse_time_min, sbatch_options
from jobs.launch.submit import rank_environment, rendezvous_port
from jobs.recipe import parse_recipe
from tests.helpers import SMALL, merge

CPU = Partition("batch", True, nodes=2, cpus_per_node=8, gpus_per_node=0, max_time_min=120)
GPU = Partition("gpu", False, nodes=4, cpus_per_node=96, gpus_per_node=8, max_time_min=None)


def recipe(tmp_path: Path, **extra):
    return parse_recipe(merge(SMALL, {"run_dir": str(tmp_path / "run"), **extra}))


@pytest.mark.parametrize(("text", "minutes"), [("1-00:00:00", 1440), ("2:00:00", 120), ("30", 30), ("05:30", 6),
                                               ("INFINITE", None), ("UNLIMITED", None)])
def test_slurm_time_limits_parse_to_minutes(text: str, minutes: int | None) -> None:
    assert parse_time_min(text) == minutes


@pytest.mark.parametrize(("gres", "gpus"), [("(null)", 0), ("gpu:h100:8(S:0-1)", 8), ("gpu:4", 4),
                                            ("gpu:a100:4,gpu:a100:4", 8), ("shard:8", 0)])
def test_gpus_per_node_from_sinfo_gres(gres: str, gpus: int) -> None:
    assert gpus_in_gres(gres) == gpus


def test_a_fitting_job_passes_and_gets_one_gpu_per_rank_on_gpu_partitions(tmp_path: Path) -> None:
    r = recipe(tmp_path)
    assert check_fits(r, CPU) == [] and check_fits(r, GPU) == []
    assert gpus_per_node(r, CPU) == 0 and gpus_per_node(r, GPU) == 2


def test_each_misfit_is_named_with_its_field_and_fix(tmp_path: Path) -> None:
    r = recipe(tmp_path, training={**SMALL["training"], "nodes": 4, "processes_per_node": 1},
               slurm={"gpus_per_node": 1, "time_limit_min": 300, "cpus_per_task": 9})
    problems = "\n".join(check_fits(r, CPU))
    assert "training.nodes=4 but partition batch has 2 node(s)" in problems
    assert "asks for 1 GPU(s) per node" in problems and "has 0 per node" in problems
    assert "= 9 CPUs, but partition batch has 8 per node" in problems
    assert "slurm.time_limit_min=300 is above partition batch's MaxTime of 120 min" in problems


def test_time_limit_below_one_checkpoint_interval_is_refused_with_the_interval_that_fits(tmp_path: Path) -> None:
    r = recipe(tmp_path, checkpoint={"interval": 100}, slurm={"time_limit_min": 5, "expected_step_s": 3.0})
    (problem,) = check_fits(r, GPU)
    assert "100 steps x 3.00 s/step = 300 s, but only 210 s run before the time-limit signal" in problem
    assert "lower checkpoint.interval to at most 69" in problem
    # a measured step time beats the estimate
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text(json.dumps(
        {"step": 10, "tokens": 10240, "tokens_per_s": 10240.0, "loss": 5.0}) + "\n")
    assert check_fits(r, GPU) == []  # 1 s/step: 100 s fits in 210 s
    assert check_fits(recipe(tmp_path, slurm={"time_limit_min": 1, "signal_delay_s": 90}), GPU)[0].startswith(
        "slurm.time_limit_min=1 leaves no time before the checkpoint signal")


def test_sbatch_options_pass_through_with_requeue(tmp_path: Path) -> None:
    r = recipe(tmp_path, slurm={"account": "ml", "qos": "high", "sbatch": {"exclusive": "", "mail-type": "END"}})
    assert sbatch_options(r) == {"account": "ml", "qos": "high", "requeue": True, "exclusive": True,
                                 "mail_type": "END"}


def test_rank_environment_of_a_task_in_a_two_node_job() -> None:
    env = SimpleNamespace(cluster="local", num_tasks=4, num_nodes=2, global_rank=3, local_rank=1, node=1,
                          job_id="4242", hostnames=["n1", "n2"])
    ranks = rank_environment(env)
    assert ranks == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "NODE_RANK": "1",
                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(rendezvous_port("4242"))}
    assert rendezvous_port("4242") != rendezvous_port("4243") and 29500 <= rendezvous_port("4242") < 39500


def test_a_job_with_fewer_tasks_runs_the_recipe_resized(tmp_path) -> None:
    from jobs.launch.slurm import SubmitError
    from jobs.launch.submit import recipe_for_allocation
    from tests.helpers import SMALL, merge, write_recipe

    path = write_recipe(tmp_path / "r.yaml", merge(SMALL, {"training": {"nodes": 2, "processes_per_node": 2}}))
    assert recipe_for_allocation(str(path), 2, 4).training.world_size == 4
    fewer = recipe_for_allocation(str(path), 1, 2)  # requeued onto one node
    assert (fewer.training.nodes, fewer.training.processes_per_node, fewer.training.global_batch_size) == (1, 2, 16)
    odd = write_recipe(tmp_path / "odd.yaml", merge(SMALL, {"training": {"global_batch_size": 24, "nodes": 3,
                                                                           "processes_per_node": 2}}))
    with pytest.raises(SubmitError, match=r"(?s)got 4 tasks on 2 node.*global_batch_size=24"):
        recipe_for_allocation(str(odd), 2, 4)


def test_min_nodes_becomes_one_node_range_line_and_must_fit_every_admitted_size(tmp_path: Path) -> None:
    from submitit.slurm.slurm import _make_sbatch_string

    from jobs.recipe import RecipeError

    two = {**SMALL["training"], "nodes": 2, "processes_per_node": 1}
    r = recipe(tmp_path, training=two, slurm={"min_nodes": 1})
    assert sbatch_options(r)["nodes"] == "1-2"
    script = _make_sbatch_string("true", tmp_path, nodes=2, additional_parameters=sbatch_options(r))
    assert [line for line in script.splitlines() if "--nodes" in line] == ["#SBATCH --nodes=1-2"]
    assert "nodes" not in sbatch_options(recipe(tmp_path, training=two, slurm={"min_nodes": 2}))
    assert "nodes" not in sbatch_options(recipe(tmp_path, training=two))
    with pytest.raises(RecipeError, match=r"slurm.min_nodes=3 is above training.nodes=2; set slurm.min_nodes to at"):
        recipe(tmp_path, training=two, slurm={"min_nodes": 3})
    with pytest.raises(RecipeError, match=r"slurm\.min_nodes.*greater than 0"):
        recipe(tmp_path, training=two, slurm={"min_nodes": 0})
    with pytest.raises(RecipeError, match=r"processes_per_node=2: a node range runs one rank per node"):
        recipe(tmp_path, training={**two, "processes_per_node": 2}, slurm={"min_nodes": 1})
    four = {**SMALL["training"], "nodes": 4, "processes_per_node": 1}  # 16 samples do not split over 3 ranks
    with pytest.raises(RecipeError, match=r"slurm.min_nodes=1: on 3 node\(s\) \(3 ranks\).*raise slurm.min_nodes"):
        recipe(tmp_path, training=four, slurm={"min_nodes": 1})
    assert recipe(tmp_path, training=four, slurm={"min_nodes": 4}).slurm.min_nodes == 4


def test_the_sinfo_check_needs_only_the_minimum_of_a_node_range(tmp_path: Path) -> None:
    four = {**SMALL["training"], "nodes": 4, "processes_per_node": 1, "global_batch_size": 48}  # splits 2, 3, 4
    assert check_fits(recipe(tmp_path, training=four, slurm={"min_nodes": 2}), CPU) == []
    (problem,) = check_fits(recipe(tmp_path, training=four, slurm={"min_nodes": 3}), CPU)
    assert "slurm.min_nodes=3 but partition batch has 2 node(s); set slurm.min_nodes<=2" in problem


class FakeTask:
    def __init__(self, result: dict | None) -> None:
        self._result = result

    def result(self) -> dict:
        if self._result is None:
            raise AssertionError("waited for a task that never ran")
        return self._result


def test_job_results_reads_only_the_tasks_of_the_run_that_finished() -> None:
    from jobs.launch.submit import job_results

    def job(*results: dict | None) -> SimpleNamespace:
        tasks = [FakeTask(r) for r in results]
        return SimpleNamespace(num_tasks=len(tasks), task=tasks.__getitem__, results=lambda: [results[0]])

    shrunk = job({"step": 40, "world_size": 1}, None)  # requeued onto one node: task 1 has no result
    assert job_results(shrunk) == [{"step": 40, "world_size": 1}]
    full = job({"step": 40, "world_size": 2}, {"step": 40, "world_size": 2})
    assert len(job_results(full)) == 2
    assert job_results(job({"step": 3, "world_size": 1})) == [{"step": 3, "world_size": 1}]
