"""The studio's own HTTP routes, served by the same app (and port, and share link) as the Gradio UI.

Each module contributes an APIRouter; `build_router` puts them together and `ERROR_HANDLERS` turns the studio's
errors into HTTP answers with a message, never a 500 for bad input.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from studio.api import audio, health, image, metrics, openai_compat, shape, text
from studio.cache import CacheBusy, CacheError, ModelTooLarge
from studio.providers import ProviderError
from studio.registry import UnknownModelError
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


def _error(status: int, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse({"detail": message, **({"field": field} if field else {})}, status_code=status)


async def _unknown_model(_request: Request, exc: UnknownModelError) -> JSONResponse:
    return _error(404, f"model: {exc.message}", "model")


async def _cache_error(_request: Request, exc: CacheError) -> JSONResponse:
    status = 413 if isinstance(exc, ModelTooLarge) else 503 if isinstance(exc, CacheBusy) else 502
    return _error(status, str(exc))


async def _provider_error(_request: Request, exc: ProviderError) -> JSONResponse:
    return _error(exc.status, str(exc))  # 502/503/504 for the provider's failures, 429 when it rate-limits


ERROR_HANDLERS = {UnknownModelError: _unknown_model, CacheError: _cache_error, ProviderError: _provider_error}
