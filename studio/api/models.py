"""The model manager over HTTP: the catalog (`GET /models`), adding a model with its download's progress as
Server-Sent Events (`POST /models`, after `POST /models/plan` if you want to look first), removing one from disk
(`DELETE /models/{id}`), keeping one loaded or unloading it, and rescanning the drop-in folders.

All of it goes through `studio.manager`, as the Models tab does; errors name the model and the reason: 422 with
the field (an unsupported family, files that are no model, quantization this device cannot do, an id taken),
404 (unknown model), 413 (larger than the memory budget), 507 (not enough disk).
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Literal

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from studio.api.errors import ERROR_RESPONSES
from studio.api.security import guard
from studio.api.streaming import DONE, frame
from studio.manager import Download, ModelInfo, Plan
from studio.quantization import QUANTIZE_CHOICES
from studio.runtime import Studio
from studio.usermodels import DTYPES

PROGRESS_EVERY_S = 0.5  # how long the stream waits for new bytes before it looks again

ADD_RESPONSES = {**ERROR_RESPONSES,
                 413: {"description": "the model is larger than the whole memory budget"},
                 507: {"description": "not enough free disk for the download"}}


class Problem(BaseModel):
    where: str
    message: str


class AliasOut(BaseModel):
    id: str  # another profile's id (tiny profile: a real model's) that requests may use
    model: str  # the model it names
    label: str


class Catalog(BaseModel):
    budget_bytes: int
    used_bytes: int  # held by resident models now
    models: list[ModelInfo]
    downloads: list[dict[str, Any]]  # models being added: their progress (they join `models` once complete)
    problems: list[Problem]  # drop-in files and catalog entries that were left out, and why
    aliases: list[AliasOut] = []  # ids that name one of `models` (tiny profile: the real models' ids)


class AddModel(BaseModel):
    """A model to add: a Hub repo id or a local folder or file; the rest is optional (detected or defaulted)."""

    model_config = ConfigDict(extra="forbid")
    source: str = Field(min_length=1, max_length=1000, description="org/name, or a path on the studio's machine")
    id: str | None = Field(None, max_length=100, description="default: from the source's name")
    modality: str | None = Field(None, description="default: detected from the files")
    label: str | None = Field(None, max_length=200)
    revision: str | None = Field(None, max_length=200, description="Hub branch, tag or commit (default main)")
    dtype: Literal[DTYPES] | None = None  # type: ignore[valid-type]
    quantize: Literal[QUANTIZE_CHOICES] | None = None  # type: ignore[valid-type]
    options: dict[str, Any] | None = Field(None, description="the modality's defaults and caps (see README)")


class PlanOut(BaseModel):
    id: str
    modality: str
    family: str
    source: str
    dtype: str
    quantize: str | None
    size_bytes: int  # in memory at its dtype and quantization
    download_bytes: int  # still to fetch
    free_disk_bytes: int
    budget_bytes: int

    @classmethod
    def of(cls, plan: Plan) -> "PlanOut":
        spec = plan.spec
        return cls(id=spec.id, modality=spec.modality, family=plan.family_label, source=spec.source,
                   dtype=plan.dtype, quantize=spec.quantize, size_bytes=plan.size_bytes,
                   download_bytes=plan.download_bytes, free_disk_bytes=plan.free_disk_bytes,
                   budget_bytes=plan.budget_bytes)


class Removed(BaseModel):
    model: str
    freed_bytes: int
    unregistered: bool  # the entry left the catalog (user models); a built-in one stays and downloads on use


class KeepLoaded(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keep_loaded: bool


class Refreshed(BaseModel):
    added: list[str]
    removed: list[str]
    problems: list[Problem]


def router(studio: Studio) -> APIRouter:
    api = APIRouter(tags=["models"], dependencies=[guard(studio)], responses=ERROR_RESPONSES)
    manager = studio.manager

    def info(model_id: str) -> ModelInfo:
        model_id = studio.registry.get(model_id).id
        return next(m for m in manager.catalog() if m.id == model_id)

    @api.get("/models")
    def list_models(modality: str | None = None) -> Catalog:
        """Every model with its modality, family, source, size at its dtype, disk use, fit, residency and use."""
        snap = studio.cache.snapshot()
        models = manager.catalog(modality)
        listed = {m.id for m in models}
        aliases = [AliasOut(**vars(a)) for a in studio.registry.aliases.values() if a.model in listed]
        return Catalog(budget_bytes=snap.budget_bytes, used_bytes=snap.used_bytes, models=models,
                       downloads=[job.status() for job in manager.downloads()],
                       problems=[Problem(**vars(p)) for p in manager.problems], aliases=aliases)

    @api.post("/models/plan", responses=ADD_RESPONSES)
    def plan_model(body: AddModel) -> PlanOut:
        """What adding the model would do (family, size, disk need), checked; nothing is downloaded."""
        return PlanOut.of(manager.plan(**_plan_args(body)))

    @api.post("/models", responses={**ADD_RESPONSES, 200: {
        "description": "Server-Sent Events: plan, progress (bytes, speed, time left), then done or error",
        "content": {"text/event-stream": {}}}})
    async def add_model(body: AddModel) -> StreamingResponse:
        """Add a model: checked first (errors are HTTP errors), then downloaded with progress as Server-Sent
        Events, written to the user catalog and registered. Closing the connection cancels the download."""
        plan = await run_in_threadpool(lambda: manager.plan(**_plan_args(body)))
        job = manager.add(plan)
        return StreamingResponse(_events(plan, job), media_type="text/event-stream")

    async def _events(plan: Plan, job: Download) -> AsyncIterator[str]:
        yield frame({"event": "plan", **PlanOut.of(plan).model_dump()})
        try:
            seen = -1
            while True:
                status = job.status()
                if status["done_bytes"] != seen or job.finished:
                    seen = status["done_bytes"]
                    yield frame({"event": "progress", **status})
                if job.finished:
                    break
                await run_in_threadpool(job.wait, seen, PROGRESS_EVERY_S)
            if job.state == "done":
                yield frame({"event": "done", "model": vars(info(plan.spec.id))})
            else:
                yield frame({"event": "error", "state": job.state, "error": job.error or job.state})
            yield DONE
        finally:  # the client went away before the end: nobody wants the download now
            if not job.finished:
                manager.cancel(plan.spec.id)

    @api.delete("/models/{model_id}")
    def remove_model(model_id: str) -> Removed:
        """Unload the model and free its files in the Hugging Face cache; a user catalog entry leaves the
        catalog. Your own files (a local path, a drop-in) are never deleted."""
        return Removed(**vars(manager.remove(model_id)))

    @api.patch("/models/{model_id}")
    def keep_model(model_id: str, body: KeepLoaded) -> ModelInfo:
        """Keep the model loaded (it loads now; eviction passes it by), or stop keeping it."""
        manager.keep(model_id, body.keep_loaded)
        return info(model_id)

    @api.post("/models/{model_id}/unload")
    def unload_model(model_id: str) -> ModelInfo:
        """Free the model's memory now (also when it is kept loaded); 422 while requests use it."""
        manager.unload(model_id)
        return info(model_id)

    @api.post("/models/refresh")
    def refresh_models() -> Refreshed:
        """Scan the drop-in folders again."""
        added, removed = manager.refresh()
        return Refreshed(added=added, removed=removed, problems=[Problem(**vars(p)) for p in manager.problems])

    return api


def _plan_args(body: AddModel) -> dict[str, Any]:
    return {"source": body.source, "model_id": body.id, "modality": body.modality, "label": body.label,
            "revision": body.revision, "dtype": body.dtype, "quantize": body.quantize, "options": body.options}
