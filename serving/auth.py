"""Who may call: API keys (only their SHA-256 hashes are kept) or JWT bearer tokens, and their scopes.

Scopes: `models:NAME` (or `models:*`) to use a model, `metrics:read` to read /metrics. An API key
carries every scope; a JWT carries what its `scope` claim lists (space-separated, or a list).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.api import ApiError

ALL_SCOPES = frozenset({"models:*", "metrics:read"})


def hash_key(key: str) -> str:
    """The form a key is stored in."""
    return hashlib.sha256(key.encode()).hexdigest()


def env_key_hashes(env_var: str) -> set[str]:
    """Hashes of the comma-separated plain keys in `env_var`."""
    return {hash_key(k.strip()) for k in os.environ.get(env_var, "").split(",") if k.strip()}


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: an id safe to log and rate-limit by, and its scopes."""

    id: str
    scopes: frozenset[str]

    def may_use(self, model: str) -> bool:
        return "models:*" in self.scopes or f"models:{model}" in self.scopes

    def require_model(self, model: str) -> None:
        if not self.may_use(model):
            raise ApiError(403, f"this credential may not use model {model!r} (needs scope models:{model})",
                           "permission_denied", param="model")

    def require_metrics(self) -> None:
        if "metrics:read" not in self.scopes:
            raise ApiError(403, "reading /metrics needs the scope metrics:read", "permission_denied")


ANONYMOUS = Caller("anonymous", ALL_SCOPES)


class Authenticator:
    """Checks `Authorization: Bearer ...` against the configured keys and JWT settings."""

    def __init__(self, auth: Any) -> None:
        self.mode = auth.mode
        self.hashes = {h.lower() for h in auth.api_key_hashes}
        self.jwt = auth.jwt
        self._jwt_key: str | None = None
        if self.jwt is not None:
            if self.jwt.public_key_file:
                self._jwt_key = Path(self.jwt.public_key_file).read_text()
            else:
                self._jwt_key = os.environ.get(self.jwt.secret_env or "", "")
                if not self._jwt_key:
                    raise ValueError(f"auth.jwt.secret_env={self.jwt.secret_env!r} is not set in the environment")

    def check(self, authorization: str | None) -> Caller:
        """The caller of a request, or ApiError 401."""
        if self.mode == "none":
            return ANONYMOUS
        if not authorization or not authorization.lower().startswith("bearer "):
            raise ApiError(401, "missing credentials: send 'Authorization: Bearer YOUR_KEY_OR_TOKEN'",
                           "invalid_api_key")
        token = authorization[7:].strip()
        digest = hash_key(token)
        if any(hmac.compare_digest(digest, h) for h in self.hashes):
            return Caller(f"key:{digest[:12]}", ALL_SCOPES)
        if self.jwt is not None and token.count(".") == 2:
            return self._check_jwt(token)
        raise ApiError(401, "invalid API key", "invalid_api_key")

    def _check_jwt(self, token: str) -> Caller:
        import jwt

        try:
            claims = jwt.decode(token, self._jwt_key, algorithms=self.jwt.algorithms, audience=self.jwt.audience,
                                issuer=self.jwt.issuer, leeway=self.jwt.leeway_s,
                                options={"require": ["exp", "iss", "aud", "sub"]})
        except jwt.ExpiredSignatureError:
            raise ApiError(401, "the token has expired", "invalid_token") from None
        except jwt.InvalidTokenError as exc:
            raise ApiError(401, f"invalid token: {exc}", "invalid_token") from None
        raw = claims.get(self.jwt.scope_claim, "")
        scopes = frozenset(raw.split() if isinstance(raw, str) else raw)
        return Caller(f"sub:{claims['sub']}"[:80], scopes)
