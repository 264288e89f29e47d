"""The Ray Serve application: a gateway (OpenAI API, auth, limits, filter, cache, A/B, metrics, audit)
in front of one batched, quantized model deployment per served version (champion, optional challenger).

Requests are validated in the model replica *before* they join a batch, so one bad request never
fails its neighbours. Overload beyond `max_queued_requests` is answered 503 with Retry-After.
A new champion is rolled out by redeploying the `champion` deployment with the new version: Serve
starts the new replicas, then drains the old ones, so no request fails.
"""


import asyncio
import hashlib
import json
import logging
import re
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError

from serving.api import ApiError, ChatRequest, CompletionRequest, completion_response, parse, stream_chunk
from serving.auth import KeyRing
from serving.settings import ServeSettings

log = logging.getLogger("privlm.serving")


def resolve_model(uri: str, tracking_uri: str | None) -> tuple[str, str]:
    """(pinned URI, version label): `models:/NAME@alias` becomes `models:/NAME/N`; a path stays a path."""
    if uri.startswith("models:/"):
        from mlops.tracking import client

        name, _, rest = uri.removeprefix("models:/").partition("@")
        if rest:
            version = client(tracking_uri).get_model_version_by_alias(name, rest).version
            return f"models:/{name}/{version}", f"{name}/v{version}"
        name, _, version = uri.removeprefix("models:/").partition("/")
        return uri, f"{name}/v{version}"
    path = Path(uri)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model_uri={uri!r} is neither models:/NAME@ALIAS nor a Hugging Face directory")
    stamp = hashlib.sha256(str(sorted((f.name, f.stat().st_mtime_ns) for f in path.iterdir())).encode()).hexdigest()
    return str(path.resolve()), f"{path.name}@{stamp[:8]}"


def served_name(uri: str) -> str:
    """The `model` clients ask for: the registered name, or the directory name."""
    if uri.startswith("models:/"):
        return re.split(r"[@/]", uri.removeprefix("models:/"))[0]
    path = Path(uri).resolve()
    return path.parent.name if path.name == "model" else path.name  # runs/NAME/model -> NAME


