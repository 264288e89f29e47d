"""OpenAI request and response shapes, validation before batching, and OpenAI-style errors."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ApiError(Exception):
    """An error returned to the client in OpenAI's shape with a 4xx/5xx status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.type}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s or len(s) > 64 for s in stops):
            raise ValueError("at most 4 non-empty stop sequences of up to 64 characters")
        return stops


class CompletionRequest(_Request):
    """POST /v1/completions."""

    prompt: str

    @field_validator("prompt")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt must not be empty")
        return v


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Request):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)


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
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(400, f"{param}: {first['msg'].removeprefix('Value error, ')}", param=param) from None


def completion_response(model: str, choices: list[dict[str, Any]], usage: dict[str, int], chat: bool) -> dict[str, Any]:
    """The full (non-streaming) response body."""
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    shaped = []
    for i, c in enumerate(choices):
        if chat:
            shaped.append({"index": i, "message": {"role": "assistant", "content": c["text"]},
                           "finish_reason": c["finish_reason"], "logprobs": None})
        else:
            shaped.append({"index": i, "text": c["text"], "finish_reason": c["finish_reason"], "logprobs": None})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": shaped, "usage": usage}


def stream_chunk(rid: str, model: str, text: str, finish: str | None, chat: bool) -> str:
    """One server-sent event of a streaming response."""
    if chat:
        choice = {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    body = {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}
    return f"data: {json.dumps(body)}\n\n"
