"""Serve the UI and the HTTP API from one Gradio app: one process, one port, one share link.

Blocks mounted under an outside FastAPI app lose Gradio's share links, so the studio's routes, middleware and
lifespan are handed to the app that `Blocks.launch()` creates (its `app_kwargs`), and that app is the one the
share tunnel reaches.
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlparse, urlunparse

import anyio
import gradio as gr
from starlette.middleware import Middleware

from studio.api import build_router
from studio.api.bodylimit import BodyLimitMiddleware
from studio.api.errors import ERROR_HANDLERS
from studio.api.security import AccessMiddleware
from studio.runtime import Studio, describe, preload_ids
from studio.telemetry.middleware import RequestIdMiddleware
from studio.ui import build_ui, page

PUBLIC_QUEUE_SIZE = 32  # requests waiting beyond this are turned away ("queue full") instead of piling up


@dataclass(frozen=True)
class Limits:
    """What strangers may ask of a public studio (a share link or a Space); a local one has no such limits."""

    public: bool
    queue_size: int | None  # requests waiting in Gradio's queue
    max_file_size: int | None  # bytes of an upload to Gradio's upload route (the Speech tab's recordings)
    concurrency: int  # generations at once per event (and per model: the studio's own slots)


def limits(studio: Studio) -> Limits:
    public = studio.public
    return Limits(public, PUBLIC_QUEUE_SIZE if public else None, studio.upload_limit if public else None,
                  studio.settings.concurrency)


def _lifespan(studio: Studio):
    @asynccontextmanager
    async def lifespan(_app):
        ids = preload_ids(studio)
        if ids:
            print(f"Preloading {', '.join(ids)} ...", flush=True)
            await anyio.to_thread.run_sync(studio.cache.preload, ids)
        yield

    return lifespan


def app_kwargs(studio: Studio) -> dict:
    """Everything the studio adds to the FastAPI app: routes, error handlers, middleware, lifespan.

    Tests build a plain FastAPI(**app_kwargs(studio)) from the same pieces."""
    return {
        "routes": build_router(studio).routes,
        "exception_handlers": ERROR_HANDLERS,
        "lifespan": _lifespan(studio),
        "middleware": [Middleware(RequestIdMiddleware, metrics=studio.metrics),
                       Middleware(AccessMiddleware, keys=studio.settings.api_keys, users=dict(studio.settings.auth)),
                       Middleware(BodyLimitMiddleware, upload_limit=studio.upload_limit)],
    }


def _open_share_link(demo: gr.Blocks, local_url: str) -> str | None:
    """Open Gradio's share tunnel for the running server; on failure say so in one line and keep serving locally.

    `launch(share=True)` prints a paragraph on failure (often about a missing binary, when the real cause is no
    network), so the studio opens the tunnel itself, the way `Blocks.launch` does, once the server is up."""
    from gradio import networking

    if demo.space_id:
        print("Share link: not needed on Hugging Face Spaces; the Space's own URL is the public address.", flush=True)
        return None
    try:
        url = networking.setup_tunnel(demo.server_name, demo.server_port, demo.share_token,
                                      demo.share_server_address, demo.share_server_tls_certificate)
    except Exception as exc:  # no network, blocked port, certificate or binary problems: all mean "no link"
        cause = exc.__cause__ or exc
        print(f"Share link: could not be created ({type(cause).__name__}: {str(cause) or exc}); "
              f"serving locally only at {local_url}", flush=True)
        return None
    demo.share_url = urlunparse((demo.share_server_protocol, *urlparse(url)[1:]))
    demo.share = True  # read per request by Gradio (share page, robots.txt)
    print(f"* Running on public URL: {demo.share_url}", flush=True)
    return demo.share_url


def _mcp_loopback_with_key(demo: gr.Blocks, local_url: str, key: str) -> None:
    """Gradio's MCP server runs queued tools through a gradio_client of its own on the local URL; with API keys
    that loopback must carry one too. Made here, once the server answers, with the arguments Gradio uses."""
    from gradio_client import Client

    demo.mcp_server_obj._client_instance = Client(
        local_url, download_files=False, verbose=False, analytics_enabled=False, ssl_verify=False,
        _skip_components=False, headers={"x-gradio-user": "mcp", "Authorization": f"Bearer {key}"})


def launch(studio: Studio, *, block: bool = True) -> tuple[gr.Blocks, str]:
    """Start the server; with block=False return (blocks, local url) and keep serving in the background.

    Public mode (--share, or running as a Space) bounds what strangers can ask for: a queue size limit, an upload
    size limit, no extra folders served; generations are already limited per model by --concurrency."""
    settings, bounds = studio.settings, limits(studio)
    demo = build_ui(studio)
    demo.queue(default_concurrency_limit=bounds.concurrency, max_size=bounds.queue_size)
    print(f"GenAI Studio: {describe(studio)}", flush=True)
    if studio.notice:
        print(f"NOTE: {studio.notice}", flush=True)
    if bounds.public and os.environ.pop("GRADIO_ALLOWED_PATHS", None):
        print("Public mode: GRADIO_ALLOWED_PATHS ignored; a public studio serves no extra folders.", flush=True)
    _app, local_url, _share_url = demo.launch(
        server_name=settings.host,
        server_port=settings.port,
        share=False,  # opened below, so that a failure is one line
        auth=list(settings.auth) or None,
        max_file_size=bounds.max_file_size,
        mcp_server=settings.mcp,
        prevent_thread_lock=True,
        quiet=True,
        app_kwargs=app_kwargs(studio),
        css=page.CSS,
        js=page.SCRIPT,
    )
    print(f"* Running on local URL:  {local_url}", flush=True)
    if demo.mcp_error:
        print(demo.mcp_error, flush=True)
    elif settings.mcp and settings.api_keys:
        _mcp_loopback_with_key(demo, local_url, settings.api_keys[0])
    if settings.share:
        _open_share_link(demo, local_url)
    if block:
        demo.block_thread()
    return demo, local_url
