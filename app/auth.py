"""Optional API keys: ``Authorization: Bearer <key>``, compared in constant time."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.deps import SettingsDep
from app.errors import ApiError

bearer = HTTPBearer(
    auto_error=False,
    description="An API key from CAPTIONER_API_KEYS (only when keys are configured).",
)


def key_matches(sent: str, keys: list[str]) -> bool:
    """True if ``sent`` is one of ``keys``; every key is compared, each in constant time."""
    token = sent.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(token, key.encode())
    return found


async def require_api_key(
    request: Request,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    """Let the request through when no keys are set, the path is exempt, or the key is valid."""
    if not settings.api_keys or request.url.path in settings.auth_exempt_paths:
        return
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise ApiError(
            "unauthorized", "send an API key as 'Authorization: Bearer <key>'", headers=challenge
        )
    keys = [key.get_secret_value() for key in settings.api_keys]
    if not key_matches(credentials.credentials, keys):
        raise ApiError("unauthorized", "the API key is not valid", headers=challenge)
