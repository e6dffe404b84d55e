"""The model manager behind the Models tab and `/models`: the whole catalog with what each model costs and where it
is, adding a model while the studio runs, removing one from disk, keeping one loaded, and rescanning the drop-in
folders.

Adding is two steps, as in a download box that asks before it fetches gigabytes: `plan` reads the model's
metadata (a Hub repo's config files and safetensors headers, or a local folder's files), detects its family and
sizes it (in memory at its dtype and quantization, on disk still to download), and refuses what cannot work —
an unsupported family, files that are no model, quantization this device cannot do, a model larger than the
memory budget, not enough free disk — with the model and the reason. `add` then downloads in the background with
progress (bytes, speed, time left) and a cancel; only a finished download is written to the user catalog and
registered, so a failed or cancelled one leaves no entry behind (its finished files stay in the Hugging Face
cache, and adding the model again fetches only the rest).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from studio import hub, modalities, usermodels, weights
from studio.cache import CacheError, ModelCache, ModelStatus, ModelTooLarge
from studio.config import Settings, format_size
from studio.contract import InputError, UnsupportedModel, require
from studio.quantization import MODALITIES as QUANTIZABLE, QUANTIZE_CHOICES
from studio.registry import ModelSpec, Registry

logger = logging.getLogger(__name__)


class NotEnoughDisk(CacheError):
    """A download that would not fit on the disk; nothing was fetched."""


@dataclass(frozen=True)
class ModelInfo:
    """One model as the Models tab and `GET /models` show it."""

    id: str
    label: str
    modality: str
    family: str | None
    origin: str  # built-in, catalog, drop-in or external
    source: str
    dtype: str | None  # on this studio's device (None: external)
    quantize: str | None
    size_bytes: int  # in memory at its dtype: measured when resident, else estimated before loading
    fits_budget: bool
    on_disk: bool  # loading it needs no download
    disk_bytes: int  # what its files take on disk now
    state: str  # "resident", "loading", "evicting" or "not loaded"
    in_use: int  # requests using it now
    keep_loaded: bool
    last_used: float | None  # time.time() of its last use in this process
    external: bool
    workspace_bytes: int = 0  # reserved beyond its weights while it serves (a batching engine's KV cache)
    running: int | None = None  # sequences in its batch now (models that batch)
    waiting: int | None = None  # requests waiting for a batch slot


@dataclass(frozen=True)
class Plan:
    """What adding a model will do, checked: shown before the download starts."""

    spec: ModelSpec
    entry: usermodels.UserEntry  # what goes into the user catalog
    family_label: str
    dtype: str  # on this studio's device
    size_bytes: int  # in memory at its dtype and quantization
    download_bytes: int  # still to fetch (0 for a local model, or one already in the cache)
    free_disk_bytes: int
    budget_bytes: int
    files: tuple[str, ...] = ()  # the Hub files loading it reads


@dataclass(eq=False)
class Download:
    """One model being added: its progress, and how it ended."""

    model: str
    total: int  # bytes to fetch
    done: int = 0
    state: str = "downloading"  # downloading, done, failed or cancelled
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def advance(self, nbytes: int) -> None:
        with self.changed:
            self.done += nbytes
            self.changed.notify_all()

    def end(self, state: str, error: str | None = None) -> None:
        with self.changed:
            self.state, self.error, self.ended = state, error, time.monotonic()
            self.changed.notify_all()

    def wait(self, seen: int, timeout: float) -> None:
        """Block until progress passes `seen` bytes or the download ends (or `timeout` seconds pass)."""
        with self.changed:
            self.changed.wait_for(lambda: self.done != seen or self.state != "downloading", timeout)

    @property
    def finished(self) -> bool:
        return self.state != "downloading"

    def status(self) -> dict[str, Any]:
        """Bytes, speed and time left, for the progress bar and the SSE events."""
        seconds = (self.ended or time.monotonic()) - self.started
        speed = self.done / seconds if seconds > 0 else 0.0
        left = (self.total - self.done) / speed if speed > 0 and not self.finished else None
        return {"model": self.model, "state": self.state, "done_bytes": self.done, "total_bytes": self.total,
                "fraction": round(self.done / self.total, 4) if self.total else (1.0 if self.finished else 0.0),
                "bytes_per_s": round(speed), "seconds_left": None if left is None else round(left, 1),
                "error": self.error}


@dataclass(frozen=True)
class Removal:
    model: str
    freed_bytes: int
    unregistered: bool  # the entry left the catalog (user models); built-in ones stay, to download again on use


class ModelManager:
    """The one place models are added, removed, kept loaded and rescanned while the studio runs."""

    def __init__(self, registry: Registry, cache: ModelCache, settings: Settings,
                 problems: list[usermodels.Problem] | None = None):
        self.registry = registry
        self.cache = cache
        self.settings = settings
        self._catalog_problems = list(problems or [])  # from the catalog file at start-up
        self._scan_problems: list[usermodels.Problem] = []  # from the last scan of the drop-in folders
        self._downloads: dict[str, Download] = {}
        self._lock = threading.Lock()

    @property
    def device(self) -> str:
        return self.cache.device

    @property
    def problems(self) -> list[usermodels.Problem]:
        """Models that were left out, and why."""
        return self._catalog_problems + self._scan_problems

    # ------------------------------------------------------------------------------------------ the catalog

    def catalog(self, modality: str | None = None) -> list[ModelInfo]:
        """Every model (built-in, user catalog, drop-in, external), optionally of one modality."""
        snapshot = {m.id: m for m in self.cache.snapshot().models}
        last_used, kept = self.cache.last_used(), self.cache.kept()
        return [self._info(spec, snapshot.get(spec.id), last_used.get(spec.id), spec.id in kept)
                for spec in self.registry if modality is None or spec.modality == modality]

    def _info(self, spec: ModelSpec, status: ModelStatus | None, last_used: float | None, kept: bool) -> ModelInfo:
        if spec.external:
            return ModelInfo(spec.id, spec.label, spec.modality, spec.family, spec.origin, spec.source, None, None,
                             0, True, True, 0, "external", status.pins if status else 0, kept, last_used, True)
        dtype = spec.dtype(self.device)
        size = status.bytes if status is not None else weights.estimate_bytes(spec, dtype)
        return ModelInfo(spec.id, spec.label, spec.modality, spec.family, spec.origin, spec.source, dtype,
                         spec.quantize, size, size <= self.cache.budget, weights.is_cached(spec),
                         weights.disk_bytes(spec), status.state if status else "not loaded",
                         status.pins if status else 0, kept, last_used, False,
                         status.workspace_bytes if status else 0, status.running if status else None,
                         status.waiting if status else None)

    def choices(self, modality: str) -> list[tuple[str, str]]:
        """A model picker's (text, id) pairs: the label, the size in memory and whether it is loaded."""
        resident = {m.id: m.bytes for m in self.cache.snapshot().models if m.state == "resident"}
        pairs = []
        for spec in self.registry.of(modality):
            if spec.external:
                size = "external"
            else:
                size = format_size(resident.get(spec.id) or weights.estimate_bytes(spec, spec.dtype(self.device)))
            pairs.append((f"{spec.label} · {size}{' · loaded' if spec.id in resident else ''}", spec.id))
        return pairs

    # ------------------------------------------------------------------------------------------ adding

    def plan(self, source: str, *, model_id: str | None = None, modality: str | None = None,
             label: str | None = None, revision: str | None = None, dtype: str | None = None,
             quantize: str | None = None, options: dict | None = None) -> Plan:
        """Read a model's metadata and check that adding it can work; raises InputError (the field and why),
        ModelTooLarge or NotEnoughDisk, each naming the model."""
        source = (source or "").strip()
        require(bool(source), "source", "paste a Hub repo id (org/name) or a local folder or file")
        require(dtype in (None, *usermodels.DTYPES), "dtype", f"must be one of {', '.join(usermodels.DTYPES)}")
        require(quantize in (None, "", *QUANTIZE_CHOICES), "quantize", f"must be one of {', '.join(QUANTIZE_CHOICES)}")
        local, folder = self._files(source, revision or "main")
        try:
            detected, family = usermodels.recognise(folder)
        except UnsupportedModel as exc:
            raise InputError("source", f"{source}: {exc}") from None
        kind = modality or detected.name
        require(kind in modalities.names(), "modality", f"must be one of {', '.join(modalities.names())}")
        model_id = (model_id or "").strip() or usermodels.slug(
            local.stem if local is not None and local.is_file() else source.rstrip("/").split("/")[-1])
        require(model_id == usermodels.slug(model_id), "id",
                f"{model_id!r}: use lower-case letters, digits, '.', '_' and '-'")
        require(model_id not in self.registry, "id", f"{model_id!r} is already a model of this studio; pick another id")
        problems = modalities.resolve(modalities.get(kind).options).problems(options or {})
        require(not problems, "options", problems[0] if problems else "")
        entry = usermodels.UserEntry(id=model_id, modality=kind, source=source, label=label or None,
                                     revision=revision or None, dtype=dtype, quantize=quantize or None,
                                     options=dict(options or {}))
        try:
            spec = usermodels.resolve(entry, Path.cwd(), self.device)
        except InputError as exc:
            raise InputError(exc.field, f"{model_id}: {exc.message}") from None
        files, need = self._to_fetch(spec)
        dtype = spec.dtype(self.device)
        plan = Plan(spec, entry, family.label, dtype, weights.estimate_bytes(spec, dtype), need,
                    hub.free_bytes(hub.cache_dir()), self.cache.budget, files)
        self._refuse_what_cannot_fit(plan)
        return plan

    def _files(self, source: str, revision: str) -> tuple[Path | None, Path]:
        """(the local file or folder, or None for a Hub repo; a folder or file to recognise the model from)."""
        local = usermodels.local_source(source, Path.cwd())
        if local is not None:
            return local, local
        require(hub.is_repo_id(source), "source",
                f"{source!r} is neither a file or folder on this machine nor a Hub repo id (org/name)")
        try:
            return None, usermodels.hub_files(source, revision)
        except usermodels.Unreachable as exc:
            raise InputError("source", str(exc)) from None

    def _to_fetch(self, spec: ModelSpec) -> tuple[tuple[str, ...], int]:
        """The Hub files loading the model reads, and the bytes of those not in the cache yet."""
        if not spec.repo or weights.local_files(spec) is not None:
            return (), 0
        from huggingface_hub import try_to_load_from_cache

        try:
            _commit, files = hub.list_files(spec.repo, spec.revision)
        except Exception as exc:
            raise InputError("source", f"{spec.repo}: cannot list its files on the Hub ({type(exc).__name__})") \
                from None
        wanted = hub.wanted(files)
        missing = [f for f in wanted
                   if not isinstance(try_to_load_from_cache(spec.repo, f.path, revision=spec.revision), str)]
        return tuple(f.path for f in wanted), sum(f.size for f in missing)

    def _refuse_what_cannot_fit(self, plan: Plan) -> None:
        spec = plan.spec
        if plan.size_bytes > plan.budget_bytes:
            dtype = plan.dtype
            hint = "raise --memory-budget or pick a smaller model"
            if spec.quantize is None and spec.modality in QUANTIZABLE:
                smaller = weights.estimate_bytes(replace(spec, quantize="int8"), dtype)
                if smaller <= plan.budget_bytes:
                    hint = f"add it with quantize int8 (about {format_size(smaller)}), or raise --memory-budget"
            raise ModelTooLarge(f"{spec.id} needs about {format_size(plan.size_bytes)} at {dtype}"
                                f"{' quantized ' + spec.quantize if spec.quantize else ''}, more than the whole memory "
                                f"budget of {format_size(plan.budget_bytes)}; {hint}")
        if plan.download_bytes > plan.free_disk_bytes:
            raise NotEnoughDisk(f"{spec.id} needs {format_size(plan.download_bytes)} of disk for its download, but "
                                f"only {format_size(plan.free_disk_bytes)} is free in {hub.cache_dir()}; free some "
                                "space (Remove from disk in the Models tab) or set HF_HOME to a larger disk")

    def add(self, plan: Plan) -> Download:
        """Download what the plan needs in the background; once complete, write the model into the user catalog
        and register it. The returned Download reports progress and ends done, failed or cancelled."""
        with self._lock:
            running = self._downloads.get(plan.spec.id)
            require(running is None or running.finished, "id", f"{plan.spec.id} is being downloaded already")
            job = self._downloads[plan.spec.id] = Download(plan.spec.id, plan.download_bytes)
        if not plan.download_bytes:
            self._finish(plan, job)
            return job
        threading.Thread(target=self._fetch, args=(plan, job), name=f"download-{plan.spec.id}", daemon=True).start()
        return job

    def _fetch(self, plan: Plan, job: Download) -> None:
        try:
            hub.download(plan.spec.repo, plan.spec.revision, list(plan.files), job.advance, job.cancel)
        except hub.DownloadCancelled:
            job.end("cancelled")
            return
        except Exception as exc:
            logger.warning("download of %s failed: %s", plan.spec.id, exc)
            job.end("failed", f"{type(exc).__name__}: {exc}")
            return
        self._finish(plan, job)

    def _finish(self, plan: Plan, job: Download) -> None:
        """Written to the catalog file first, then registered: a studio restarted now finds it too."""
        try:
            if weights.local_files(plan.spec) is None and plan.spec.repo:
                raise RuntimeError("the download ended without every file in the cache")
            usermodels.append_entry(self.settings.models_file, plan.entry)
            self.registry.add(plan.spec)
        except (OSError, RuntimeError, ValueError) as exc:
            job.end("failed", f"{type(exc).__name__}: {exc}")
            return
        job.end("done")

    def download(self, model_id: str) -> Download | None:
        """The model's running (or last) download."""
        return self._downloads.get(model_id)

    def downloads(self) -> list[Download]:
        """The downloads running now (a model being added is not in the catalog until it is complete)."""
        return [job for job in list(self._downloads.values()) if not job.finished]

    def cancel(self, model_id: str) -> bool:
        """Cancel a running download; False when none runs."""
        job = self._downloads.get(model_id)
        if job is None or job.finished:
            return False
        job.cancel.set()
        return True

    # ------------------------------------------------------------------------------------------ removing

    def remove(self, model_id: str) -> Removal:
        """Unload the model and free its files on disk. A user catalog entry leaves the catalog; a built-in one
        stays (its files download again on use). The user's own files (a local path, a drop-in) are never
        deleted: such an entry is only taken out of the catalog. Removing a model that is still downloading cancels
        the download."""
        if model_id not in self.registry and self.cancel(model_id):
            return Removal(model_id, 0, True)
        spec = self.registry.get(model_id)
        model_id = spec.id  # an alias names its model
        if spec.provider is not None:
            raise InputError("model", f"{model_id} is served by {spec.provider.name}; remove it from the providers "
                             "file")
        require(spec.origin != "drop-in", "model", f"{model_id} is a drop-in model: delete {spec.path} yourself "
                "(the studio does not delete your files), then press Refresh")
        require(spec.repo or spec.build or spec.origin == "catalog", "model",
                f"{model_id} ships inside a Python package; there is nothing to remove")
        self.cancel(model_id)
        if self.cache.resident(model_id):
            require(self.cache.unload(model_id), "model",
                    f"{model_id} is in use; remove it when its requests have ended")
        freed = 0
        if spec.repo and not any(other.repo == spec.repo for other in self.registry if other.id != model_id):
            freed = hub.delete(spec.repo)
        elif spec.build:
            freed = weights.disk_bytes(spec)
            weights.remove_build(spec)
        unregister = spec.origin == "catalog"
        if unregister:
            usermodels.remove_entry(self.settings.models_file, model_id)
            self.registry.remove(model_id)
            self.cache.forget(model_id)
        return Removal(model_id, freed, unregister)

    # ------------------------------------------------------------------------------------------ memory

    def keep(self, model_id: str, on: bool) -> None:
        """Keep a model loaded (loading it now), or stop keeping it."""
        self.cache.keep(self.registry.get(model_id).id, on)

    def unload(self, model_id: str) -> bool:
        """Free a model's memory now (kept loaded or not); False when it was not loaded. Refused while in use."""
        model_id = self.registry.get(model_id).id
        if not self.cache.resident(model_id):
            return False
        require(self.cache.unload(model_id), "model", f"{model_id} is in use; unload it when its requests have ended")
        return True

    # ------------------------------------------------------------------------------------------ drop-in folders

    def refresh(self) -> tuple[list[str], list[str]]:
        """Scan the drop-in folders (at start-up, and on Refresh): new models are registered, ones whose files are
        gone leave (unless in use). Returns (added ids, removed ids); `problems` lists what was left out and why."""
        found, problems = usermodels.scan(self.settings.models_dir, self.registry, self.device)
        for spec in found:
            self.registry.add(spec)
        gone = []
        for spec in self.registry:
            if spec.origin == "drop-in" and not Path(spec.path).exists():
                if self.cache.resident(spec.id) and not self.cache.unload(spec.id):
                    continue  # in use: it goes at the next refresh
                self.registry.remove(spec.id)
                self.cache.forget(spec.id)
                gone.append(spec.id)
        self._scan_problems = problems
        usermodels.log_problems(problems)
        return [spec.id for spec in found], gone
