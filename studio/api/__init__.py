"""The studio's own HTTP routes, served by the same app (and port, and share link) as the Gradio UI.

Each module contributes an APIRouter; `build_router` puts them together. `ERROR_HANDLERS` (studio.api.errors)
turns the studio's errors into HTTP answers with a message, never a 500 for bad input.
"""

from __future__ import annotations

from fastapi import APIRouter

from studio.api import audio, health, image, metrics, openai_compat, shape, text
from studio.runtime import Studio


def build_router(studio: Studio) -> APIRouter:
    router = APIRouter()
    router.include_router(health.router(studio))
    router.include_router(image.router(studio))
    router.include_router(audio.router(studio))
    router.include_router(metrics.router(studio))
    router.include_router(text.router(studio))
    router.include_router(openai_compat.router(studio))
    router.include_router(shape.router(studio))
    return router
