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
prompts, outputs or secrets, only what runs and what is loaded, and load balancers and Spaces poll it.

Gradio's own doors (`AccessMiddleware`, pure ASGI, in front of every route): with API keys set, its client API
(`/gradio_api/call/*`, `/api/*`) and MCP (`/gradio_api/mcp/*`) require the key like the studio's routes; the
other requests that run or change something (`/gradio_api/queue/join`, `/run/*` (the page's unqueued events),
`/upload`, `/cancel`, ...) take the key or the browser session cookie that loading the page (`GET /`) sets, so the
UI keeps working for a person in a browser.
The cookie proves a page load, not a person: `--auth` is what protects the UI (Gradio's login covers all of its
routes). With `--auth`, the schema (`/openapi.json`, `/docs`, `/redoc`) needs the login too.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import os
from typing import Callable

from fastapi import Depends, HTTPException, Request
from fastapi.params import Depends as DependsParam
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from studio.runtime import Studio

REALM = "GenAI Studio"
UI_COOKIE = "studio-ui"
KEY_ONLY = ("/gradio_api/call/", "/gradio_api/api/", "/gradio_api/mcp")  # the page itself uses /run/ and /queue/
SCHEMA = frozenset({"/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect"})


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


def _auth_problem(header: str, request: Request, keys: tuple[str, ...],
                  users: dict[str, str]) -> tuple[str, str] | None:
    """(message, WWW-Authenticate) when the request does not meet the access rule; None when it does."""
    if keys:
        if not _bearer_ok(header, keys):
            return "authorization: missing or wrong API key; send 'Authorization: Bearer <key>'", "Bearer"
        return None
    if users and not (_basic_ok(header, users) or _cookie_user(request)):
        return ("authorization: log in with the studio's user and password (HTTP Basic) or through the UI's login "
                "page", f'Basic realm="{REALM}"')
    return None


def require_api_key(studio: Studio) -> Callable[[Request], None]:
    """The dependency function enforcing the access rule above: API keys first, else the launch auth."""
    keys = studio.settings.api_keys
    users = dict(studio.settings.auth)

    def check(request: Request) -> None:
        problem = _auth_problem(request.headers.get("authorization", ""), request, keys, users)
        if problem:
            raise HTTPException(401, problem[0], headers={"WWW-Authenticate": problem[1]})

    return check


def guard(studio: Studio) -> DependsParam:
    """`APIRouter(dependencies=[guard(studio)])`: every route of the router obeys the access rule."""
    return Depends(require_api_key(studio))


def _signed(nonce: str, key: str) -> str:
    return hmac.new(key.encode(), nonce.encode(), "sha256").hexdigest()


def ui_cookie(keys: tuple[str, ...]) -> str:
    """A fresh browser session cookie's value: a random nonce and its HMAC under the first key."""
    nonce = os.urandom(16).hex()
    return f"{nonce}.{_signed(nonce, keys[0])}"


def ui_cookie_ok(value: str, keys: tuple[str, ...]) -> bool:
    nonce, _, signature = value.partition(".")
    return bool(nonce) and any([_same(signature, _signed(nonce, key)) for key in keys])


def _door(method: str, path: str, keys: tuple[str, ...], users: dict[str, str]) -> str | None:
    """What a request needs beyond the routes' own checks: "key", "key or page" (the UI cookie), "login" or None."""
    if path in SCHEMA:
        return "login" if users else None
    if not keys or not path.startswith("/gradio_api/"):
        return None
    if path.startswith(KEY_ONLY):
        return "key"
    return None if method in ("GET", "HEAD", "OPTIONS") else "key or page"


class AccessMiddleware:
    """The API key on Gradio's programmatic doors and MCP, the browser's session cookie, the login on the schema."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...], users: dict[str, str]):
        self.app, self.keys, self.users = app, keys, users

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        door = _door(method, path, self.keys, self.users)
        if door is not None:
            request = Request(scope)
            header = request.headers.get("authorization", "")
            cookie = request.cookies.get(UI_COOKIE, "")
            if door == "key or page" and cookie and ui_cookie_ok(cookie, self.keys):
                problem = None
            else:
                problem = _auth_problem(header, request, self.keys if door != "login" else (), self.users)
                if problem and door == "login" and self.keys and _bearer_ok(header, self.keys):
                    problem = None  # a key holder may read the schema too
            if problem:
                await _refuse(send, *problem)
                return
        if self.keys and method == "GET" and path == "/":
            send = self._with_cookie(send, scope)
        await self.app(scope, receive, send)

    def _with_cookie(self, send: Send, scope: Scope) -> Send:
        secure = "; Secure" if scope.get("scheme") == "https" else ""
        cookie = f"{UI_COOKIE}={ui_cookie(self.keys)}; Path=/; HttpOnly; SameSite=Strict{secure}".encode()

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (b"set-cookie", cookie)]}
            await send(message)

        return send_with_cookie


async def _refuse(send: Send, message: str, scheme: str) -> None:
    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": 401, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"www-authenticate", scheme.encode())]})
    await send({"type": "http.response.body", "body": body})
