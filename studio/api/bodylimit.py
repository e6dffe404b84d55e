"""How large a request body may be, checked before anything parses it (pure ASGI middleware).

A 10 MB chat prompt was read, parsed and tokenized (10–17 s of CPU) before validation refused it. Now the
declared `Content-Length` is checked before the app runs, and a body sent without one (chunked) is counted as it
arrives: the request ends with 413 as soon as it passes the limit. The limits, per kind of route:

- routes that take files (images, masks, audio: as multipart or base64 in JSON) and all of Gradio's routes (its
  uploads, queue and MCP calls carry files and data URIs): `MEDIA_FACTOR` × the upload limit (`--max-upload-size`,
  at most 50 MiB on a public studio), room for an image and its mask, base64-encoded, plus `JSON_LIMIT`;
- every other route (chat, speech, image generation from text, the model manager, ...): `JSON_LIMIT`, 1 MiB.
"""

from __future__ import annotations

import json

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from studio.config import format_size

JSON_LIMIT = 2**20
MEDIA_FACTOR = 3
MEDIA_ROUTES = ("/generate/image", "/generate/3d", "/generate/transcript", "/generate/video", "/v1/images/edits",
                "/v1/audio/transcriptions", "/v1/videos", "/loras/", "/gradio_api/")


def body_limit(path: str, upload_limit: int) -> int:
    """The most bytes a request to `path` may send."""
    return MEDIA_FACTOR * upload_limit + JSON_LIMIT if path.startswith(MEDIA_ROUTES) else JSON_LIMIT


def too_large(path: str, limit: int) -> str:
    return f"body: larger than the {format_size(limit)} this route takes ({path})"


class BodyLimitMiddleware:
    """413 for a body over its route's limit, before (Content-Length) or while (chunked) it is read."""

    def __init__(self, app: ASGIApp, upload_limit: int):
        self.app = app
        self.upload_limit = upload_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        limit = body_limit(path, self.upload_limit)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await _refuse(send, too_large(path, limit))
            return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # FastAPI and Gradio answer an HTTPException raised while reading the body
                    raise HTTPException(413, too_large(path, limit))
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except HTTPException as exc:  # raised where no handler answers it (a plain Starlette route)
            if started or exc.status_code != 413:
                raise
            await _refuse(send, exc.detail)


async def _refuse(send: Send, message: str) -> None:
    body = json.dumps({"detail": message, "field": "body"}).encode()
    await send({"type": "http.response.start", "status": 413, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
