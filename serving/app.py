"""The Ray Serve application: our OpenAI-compatible gateway (auth, rate limits, block list, cache, A/B,
metrics, audit) in front of vLLM deployments (Ray Serve LLM), one per served base model.

The gateway validates every request before it reaches an engine, so a bad request never costs the
engine anything and always gets a 4xx naming the field. vLLM batches continuously; beyond an
engine's `max_queued_requests` a request is answered 503 with Retry-After. A new champion is rolled
out by deploying it next to the old one first (`privlm serve up --watch`), then moving the gateway.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError

from mlops.feedback import FeedbackStore, score_of
from serving.api import ApiError, ChatRequest, CompletionRequest, FeedbackRequest, engine_request, invalid, parse
from serving.auth import ANONYMOUS, Authenticator, Caller, env_key_hashes
from serving.engine import (
    Served,
    ServingError,
    check_quantization,
    group,
    llm_deployment,
    quantization_of,
    resolve,
    served_name,
    slug,
)
from serving.filter import BlockList
from serving.settings import ServeSettings

log = logging.getLogger("ray.serve")
# vLLM fields a client of the OpenAI API does not expect; dropped from responses when empty.
_ENGINE_EXTRAS = ("stop_reason", "token_ids", "prompt_logprobs", "prompt_token_ids", "routed_experts",
                  "kv_transfer_params", "ec_transfer_params", "metrics", "service_tier", "reasoning_content",
                  "reasoning", "prompt_tokens_details", "completion_tokens_details")

api = FastAPI(title="privlm", docs_url=None, redoc_url=None)


def _openapi() -> dict[str, Any]:
    """The OpenAPI schema with our request models as the bodies (the routes read raw bodies to validate
    them ourselves, so FastAPI cannot see them); what schemathesis fuzzes in the tests."""
    if api.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=api.title, version="1", routes=api.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (CompletionRequest, ChatRequest):
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
        api.openapi_schema = schema
    return api.openapi_schema


def _body(model: type) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


api.openapi = _openapi


def _tidy(obj: Any) -> Any:
    """Drop vLLM's extra keys when they carry nothing."""
    if isinstance(obj, dict):
        return {k: _tidy(v) for k, v in obj.items() if not (k in _ENGINE_EXTRAS and v in (None, [], {}))}
    if isinstance(obj, list):
        return [_tidy(v) for v in obj]
    return obj


def settings_digest(settings: ServeSettings) -> str:
    """Defined before the Gateway: serve.ingress pickles the FastAPI app (and what it refers to) at decoration."""
    return hashlib.sha256(settings.model_dump_json().encode()).hexdigest()[:12]


