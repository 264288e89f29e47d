"""Recipe validation: shipped recipes load; bad ones fail naming the field, the value and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.recipe import RecipeError, load_recipe, parse_recipe
from jobs.train.ds_config import deepspeed_config
from tests.helpers import REPO, SMALL, merge, write_recipe


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.gradient_accumulation_steps >= 1
    assert recipe.model.vocab_size >= recipe.tokenizer.vocab_size


def test_real_sized_recipes_are_real_sized() -> None:
    from jobs.train.model import hf_config

    cfg = hf_config(load_recipe(REPO / "recipes/llama-1b-8gpu.yaml").model)
    # Count from the config without allocating: embeddings + layers.
    h, i, layers, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = h * cfg.num_key_value_heads // cfg.num_attention_heads
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i
    assert 1.0e9 < 2 * v * h + layers * per_layer < 1.2e9


def expect_error(data: dict, *fragments: str) -> str:
    with pytest.raises(RecipeError) as info:
        parse_recipe(data)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_indivisible_global_batch_names_field_value_and_fix() -> None:
    expect_error(merge(SMALL, {"training": {"global_batch_size": 12}}),
                 "training", "global_batch_size=12", "micro_batch_size", "use e.g. global_batch_size=8")


def test_unknown_field_is_an_error_not_ignored() -> None:
    expect_error(merge(SMALL, {"training": {"learning_rat": 1e-3}}), "training.learning_rat", "unknown field")


def test_bad_zero_stage_lists_allowed_values() -> None:
    expect_error(merge(SMALL, {"deepspeed": {"zero_stage": 4}}), "deepspeed.zero_stage", "0, 1, 2 or 3", "4")


def test_param_offload_needs_zero3() -> None:
    expect_error(merge(SMALL, {"deepspeed": {"zero_stage": 2, "offload_param": "cpu"}}), "needs zero_stage 3")


def test_steps_and_token_budget_are_exclusive() -> None:
    expect_error(merge(SMALL, {"training": {"token_budget": 100000}}), "exactly one of max_steps and token_budget")


def test_heads_must_divide_hidden() -> None:
    expect_error(merge(SMALL, {"model": {"num_heads": 5}}), "hidden_size=64", "num_heads=5")


def test_sequence_longer_than_positions() -> None:
    expect_error(merge(SMALL, {"training": {"sequence_length": 256}}), "max_position_embeddings=128")


def test_lora_targets_checked_for_gpt2() -> None:
    data = merge(SMALL, {"model": {"architecture": "gpt2", "num_kv_heads": None},
                         "finetune": {"base": "x", "lora": {"target_modules": ["q_proj"]}}})
    expect_error(data, "finetune.lora.target_modules", "c_attn")


def test_every_problem_is_reported_at_once() -> None:
    message = expect_error(merge(SMALL, {"training": {"learning_rate": -1, "seed": "x"}}))
    assert "training.learning_rate" in message and "training.seed" in message


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_overrides_apply_before_validation(tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "r.yaml", SMALL)
    assert load_recipe(path, ["training.max_steps=3"]).training.max_steps == 3
    with pytest.raises(RecipeError, match=r"training\.max_steps"):
        load_recipe(path, ["training.max_steps=-3"])


def test_token_budget_sets_steps_and_accumulation_is_derived() -> None:
    data = merge(SMALL, {"training": {"max_steps": None, "token_budget": 10_000}})
    recipe = parse_recipe(data)
    t = recipe.training
    assert t.tokens_per_step == 16 * 64 and t.total_steps == 10  # ceil(10000 / 1024)
    assert recipe.gradient_accumulation_steps == 16 // (4 * 2)


def test_deepspeed_config_passes_options_through() -> None:
    recipe = parse_recipe(merge(SMALL, {"deepspeed": {"zero_stage": 3, "precision": "bf16", "offload_optimizer": "cpu",
                                                      "extra": {"zero_optimization": {"overlap_comm": True},
                                                                "activation_checkpointing": {"cpu": True}}}}))
    cfg = deepspeed_config(recipe, world_size=2)
    assert cfg["gradient_accumulation_steps"] == 2 and cfg["train_batch_size"] == 16
    assert cfg["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                        "overlap_comm": True}
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert cfg["activation_checkpointing"] == {"cpu": True}
    sched = cfg["scheduler"]["params"]
    assert sched["cos_min_ratio"] == pytest.approx(0.1) and sched["total_num_steps"] == 12


@pytest.mark.parametrize(("sections", "fragments"), [
    ({"parallel": {"tensor": 2, "pipeline": 2}, "training": {"processes_per_node": 4}},
     ["parallel.tensor=2 with parallel.pipeline=2", "set one of them to 1"]),
    ({"parallel": {"pipeline": 2}, "deepspeed": {"zero_stage": 2}},
     ["deepspeed.zero_stage=2 with parallel.pipeline=2", "ZeRO 0 or 1", "zero_stage: 1"]),
    ({"parallel": {"tensor": 2}, "deepspeed": {"zero_stage": 3}},
     ["deepspeed.zero_stage=3 with parallel.tensor=2", "ZeRO 0, 1 or 2"]),
    ({"parallel": {"tensor": 4}, "training": {"processes_per_node": 4}},
     ["model.num_kv_heads=2 is not divisible by parallel.tensor=4"]),
    ({"parallel": {"pipeline": 3}}, ["1 x 3 = 3", "does not divide", "world size"]),
    ({"parallel": {"pipeline": 2}, "training": {"processes_per_node": 4, "global_batch_size": 12}},
     ["training.global_batch_size=12", "micro_batch_size x data-parallel ranks", "4 x 2 = 8"]),
    ({"parallel": {"pipeline": 4}, "training": {"processes_per_node": 4}}, ["more than model.num_layers=2"]),
    ({"parallel": {"tensor": 2}, "finetune": {"base": "x", "method": "lora"}}, ["adapters train with data"]),
    ({"training": {"early_stopping": {"patience": 2}}}, ["early_stopping needs eval_every"]),
], ids=["tp-and-pp", "pp-zero2", "tp-zero3", "tp-heads", "indivisible", "pp-batch", "pp-layers", "tp-lora",
        "early-stop-without-eval"])
def test_unsupported_parallel_layouts_are_refused_with_the_fix(sections: dict, fragments: list[str]) -> None:
    expect_error(merge(SMALL, sections), *fragments)


def test_model_parallel_degrees_shrink_the_data_parallel_batch() -> None:
    recipe = parse_recipe(merge(SMALL, {"parallel": {"tensor": 2}, "deepspeed": {"zero_stage": 2}}))
    assert recipe.data_parallel == 1 and recipe.gradient_accumulation_steps == 4
    cfg = deepspeed_config(recipe, world_size=2)
    assert cfg["tensor_parallel"] == {"autotp_size": 2} and cfg["gradient_accumulation_steps"] == 4
    assert "train_batch_size" not in cfg  # DeepSpeed would check it against all ranks, before the TP mesh
    piped = parse_recipe(merge(SMALL, {"parallel": {"pipeline": 2}}))
    assert deepspeed_config(piped, world_size=2, load_universal=True)["checkpoint"] == {"load_universal": True}
    with pytest.raises(ValueError, match="this launch has 3 ranks"):
        deepspeed_config(piped, world_size=3)
