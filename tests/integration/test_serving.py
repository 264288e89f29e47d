"""The endpoint against a real local Ray with vLLM (CPU) behind our gateway, over HTTPS.

One set of engines for the module (v1 with a LoRA adapter, v2 as challenger: each takes a minute or
more to start); tests that need other gateway settings redeploy only the gateway, which reuses them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import SMALL

pytestmark = pytest.mark.integration
KEY = "sk-test-privlm"
PORT = 18077
BASE = f"https://127.0.0.1:{PORT}"
STATE: dict[str, Any] = {}


def save_model(out: Path, data_dir: Path, seed: int) -> Path:
    """A randomly initialised SMALL-sized model (head size 32: vLLM's CPU attention needs >= 32) with the
    prepared tokenizer, in Hugging Face format."""
    from jobs.recipe import ModelConfig
    from jobs.train.model import build_model

    cfg = ModelConfig.model_validate({**SMALL["model"], "hidden_size": 128, "intermediate_size": 256,
                                      "vocab_size": 1024})
    build_model(cfg, seed, eos_id=0).save_pretrained(out)
    for f in (data_dir / "tokenizer").iterdir():
        shutil.copy2(f, out / f.name)
    return out


def save_adapter(base: Path, out: Path) -> Path:
    """A peft LoRA adapter on q_proj/v_proj with non-zero weights (so it changes the output)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    d = tmp_path_factory.mktemp("tls")
    paths = {"ca": d / "ca.pem", "cert": d / "cert.pem", "key": d / "key.pem"}
    ca.cert_pem.write_to_path(paths["ca"])
    cert.cert_chain_pems[0].write_to_path(paths["cert"])
    cert.private_key_pem.write_to_path(paths["key"])
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def registered(small_data: Path, mlflow_server, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`served` v1 (champion), v2 (challenger) and v3, a LoRA adapter on v1, in the MLflow registry."""
    from mlflow.tracking import MlflowClient

    from mlops.registry import _log_model, log_adapter

    tmp = tmp_path_factory.mktemp("registered")
    client = MlflowClient(mlflow_server.uri)
    client.create_registered_model("served")
    exp = client.create_experiment("serving-tests")
    for seed in (1, 2):
        run = client.create_run(exp).info.run_id
        uri, model_id = _log_model(save_model(tmp / f"m{seed}", small_data, seed), run, mlflow_server.uri)
        client.create_model_version("served", uri, run_id=run, model_id=model_id)
    run = client.create_run(exp).info.run_id
    log_adapter(save_adapter(tmp / "m1", tmp / "adapter"), "served", "1", run, mlflow_server.uri)
    client.set_model_version_tag("served", "1", "privlm.data_dir", str(small_data))  # its held-out split
    client.set_registered_model_alias("served", "champion", "1")
    client.set_registered_model_alias("served", "challenger", "2")
    return {"uri": mlflow_server.uri, "client": client}


def settings(registered: dict, tls: dict, **overrides: Any) -> Any:
    from serving.settings import ServeSettings

    base = {"model_uri": "models:/served@champion", "tracking_uri": registered["uri"], "port": PORT,
            "adapters": ["models:/served/3"], "ab": {"enabled": True, "challenger_share": 0.5},
            "engine": {"max_model_len": 128}, "max_ongoing_requests": 4,
            "max_queued_requests": 8, "block_list": ["forbiddenword"], "limits": {"max_tokens": 64},
            "auth": {"api_key_hashes": [hashlib.sha256(KEY.encode()).hexdigest()]},
            "tls": {"certfile": tls["cert"], "keyfile": tls["key"]}, "audit_log": STATE["audit"],
            "feedback": {"url": STATE["feedback"]}}
    return ServeSettings.model_validate({**base, **overrides})


@pytest.fixture(scope="module")
def endpoint(registered: dict, tls: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray
    from ray import serve

    from serving.deploy import deploy, serve_start

    STATE["audit"] = str(tmp_path_factory.mktemp("audit") / "audit.jsonl")
    STATE["feedback"] = f"sqlite:///{tmp_path_factory.mktemp('feedback') / 'feedback.db'}"
    ray.init(num_cpus=8, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    serve_start(settings(registered, tls))
    deploy(settings(registered, tls))
    yield {"registered": registered, "tls": tls, "deploy": lambda **kw: deploy(settings(registered, tls, **kw))}
    serve.shutdown()
    ray.shutdown()


@pytest.fixture
def gateway_default(endpoint: dict) -> Iterator[dict]:
    """Tests that change the gateway put the module's settings back afterwards (engines are untouched)."""
    yield endpoint
    endpoint["deploy"]()


def client(tls: dict) -> httpx.Client:
    return httpx.Client(base_url=BASE, verify=tls["ca"], timeout=120)


def post(endpoint: dict, path: str, body: dict | None = None, key: str | None = KEY, raw: bytes | None = None,
         **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with client(endpoint["tls"]) as c:
        return c.post(path, json=body, content=raw, headers={**headers, **kw.pop("headers", {})}, **kw)


def test_openai_client_over_tls_completions_chat_stream_and_models(endpoint) -> None:
    from openai import OpenAI

    oai = OpenAI(base_url=f"{BASE}/v1", api_key=KEY, http_client=httpx.Client(verify=endpoint["tls"]["ca"]))
    assert {m.id for m in oai.models.list().data} == {"served", "served-v3"}
    assert oai.models.retrieve("served").id == "served"
    done = oai.completions.create(model="served", prompt=["def main", "import os"], max_tokens=4, n=2,
                                  logprobs=2, temperature=0.8)
    assert len(done.choices) == 4 and done.usage.completion_tokens <= 16
    assert all(len(c.logprobs.top_logprobs[0]) >= 2 for c in done.choices)
    chat = oai.chat.completions.create(model="served@champion", messages=[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        max_completion_tokens=20, temperature=0, extra_body={})
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == 20 or chat.choices[0].finish_reason == "stop"  # not cut at 16
    chunks = list(oai.chat.completions.create(model="served", messages=[{"role": "user", "content": "x"}],
                                              max_tokens=6, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert any(c.choices and c.choices[0].finish_reason in ("length", "stop") for c in chunks)
    seeded = [oai.completions.create(model="served", prompt="class", max_tokens=8, seed=11, temperature=1.0,
                                     user=f"u{i}").choices[0].text for i in range(2)]
    assert seeded[0] == seeded[1]
    greedy = oai.completions.create(model="served", prompt="def", max_tokens=12, temperature=0).choices[0].text
    assert len(greedy) >= 4, greedy
    stop = greedy[len(greedy) // 2:len(greedy) // 2 + 3]
    stopped = oai.completions.create(model="served", prompt="def", max_tokens=12, temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].text == greedy[:greedy.index(stop)]


def test_response_format_is_guided_decoding(endpoint) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    r = post(endpoint, "/v1/chat/completions", {
        "model": "served", "messages": [{"role": "user", "content": "give n"}], "max_tokens": 40, "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}})
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["message"]["content"]
    if r.json()["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(content)["n"], int)
    else:  # ran out of tokens: still a prefix of valid JSON for the schema
        assert content.lstrip().startswith("{")


def test_langchain_and_litellm_clients(endpoint, monkeypatch) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{BASE}/v1", api_key=KEY, model="served", max_completion_tokens=5, temperature=0,
                     http_client=httpx.Client(verify=endpoint["tls"]["ca"]))
    reply = llm.invoke("hello")
    assert reply.usage_metadata["output_tokens"] == 5 or reply.response_metadata["finish_reason"] == "stop"
    import litellm

    monkeypatch.setenv("SSL_CERT_FILE", endpoint["tls"]["ca"])
    litellm.ssl_verify = endpoint["tls"]["ca"]
    out = litellm.completion(model="openai/served", api_base=f"{BASE}/v1", api_key=KEY, max_tokens=4,
                             messages=[{"role": "user", "content": "hi"}])
    assert out.choices[0].message.content is not None and out.usage.completion_tokens <= 4


@pytest.mark.parametrize(("body", "raw", "key", "status", "param"), [
    (None, b"{not json", KEY, 400, None),
    ({"model": "served"}, None, KEY, 400, "prompt"),
    ({"model": "served", "prompt": "  "}, None, KEY, 400, "prompt"),
    ({"model": "served", "prompt": []}, None, KEY, 400, "prompt"),
    ({"model": "served", "prompt": "x", "max_tokens": "ten"}, None, KEY, 400, "max_tokens"),
    ({"model": "served", "prompt": "x", "max_tokens": 10**6}, None, KEY, 400, "max_tokens"),
    ({"model": "served", "prompt": "word " * 400}, None, KEY, 400, "prompt"),
    ({"model": "served", "prompt": "x", "temperature": 9}, None, KEY, 400, "temperature"),
    ({"model": "served", "prompt": "x", "tools": []}, None, KEY, 400, "tools"),
    ({"model": "served", "prompt": "x", "frobnicate": 1}, None, KEY, 400, "frobnicate"),
    ({"model": "served", "prompt": "x", "stream_options": {"include_usage": True}}, None, KEY, 400, None),
    ({"model": "served", "prompt": "x", "response_format": {"type": "xml"}}, None, KEY, 400,
     "response_format.type"),
    (None, b'{"model": "served", "prompt": "x\\u0000y"}', KEY, 400, "prompt"),
    (None, b'{"model": "served", "prompt": "x\\ud800y"}', KEY, 400, "prompt"),
    ({"model": "gpt-4", "prompt": "x"}, None, KEY, 404, "model"),
    ({"model": "served@canary", "prompt": "x"}, None, KEY, 404, "model"),
    ({"model": "served", "prompt": "x"}, None, None, 401, None),
    ({"model": "served", "prompt": "x"}, None, "wrong", 401, None),
    ({"model": "served", "prompt": "say forbiddenword"}, None, KEY, 400, "prompt"),
])
def test_bad_input_gets_4xx_in_openai_shape(endpoint, body, raw, key, status, param) -> None:
    r = post(endpoint, "/v1/completions", body, key=key, raw=raw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param"} and err["message"] and err["param"] == param


def test_bad_chat_input(endpoint) -> None:
    for body, param in [({"model": "served", "messages": []}, "messages"),
                        ({"model": "served", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
                        ({"model": "served", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
                          "max_completion_tokens": 4}, None)]:
        r = post(endpoint, "/v1/chat/completions", body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_good_requests_beside_a_bad_one_all_succeed(endpoint) -> None:
    bodies = [{"model": "served", "prompt": f"def f{i}", "max_tokens": 8} for i in range(6)]
    bodies.insert(3, {"model": "served", "prompt": "word " * 400, "max_tokens": 8})  # beyond the context
    with ThreadPoolExecutor(len(bodies)) as pool:
        codes = list(pool.map(lambda b: post(endpoint, "/v1/completions", b).status_code, bodies))
    assert codes == [200, 200, 200, 400, 200, 200, 200]


def test_overload_gets_503_with_retry_after_and_recovers(endpoint) -> None:
    body = {"model": "served@champion", "prompt": "class A", "max_tokens": 64, "temperature": 1.0}
    with ThreadPoolExecutor(40) as pool:  # the engine takes 4 at once and queues 8
        responses = list(pool.map(lambda _: post(endpoint, "/v1/completions", body), range(40)))
    codes = [r.status_code for r in responses]
    assert 503 in codes and 200 in codes and set(codes) <= {200, 503}
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"] == "1" and busy.json()["error"]["type"] == "server_overloaded"
    assert post(endpoint, "/v1/completions", {**body, "max_tokens": 2}).status_code == 200  # recovered


def metric(endpoint: dict, line_start: str) -> float:
    with client(endpoint["tls"]) as c:
        text = c.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


def test_metrics_audit_and_cache_keyed_by_version_and_arm(endpoint) -> None:
    body = {"model": "served@champion", "prompt": "secret prompt text", "max_tokens": 3, "temperature": 0}
    hits = metric(endpoint, 'privlm_cache_total{result="hit"}')
    misses = metric(endpoint, 'privlm_cache_total{result="miss"}')
    first, second = post(endpoint, "/v1/completions", body), post(endpoint, "/v1/completions", body)
    assert first.json()["choices"] == second.json()["choices"]
    other = post(endpoint, "/v1/completions", {**body, "model": "served@challenger"})
    assert other.headers["x-privlm-model-version"] == "served/v2" != first.headers["x-privlm-model-version"]
    with client(endpoint["tls"]) as c:
        assert c.get("/metrics").status_code == 401
        metrics = c.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert metric(endpoint, 'privlm_cache_total{result="hit"}') == hits + 1  # the second champion request
    assert metric(endpoint, 'privlm_cache_total{result="miss"}') == misses + 2  # champion once, challenger once
    assert 'privlm_requests_total{endpoint="completions",status="200",version="served/v2"}' in metrics
    assert 'privlm_completion_tokens_total{version="served/v1"}' in metrics
    assert "privlm_prompt_tokens_total" in metrics
    post(endpoint, "/v1/completions", {**body, "stream": True})
    with client(endpoint["tls"]) as c:
        metrics = c.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'privlm_time_to_first_token_seconds_count{version="served/v1"}' in metrics
    assert 'privlm_inter_token_latency_seconds_count{version="served/v1"}' in metrics
    audit = Path(STATE["audit"]).read_text()
    lines = [json.loads(x) for x in audit.splitlines()]
    assert {"time", "key_id", "model_version", "status", "prompt_tokens", "completion_tokens"} <= set(lines[-1])
    assert "secret prompt text" not in audit and KEY not in audit


def test_block_list_catches_a_word_split_across_stream_chunks(gateway_default) -> None:
    ep = gateway_default
    body = {"model": "served@champion", "prompt": "def main", "max_tokens": 12, "temperature": 0, "logprobs": 0}
    tokens = post(ep, "/v1/completions", body).json()["choices"][0]["logprobs"]["tokens"]
    i = next(i for i in range(len(tokens) - 1) if len(tokens[i].strip()) >= 2 and len(tokens[i + 1].strip()) >= 2)
    word = tokens[i].strip()[-2:] + tokens[i + 1].strip()[:2]  # spans two tokens, so two stream chunks
    ep["deploy"](block_list=[word])
    plain = post(ep, "/v1/completions", {**body, "logprobs": None}).json()["choices"][0]
    assert word.lower() not in plain["text"].lower() and plain["finish_reason"] == "content_filter"
    streamed = post(ep, "/v1/completions", {**body, "logprobs": None, "stream": True}).text
    chunks = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert word.lower() not in text.lower() and text == plain["text"]  # the same text as the whole-text filter
    assert any(c["choices"] and c["choices"][0]["finish_reason"] == "content_filter" for c in chunks)


def test_jwt_scopes_and_expiry(gateway_default, tmp_path) -> None:
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pub = tmp_path / "jwt.pem"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    gateway_default["deploy"](auth={"mode": "jwt", "api_key_hashes": [hashlib.sha256(KEY.encode()).hexdigest()],
                                    "jwt": {"issuer": "https://idp.test", "audience": "privlm",
                                                          "public_key_file": str(pub)}})

    def token(scope: str, exp: float = 300, aud: str = "privlm") -> str:
        claims = {"iss": "https://idp.test", "aud": aud, "sub": "alice", "exp": int(time.time() + exp),
                  "scope": scope}
        return jwt.encode(claims, key, algorithm="RS256")

    body = {"model": "served", "prompt": "x", "max_tokens": 2}
    ep = gateway_default
    ok = post(ep, "/v1/completions", body, key=token("models:served"))
    assert ok.status_code == 200, ok.text
    assert post(ep, "/v1/completions", body, key=token("models:other")).status_code == 403
    assert post(ep, "/v1/completions", body, key=token("models:served", exp=-120)).json()["error"]["message"] \
        == "the token has expired"
    assert post(ep, "/v1/completions", body, key=token("models:served", aud="else")).status_code == 401
    assert post(ep, "/v1/completions", body, key=KEY).status_code == 200  # keys still work beside JWTs
    with client(ep["tls"]) as c:
        assert c.get("/metrics", headers={"Authorization": f"Bearer {token('models:*')}"}).status_code == 403
        assert c.get("/metrics", headers={"Authorization": f"Bearer {token('metrics:read')}"}).status_code == 200
        listed = c.get("/v1/models", headers={"Authorization": f"Bearer {token('models:served')}"}).json()
    assert [m["id"] for m in listed["data"]] == ["served"]


def test_rate_limit_per_key_gets_429_with_retry_after(gateway_default) -> None:
    gateway_default["deploy"](rate_limit={"requests_per_minute": 6, "burst": 2})
    body = {"model": "served", "prompt": "x", "max_tokens": 1}
    codes = [post(gateway_default, "/v1/completions", body) for _ in range(4)]
    assert [r.status_code for r in codes] == [200, 200, 429, 429]
    assert int(codes[2].headers["retry-after"]) >= 1 and codes[2].json()["error"]["type"] == "rate_limit_exceeded"


def test_adapter_served_on_its_base_without_merging(gateway_default) -> None:
    ep = gateway_default
    body = {"prompt": "def main", "max_tokens": 8, "temperature": 0}
    base = post(ep, "/v1/completions", {**body, "model": "served@champion"})
    tuned = post(ep, "/v1/completions", {**body, "model": "served-v3"})
    assert tuned.status_code == 200 and tuned.headers["x-privlm-model-version"] == "served/v3"
    assert tuned.json()["choices"][0]["text"] != base.json()["choices"][0]["text"]
    # the champion alias may point at the adapter version: served on base v1's engine
    client_ = ep["registered"]["client"]
    client_.set_registered_model_alias("served", "champion", "3")
    try:
        ep["deploy"]()
        again = post(ep, "/v1/completions", {**body, "model": "served@champion"})
        assert again.headers["x-privlm-model-version"] == "served/v3"
        assert again.json()["choices"][0]["text"] == tuned.json()["choices"][0]["text"]
    finally:
        client_.set_registered_model_alias("served", "champion", "1")


def test_ab_split_is_sticky_per_user(endpoint) -> None:
    versions = {}
    for user in [f"user-{i}" for i in range(12)]:
        got = {post(endpoint, "/v1/completions", {"model": "served", "prompt": "x", "max_tokens": 1},
                    headers={"x-user-id": user}).headers["x-privlm-model-version"] for _ in range(2)}
        assert len(got) == 1  # a user stays on one version
        versions[user] = got.pop()
    assert set(versions.values()) == {"served/v1", "served/v2"}  # both arms get users


def test_feedback_decides_the_ab_test_and_the_promotion(endpoint) -> None:
    """Users rate answers through POST /v1/feedback; the challenger's are rated higher; the A/B test
    says so with enough data, the promotion records the numbers, the store feeds the data loop."""
    from jobs.recipe import ABPolicy
    from mlops.compare import compare_versions
    from mlops.feedback import FeedbackStore
    from mlops.loop import export_feedback
    from mlops.promote import PromotionRefused, events, promote_champion

    ep, rng = endpoint, random.Random(7)
    bad = post(ep, "/v1/feedback", {"id": "cmpl-nothing", "thumbs": "up"})
    assert bad.status_code == 404 and bad.json()["error"]["param"] == "id"
    assert post(ep, "/v1/feedback", {"id": "x", "rating": 9}).json()["error"]["param"] == "rating"

    def ask_and_rate(user: str, stream: bool) -> str:
        body = {"model": "served", "prompt": f"mail me at {user}@example.com", "max_tokens": 4, "stream": stream}
        r = post(ep, "/v1/completions", body, headers={"x-user-id": user})
        rid = json.loads(r.text.split("data: ")[1])["id"] if stream else r.json()["id"]
        version = r.headers["x-privlm-model-version"]
        rating = min(5, max(1, round(rng.gauss(4.2 if version == "served/v2" else 2.8, 0.8))))
        fb = post(ep, "/v1/feedback", {"id": rid, "rating": rating})
        assert fb.status_code == 200 and fb.json()["version"] == version, fb.text
        return version

    with ThreadPoolExecutor(4) as pool:
        seen = list(pool.map(lambda i: ask_and_rate(f"u{i}", stream=i % 4 == 0), range(80)))
    assert {"served/v1", "served/v2"} == set(seen)
    assert metric(ep, 'privlm_feedback_score_count{arm="challenger",version="served/v2"}') == seen.count("served/v2")
    assert metric(ep, 'privlm_finish_reasons_total{reason="length",version="served/v1"}') > 0
    assert sum(metric(ep, f'privlm_output_tokens_total{{bucket="{b}",version="served/v2"}}') or 0
               for b in range(64)) > 0

    store = FeedbackStore(STATE["feedback"])
    result = compare_versions(store, "served", "served/v1", "served/v2", ABPolicy(min_effect=1.0))
    assert result.challenger_wins and result.p_value < 0.05, result.verdict()
    uri = ep["registered"]["uri"]
    with pytest.raises(PromotionRefused, match="not enough data"):  # the recipe's default effect size needs more
        promote_champion("served", feedback_url=STATE["feedback"], uri=uri)
    client_ = ep["registered"]["client"]
    client_.set_model_version_tag("served", "2", "privlm.recipe_yaml",
                                  "registry: {promotion: {ab: {min_effect: 1.0}}}")
    try:
        decision = promote_champion("served", uri=uri, feedback_url=STATE["feedback"])  # recipe: effect 1.0
        assert decision.promoted and decision.version == "2" and "A/B" in decision.reason
        assert events(client_, "served")[-1]["ab"]["challenger"]["n"] == seen.count("served/v2")
        baseline = float(client_.get_model_version("served", "2").tags["privlm.quality_baseline"])
        assert baseline == pytest.approx(result.challenger.mean)
    finally:  # the module's aliases again
        client_.set_registered_model_alias("served", "champion", "1")
        client_.set_registered_model_alias("served", "challenger", "2")
        client_.delete_model_version_tag("served", "2", "privlm.recipe_yaml")
    exported = export_feedback(store, "served", Path(STATE["audit"]).parent / "feedback.jsonl", min_score=0.75)
    text = exported.path.read_text()
    assert exported.kept > 0 and "@example.com" not in text and exported.redactions["email"] == exported.kept


def test_the_loop_retrains_on_feedback_into_a_challenger(endpoint, small_data, tmp_path, monkeypatch) -> None:
    """One turn of the loop on CPU, on the feedback of the A/B test above: the rated answers trigger a
    retraining; they are exported (redacted) and fine-tune a LoRA adapter on the champion's base as a
    local DeepSpeed job; the adapter is registered on that base, evaluated beside the champion on the
    same held-out data, passes the offline gate and becomes the challenger."""
    from mlops.feedback import FeedbackStore
    from mlops.loop import LAST_RETRAIN_TAG, Trigger, due, export_feedback, last_retrain, retrain
    from tests.helpers import SMALL, merge, write_recipe

    uri, client_ = endpoint["registered"]["uri"], endpoint["registered"]["client"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the training job tracks there too
    store = FeedbackStore(STATE["feedback"])
    assert due(Trigger(feedback_count=50), store, "served", last_retrain(client_, "served")).endswith("(trigger: 50)")
    exported = export_feedback(store, "served", tmp_path / "feedback.jsonl", min_score=0.5)
    assert exported.kept >= 40
    loose = {"min_chars": 5, "min_words": 2, "max_symbol_ratio": 1.0, "min_alpha_word_fraction": 0.0,
             "max_top_ngram_fraction": 1.0, "max_duplicate_line_fraction": 1.0, "max_mean_word_length": 100}
    recipe = write_recipe(tmp_path / "loop.yaml", merge(SMALL, {
        "name": "served-loop", "run_dir": str(tmp_path / "run"),
        "model": {"hidden_size": 128, "intermediate_size": 256},
        "tokenizer": {"path": str(small_data / "tokenizer"), "vocab_size": 1024},
        "data": {"sources": [{"path": "set-by-the-loop.jsonl"}], "output_dir": str(tmp_path / "data"),
                 "num_shards": 1, "workers": 1, "eval_fraction": 0.2, "filters": loose,
                 "dedup": {"near": False, "sentences": False}},
        "training": {"sequence_length": 32, "micro_batch_size": 2, "global_batch_size": 4, "max_steps": 8,
                     "warmup_steps": 1, "learning_rate": 5e-3, "min_learning_rate": 5e-4},
        "checkpoint": {"interval": 8, "directory": str(tmp_path / "run" / "checkpoints")},
        "finetune": {"base": "set-by-the-loop", "method": "lora",
                     "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
        "registry": {"model_name": "served"}}))
    result = retrain("served", recipe, exported.path, executor="local", uri=uri)
    assert result["challenger"], result["gate"]
    new = client_.get_model_version("served", result["version"])
    assert new.tags["privlm.adapter_of"] == "served/1" and LAST_RETRAIN_TAG in client_.get_registered_model(
        "served").tags
    assert client_.get_model_version_by_alias("served", "challenger").version == result["version"]
    assert new.tags["eval.dataset"] == client_.get_model_version("served", "1").tags["eval.dataset"]
    client_.set_registered_model_alias("served", "challenger", "2")  # the module's challenger again
    # Serving it as the challenger (an adapter on the v1 engine) would restart that engine (its adapter
    # list changes): test_adapter_served_on_its_base_without_merging covers adapters on a base.


@pytest.fixture(scope="module")
def monitoring(endpoint: dict, monitoring_stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The session's monitoring stack (Prometheus, Alertmanager, our receiver) scraping this module's
    gateway over HTTPS with a metrics:read key, the P99 alert's `for` shortened to 3 s."""
    token = tmp_path_factory.mktemp("scrape") / "token"
    token.write_text(KEY)
    monitoring_stack.override_rules({"p99_latency": {"for": "3s"}})
    monitoring_stack.add_gateway(f"127.0.0.1:{PORT}", token_file=str(token), ca_file=endpoint["tls"]["ca"],
                                 scheme="https")
    assert monitoring_stack.wait_for_target("privlm-gateway", 60), monitoring_stack.logs()
    return monitoring_stack


def traffic(endpoint: dict, seconds: float, prompts: list[str], max_tokens: int, clients: int = 4) -> int:
    """Requests to the champion from `clients` threads for `seconds`; how many were answered."""
    done, stop = [], time.monotonic() + seconds

    def loop(i: int) -> None:
        n = 0
        while time.monotonic() < stop:
            body = {"model": "served@champion", "prompt": prompts[n % len(prompts)], "max_tokens": max_tokens}
            done.append(post(endpoint, "/v1/completions", body).status_code == 200)
            n += 1

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(loop, range(clients)))
    return sum(done)


def test_output_drift_is_measured_on_live_traffic(endpoint, monitoring) -> None:
    """A steady stream stays below the threshold; outputs changed on purpose go above it and alert."""
    from jobs.recipe import DriftPolicy
    from mlops.drift import Prometheus, alert, measure
    from mlops.registry import get_version

    uri, prom = endpoint["registered"]["uri"], Prometheus(monitoring.prometheus_url)
    mv = get_version("served", "1", uri)
    policy = DriftPolicy(window="12s", reference_window="12s", min_tokens=200)
    steady = ["def main", "import os", "class A:", "for i in"]
    assert traffic(endpoint, 14, steady, 8) > 20
    time.sleep(2)  # the last scrape
    first = measure(prom, mv, policy, capture_reference=True, uri=uri)  # the last 12 s become the reference
    assert "privlm.drift.reference" in get_version("served", "1", uri).tags
    traffic(endpoint, 14, steady, 8)
    time.sleep(2)
    same = measure(prom, mv, policy, uri=uri)
    assert not same.drifted and same.recent_tokens >= 200, same.as_dict()
    traffic(endpoint, 14, ["1", "\n\n\n"], 2)  # other prompts, answers cut to 2 tokens
    time.sleep(2)
    changed = measure(prom, mv, policy, uri=uri)
    assert changed.drifted and changed.divergences["length"] > 0.15, changed.as_dict()
    assert changed.score > 5 * same.score and first.reference_tokens >= 200
    from tests.integration.monitoring_fixture import wait_until

    alert(monitoring.alertmanager_url, changed)
    ours = wait_until(lambda: [m for m in monitoring.captured["slack"]  # the session's stack: other drift alerts too
                               if "PrivlmOutputDrift" in json.dumps(m) and "served/v1" in json.dumps(m)], 60)
    assert ours, monitoring.captured["slack"]


def test_a_slow_endpoint_fires_the_p99_alert_end_to_end(endpoint, monitoring) -> None:
    """Long generations at high concurrency push the gateway's P99 above 500 ms: Prometheus fires the
    alert, Alertmanager delivers it to our receiver."""
    traffic(endpoint, 20, ["def main"], 64, clients=12)
    p99 = monitoring.prometheus.value(
        'histogram_quantile(0.99, sum by (le) (rate(privlm_request_latency_seconds_bucket[1m])))')
    assert p99 is not None and p99 > 0.5, p99
    delivered = monitoring.wait_for_alert("PrivlmP99LatencyHigh", 90)
    assert "PrivlmP99LatencyHigh" in json.dumps(delivered)


def test_rollout_to_a_new_champion_fails_no_request(gateway_default) -> None:
    from serving.cli import follow_champion

    ep = gateway_default
    seen, failures, stop = [], [], threading.Event()

    def client_loop() -> None:
        while not stop.is_set():
            r = post(ep, "/v1/completions", {"model": "served@champion", "prompt": "def", "max_tokens": 2})
            (seen if r.status_code == 200 else failures).append(r.headers.get("x-privlm-model-version") or r.text)

    threads = [threading.Thread(target=client_loop) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(2)
    ep["registered"]["client"].set_registered_model_alias("served", "champion", "2")
    try:
        follow_champion(settings(ep["registered"], ep["tls"]), "served/v1", interval_s=0.1, rounds=1)
        deadline = time.monotonic() + 60
        while (not seen or seen[-1] != "served/v2") and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join()
        ep["registered"]["client"].set_registered_model_alias("served", "champion", "1")
    assert failures == []
    assert seen[0] == "served/v1" and seen[-1] == "served/v2"


def test_schemathesis_finds_no_server_error(endpoint) -> None:
    """A bounded fuzz of both endpoints from the live OpenAPI schema: every answer is < 500 and OpenAI-shaped."""
    import schemathesis
    from hypothesis import HealthCheck, given
    from hypothesis import settings as hsettings

    with client(endpoint["tls"]) as c:
        schema = schemathesis.openapi.from_dict(c.get("/openapi.json").json())
    def fuzzer(path: str):
        @hsettings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
        @given(case=schema[path]["POST"].as_strategy())
        def fuzz(case) -> None:
            r = post(endpoint, path, case.body if isinstance(case.body, dict) else None,
                     raw=None if isinstance(case.body, dict) else json.dumps(case.body).encode())
            assert r.status_code < 500, (case.body, r.text)
            assert r.status_code == 200 or set(r.json()["error"]) >= {"message", "type", "param"}

        return fuzz

    for path in ("/v1/completions", "/v1/chat/completions"):
        fuzzer(path)()


def test_the_quantized_version_is_served_by_scheme(endpoint) -> None:
    """Last in the module: it replaces the module's engines with the w8a8 one."""
    from mlops.quantize import quantize_version

    quantize_version("served", "1", "w8a8", uri=endpoint["registered"]["uri"])
    endpoint["deploy"](quantization="w8a8", adapters=[], ab={"enabled": False})
    r = post(endpoint, "/v1/completions", {"model": "served", "prompt": "def main", "max_tokens": 8})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
    version = r.headers["x-privlm-model-version"]
    mv = endpoint["registered"]["client"].get_model_version("served", version.removeprefix("served/v"))
    assert mv.tags["privlm.quantized_from"] == "served/1" and mv.tags["privlm.quant_scheme"] == "w8a8"
    with client(endpoint["tls"]) as c:
        card = c.get("/v1/models/served", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert card["version"] == version  # the model answering is the quantized version ...
    assert card["quantization"] == {"method": "compressed-tensors", "format": "int-quantized"}  # ... loaded as int8