@serve.deployment(max_ongoing_requests=1024)
@serve.ingress(api)
class Gateway:
    """The OpenAI-compatible front door."""

    def __init__(self, settings: ServeSettings, routes: dict[str, Served], engines: dict[str, Any],
                 name: str) -> None:
        """`engines`: by deployment name, a bound engine (one application) or (deployment, application)."""
        from serving.limits import RateLimiter
        from serving.metrics import ServingMetrics

        self.settings, self.routes, self.name = settings, routes, name
        self.engines = {k: (serve.get_deployment_handle(*h) if isinstance(h, tuple) else h).options(stream=True)
                        for k, h in engines.items()}
        self.auth = Authenticator(settings.auth)
        self.limiter = RateLimiter(settings.rate_limit.requests_per_minute, settings.rate_limit.burst)
        self.blocks = BlockList(settings.block_list)
        self.cache: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.metrics = ServingMetrics()
        self.audit = Path(settings.audit_log) if settings.audit_log else None
        if self.audit:
            self.audit.parent.mkdir(parents=True, exist_ok=True)
        self.store = FeedbackStore(settings.feedback.url) if settings.feedback.enabled else None
        stats = settings.output_stats
        self.refusal = re.compile("|".join(re.escape(p) for p in stats.refusal_patterns)) \
            if stats.refusal_patterns else None
        for served in routes.values():
            self.metrics.refusals.labels(served.version)  # a 0 series from the start: the refusal rate exists
            if served.quality_baseline is not None:
                self.metrics.baseline.labels(served.version).set(served.quality_baseline)
        if settings.auth.mode == "none":
            log.warning("privlm gateway: authentication is OFF (auth.mode: none): anyone who reaches "
                        "%s:%s may use the model", settings.host, settings.port)

    # --- routes -------------------------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> dict[str, str]:
        """`settings`: a digest of the settings this replica runs with (a rollout is done when it changes)."""
        return {"status": "ok", "settings": settings_digest(self.settings)}

    @api.get("/metrics")
    async def prometheus(self, request: Request) -> Any:
        try:
            self._caller(request).require_metrics()
        except ApiError as err:
            return JSONResponse(err.body(), err.status)
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        try:
            caller = self._caller(request)
        except ApiError as err:
            return JSONResponse(err.body(), err.status)
        data = [self._card(m) for m in self._model_ids() if caller.may_use(m)]
        return JSONResponse({"object": "list", "data": data})

    @api.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str, request: Request) -> JSONResponse:
        try:
            caller = self._caller(request)
            if model_id not in self._model_ids() or not caller.may_use(model_id):
                raise ApiError(404, f"model {model_id!r} does not exist", "model_not_found", param="model")
        except ApiError as err:
            return JSONResponse(err.body(), err.status)
        return JSONResponse(self._card(model_id))

    @api.post("/v1/completions", openapi_extra=_body(CompletionRequest))
    async def completions(self, request: Request) -> Any:
        return await self._handle(request, CompletionRequest, chat=False)

    @api.post("/v1/chat/completions", openapi_extra=_body(ChatRequest))
    async def chat(self, request: Request) -> Any:
        return await self._handle(request, ChatRequest, chat=True)

    @api.post("/v1/feedback", openapi_extra=_body(FeedbackRequest))
    async def feedback(self, request: Request) -> JSONResponse:
        """A user's rating of an answer (by its id), stored with the version and arm that gave it."""
        try:
            caller = self._caller(request)
            req = parse(await request.body(), FeedbackRequest)
            if self.store is None:
                raise ApiError(404, "feedback is not collected here (feedback.enabled is false)", param="id")
            score = score_of(req.rating, req.thumbs, req.score)
            answer = await asyncio.to_thread(self.store.response, req.id)
            if answer is None or not caller.may_use(answer["model"]):
                raise ApiError(404, f"id={req.id!r}: no answer with this id is on record", "not_found", param="id")
            await asyncio.to_thread(self.store.rate, req.id, score, caller.id, req.correction)
        except ApiError as err:
            return JSONResponse(err.body(), err.status, headers=err.headers)
        self.metrics.feedback.labels(answer["version"], answer["arm"]).observe(score)
        return JSONResponse({"id": req.id, "object": "feedback", "score": score, "version": answer["version"],
                             "arm": answer["arm"]})

    # --- the request path ---------------------------------------------------------------------
    def _caller(self, request: Request) -> Caller:
        return self.auth.check(request.headers.get("authorization"))

    def _model_ids(self) -> list[str]:
        return [self.name, *sorted(k for k in self.routes if k not in ("champion", "challenger"))]

    def _card(self, model_id: str) -> dict[str, Any]:
        served = self.routes.get(model_id, self.routes["champion"])
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "privlm",
                "version": served.version, "quantization": quantization_of(served.base_dir)}

    async def _handle(self, request: Request, kind: type, chat: bool) -> Any:
        endpoint = "chat" if chat else "completions"
        started, caller, version, text = time.perf_counter(), ANONYMOUS, "-", None
        self.metrics.in_flight.inc()
        try:
            caller = self._caller(request)
            self.limiter.take(caller.id)
            req = parse(await request.body(), kind)
            served, arm = self._route(request, req, caller)
            version, text = served.version, req.text()
            max_tokens = self._check_limits(req)
            body = engine_request(req, served.engine_model, max_tokens)
            if req.stream:
                return await self._stream(served, arm, body, req, chat, started, caller, endpoint, text)
            result = await self._complete(served, arm, body, chat)
            self._record(endpoint, 200, version, started, caller, result.get("usage"), text)
            first = result["choices"][0] if result["choices"] else {}
            await self._remember(result["id"], served, arm, endpoint, caller, text,
                                 (first.get("message") or {}).get("content") if chat else first.get("text"))
            return JSONResponse(result, headers={"x-privlm-model-version": version})
        except ApiError as err:
            self._record(endpoint, err.status, version, started, caller, None, text)
            return JSONResponse(err.body(), err.status, headers=err.headers)
        finally:
            self.metrics.in_flight.dec()

    def _route(self, request: Request, req: Any, caller: Caller) -> tuple[Served, str]:
        """The version to answer with: an adapter by name, the champion, or the challenger for the users the
        A/B split assigns to it (stable per user id)."""
        base, _, wants = req.model.partition("@")
        if base != self.name and base not in self.routes:
            raise ApiError(404, f"model {req.model!r} does not exist; this endpoint serves "
                           f"{self._model_ids()}", "model_not_found", param="model")
        caller.require_model(base)
        if base != self.name:
            return self.routes[base], base
        if wants not in ("", "champion", "challenger"):
            raise ApiError(404, f"model {req.model!r}: {base} has no @{wants} here (champion, challenger)",
                           "model_not_found", param="model")
        challenger = self.routes.get("challenger")
        if wants == "challenger" and challenger is None:
            raise ApiError(404, f"{base} has no challenger deployed (ab.enabled is false)", "model_not_found",
                           param="model")
        if challenger is not None and wants != "champion":
            ab = self.settings.ab
            user = request.headers.get(ab.user_header) or req.user or ""
            bucket = int.from_bytes(hashlib.sha256(user.encode()).digest()[:4], "big") / 2**32
            if wants == "challenger" or (ab.enabled and user and bucket < ab.challenger_share):
                return challenger, "challenger"
        return self.routes["champion"], "champion"

    def _check_limits(self, req: Any) -> int:
        lim = self.settings.limits
        text = req.text()
        if len(text) > lim.max_prompt_chars:
            raise ApiError(400, f"the prompt has {len(text)} characters; the limit is {lim.max_prompt_chars}",
                           param="messages" if isinstance(req, ChatRequest) else "prompt")
        if self.blocks.matches(text):
            raise ApiError(400, "the prompt contains blocked content", "content_filter",
                           param="messages" if isinstance(req, ChatRequest) else "prompt")
        if req.n > lim.max_n:
            raise ApiError(400, f"n={req.n} exceeds the limit {lim.max_n}", param="n")
        if isinstance(req, CompletionRequest) and len(req.prompts()) > lim.max_prompts:
            raise ApiError(400, f"prompt lists {len(req.prompts())} prompts; the limit is {lim.max_prompts}",
                           param="prompt")
        wanted = req.requested_tokens()
        field = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
        if wanted is not None and wanted > lim.max_tokens:
            raise ApiError(400, f"{field}={wanted} exceeds the limit {lim.max_tokens}", param=field)
        return wanted or lim.default_max_tokens

    async def _engine_stream(self, served: Served, body: dict[str, Any], chat: bool) -> AsyncIterator[Any]:
        """vLLM's answer as an async iterator, the first item already awaited (errors surface here)."""
        from pydantic import ValidationError
        from ray.serve.llm.openai_api_models import ChatCompletionRequest as VChat
        from ray.serve.llm.openai_api_models import CompletionRequest as VCompletion

        try:
            vreq = (VChat if chat else VCompletion).model_validate(body)
        except ValidationError as exc:
            raise invalid(exc) from None
        handle = self.engines[served.deployment]
        gen = (handle.chat if chat else handle.completions).remote(vreq, None)
        try:
            first = await gen.__anext__()
        except BackPressureError:
            raise ApiError(503, "the model is at capacity; retry shortly", "server_overloaded",
                           headers={"Retry-After": "1"}) from None
        pieces = first if isinstance(first, list) else [first]
        error = getattr(pieces[0], "error", None)
        if error is not None:
            status = int(error.code) if str(error.code).isdigit() else 500
            param = getattr(error, "param", None)
            raise ApiError(status if 400 <= status < 600 else 500, error.message,
                           "context_length_exceeded" if "context length" in error.message else
                           "invalid_request_error", param="prompt" if param == "input_tokens" else param)

        async def chain() -> AsyncIterator[Any]:
            for p in pieces:
                yield p
            async for more in gen:
                for p in more if isinstance(more, list) else [more]:
                    yield p

        return chain()

    async def _complete(self, served: Served, arm: str, body: dict[str, Any], chat: bool) -> dict[str, Any]:
        deterministic = body.get("temperature", 1.0) == 0 or body.get("seed") is not None
        cacheable = deterministic and self.settings.cache_size > 0
        key = hashlib.sha256(json.dumps([served.version, arm, body], sort_keys=True).encode()).hexdigest()
        if cacheable and key in self.cache:
            self.cache.move_to_end(key)
            self.metrics.cache.labels("hit").inc()
            return {**self.cache[key], "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"}
        stream = await self._engine_stream(served, body, chat)
        response = None
        async for piece in stream:
            response = piece
        result = response.model_dump()
        result.pop("prompt_token_ids", None)
        result = _tidy(result)
        result["model"] = self._public_model(served)
        for choice in result["choices"]:
            self._scrub_choice(choice, chat)
            self._observe(served.version, choice.pop("token_ids", None) or [], choice.get("finish_reason"),
                          (choice.get("message") or {}).get("content") if chat else choice.get("text"))
            choice.pop("prompt_token_ids", None)
        if cacheable:
            self.metrics.cache.labels("miss").inc()
            self.cache[key] = result
            if len(self.cache) > self.settings.cache_size:
                self.cache.popitem(last=False)
        return result

    def _observe(self, version: str, token_ids: list[int], finish_reason: str | None, text: str | None) -> None:
        refused = bool(self.refusal and text and self.refusal.search(text))
        self.metrics.observe_choice(version, token_ids, finish_reason, refused,
                                    self.settings.output_stats.token_buckets)

    async def _remember(self, id: str, served: Served, arm: str, endpoint: str, caller: Caller,
                        prompt: str | None, completion: str | None) -> None:
        """Keep the answer for feedback (and the data loop); a store failure never fails the request."""
        if self.store is None:
            return
        keep = self.settings.feedback.keep_text
        try:
            await asyncio.to_thread(self.store.record, id=id, model=self.name, version=served.version, arm=arm,
                                    endpoint=endpoint, caller=caller.id, prompt=prompt if keep else None,
                                    completion=completion if keep else None)
        except Exception as exc:  # the answer is already computed: log why it cannot be rated
            log.error("privlm gateway: could not store answer %s for feedback: %s", id, exc)

    def _public_model(self, served: Served) -> str:
        return next((k for k, v in self.routes.items() if v == served and k not in ("champion", "challenger")),
                    self.name)

    def _scrub_choice(self, choice: dict[str, Any], chat: bool) -> None:
        holder = choice["message"] if chat else choice
        text, hit = self.blocks.scrub(holder.get("content" if chat else "text") or "")
        holder["content" if chat else "text"] = text
        if hit:
            choice["finish_reason"] = "content_filter"

    async def _stream(self, served: Served, arm: str, body: dict[str, Any], req: Any, chat: bool, started: float,
                      caller: Caller, endpoint: str, text: str) -> StreamingResponse:
        stream = await self._engine_stream(served, body, chat)
        want_usage = bool(req.stream_options and req.stream_options.include_usage)
        model, version = self._public_model(served), served.version

        async def events() -> AsyncIterator[str]:
            scrubbers: dict[int, Any] = {}
            outputs: dict[int, dict[str, Any]] = {}  # per choice: token ids, text, finish reason
            usage, last, status, answer_id = None, None, 200, None
            try:
                async for piece in stream:
                    raw = piece if isinstance(piece, str) else f"data: {piece.model_dump_json()}\n\n"
                    payload = raw.removeprefix("data: ").strip()
                    if payload == "[DONE]":
                        continue
                    chunk = json.loads(payload)
                    if "error" in chunk:
                        status = 500
                        yield f"data: {json.dumps(chunk)}\n\n"
                        continue
                    chunk["model"] = model
                    chunk.pop("prompt_token_ids", None)
                    answer_id = chunk.get("id", answer_id)
                    if chunk.get("usage") and not chunk.get("choices"):
                        usage = chunk["usage"]
                        if want_usage:
                            yield f"data: {json.dumps(_tidy(chunk))}\n\n"
                        continue
                    chunk.pop("usage", None)
                    now = time.perf_counter()
                    if last is None:
                        self.metrics.ttft.labels(version).observe(now - started)
                    else:
                        self.metrics.itl.labels(version).observe(now - last)
                    last = now
                    for choice in chunk.get("choices", []):
                        self._scrub_delta(choice, scrubbers, chat)
                        out = outputs.setdefault(choice.get("index", 0), {"ids": [], "text": [], "finish": None})
                        out["ids"] += choice.pop("token_ids", None) or []
                        choice.pop("prompt_token_ids", None)
                        out["text"].append((choice.get("delta") or {}).get("content") or "" if chat
                                           else choice.get("text") or "")
                        out["finish"] = choice.get("finish_reason") or out["finish"]
                    yield f"data: {json.dumps(_tidy(chunk))}\n\n"
                yield "data: [DONE]\n\n"
                for out in outputs.values():
                    self._observe(version, out["ids"], out["finish"], "".join(out["text"]))
                if answer_id and status == 200:
                    await self._remember(answer_id, served, arm, endpoint, caller, text,
                                         "".join(outputs[min(outputs)]["text"]) if outputs else "")
            finally:
                self._record(endpoint, status, version, started, caller, usage, text)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"x-privlm-model-version": version})

    def _scrub_delta(self, choice: dict[str, Any], scrubbers: dict[int, Any], chat: bool) -> None:
        scrubber = scrubbers.setdefault(choice.get("index", 0), self.blocks.stream())
        holder, key = (choice.setdefault("delta", {}), "content") if chat else (choice, "text")
        piece = scrubber.feed(holder.get(key) or "")
        if choice.get("finish_reason"):
            piece += scrubber.flush()
            if scrubber.hit:
                choice["finish_reason"] = "content_filter"
        if piece or key in holder:
            holder[key] = piece

    def _record(self, endpoint: str, status: int, version: str, started: float, caller: Caller,
                usage: dict[str, int] | None, prompt: str | None) -> None:
        """Metrics and one audit line per request (never the prompt text unless configured)."""
        seconds = time.perf_counter() - started
        self.metrics.observe(endpoint, status, version, seconds, usage)
        if self.audit is None:
            return
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "key_id": caller.id, "endpoint": endpoint,
                "model_version": version, "status": status, "latency_s": round(seconds, 4),
                "prompt_tokens": (usage or {}).get("prompt_tokens"),
                "completion_tokens": (usage or {}).get("completion_tokens")}
        if self.settings.audit_prompts and prompt is not None:
            line["prompt"] = prompt
        with open(self.audit, "a") as fh:
            fh.write(json.dumps(line) + "\n")


