"""HTTP request ids and metrics, as pure ASGI middleware.

Starlette's BaseHTTPMiddleware runs the app in a separate task and re-streams its body, which breaks or
buffers streaming responses; this middleware only wraps `send`, so every chunk goes out when the app sends it.
Each HTTP response carries `X-Request-ID` (the client's own, when it sends a sane one, so ids can be followed
through proxies), and generations served by the request log it under the same id.

An exception no handler turned into an answer is an internal error: it is logged with its traceback and answered
here with a 500 that names the request id, and nothing else (no exception text, stack or path). Answering here,
rather than letting it reach Starlette's outermost error middleware (which re-raises), keeps the server's
keep-alive connection usable: one failed request never affects the client's next one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from studio.telemetry.metrics import Metrics
from studio.telemetry.requestlog import REQUEST_ID

HEADER = b"x-request-id"
_VALID_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")  # anything else (or nothing) gets a fresh id
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})  # others count as OTHER

logger = logging.getLogger("studio.http")


def internal_message(request_id: str) -> str:
    """What a client is told of an internal error."""
    return f"internal error; the server log has the details under request id {request_id}"


class RequestIdMiddleware:
    """Adds X-Request-ID, sets `REQUEST_ID` for the request, and records HTTP count and duration."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = None
        for name, value in scope["headers"]:
            if name == HEADER:
                request_id = value.decode("latin-1") if _VALID_ID.fullmatch(value) else None
                break
        request_id = request_id or os.urandom(16).hex()
        header = (HEADER, request_id.encode("latin-1"))
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        token = REQUEST_ID.set(request_id)
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("internal error (request %s): %s %s", request_id, scope["method"], scope["path"])
            if started:  # half an answer went out: only closing the connection tells the client
                raise
            body = json.dumps({"detail": internal_message(request_id)}).encode()
            await send_with_id({"type": "http.response.start", "status": 500, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send_with_id({"type": "http.response.body", "body": body})
        finally:
            REQUEST_ID.reset(token)
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"] if scope["method"] in _METHODS else "OTHER"
            self.metrics.observe_http(method, route, status, time.perf_counter() - start)
