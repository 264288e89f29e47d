"""Serving settings: one validated object, from a Serve config file's `args` or from the CLI.

It is validated once, at the edge (`build_app`, `privlm serve up`), and travels to the gateway and the
engine deployments as the typed object itself.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from privlm.validation import Strict, problems


class ABSplit(Strict):
    """Send a share of users to the `challenger` version, assigned by hashing a user id."""

    enabled: bool = False
    challenger_share: float = Field(0.1, ge=0.0, le=1.0)
    user_header: str = "x-user-id"


class Limits(Strict):
    """What one request may ask for; max_tokens is also capped by the model's context."""

    max_prompt_chars: int = Field(32_000, gt=0)
    max_tokens: int = Field(256, gt=0)
    default_max_tokens: int = Field(16, gt=0, description="when a request names no max_tokens")
    max_n: int = Field(4, gt=0)
    max_prompts: int = Field(16, gt=0, description="entries of a list `prompt`")


class Engine(Strict):
    """vLLM engine options of every served version (passed to vLLM as engine_kwargs)."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: float32 on CPU (bf16 is slow without AMX), the model's dtype on GPUs")
    max_model_len: int | None = Field(None, gt=0, description="default: the model's max_position_embeddings")
    max_num_seqs: int = Field(64, gt=0, description="sequences vLLM batches continuously per replica")
    kv_cache_gib: int = Field(1, ge=1, description="CPU: KV cache GiB per replica (VLLM_CPU_KVCACHE_SPACE, whole GiB)")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    gpus_per_replica: int = Field(0, ge=0, description="0 on CPU; >1 shards a replica (tensor parallel)")
    cpus_per_replica: float = Field(1.0, gt=0)
    max_lora_rank: int = Field(16, gt=0)
    extra: dict[str, Any] = Field(default_factory=dict, description="more vLLM engine_kwargs, verbatim")


class Jwt(Strict):
    """Bearer JWTs from your identity provider: signature, issuer, audience and expiry are checked."""

    issuer: str
    audience: str
    algorithms: list[str] = Field(default_factory=lambda: ["RS256"])
    public_key_file: str | None = Field(None, description="PEM public key (RS*/ES*)")
    secret_env: str | None = Field(None, description="env var holding the shared secret (HS*)")
    scope_claim: str = "scope"
    leeway_s: int = Field(30, ge=0)

    @model_validator(mode="after")
    def _one_key(self) -> Jwt:
        if (self.public_key_file is None) == (self.secret_env is None):
            raise ValueError("set exactly one of auth.jwt.public_key_file (RS256/ES256) or auth.jwt.secret_env (HS256)")
        return self


class Auth(Strict):
    """Who may call. Fail-closed: mode `keys` with no key configured refuses to start."""

    mode: Literal["keys", "jwt", "none"] = "keys"
    api_key_hashes: list[str] = Field(default_factory=list, description="sha256 hex of accepted keys")
    api_keys_env: str = Field("PRIVLM_API_KEYS", description="env var with comma-separated plain keys")
    jwt: Jwt | None = None

    @model_validator(mode="after")
    def _jwt_needs_settings(self) -> Auth:
        if self.mode == "jwt" and self.jwt is None:
            raise ValueError("auth.mode=jwt needs auth.jwt (issuer, audience, public_key_file or secret_env)")
        return self


class RateLimit(Strict):
    """Per caller (key id or JWT subject), per gateway replica: beyond it, 429 with Retry-After."""

    requests_per_minute: float | None = Field(None, gt=0, description="None: no limit")
    burst: int = Field(10, gt=0)


class Tls(Strict):
    """HTTPS on Serve's proxy (http_options.ssl_certfile / ssl_keyfile)."""

    certfile: str
    keyfile: str


class Feedback(Strict):
    """Answers kept for `POST /v1/feedback`, A/B statistics and the data loop (mlops/feedback.py)."""

    enabled: bool = True
    url: str = Field("sqlite:///runs/serving/feedback.db",
                     description="SQLAlchemy URL; PostgreSQL where gateway replicas run on several nodes")
    keep_text: bool = Field(True, description="store prompt and completion (the data loop needs them)")


class OutputStats(Strict):
    """Per-version output statistics exported at /metrics, what `privlm monitor drift` compares."""

    token_buckets: int = Field(64, ge=2, le=1024, description="generated token ids are counted modulo this")
    refusal_patterns: list[str] = Field(
        default_factory=lambda: ["I can't", "I cannot", "I'm sorry", "As an AI", "抱歉", "我不能", "无法回答"],
        description="an answer containing one counts as a refusal")


class ServeSettings(Strict):
    """Everything `privlm serve up` and `serve deploy serving/config/privlm-serve.yaml` need."""

    model_uri: str = "models:/privlm-tiny@champion"
    tracking_uri: str | None = Field(None, description="MLflow URI; default MLFLOW_TRACKING_URI or ./mlflow")
    quantization: str = Field("none", description="serve the version quantized from the resolved one with this "
                                                 "scheme (`privlm model quantize`); none: as registered")
    adapters: list[str] = Field(default_factory=list,
                                description="more LoRA adapter versions (models:/NAME/V) served on their bases")
    engine: Engine = Field(default_factory=Engine)
    num_replicas: int = Field(1, gt=0)
    min_replicas: int | None = Field(None, ge=0, description="with max_replicas: autoscaling bounds")
    max_replicas: int | None = Field(None, gt=0)
    max_ongoing_requests: int = Field(64, gt=0, description="requests one engine replica takes at once")
    max_queued_requests: int = Field(64, gt=0, description="beyond this, requests get 503 + Retry-After")
    limits: Limits = Field(default_factory=Limits)
    auth: Auth = Field(default_factory=Auth)
    rate_limit: RateLimit = Field(default_factory=RateLimit)
    tls: Tls | None = None
    block_list: list[str] = Field(default_factory=list, description="words refused in prompts, removed from outputs")
    audit_log: str | None = "runs/serving/audit.jsonl"
    audit_prompts: bool = False
    cache_size: int = Field(1024, ge=0)
    ab: ABSplit = Field(default_factory=ABSplit)
    feedback: Feedback = Field(default_factory=Feedback)
    output_stats: OutputStats = Field(default_factory=OutputStats)
    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)

    @model_validator(mode="after")
    def _autoscaling(self) -> ServeSettings:
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("set both min_replicas and max_replicas for autoscaling, or neither")
        if self.min_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} is above max_replicas={self.max_replicas}")
        return self


def settings_error(exc: Exception) -> str:
    """A pydantic ValidationError as one line per field, in the recipes' wording (field, problem, value)."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return str(exc)
    return "\n".join(problems(exc))