def prepare(args: dict[str, Any] | ServeSettings) -> ServeSettings:
    """Validate once; fold in the deployer's keys (replicas see only hashes); refuse to start unauthenticated."""
    settings = args if isinstance(args, ServeSettings) else ServeSettings.model_validate(args)
    auth = settings.auth
    hashes = sorted({h.lower() for h in auth.api_key_hashes} | env_key_hashes(auth.api_keys_env))
    if auth.mode == "keys" and not hashes:
        raise ServingError(f"auth.mode=keys but no API key is configured: set ${auth.api_keys_env} (comma-separated "
                           "keys) or auth.api_key_hashes, use auth.mode: jwt, or set auth.mode: none to serve "
                           "without authentication")
    settings = settings.model_copy(update={"auth": auth.model_copy(update={"api_key_hashes": hashes}),
                                           **_absolute_paths(settings)})
    check_quantization(settings)
    if settings.tracking_uri is None:
        from mlops.tracking import tracking_uri

        settings = settings.model_copy(update={"tracking_uri": tracking_uri()})
    return settings


def _absolute_paths(settings: ServeSettings) -> dict[str, Any]:
    """Relative audit-log and SQLite paths mean the deployer's working directory, not a Ray worker's."""
    update: dict[str, Any] = {}
    if settings.audit_log:
        update["audit_log"] = str(Path(settings.audit_log).absolute())
    url = settings.feedback.url
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        path = Path(url.removeprefix("sqlite:///")).absolute()
        update["feedback"] = settings.feedback.model_copy(update={"url": f"sqlite:///{path}"})
    return update


