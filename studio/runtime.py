"""The running studio: settings, the active model registry, the model cache and the request log, in one object
that the UI and the HTTP API share. Every generation, from either side, goes through `Studio.generation`."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

from studio import devices, modalities, providers, usermodels
from studio.cache import Lease, ModelCache
from studio.config import PUBLIC_MAX_UPLOAD, ConfigError, Settings, format_size
from studio.contract import InputError
from studio.catalog import select_profile
from studio.manager import ModelManager
from studio.registry import ModelSpec, Registry
from studio.telemetry import logreader
from studio.spaces import on_spaces
from studio.telemetry.metrics import Metrics
from studio.telemetry.requestlog import REQUEST_ID, Recorder, RequestLog

@dataclass
class Call:
    """Who asked for one generation, and how to reach back to them while it runs.

    `client` and `entry` make the request log's endpoint label, one scheme for every door: "ui:image",
    "rest:/generate/image", "openai:/v1/images/generations", "gradio:generate_image". `cancel` is the Stop of the
    session (or a client that went away); `progress` receives (fraction, text)."""

    client: str  # "ui", "rest" (/generate/*), "openai" (/v1/*), "gradio" (its client API and MCP)
    entry: str
    session: str | None = None
    cancel: threading.Event | None = None
    progress: Callable[[float, str], Any] | None = None
    # An HTTP request's id (the middleware's X-Request-ID); a UI generation gets its own.
    request_id: str = field(default_factory=lambda: REQUEST_ID.get() or os.urandom(16).hex())
    disconnected: bool = False  # the HTTP client went away (set with `cancel`): the log says "cancelled"

    @property
    def endpoint(self) -> str:
        return f"{self.client}:{self.entry}"

    @property
    def stopped(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def report(self, fraction: float, text: str) -> None:
        if self.progress is not None:
            self.progress(fraction, text)


@dataclass
class Studio:
    settings: Settings
    registry: Registry
    cache: ModelCache
    log: RequestLog
    notice: str | None = None  # why the studio fell back to the tiny profile, shown as a banner
    manager: ModelManager = None  # type: ignore[assignment]  # made from the rest when not given
    metrics: Metrics = field(default_factory=Metrics, repr=False)
    _slots: dict[str, threading.BoundedSemaphore] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _asked: set[str] = field(default_factory=set, repr=False)  # providers whose models' limits were read

    def __post_init__(self) -> None:
        if self.manager is None:
            self.manager = ModelManager(self.registry, self.cache, self.settings)

    @property
    def device(self) -> str:
        return self.cache.device

    @property
    def public(self) -> bool:
        """Served to strangers: a share link, or a Hugging Face Space (public unless its owner adds a login)."""
        return self.settings.share or on_spaces()

    @property
    def upload_limit(self) -> int:
        """Bytes of one uploaded file: --max-upload-size, and at most PUBLIC_MAX_UPLOAD on a public studio."""
        cap = self.settings.max_upload_size
        return min(cap, PUBLIC_MAX_UPLOAD) if self.public else cap

    def models(self, modality: str) -> list[str]:
        return [spec.id for spec in self.registry.of(modality)]

    def model(self, model_id: str | None, modality: str) -> ModelSpec:
        """The registry entry a request names (the modality's first model when it names none), checked to be of
        the modality. An external model from another studio gets that studio's limits on first use."""
        if model_id is None:
            first = self.models(modality)
            if not first:
                raise InputError("model", f"this studio serves no {modality} model")
            model_id = first[0]
        spec = self.registry.get(model_id)
        if spec.modality != modality:
            raise InputError("model", f"{model_id!r} is a {spec.modality} model, not a {modality} model")
        if spec.provider is not None and spec.provider.extensions and spec.provider.name not in self._asked:
            spec = self._with_remote_options(spec)
        return spec

    def _with_remote_options(self, spec: ModelSpec) -> ModelSpec:
        published = providers.remote_options(spec.provider)
        if published is None:  # not reachable now: ask again next time, check nothing meanwhile
            return spec
        with self._lock:
            self._asked.add(spec.provider.name)
            for entry in self.registry:
                if entry.provider == spec.provider and entry.remote in published:
                    options = modalities.resolve(modalities.get(entry.modality).options)
                    theirs = options.known(published[entry.remote])
                    self.registry.replace(replace(entry, options={**theirs, **entry.options}))
        return self.registry.get(spec.id)

    def _slot(self, model_id: str, size: int) -> threading.BoundedSemaphore:
        with self._lock:
            if model_id not in self._slots:
                self._slots[model_id] = threading.BoundedSemaphore(size)
            return self._slots[model_id]

    @contextmanager
    def generation(self, spec: ModelSpec, call: Call, *, slots: int | None = None,
                   **fields: Any) -> Iterator[tuple[Lease, Recorder]]:
        """Log, queue and pin the model for one generation (on the call's device, where a ZeroGPU call was given
        one). At most `slots` generations use a model at once (default --concurrency; chat models batch theirs,
        up to --max-batch)."""
        with self.log.record(request_id=call.request_id, client=call.client, endpoint=call.endpoint,
                             modality=spec.modality, model=spec.id, session=call.session,
                             external=spec.external, **fields) as rec:
            queued = time.monotonic()
            with self._slot(spec.id, slots or self.settings.concurrency):
                rec.set(queue_ms=round((time.monotonic() - queued) * 1000, 1))
                with self.cache.use(spec.id, run_on=devices.call_device()) as lease:
                    rec.set(cache="hit" if lease.hit else "load", load_ms=round(lease.load_seconds * 1000, 1))
                    try:
                        yield lease, rec
                    finally:
                        if call.disconnected:
                            rec.set(cancelled=True)


def create_studio(settings: Settings) -> Studio:
    """Pick the profile (falling back to tiny when offline), the device and the budget."""
    try:
        device = devices.resolve_device(settings.device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    choice = select_profile(settings.profile)
    if settings.providers:
        providers.register(choice.registry, settings.providers)
    problems = usermodels.register_catalog(choice.registry, settings.models_file, device)
    usermodels.log_problems(problems)
    budget = settings.memory_budget or devices.default_budget(device)
    cache = ModelCache(choice.registry, budget=budget, device=device, strategy=settings.strategy,
                       load_timeout=settings.load_timeout, max_batch=settings.max_batch)
    manager = ModelManager(choice.registry, cache, settings, problems)
    manager.refresh()  # the drop-in folders
    unknown = [m for m in settings.preload if m not in choice.registry]
    if unknown:
        known = ", ".join(spec.id for spec in choice.registry)
        raise ConfigError(f"--preload: unknown model {unknown[0]!r} in the {choice.registry.name} profile; known: {known}")
    try:
        log = RequestLog(settings.log_dir, log_prompts=settings.log_prompts, device=device,
                         finished_day=logreader.compile_day)
        tempfile.TemporaryFile(dir=settings.log_dir).close()  # writable, not only there
    except OSError as exc:
        raise ConfigError(f"--log-dir: cannot write the request logs to {settings.log_dir}: "
                          f"{exc.strerror or exc}") from None
    cache.add_listener(log.cache_event)
    studio = Studio(settings, choice.registry, cache, log, choice.notice, manager=manager)
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