@serve.deployment
class ModelServer:
    """One model version: loaded, quantized, and generating in batches on a worker thread."""

    def __init__(self, settings: dict[str, Any], model_uri: str, version: str) -> None:
        import torch

        self.settings = ServeSettings.model_validate(settings)
        torch.set_num_threads(self.settings.torch_threads)
        self.version = version
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if self.settings.device == "auto" \
            else self.settings.device
        self.model, self.tokenizer, self.quant_report = self._load(model_uri)
        self.context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self._batched.set_max_batch_size(self.settings.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)
        log.warning("serving %s: %s", version, json.dumps(self.quant_report))

    def _load(self, uri: str) -> tuple[Any, Any, dict[str, Any]]:
        import copy

        from serving.quantize import logit_deviation, model_bytes, quantize

        if uri.startswith("models:/"):
            from mlops.registry import load_components

            model, tokenizer = load_components(uri, self.settings.tracking_uri)
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model, tokenizer = AutoModelForCausalLM.from_pretrained(uri), AutoTokenizer.from_pretrained(uri)
        model = model.eval().to(self.device)
        reference = copy.deepcopy(model)
        before = model_bytes(model)
        model = quantize(model, self.settings.quantization, self.device)
        report = {"version": self.version, "quantization": self.settings.quantization, "device": self.device,
                  "bytes_fp32": before, "bytes": model_bytes(model),
                  **logit_deviation(reference, model, len(tokenizer), self.device)}
        return model, tokenizer, report

    def info(self) -> dict[str, Any]:
        return {**self.quant_report, "context": self.context}

    def _requests(self, payload: dict[str, Any]) -> tuple[list[Any], int]:
        """Validate against the model (context, limits) and build one GenRequest per choice."""
        from serving.generate import GenRequest, chat_prompt

        lim = self.settings.limits
        prompt = chat_prompt(self.tokenizer, payload["messages"]) if "messages" in payload else payload["prompt"]
        if len(prompt) > lim.max_prompt_chars:
            raise ApiError(400, f"prompt has {len(prompt)} characters; the limit is {lim.max_prompt_chars}",
                           param="prompt")
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ApiError(400, "prompt has no tokens", param="prompt")
        room = self.context - len(ids)
        if room < 1:
            raise ApiError(400, f"prompt is {len(ids)} tokens; this model's context is {self.context}",
                           "context_length_exceeded", param="prompt")
        max_tokens = payload.get("max_tokens") or min(16, room)
        if max_tokens > min(lim.max_tokens, room):
            raise ApiError(400, f"max_tokens={max_tokens} exceeds {min(lim.max_tokens, room)} (limit "
                           f"{lim.max_tokens}, context room {room})", param="max_tokens")
        if payload.get("n", 1) > lim.max_n:
            raise ApiError(400, f"n={payload['n']} exceeds the limit {lim.max_n}", param="n")
        seed = payload.get("seed")
        reqs = [GenRequest(ids, max_tokens, payload.get("temperature", 1.0), payload.get("top_p", 1.0),
                           payload.get("stop") or [], None if seed is None else seed + i)
                for i in range(payload.get("n", 1))]
        return reqs, len(ids)

    async def complete(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Validate, then batch: returns choices, usage, batch size and version, or an error dict."""
        try:
            reqs, prompt_tokens = self._requests(payload)
        except ApiError as err:
            return {"error": err.body(), "status": err.status}
        results = await asyncio.gather(*(self._batched(r) for r in reqs))
        choices = [{"text": r.text, "finish_reason": r.finish_reason} for r, _ in results]
        completion = sum(r.tokens for r, _ in results)
        return {"choices": choices, "version": self.version, "batch_size": max(b for _, b in results),
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                          "total_tokens": prompt_tokens + completion}}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _batched(self, reqs: list[Any]) -> list[tuple[Any, int]]:
        from serving.generate import generate

        results = await asyncio.to_thread(generate, self.model, self.tokenizer, reqs)
        return [(r, len(reqs)) for r in results]

    async def stream(self, payload: dict[str, Any]):
        """Token-by-token text deltas for one request (streams are not batched)."""
        from serving.generate import Decoder, stream_tokens

        try:
            reqs, _ = self._requests({**payload, "n": 1})
        except ApiError as err:
            yield {"error": err.body(), "status": err.status}
            return
        decoder = Decoder(self.tokenizer, reqs[0])
        steps = stream_tokens(self.model, self.tokenizer.pad_token_id or self.tokenizer.eos_token_id, reqs)
        while not decoder.finish:
            step = await asyncio.to_thread(next, steps, None)
            if step is None:
                break
            delta = decoder.add(step[0])
            if delta:
                yield {"text": delta}
        yield {"finish_reason": decoder.finish or "length", "version": self.version, "tokens": len(decoder.tokens)}


api = FastAPI(title="privlm", docs_url=None, redoc_url=None)


@serve.deployment(max_ongoing_requests=512)
@serve.ingress(api)
class Gateway:
    """The OpenAI-compatible front door."""

    def __init__(self, settings: dict[str, Any], champion: Any, challenger: Any | None, name: str) -> None:
        from serving.metrics import ServingMetrics

        self.settings = ServeSettings.model_validate(settings)
        self.champion, self.challenger, self.name = champion, challenger, name
        self.keys = KeyRing(self.settings.api_key_hashes, self.settings.api_keys_env)
        self.blocked = re.compile("|".join(re.escape(w) for w in self.settings.block_list), re.I) \
            if self.settings.block_list else None
        self.cache: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.metrics = ServingMetrics()
        self.audit = Path(self.settings.audit_log) if self.settings.audit_log else None
        if self.audit:
            self.audit.parent.mkdir(parents=True, exist_ok=True)

    # --- routes -------------------------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/metrics")
    async def prometheus(self) -> PlainTextResponse:
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        try:
            self.keys.check(request.headers.get("authorization"))
        except ApiError as err:
            return JSONResponse(err.body(), err.status)
        data = [{"id": self.name, "object": "model", "created": 0, "owned_by": "privlm"}]
        return JSONResponse({"object": "list", "data": data})

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        return await self._handle(request, CompletionRequest, chat=False)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Any:
        return await self._handle(request, ChatRequest, chat=True)

    # --- the request path ---------------------------------------------------------------------
    async def _handle(self, request: Request, kind: type, chat: bool) -> Any:
        endpoint = "chat" if chat else "completions"
        started, key_id, version = time.perf_counter(), "-", "-"
        self.metrics.in_flight.inc()
        try:
            key_id = self.keys.check(request.headers.get("authorization"))
            req = parse(await request.body(), kind)
            self._check_model(req.model)
            payload = req.model_dump(exclude_none=True)
            prompt_text = payload.get("prompt") or " ".join(m["content"] for m in payload.get("messages", []))
            if self.blocked and self.blocked.search(prompt_text):
                raise ApiError(400, "the prompt contains blocked content", "content_filter", param="prompt")
            target, version = self._route(request, req)
            if req.stream:
                return self._stream(target, payload, chat, started, key_id, endpoint)
            result = await self._complete(target, payload)
            version = result["version"]
            body = completion_response(self.name, [self._filter(c) for c in result["choices"]], result["usage"], chat)
            self._record(endpoint, 200, version, started, key_id, result["usage"], prompt_text)
            return JSONResponse(body, headers={"x-privlm-model-version": version})
        except ApiError as err:
            self._record(endpoint, err.status, version, started, key_id, None, None)
            return JSONResponse(err.body(), err.status, headers=err.headers)
        finally:
            self.metrics.in_flight.dec()

    def _check_model(self, model: str) -> None:
        if model.split("@")[0] != self.name:
            raise ApiError(404, f"model {model!r} does not exist; this endpoint serves {self.name!r}",
                           "model_not_found", param="model")

    def _route(self, request: Request, req: Any) -> tuple[Any, str]:
        """Champion, or challenger for the users the A/B split assigns to it (stable per user id)."""
        ab = self.settings.ab
        wants = req.model.partition("@")[2]
        if self.challenger is not None and (wants == "challenger" or (ab.enabled and not wants)):
            user = request.headers.get(ab.user_header) or req.user or ""
            bucket = int.from_bytes(hashlib.sha256(user.encode()).digest()[:4], "big") / 2**32
            if wants == "challenger" or (user and bucket < ab.challenger_share):
                return self.challenger, "challenger"
        return self.champion, "champion"

    async def _complete(self, target: Any, payload: dict[str, Any]) -> dict[str, Any]:
        cacheable = payload.get("temperature", 1.0) == 0 and self.settings.cache_size > 0
        key = json.dumps({k: v for k, v in payload.items() if k not in ("user", "stream")}, sort_keys=True)
        if cacheable and key in self.cache:
            self.cache.move_to_end(key)
            self.metrics.cache.labels("hit").inc()
            return self.cache[key]
        try:
            result = await target.complete.remote(payload)
        except BackPressureError:
            raise ApiError(503, "the model is at capacity; retry shortly", "server_overloaded",
                           headers={"Retry-After": "1"}) from None
        if "error" in result:
            raise ApiError(result["status"], result["error"]["error"]["message"], result["error"]["error"]["type"],
                           result["error"]["error"]["param"])
        self.metrics.batch_size.observe(result["batch_size"])
        if cacheable:
            self.metrics.cache.labels("miss").inc()
            self.cache[key] = result
            if len(self.cache) > self.settings.cache_size:
                self.cache.popitem(last=False)
        return result

    def _filter(self, choice: dict[str, Any]) -> dict[str, Any]:
        if self.blocked and self.blocked.search(choice["text"]):
            return {"text": self.blocked.sub("", choice["text"]), "finish_reason": "content_filter"}
        return choice

    def _stream(self, target: Any, payload: dict[str, Any], chat: bool, started: float, key_id: str,
                endpoint: str) -> StreamingResponse:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"

        async def events():
            version, tokens = "-", 0
            async for piece in target.options(stream=True).stream.remote(payload):
                if "error" in piece:
                    yield f"data: {json.dumps(piece['error'])}\n\n"
                    self._record(endpoint, piece["status"], version, started, key_id, None, None)
                    return
                if "text" in piece:
                    text = self.blocked.sub("", piece["text"]) if self.blocked else piece["text"]
                    yield stream_chunk(rid, self.name, text, None, chat)
                else:
                    version, tokens = piece["version"], piece["tokens"]
                    yield stream_chunk(rid, self.name, "", piece["finish_reason"], chat)
            yield "data: [DONE]\n\n"
            self._record(endpoint, 200, version, started, key_id, {"prompt_tokens": 0, "completion_tokens": tokens},
                         None)

        return StreamingResponse(events(), media_type="text/event-stream")

    def _record(self, endpoint: str, status: int, version: str, started: float, key_id: str,
                usage: dict[str, int] | None, prompt: str | None) -> None:
        """Metrics and one audit line per request (never the prompt text unless configured)."""
        seconds = time.perf_counter() - started
        self.metrics.observe(endpoint, status, version, seconds, (usage or {}).get("completion_tokens", 0))
        if self.audit is None:
            return
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "key_id": key_id, "endpoint": endpoint,
                "model_version": version, "status": status, "latency_s": round(seconds, 4),
                "prompt_tokens": (usage or {}).get("prompt_tokens"),
                "completion_tokens": (usage or {}).get("completion_tokens")}
        if self.settings.audit_prompts and prompt is not None:
            line["prompt"] = prompt
        with open(self.audit, "a") as fh:
            fh.write(json.dumps(line) + "\n")


def model_deployment(settings: ServeSettings, role: str, uri: str, version: str) -> Any:
    """The model deployment for one role, with replicas, autoscaling and queue bounds from the settings."""
    options: dict[str, Any] = {"name": role, "max_ongoing_requests": settings.max_ongoing_requests,
                               "max_queued_requests": settings.max_queued_requests,
                               "ray_actor_options": {"num_cpus": 0}}
    if settings.min_replicas is not None:
        options["autoscaling_config"] = {"min_replicas": settings.min_replicas,
                                         "max_replicas": settings.max_replicas}
    else:
        options["num_replicas"] = settings.num_replicas
    return ModelServer.options(**options).bind(settings.model_dump(), uri, version)


def build_app(args: dict[str, Any]) -> Any:
    """The Serve application (also the `import_path` target of serving/config/privlm-serve.yaml)."""
    settings = ServeSettings.model_validate(args)
    # Keys from the environment of whoever deploys are hashed here: replicas never see them in plain text.
    env_keys = KeyRing([], settings.api_keys_env).hashes
    settings = settings.model_copy(update={"api_key_hashes": sorted(set(settings.api_key_hashes) | env_keys)})
    if settings.tracking_uri is None:
        from mlops.tracking import tracking_uri

        settings = settings.model_copy(update={"tracking_uri": tracking_uri()})
    uri, version = resolve_model(settings.model_uri, settings.tracking_uri)
    champion = model_deployment(settings, "champion", uri, version)
    challenger = None
    if settings.ab.enabled and settings.model_uri.startswith("models:/"):
        name = served_name(settings.model_uri)
        c_uri, c_version = resolve_model(f"models:/{name}@challenger", settings.tracking_uri)
        challenger = model_deployment(settings, "challenger", c_uri, c_version)
    return Gateway.options(ray_actor_options={"num_cpus": 0}).bind(
        settings.model_dump(), champion, challenger, served_name(settings.model_uri))
