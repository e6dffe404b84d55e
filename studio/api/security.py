"""Who may call the studio's HTTP routes (/generate/*, /v1/*): API keys, or the same login as the UI.

One rule, checked by one FastAPI dependency that route modules attach to their router:

    api = APIRouter(dependencies=[guard(studio)])   # or Depends(require_api_key(studio)) on one route

Precedence:
1. API keys (`--api-key`, `STUDIO_API_KEYS`) set: the routes require `Authorization: Bearer KEY` with one of the
   keys; nothing else is accepted. Keys are for programs, so a key holder needs no UI password.
2. Otherwise, launch auth (`--auth`, `STUDIO_AUTH`, a credentials file) set: the routes require the UI's
   credentials, either as HTTP Basic (`curl -u user:password`) or as the session cookie Gradio sets when the user
   logs in on the UI's login page (so a logged-in browser can call the routes too).
3. Neither: the routes are open (a local studio on 127.0.0.1).

Anything else gets 401 with a message and a `WWW-Authenticate` header naming the scheme to use. Secrets are
compared with `hmac.compare_digest` (constant time for equal lengths). `/health` is not guarded: it carries no
prompts, outputs or secrets, only what runs and what is loaded, and load balancers and Spaces poll it. The UI and
Gradio's own client API are protected by Gradio's launch auth, not by this module.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import Callable

from fastapi import Depends, HTTPException, Request
from fastapi.params import Depends as DependsParam

from studio.runtime import Studio

REALM = "GenAI Studio"


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def _bearer_ok(header: str, keys: tuple[str, ...]) -> bool:
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    return any([_same(token.strip(), key) for key in keys])  # a list: every key is compared, no early exit


def _basic_ok(header: str, users: dict[str, str]) -> bool:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    matches = _same(password, users.get(user, ""))  # compared for unknown users too: no timing hint
    return matches and bool(sep) and user in users


def _cookie_user(request: Request) -> str | None:
    """The user logged in on Gradio's login page, read the way gradio.routes reads it (App.tokens, cookie_id)."""
    app = request.app
    tokens, cookie_id = getattr(app, "tokens", None), getattr(app, "cookie_id", None)
    if not tokens or cookie_id is None:
        return None
    cookies = request.cookies
    token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
    return tokens.get(token) if token else None


def require_api_key(studio: Studio) -> Callable[[Request], None]:
    """The dependency function enforcing the access rule above: API keys first, else the launch auth."""
    keys = studio.settings.api_keys
    users = dict(studio.settings.auth)

    def check(request: Request) -> None:
        header = request.headers.get("authorization", "")
        if keys:
            if not _bearer_ok(header, keys):
                raise HTTPException(401, "authorization: missing or wrong API key; send 'Authorization: Bearer <key>'",
                                    headers={"WWW-Authenticate": "Bearer"})
            return
        if users and not (_basic_ok(header, users) or _cookie_user(request)):
            raise HTTPException(401, "authorization: log in with the studio's user and password (HTTP Basic) "
                                     "or through the UI's login page",
                                headers={"WWW-Authenticate": f'Basic realm="{REALM}"'})

    return check


def guard(studio: Studio) -> DependsParam:
    """`APIRouter(dependencies=[guard(studio)])`: every route of the router obeys the access rule."""
    return Depends(require_api_key(studio))
