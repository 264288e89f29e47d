"""The Ray Serve endpoint against a real local Ray: OpenAI shapes, bad input, overload, rollout, A/B."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.helpers import SMALL

pytestmark = pytest.mark.integration
KEY = "sk-test-privlm"
PORT = 18077
BASE = f"http://127.0.0.1:{PORT}"


def save_model(out: Path, data_dir: Path, seed: int) -> Path:
    """A randomly initialised SMALL model with the prepared tokenizer, in Hugging Face format."""
    from jobs.recipe import ModelConfig
    from jobs.train.model import build_model

    cfg = ModelConfig.model_validate({**SMALL["model"], "vocab_size": 1024})
    build_model(cfg, seed, eos_id=0).save_pretrained(out)
    for f in (data_dir / "tokenizer").iterdir():
        shutil.copy2(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def ray_serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    yield
    serve.shutdown()
    ray.shutdown()


def deploy(**settings) -> None:
    from ray import serve

    from serving.app import build_app

    os.environ["PRIVLM_API_KEYS"] = KEY
    serve.run(build_app(settings), name="privlm", route_prefix="/")


@pytest.fixture(scope="module")
def endpoint(ray_serve, small_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("serve")
    model = save_model(tmp / "tiny" / "model", small_data, seed=1)
    audit = tmp / "audit.jsonl"
    deploy(model_uri=str(model), quantization="int8-dynamic", max_ongoing_requests=4, max_queued_requests=8,
           block_list=["forbiddenword"], audit_log=str(audit), limits={"max_tokens": 64})
    return {"name": "tiny", "audit": audit, "model": model}


def post(path: str, body=None, key: str | None = KEY, raw: bytes | None = None, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(BASE + path, json=body, content=raw, headers={**headers, **kw.pop("headers", {})},
                      timeout=120, **kw)


def test_openai_shapes_and_the_openai_client(endpoint) -> None:
    from openai import OpenAI

    r = post("/v1/completions", {"model": "tiny", "prompt": "def main", "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["choices"][0]["finish_reason"] in ("length", "stop")
    assert body["usage"]["completion_tokens"] <= 5 and body["usage"]["prompt_tokens"] > 0
    assert r.headers["x-privlm-model-version"].startswith("model@")
    chat = post("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                         "max_tokens": 4}).json()
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    client = OpenAI(base_url=f"{BASE}/v1", api_key=KEY)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    done = client.completions.create(model="tiny", prompt="import os", max_tokens=4, n=2)
    assert len(done.choices) == 2
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                 max_tokens=6, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert all(c.object == "chat.completion.chunk" for c in chunks)


@pytest.mark.parametrize(("body", "raw", "key", "status", "param"), [
    (None, b"{not json", KEY, 400, None),
    ({"model": "tiny"}, None, KEY, 400, "prompt"),
    ({"model": "tiny", "prompt": "  "}, None, KEY, 400, "prompt"),
    ({"model": "tiny", "prompt": "x", "max_tokens": "ten"}, None, KEY, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 10**6}, None, KEY, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "word " * 400}, None, KEY, 400, "prompt"),
    ({"model": "tiny", "prompt": "x", "temperature": 9}, None, KEY, 400, "temperature"),
    ({"model": "gpt-4", "prompt": "x"}, None, KEY, 404, "model"),
    ({"model": "tiny", "prompt": "x"}, None, None, 401, None),
    ({"model": "tiny", "prompt": "x"}, None, "wrong", 401, None),
    ({"model": "tiny", "prompt": "say forbiddenword"}, None, KEY, 400, "prompt"),
])
def test_bad_input_gets_4xx_in_openai_shape(endpoint, body, raw, key, status, param) -> None:
    r = post("/v1/completions", body, key=key, raw=raw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param"} and err["message"] and err["param"] == param


def test_good_requests_batched_with_a_bad_one_all_succeed(endpoint) -> None:
    bodies = [{"model": "tiny", "prompt": f"def f{i}", "max_tokens": 8} for i in range(6)]
    bodies.insert(3, {"model": "tiny", "prompt": "word " * 400, "max_tokens": 8})  # beyond the context
    with ThreadPoolExecutor(len(bodies)) as pool:
        codes = list(pool.map(lambda b: post("/v1/completions", b).status_code, bodies))
    assert codes == [200, 200, 200, 400, 200, 200, 200]
    metrics = httpx.get(f"{BASE}/metrics").text
    assert "privlm_batch_size_bucket" in metrics


def test_overload_gets_503_with_retry_after_and_recovers(endpoint) -> None:
    body = {"model": "tiny", "prompt": "class A", "max_tokens": 64, "temperature": 1.0}
    with ThreadPoolExecutor(40) as pool:  # capacity is 4 generating + 8 queued
        responses = list(pool.map(lambda _: post("/v1/completions", body), range(40)))
    codes = [r.status_code for r in responses]
    assert 503 in codes and 200 in codes and set(codes) <= {200, 503}
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"] == "1" and busy.json()["error"]["type"] == "server_overloaded"
    assert post("/v1/completions", {**body, "max_tokens": 2}).status_code == 200  # recovered


def test_metrics_audit_and_cache(endpoint) -> None:
    body = {"model": "tiny", "prompt": "secret prompt text", "max_tokens": 3, "temperature": 0}
    first, second = post("/v1/completions", body).json(), post("/v1/completions", body).json()
    assert first["choices"] == second["choices"]
    metrics = httpx.get(f"{BASE}/metrics").text
    assert 'privlm_cache_total{result="hit"}' in metrics and "privlm_request_latency_seconds_bucket" in metrics
    assert 'privlm_requests_total{endpoint="completions",status="200"' in metrics
    lines = [json.loads(x) for x in endpoint["audit"].read_text().splitlines()]
    assert {"time", "key_id", "model_version", "status", "prompt_tokens", "completion_tokens"} <= set(lines[-1])
    assert "secret prompt text" not in endpoint["audit"].read_text()
    assert lines[-1]["key_id"] != KEY and KEY not in endpoint["audit"].read_text()


@pytest.fixture(scope="module")
def registered(ray_serve, small_data: Path, mlflow_server, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two versions of `served` in the MLflow registry, v1 champion and v2 challenger."""
    from mlflow.tracking import MlflowClient

    from mlops.registry import _log_model

    tmp = tmp_path_factory.mktemp("registered")
    client = MlflowClient(mlflow_server.uri)
    client.create_registered_model("served")
    exp = client.create_experiment("serving-tests")
    for seed in (1, 2):
        run = client.create_run(exp).info.run_id
        uri, model_id = _log_model(save_model(tmp / f"m{seed}", small_data, seed), run, mlflow_server.uri)
        client.create_model_version("served", uri, run_id=run, model_id=model_id)
    client.set_registered_model_alias("served", "champion", "1")
    client.set_registered_model_alias("served", "challenger", "2")
    return {"uri": mlflow_server.uri, "client": client}


