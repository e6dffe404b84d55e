"""The running studio: settings, the active model registry, the model cache and the request log, in one object
that the UI and the HTTP API share. Every generation, from either side, goes through `Studio.generation`."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from studio import devices, providers
from studio.cache import Lease, ModelCache
from studio.config import ConfigError, Settings, format_size
from studio.registry import Modality, Registry, select_profile
from studio.telemetry.metrics import Metrics
from studio.telemetry.requestlog import Recorder, RequestLog


@dataclass
class Studio:
    settings: Settings
    registry: Registry
    cache: ModelCache
    log: RequestLog
    notice: str | None = None  # why the studio fell back to the tiny profile, shown as a banner
    metrics: Metrics = field(default_factory=Metrics, repr=False)
    _slots: dict[str, threading.BoundedSemaphore] = field(default_factory=dict, repr=False)
    _slots_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def device(self) -> str:
        return self.cache.device

    def models(self, modality: Modality) -> list[str]:
        return [spec.id for spec in self.registry.of(modality)]

    def _slot(self, model_id: str) -> threading.BoundedSemaphore:
        with self._slots_lock:
            if model_id not in self._slots:
                self._slots[model_id] = threading.BoundedSemaphore(self.settings.concurrency)
            return self._slots[model_id]

    @contextmanager
    def generation(self, *, modality: Modality, model: str, client: str, endpoint: str,
                   session: str | None = None, **fields: Any) -> Iterator[tuple[Lease, Recorder]]:
        """Log, queue (per-model concurrency limit) and pin the model for one generation (on the call's device,
        where a ZeroGPU call was given one)."""
        spec = self.registry.get(model)
        if spec.modality != modality:
            raise ValueError(f"model: {model!r} is a {spec.modality} model, not a {modality} model")
        with self.log.record(client=client, endpoint=endpoint, modality=modality, model=model,
                             session=session, **fields) as rec:
            queued = time.monotonic()
            with self._slot(model):
                rec.set(queue_ms=round((time.monotonic() - queued) * 1000, 1))
                with self.cache.use(model, run_on=devices.call_device()) as lease:
                    rec.set(cache="hit" if lease.hit else "load", load_ms=round(lease.load_seconds * 1000, 1),
                            external=spec.external)
                    yield lease, rec


def create_studio(settings: Settings) -> Studio:
    """Pick the profile (falling back to tiny when offline), the device and the budget."""
    try:
        device = devices.resolve_device(settings.device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    choice = select_profile(settings.profile)
    if settings.providers:
        providers.register(choice.registry, settings.providers)
    unknown = [m for m in settings.preload if m not in choice.registry]
    if unknown:
        known = ", ".join(spec.id for spec in choice.registry)
        raise ConfigError(f"--preload: unknown model {unknown[0]!r} in the {choice.registry.name} profile; known: {known}")
    budget = settings.memory_budget or devices.default_budget(device)
    cache = ModelCache(choice.registry, budget=budget, device=device, strategy=settings.strategy,
                       load_timeout=settings.load_timeout)
    log = RequestLog(settings.log_dir, log_prompts=settings.log_prompts, device=device)
    cache.add_listener(log.cache_event)
    studio = Studio(settings, choice.registry, cache, log, choice.notice)
    studio.metrics.watch(cache, log)
    return studio


def preload_ids(studio: Studio) -> list[str]:
    """--preload names models; the preload strategy without a list loads every local model."""
    if studio.settings.preload:
        return list(studio.settings.preload)
    if studio.settings.strategy == "preload":
        return [s.id for s in studio.registry if not s.external]
    return []


def describe(studio: Studio) -> str:
    return (f"profile {studio.registry.name}, device {studio.device}, strategy {studio.cache.strategy}, "
            f"budget {format_size(studio.cache.budget)}")
