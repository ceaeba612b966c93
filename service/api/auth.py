"""Optional bearer-token auth with two scopes: ``read`` and ``admin`` (admin implies read).

Off when no token is configured.  A request without a valid token gets 401 with
``WWW-Authenticate: Bearer``; a valid token without the scope gets 403.  A
websocket may send the token as ``Authorization: Bearer ...`` or, for browsers
that cannot set headers on a websocket, as ``?token=...``.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

Scope = Literal["read", "admin"]
SCOPES: tuple[Scope, ...] = ("read", "admin")


@dataclass(frozen=True, slots=True)
class AuthDecision:
    """``status`` is 200 (allowed), 401 (no or unknown token) or 403 (missing scope)."""

    status: int
    detail: str = ""

    @property
    def allowed(self) -> bool:
        return self.status == 200


@dataclass(frozen=True)
class TokenAuth:
    """Token -> scopes.  Empty means auth is off and everything is allowed."""

    tokens: Mapping[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, Iterable[str]]]) -> TokenAuth:
        tokens: dict[str, frozenset[str]] = {}
        for token, scopes in pairs:
            granted = set(scopes)
            if "admin" in granted:
                granted.add("read")
            tokens[token] = frozenset(granted)
        return cls(tokens)

    @property
    def enabled(self) -> bool:
        return bool(self.tokens)

    def check(self, authorization: str | None, scope: Scope, query_token: str | None = None) -> (
        AuthDecision
    ):
        if not self.enabled:
            return AuthDecision(200)
        token = bearer_token(authorization) or query_token
        if not token:
            return AuthDecision(401, "missing bearer token (Authorization: Bearer <token>)")
        granted = self._lookup(token)
        if granted is None:
            return AuthDecision(401, "invalid bearer token")
        if scope not in granted:
            return AuthDecision(403, f"this token lacks the {scope!r} scope")
        return AuthDecision(200)

    def _lookup(self, token: str) -> frozenset[str] | None:
        found: frozenset[str] | None = None
        for known, scopes in self.tokens.items():
            # compare against every token, in constant time per token
            if hmac.compare_digest(known.encode(), token.encode()):
                found = scopes
        return found


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    kind, _, value = authorization.strip().partition(" ")
    if kind.lower() != "bearer" or not value.strip():
        return None
    return value.strip()
