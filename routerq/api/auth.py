"""Bearer tokens and tenants: a token is known only by its hash, and its hash names its tenant.

Tokens come from ROUTERQ_API_KEYS; each request's token is hashed and compared with every known hash
in constant time. Files and batches are stored under the hash (never the token), so one token never
sees another's, and nothing stored or logged can be replayed as a credential.
"""

from __future__ import annotations

import hashlib
import hmac

OPEN_TENANT = "open"  # every caller of a server started with --no-auth
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Tokens:
    def __init__(self, tokens: list[str]) -> None:
        self._hashes = [token_hash(token) for token in tokens]

    @property
    def required(self) -> bool:
        return bool(self._hashes)

    def tenant(self, authorization: str | None) -> str | None:
        """The tenant of an `Authorization: Bearer ...` header; None when it names no known token."""
        if not self._hashes:
            return OPEN_TENANT
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        presented = token_hash(token.strip())
        found = None
        for known in self._hashes:  # every hash compared: the time taken says nothing about which
            if hmac.compare_digest(presented, known):
                found = known
        return found[:32] if found else None