def plan(settings: ServeSettings, warm: tuple[str, ...] = ()) -> tuple[dict[str, Served], list[Served]]:
    """(routes by role or adapter id, everything to deploy): the aliases are read here, once per deploy.

    `warm`: more model URIs whose engines are deployed but not routed to (a rollout's next champion).
    """
    routes = {"champion": resolve(settings.model_uri, settings)}
    if settings.ab.enabled:
        if not settings.model_uri.startswith("models:/"):
            raise ServingError("ab.enabled needs a registered model (models:/NAME@champion) with a @challenger")
        routes["challenger"] = resolve(f"models:/{served_name(settings.model_uri)}@challenger", settings)
    for uri in settings.adapters:
        served = resolve(uri, settings)
        if served.adapter_dir is None:
            raise ServingError(f"adapters: {uri} is not a LoRA adapter version (register one with "
                               "`privlm model register RUN --adapter`)")
        routes[slug(served.version)] = served
    return routes, [*routes.values(), *(resolve(u, settings) for u in warm)]


def build_app(args: dict[str, Any] | ServeSettings) -> Any:
    """One Serve application holding the gateway and its engines: the `import_path` target of
    serving/config/privlm-serve.yaml for `serve deploy`. `privlm serve up` deploys with `deploy` instead."""
    settings = prepare(args)
    routes, everything = plan(settings)
    engines = {name: llm_deployment(dep, settings) for name, dep in group(everything, settings.engine).items()}
    return gateway(settings, routes, engines)


def gateway(settings: ServeSettings, routes: dict[str, Served], engines: dict[str, Any]) -> Any:
    return Gateway.options(ray_actor_options={"num_cpus": 0}).bind(settings, routes, engines,
                                                                    served_name(settings.model_uri))
