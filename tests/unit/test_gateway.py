"""The gateway's parts without a server: request validation, credentials, rate limits, the block list,
and refusing to start unauthenticated."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from serving.api import ApiError, ChatRequest, CompletionRequest, engine_request, parse
from serving.auth import Authenticator, hash_key
from serving.filter import BlockList
from serving.limits import RateLimiter
from serving.settings import Auth


def test_max_completion_tokens_reaches_the_engine() -> None:
    req = parse(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 40}',
                ChatRequest)
    body = engine_request(req, "m-v1", req.requested_tokens())
    assert body["max_tokens"] == 40 and "max_completion_tokens" not in body and body["model"] == "m-v1"


def test_content_parts_are_flattened_and_streams_count_usage() -> None:
    req = parse(b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": '
                b'[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}', ChatRequest)
    body = engine_request(req, "m", 16)
    assert body["messages"] == [{"role": "user", "content": "ab"}]
    assert body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(("raw", "param"), [
    (b'{"model": "m", "prompt": "x", "logit_bias": {}}', "logit_bias"),
    (b'{"model": "m", "prompt": "x", "nonsense": 1}', "nonsense"),
    (b'{"model": "m", "prompt": "x\\u0000"}', "prompt"),
    (b'{"model": "m", "prompt": ["ok", "\\udfff"]}', "prompt"),
    (b'{"model": "m", "prompt": "x", "response_format": {"type": "json_schema"}}', "response_format"),
    (b'[1, 2]', None),
])
def test_refused_fields_name_the_parameter(raw: bytes, param: str | None) -> None:
    with pytest.raises(ApiError) as err:
        parse(raw, CompletionRequest)
    assert err.value.status == 400 and err.value.param == param


@given(st.text(max_size=40))
def test_any_text_is_accepted_or_refused_with_a_400(text: str) -> None:
    import json

    raw = json.dumps({"model": "m", "prompt": text}).encode()
    try:
        req = parse(raw, CompletionRequest)
    except ApiError as err:
        assert err.status == 400 and err.param == "prompt"
    else:
        assert req.prompt == text and text.strip() and "\x00" not in text


def test_keys_and_jwt(monkeypatch) -> None:
    import jwt

    monkeypatch.setenv("PRIVLM_TEST_JWT_SECRET", "s" * 32)
    auth = Authenticator(Auth.model_validate({"mode": "jwt", "api_key_hashes": [hash_key("k")],
                                              "jwt": {"issuer": "i", "audience": "a", "algorithms": ["HS256"],
                                                      "secret_env": "PRIVLM_TEST_JWT_SECRET"}}))
    assert auth.check("Bearer k").may_use("anything")
    good = jwt.encode({"iss": "i", "aud": "a", "sub": "bob", "exp": time.time() + 60, "scope": "models:m"},
                      "s" * 32, algorithm="HS256")
    caller = auth.check(f"Bearer {good}")
    assert caller.id == "sub:bob" and caller.may_use("m") and not caller.may_use("n")
    with pytest.raises(ApiError, match="metrics:read"):
        caller.require_metrics()
    forged = jwt.encode({"iss": "i", "aud": "a", "sub": "bob", "exp": time.time() + 60, "scope": "models:*"},
                        "x" * 32, algorithm="HS256")
    no_exp = jwt.encode({"iss": "i", "aud": "a", "sub": "bob"}, "s" * 32, algorithm="HS256")
    for bad in (forged, no_exp, "k2", ""):
        with pytest.raises(ApiError) as err:
            auth.check(f"Bearer {bad}")
        assert err.value.status == 401


def test_rate_limit_refills() -> None:
    limit = RateLimiter(requests_per_minute=60, burst=2)
    limit.take("a", now=0)
    limit.take("a", now=0)
    with pytest.raises(ApiError) as err:
        limit.take("a", now=0.1)
    assert err.value.status == 429 and err.value.headers["Retry-After"] == "1"
    limit.take("b", now=0.1)  # other callers are not affected
    limit.take("a", now=1.2)  # one request per second refilled


@given(st.lists(st.text(alphabet="abcXY FORBID", min_size=0, max_size=6), max_size=12))
def test_stream_scrubbing_equals_scrubbing_the_whole_text(deltas: list[str]) -> None:
    blocks = BlockList(["forbid", "xy"])
    scrubber = blocks.stream()
    streamed = "".join(scrubber.feed(d) for d in deltas) + scrubber.flush()
    assert "forbid" not in streamed.lower() and "xy" not in streamed.lower()
    whole = "".join(deltas)
    if not blocks.matches(whole):  # nothing to remove: the stream is passed through unchanged
        assert streamed == whole and not scrubber.hit
    else:
        assert scrubber.hit


def test_no_key_configured_refuses_to_start(monkeypatch) -> None:
    from serving.app import prepare
    from serving.engine import ServingError

    monkeypatch.delenv("PRIVLM_API_KEYS", raising=False)
    with pytest.raises(ServingError, match=r"auth\.mode: none"):
        prepare({"model_uri": "/nowhere", "tracking_uri": "sqlite:///x.db"})
    monkeypatch.setenv("PRIVLM_API_KEYS", "a, b")
    settings = prepare({"model_uri": "/nowhere", "tracking_uri": "sqlite:///x.db"})
    assert settings.auth.api_key_hashes == sorted({hash_key("a"), hash_key("b")})
    assert prepare({"tracking_uri": "sqlite:///x.db", "auth": {"mode": "none"}}).auth.mode == "none"


def test_settings_errors_name_the_field() -> None:
    from pydantic import ValidationError

    from serving.settings import ServeSettings, settings_error

    with pytest.raises(ValidationError) as err:
        ServeSettings.model_validate({"auth": {"mode": "jwt"}, "engine": {"kv_cache_gib": -1}, "quantizaton": "x"})
    text = settings_error(err.value)
    assert "auth: " in text and "engine.kv_cache_gib" in text and "quantizaton: unknown field" in text


def test_a_head_size_vllm_cpu_cannot_run_is_refused_before_start(tmp_path) -> None:
    import json

    from serving.engine import Served, ServingError, check_runs_here
    from serving.settings import Engine

    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4}))
    served = Served("m/v1", "m/v1", str(tmp_path))
    with pytest.raises(ServingError, match="head size 16"):
        check_runs_here(served, Engine())
    check_runs_here(served, Engine(gpus_per_replica=1))  # GPUs run it
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 128, "num_attention_heads": 4}))
    check_runs_here(served, Engine())


def test_a_scheme_this_machine_cannot_run_is_refused_at_the_edge() -> None:
    from mlops.quantize import QuantizeRefused
    from serving.app import prepare

    with pytest.raises(QuantizeRefused, match=r"'w4a16' needs a GPU.*w8a8"):
        prepare({"quantization": "w4a16", "auth": {"mode": "none"}, "tracking_uri": "sqlite:///x.db"})
    with pytest.raises(QuantizeRefused, match="unknown quantization scheme"):
        prepare({"quantization": "int3", "auth": {"mode": "none"}, "tracking_uri": "sqlite:///x.db"})
    assert prepare({"quantization": "w8a8", "auth": {"mode": "none"}, "tracking_uri": "sqlite:///x.db"})


def test_serve_up_finds_ray_without_an_activated_venv(monkeypatch) -> None:
    import sys
    from pathlib import Path

    from serving.cli import ray_cli

    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # as `.venv/bin/privlm` runs from a plain shell
    assert Path(ray_cli()) == Path(sys.executable).parent / "ray" and Path(ray_cli()).is_file()


def test_the_model_card_quantization_is_what_config_json_tells_vllm(tmp_path) -> None:
    import json

    from serving.engine import quantization_of

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert quantization_of(tmp_path) is None
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": {}}}))
    assert quantization_of(tmp_path) == {"method": "compressed-tensors", "format": "int-quantized"}
    assert quantization_of(tmp_path / "missing") is None
