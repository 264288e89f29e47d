"""The scheme check the serving code calls before deploying, and the promotion gate's cap on quantization loss."""

from __future__ import annotations

from types import SimpleNamespace

import pydantic
import pytest

from jobs.recipe import PromotionPolicy
from mlops.promote import gate
from mlops.quantize import SCHEMES, QuantizeRefused, check_scheme


def test_cpu_schemes_pass_and_gpu_only_ones_name_the_cpu_alternatives() -> None:
    cpu = sorted(k for k, s in SCHEMES.items() if s.cpu)
    assert "w8a8" in cpu
    assert check_scheme("w8a8", "cpu") is SCHEMES["w8a8"]
    gpu_only = [k for k, s in SCHEMES.items() if s.cuda and not s.cpu]
    assert gpu_only, "the table should record the schemes measured not to run on CPU"
    for name in gpu_only:
        assert check_scheme(name, "cuda") is SCHEMES[name]
        with pytest.raises(QuantizeRefused) as err:
            check_scheme(name, "cpu")
        assert f"scheme {name!r} needs a GPU on vLLM 0.32; on CPU use one of {cpu}" in str(err.value)


def test_unknown_scheme_and_device_name_the_valid_ones() -> None:
    with pytest.raises(QuantizeRefused, match=r"unknown quantization scheme 'int3'; use one of \[.*'w8a8'"):
        check_scheme("int3", "cpu")
    with pytest.raises(QuantizeRefused, match="device 'tpu' is not cpu or cuda"):
        check_scheme("w8a8", "tpu")  # type: ignore[arg-type]


def version(v: str, ppl: float, **tags: str) -> SimpleNamespace:
    return SimpleNamespace(name="m", version=v, tags={"eval.eval_perplexity": str(ppl), "eval.dataset": "d", **tags})


def quantized(v: str, ppl: float, delta: float, parent: str = "m/1") -> SimpleNamespace:
    return version(v, ppl, **{"privlm.quantized_from": parent, "privlm.quant_scheme": "w8a8",
                              "eval.perplexity_delta": str(delta)})


def test_gate_refuses_a_quantized_challenger_over_the_cap_with_field_value_and_fix() -> None:
    policy = PromotionPolicy()
    assert policy.max_quantized_perplexity_delta == 0.05
    ok, why = gate(quantized("2", 10.8, 0.08), version("1", 10.0), policy)
    assert not ok
    assert "max_quantized_perplexity_delta 0.05" in why and "0.0800" in why and "m/1" in why
    assert "registry.promotion.max_quantized_perplexity_delta" in why  # the fix
    ok, why = gate(quantized("2", 10.8, 0.08), None, policy)  # not even as the first champion
    assert not ok
    assert gate(quantized("2", 10.8, 0.08), version("1", 10.0),
                policy.model_copy(update={"max_quantized_perplexity_delta": 0.1}))[0]


def test_gate_passes_the_champion_quantized_within_the_cap_and_compares_otherwise() -> None:
    policy = PromotionPolicy()
    ok, why = gate(quantized("2", 10.2, 0.02), version("1", 10.0), policy)
    assert ok and "champion v1 quantized" in why
    # quantized from another version: it must beat the champion like any challenger
    assert not gate(quantized("3", 10.2, 0.02, parent="m/5"), version("1", 10.0), policy)[0]
    assert gate(quantized("3", 9.0, 0.02, parent="m/5"), version("1", 10.0), policy)[0]
    ok, why = gate(version("2", 10.5, **{"privlm.quantized_from": "m/1"}), version("1", 10.0), policy)
    assert not ok and "no eval.perplexity_delta" in why


def test_policy_rejects_a_negative_cap() -> None:
    with pytest.raises(pydantic.ValidationError, match="max_quantized_perplexity_delta"):
        PromotionPolicy(max_quantized_perplexity_delta=-0.1)


def test_cpu_dtype_and_cuda_limits_are_checked() -> None:
    assert check_scheme("w4a16", "cpu", dtype="bfloat16") is SCHEMES["w4a16"]  # measured: bf16 only on CPU
    with pytest.raises(QuantizeRefused, match=r"scheme 'w4a8' needs a CPU on vLLM 0.32; on CUDA use one of \["):
        check_scheme("w4a8", "cuda")


def test_group_size_must_divide_the_input_features() -> None:
    import torch
    from compressed_tensors.quantization import preset_name_to_scheme

    from mlops.quantize import _check_shape

    args = preset_name_to_scheme("W4A8", ["Linear"]).weights
    _check_shape("ok", torch.zeros(8, 256), args, "w4a8")
    with pytest.raises(QuantizeRefused, match="q_proj has 64 input features, not a multiple of scheme 'w4a8''s "
                                              r"group size 128; pick a scheme without groups \(w8a8\)"):
        _check_shape("q_proj", torch.zeros(8, 64), args, "w4a8")
