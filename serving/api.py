"""OpenAI request shapes as clients send them, validated at the gateway, and OpenAI-style errors.

Every field a request may carry is declared here: a field OpenAI defines that we do not serve, or a
field nobody defines, is a 400 naming it (never silently ignored). Text with NUL bytes or lone
surrogates is a 400 too. What passes is handed to vLLM's own request models unchanged in meaning.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# OpenAI fields this endpoint does not implement: named in the 400 so the client knows what to drop.
UNSUPPORTED = {"tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "logit_bias", "suffix",
               "best_of", "echo", "audio", "modalities", "prediction", "web_search_options", "store", "metadata",
               "service_tier", "reasoning_effort"}


class ApiError(Exception):
    """An error returned to the client in OpenAI's shape with a 4xx/5xx status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.type}}


def clean_text(value: str, field: str) -> str:
    """Refuse text that no tokenizer should see: NUL bytes and lone surrogates."""
    if "\x00" in value:
        raise ValueError(f"{field} contains a NUL byte")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{field} contains a lone surrogate (invalid UTF-16 escape)") from None
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchema(_Strict):
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format.type=json_schema needs response_format.json_schema.schema")
        return self


class _Request(_Strict):
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    response_format: ResponseFormat | None = None
    user: str | None = Field(None, max_length=256)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s or len(s) > 64 for s in stops):
            raise ValueError("at most 4 non-empty stop sequences of up to 64 characters")
        return [clean_text(s, "stop") for s in stops]

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in data:
                if name in UNSUPPORTED:
                    raise ApiError(400, f"{name} is not supported by this endpoint; remove it from the request",
                                   param=name)
        return data

    @model_validator(mode="after")
    def _stream_options(self) -> _Request:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    def requested_tokens(self) -> int | None:
        return self.max_tokens


class CompletionRequest(_Request):
    """POST /v1/completions."""

    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: str | list[str]) -> str | list[str]:
        prompts = [v] if isinstance(v, str) else v
        if not prompts:
            raise ValueError("prompt must not be an empty list")
        for p in prompts:
            if not p.strip():
                raise ValueError("prompt must not be empty")
            clean_text(p, "prompt")
        return v

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def text(self) -> str:
        """All the text the caller sent (what the block list and the prompt limit look at)."""
        return "\n".join(self.prompts())


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(None, max_length=64)

    @field_validator("content")
    @classmethod
    def _content(cls, v: str | list[TextPart]) -> str | list[TextPart]:
        for piece in [v] if isinstance(v, str) else [p.text for p in v]:
            clean_text(piece, "content")
        return v

    def plain(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Request):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=5)

    @model_validator(mode="after")
    def _limits(self) -> ChatRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree; send one of them")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def text(self) -> str:
        return "\n".join(m.plain() for m in self.messages)


def parse(raw: bytes, kind: type[_Request]) -> _Request:
    """Parse and validate a request body, or raise ApiError 400 naming the parameter."""
    try:
        data = json.loads(raw or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        raise invalid(exc, sorted(kind.model_fields)) from None


def invalid(exc: ValidationError, accepted: list[str] | None = None) -> ApiError:
    """The 400 for a failed validation: the first error, naming its parameter (and, for an unknown
    field, the fields that are accepted)."""
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    if first["type"] == "extra_forbidden" and accepted is not None:
        return ApiError(400, f"{param}: unknown field; this endpoint accepts the OpenAI fields {accepted}",
                        param=param)
    msg = first["msg"].removeprefix("Value error, ")
    return ApiError(400, f"{param}: {msg}" if param else msg, param=param)


class FeedbackRequest(_Strict):
    """`POST /v1/feedback`: a rating of an answer this endpoint gave, by its `id`."""

    id: str = Field(min_length=1, max_length=64, description="the `id` of the completion being rated")
    rating: int | None = Field(None, ge=1, le=5)
    thumbs: Literal["up", "down"] | None = None
    score: float | None = Field(None, ge=0.0, le=1.0)
    correction: str | None = Field(None, max_length=32_000, description="what the answer should have been")

    @field_validator("id", "correction")
    @classmethod
    def _text(cls, v: str | None, info: Any) -> str | None:
        return None if v is None else clean_text(v, info.field_name)

    @model_validator(mode="after")
    def _one_rating(self) -> FeedbackRequest:
        given = [f for f in ("rating", "thumbs", "score") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of rating (1-5), thumbs (up/down) or score (0-1); "
                             f"got {given or 'none'}")
        return self


def engine_request(req: _Request, engine_model: str, max_tokens: int) -> dict[str, Any]:
    """The body vLLM's OpenAI request models take, for the deployment's model name; the generated token
    ids come back for the output statistics (the gateway strips them from the answer)."""
    body = req.model_dump(exclude_none=True, by_alias=True, exclude={"max_completion_tokens", "user"})
    body.update(model=engine_model, max_tokens=max_tokens, return_token_ids=True)
    if isinstance(req, ChatRequest):
        body["messages"] = [{"role": m.role, "content": m.plain()} for m in req.messages]
    if req.stream:  # usage counts feed the gateway's metrics; the client sees them only if it asked
        body["stream_options"] = {**body.get("stream_options", {}), "include_usage": True}
    return body
