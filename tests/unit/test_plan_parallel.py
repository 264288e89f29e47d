"""The planner's tensor x pipeline x data layouts: memory per GPU, only layouts the trainer accepts, GPU-hours."""

from __future__ import annotations

import pytest

from cost.plan import TrainShape, layouts, smallest_fits, train_memory_gib
from jobs.recipe import load_recipe, parallel_problems, parse_recipe
from tests.helpers import REPO

SHAPE_67B = TrainShape(67e9, 95, 8192, 64, 4096, 1, 102400)


def test_tensor_and_pipeline_split_model_states() -> None:
    dp = train_memory_gib(SHAPE_67B, 2, 32, False, True)
    tp = train_memory_gib(SHAPE_67B, 2, 32, False, True, tensor=8)
    pp = train_memory_gib(SHAPE_67B, 1, 32, False, True, pipeline=4)
    assert tp < dp / 2 and tp < 80 < dp  # T=8 x D=4 ZeRO-2 fits an 80 GB H100; plain ZeRO-2 over 32 does not
    assert 80 < pp < 141  # P=4 x D=8 ZeRO-1 needs an H200
    assert train_memory_gib(SHAPE_67B, 2, 32, False, True) == pytest.approx(
        train_memory_gib(SHAPE_67B, 2, 32, False, True, 1, 1))


def test_planner_proposes_only_layouts_the_trainer_accepts() -> None:
    recipe = load_recipe(REPO / "recipes/llama-67b-3d-32gpu.yaml")
    proposed = layouts(32, 8, SHAPE_67B)
    assert (8, 1) in proposed and (1, 4) in proposed
    for tensor, pipeline in proposed:
        data = recipe.model_dump(mode="json")
        data["parallel"] = {"tensor": tensor, "pipeline": pipeline}
        data["deepspeed"]["zero_stage"] = 1  # the stage every layout runs with
        assert not parallel_problems(parse_recipe(data), 32), (tensor, pipeline)
    fits = smallest_fits(SHAPE_67B, 2e12)
    p5 = next(f for f in fits if f["instance_type"] == "p5.48xlarge")
    assert p5["tensor"] * p5["pipeline"] * p5["data"] == p5["gpus"] and p5["gib_per_gpu"] <= 80
    assert p5["gpu_hours"] == pytest.approx(6 * 67e9 * 2e12 / (989e12 * 0.4) / 3600, rel=0.01)


def test_shipped_67b_recipe_fits_its_cluster() -> None:
    r = load_recipe(REPO / "recipes/llama-67b-3d-32gpu.yaml")
    assert r.training.world_size == 32 and r.parallel.tensor == 8 and r.data_parallel == 4
    gib = train_memory_gib(SHAPE_67B, r.deepspeed.zero_stage, 32, False, True, r.parallel.tensor, r.parallel.pipeline)
    assert gib < 80
