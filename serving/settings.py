"""Serving settings: one validated object, from a Serve config file's `args` or from the CLI."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serving.quantize import Mode


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ABSplit(Strict):
    """Send a share of users to the `challenger` version, assigned by hashing a user id."""

    enabled: bool = False
    challenger_share: float = Field(0.1, ge=0.0, le=1.0)
    user_header: str = "x-user-id"


class Limits(Strict):
    """What one request may ask for; max_tokens is also capped by the model's context."""

    max_prompt_chars: int = Field(32_000, gt=0)
    max_tokens: int = Field(256, gt=0)
    max_n: int = Field(4, gt=0)


class ServeSettings(Strict):
    """Everything `privlm serve up` and `serve deploy serving/config/privlm-serve.yaml` need."""

    model_uri: str = "models:/privlm-tiny@champion"
    tracking_uri: str | None = Field(None, description="MLflow URI; default MLFLOW_TRACKING_URI or ./mlflow")
    quantization: Mode = "int8-dynamic"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int = Field(1, gt=0)
    max_batch_size: int = Field(8, gt=0)
    batch_wait_timeout_s: float = Field(0.05, ge=0)
    num_replicas: int = Field(1, gt=0)
    min_replicas: int | None = Field(None, ge=0, description="with max_replicas: autoscaling bounds")
    max_replicas: int | None = Field(None, gt=0)
    max_ongoing_requests: int = Field(16, gt=0)
    max_queued_requests: int = Field(32, gt=0, description="beyond this, requests get 503 + Retry-After")
    limits: Limits = Field(default_factory=Limits)
    api_key_hashes: list[str] = Field(default_factory=list, description="sha256 hex of accepted keys")
    api_keys_env: str = Field("PRIVLM_API_KEYS", description="env var with comma-separated plain keys")
    block_list: list[str] = Field(default_factory=list, description="words refused in prompts, removed from outputs")
    audit_log: str | None = "runs/serving/audit.jsonl"
    audit_prompts: bool = False
    cache_size: int = Field(1024, ge=0)
    ab: ABSplit = Field(default_factory=ABSplit)
    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)

    @model_validator(mode="after")
    def _autoscaling(self) -> ServeSettings:
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("set both min_replicas and max_replicas for autoscaling, or neither")
        if self.min_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} is above max_replicas={self.max_replicas}")
        return self