def test_rollout_to_a_new_champion_fails_no_request(registered) -> None:
    from serving.cli import follow_champion
    from serving.settings import ServeSettings

    settings = ServeSettings(model_uri="models:/served@champion", tracking_uri=registered["uri"], port=PORT,
                             quantization="none")
    deploy(**settings.model_dump())
    seen, failures, stop = [], [], threading.Event()

    def client_loop() -> None:
        while not stop.is_set():
            r = post("/v1/completions", {"model": "served", "prompt": "def", "max_tokens": 2})
            (seen if r.status_code == 200 else failures).append(r.headers.get("x-privlm-model-version") or r.text)

    threads = [threading.Thread(target=client_loop) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(2)
    registered["client"].set_registered_model_alias("served", "champion", "2")
    follow_champion(settings, "served/v1", interval_s=0.1, rounds=1)
    deadline = time.monotonic() + 60
    while (not seen or seen[-1] != "served/v2") and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    stop.set()
    for t in threads:
        t.join()
    assert failures == []
    assert seen[0] == "served/v1" and seen[-1] == "served/v2"


def test_ab_split_is_sticky_per_user(registered) -> None:
    registered["client"].set_registered_model_alias("served", "champion", "1")
    deploy(model_uri="models:/served@champion", tracking_uri=registered["uri"], port=PORT, quantization="none",
           ab={"enabled": True, "challenger_share": 0.5})
    versions = {}
    for user in [f"user-{i}" for i in range(12)]:
        got = {post("/v1/completions", {"model": "served", "prompt": "x", "max_tokens": 1},
                    headers={"x-user-id": user}).headers["x-privlm-model-version"] for _ in range(2)}
        assert len(got) == 1  # a user stays on one version
        versions[user] = got.pop()
    assert set(versions.values()) == {"served/v1", "served/v2"}  # both arms get users
    metrics = httpx.get(f"{BASE}/metrics").text
    assert 'version="served/v1"' in metrics and 'version="served/v2"' in metrics
