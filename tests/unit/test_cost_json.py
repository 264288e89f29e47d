"""`privlm plan --json` carries the total GPU-hours; `cost report --json` the break-even month even past the
horizon."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from cost.model import load_scenario, projected_break_even_month
from cost.plan import TrainShape, smallest_fits
from privlm.cli import app
from tests.helpers import REPO

runner = CliRunner()


def test_plan_json_holds_the_total_gpu_hours_and_the_recipe_as_written() -> None:
    result = runner.invoke(app, ["plan", "--recipe", str(REPO / "recipes" / "llama-1b-8gpu.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    hours = [o["gpu_hours"] for o in doc["options"]]
    assert hours and doc["total_gpu_hours"] == {"min": min(hours), "max": max(hours)}
    assert doc["recipe_as_written"]["gpus"] == 8 and doc["recipe_as_written"]["zero_stage"] == 2
    assert doc["training_memory_gib_8_gpus"]["zero0"]["cpu_offload"] is None
    assert doc["training_memory_gib_8_gpus"]["zero3"]["plain"] < doc["training_memory_gib_8_gpus"]["zero0"]["plain"]
    assert set(doc["serving"]["memory_gib"]) == {"bf16", "int8", "int4"}


def test_plan_json_options_are_the_planners() -> None:
    result = runner.invoke(app, ["plan", "--params", "7e9", "--tokens", "1e12", "--json"])
    doc = json.loads(result.stdout)
    expected = smallest_fits(TrainShape(7e9, 32, 4096, 32, 4096, 1, 32000), 1e12, 0.4)
    assert [o["instance_type"] for o in doc["options"]] == [o["instance_type"] for o in expected]
    assert doc["total_gpu_hours"]["min"] == min(o["gpu_hours"] for o in expected)


def test_break_even_past_the_horizon_is_reported() -> None:
    path = REPO / "recipes" / "cost" / "guide-example.yaml"
    doc = json.loads(runner.invoke(app, ["cost", "report", str(path), "--json"]).stdout)
    assert doc["years"] == 3 and doc["break_even_month"] is None
    month = doc["break_even_month_projected"]
    assert month > 36
    c, o = doc["cloud"], doc["own"]
    assert o["upfront"] + o["annual"] * month / 12 <= c["upfront"] + c["annual"] * month / 12
    assert o["upfront"] + o["annual"] * (month - 1) / 12 > c["upfront"] + c["annual"] * (month - 1) / 12
    within = json.loads(runner.invoke(app, ["cost", "report", str(REPO / "recipes" / "cost" /
                                                                  "h100-buy-vs-p5-rent.yaml"), "--json"]).stdout)
    assert within["break_even_month_projected"] == within["break_even_month"]
    assert load_scenario(path).years == 3


def test_projected_break_even_when_owning_never_catches_up() -> None:
    assert projected_break_even_month({"upfront": 0, "annual": 100}, {"upfront": 500, "annual": 100}) is None
    assert projected_break_even_month({"upfront": 0, "annual": 120}, {"upfront": 10, "annual": 0}) == 1
    assert projected_break_even_month({"upfront": 0, "annual": 120}, {"upfront": 100, "annual": 0}) == 10
