"""GET /health: is the studio up, what it runs on, and which models are in memory (open to monitors: no prompts,
outputs or secrets)."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter
from pydantic import BaseModel

from studio.cache import CacheSnapshot
from studio.runtime import Studio


class Health(BaseModel):
    status: str  # "ok", or "degraded" while the request log cannot be written
    log_write_errors: int  # log rows the disk refused since the start
    profile: str
    notice: str | None  # why the studio fell back to the tiny profile
    cache: CacheSnapshot


def router(studio: Studio) -> APIRouter:
    api = APIRouter(tags=["studio"])

    @api.get("/health")
    def health() -> Health:
        return Health(status="degraded" if studio.log.failing else "ok", log_write_errors=studio.log.write_errors,
                      profile=studio.registry.name, notice=studio.notice,
                      cache=asdict(studio.cache.snapshot()))

    return api
