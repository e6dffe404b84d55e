"""GET /health: is the studio up, what it runs on, and which models are in memory."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter
from pydantic import BaseModel

from studio.runtime import Studio


class ModelInfo(BaseModel):
    id: str
    modality: str
    state: str
    bytes: int
    pins: int
    idle_seconds: float
    load_seconds: float


class Health(BaseModel):
    status: str
    profile: str
    device: str
    strategy: str
    budget_bytes: int
    used_bytes: int
    peak_bytes: int
    hits: int
    misses: int
    loads: int
    load_failures: int
    evictions: int
    load_seconds: float
    models: list[ModelInfo]
    notice: str | None


def router(studio: Studio) -> APIRouter:
    api = APIRouter(tags=["studio"])

    @api.get("/health")
    def health() -> Health:
        snap = asdict(studio.cache.snapshot())
        return Health(status="ok", profile=studio.registry.name, notice=studio.notice,
                      budget_bytes=snap.pop("budget_bytes"), **snap)

    return api
