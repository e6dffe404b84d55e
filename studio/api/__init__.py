"""The studio's own HTTP routes, served by the same app (and port, and share link) as the Gradio UI.

Each registered modality contributes its router (its REST route and its OpenAI-compatible routes, see
studio.modalities); health, metrics, the model manager (/models) and /v1/models are the studio's own. `ERROR_HANDLERS` (studio.api.errors)
turns the studio's errors into HTTP answers with a message, never a 500 for bad input.
"""

from __future__ import annotations

from fastapi import APIRouter

from studio import modalities
from studio.api import health, metrics, models, openai
from studio.runtime import Studio


def build_router(studio: Studio) -> APIRouter:
    router = APIRouter()
    for module in (health, metrics, models, openai):
        router.include_router(module.router(studio))
    for modality in modalities.registered():
        if modality.routes:
            router.include_router(modalities.resolve(modality.routes)(studio))
    return router
