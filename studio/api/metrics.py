"""GET /metrics: the Prometheus text format (HTTP traffic, generations, the model cache)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from studio.api.security import guard
from studio.runtime import Studio


def router(studio: Studio) -> APIRouter:
    api = APIRouter(tags=["studio"], dependencies=[guard(studio)])  # traffic and model names: not for strangers

    @api.get("/metrics", response_class=Response, summary="Prometheus metrics")
    def metrics() -> Response:
        return Response(studio.metrics.exposition(), media_type=studio.metrics.content_type)

    return api
