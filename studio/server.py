"""Serve the UI and the HTTP API from one Gradio app: one process, one port, one share link.

Blocks mounted under an outside FastAPI app lose Gradio's share links, so the studio's routes, middleware and
lifespan are handed to the app that `Blocks.launch()` creates (its `app_kwargs`), and that app is the one the
share tunnel reaches.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

import anyio
import gradio as gr

from studio.api import ERROR_HANDLERS, build_router
from studio.runtime import Studio, describe, preload_ids
from studio.ui import build_ui


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
        "middleware": [],
    }


def launch(studio: Studio, *, block: bool = True) -> tuple[gr.Blocks, str]:
    """Start the server; with block=False return (blocks, local url) and keep serving in the background."""
    settings = studio.settings
    demo = build_ui(studio)
    demo.queue(default_concurrency_limit=settings.concurrency)
    print(f"GenAI Studio: {describe(studio)}", flush=True)
    if studio.notice:
        print(f"NOTE: {studio.notice}", flush=True)
    _app, local_url, _share_url = demo.launch(
        server_name=settings.host,
        server_port=settings.port,
        share=settings.share,
        auth=list(settings.auth) or None,
        prevent_thread_lock=True,
        quiet=False,
        app_kwargs=app_kwargs(studio),
    )
    if block:
        demo.block_thread()
    return demo, local_url
