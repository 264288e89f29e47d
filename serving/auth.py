"""API keys: only their SHA-256 hashes are kept; a request without a valid key gets 401."""

from __future__ import annotations

import hashlib
import hmac
import os

from serving.api import ApiError


def hash_key(key: str) -> str:
    """The form a key is stored in."""
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    """Accepted key hashes from the settings and from an environment variable of plain keys."""

    def __init__(self, hashes: list[str], env_var: str) -> None:
        plain = [k.strip() for k in os.environ.get(env_var, "").split(",") if k.strip()]
        self.hashes = {h.lower() for h in hashes} | {hash_key(k) for k in plain}

    @property
    def enabled(self) -> bool:
        return bool(self.hashes)

    def check(self, authorization: str | None) -> str:
        """The key id (a hash prefix, safe to log) of a valid `Authorization: Bearer KEY`, else ApiError 401."""
        if not self.enabled:
            return "anonymous"
        if not authorization or not authorization.lower().startswith("bearer "):
            raise ApiError(401, "missing API key: send 'Authorization: Bearer YOUR_KEY'", "invalid_api_key")
        digest = hash_key(authorization[7:].strip())
        if not any(hmac.compare_digest(digest, h) for h in self.hashes):
            raise ApiError(401, "invalid API key", "invalid_api_key")
        return digest[:12]
