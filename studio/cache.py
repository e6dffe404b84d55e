"""The one owner of model lifetimes: a lazy-loading LRU cache that keeps resident models within a memory budget.

Every entry moves through these states (Ollama's scheduler and InvokeAI's cache are the models here):

    LOADING  -> RESIDENT -> EVICTING -> (gone)
       \\-> FAILED (gone: waiters get the same error, the next request tries again)

Rules, each one a fault seen in other model managers:
- look-up and pin are one atomic step under the lock, so a model cannot be evicted between "get" and "use";
- concurrent requests for a model that is loading wait for that one load (single flight);
- only idle (unpinned) RESIDENT entries are evicted, least recently used first; an EVICTING entry is never
  handed out, a request for it waits and then loads it afresh;
- memory is reserved from the estimate before loading, so the budget is never exceeded, and corrected to the
  measured size after;
- reading weights and freeing memory happen outside the lock; only bookkeeping is under it;
- memory a model uses beyond its weights while it serves (a batching engine's KV cache: its "workspace") is
  reserved from the same budget, strictly: idle models are evicted to make room, else the reservation is refused
  and the request waits; a model that holds such resources is closed when it is evicted;
- a model kept loaded (`keep`, Ollama's keep-alive) is never chosen for eviction; only an explicit `unload`
  frees it, and a load that only its memory stands in the way of is refused at once instead of waiting.

A loaded model may offer three hooks (studio/backends/chat.py's TransformersChat does): `bind_workspace(workspace)`,
called once after the load with its `Workspace`; `close()`, called when it is evicted, before its references are
dropped; and `serving()` -> (running, waiting), its activity in the snapshot.

The serving strategies are settings of this one cache: `lru` keeps models until memory is needed, `swap` frees a
model as soon as its last user is done, `preload` loads models at start-up (see `preload`).
"""

from __future__ import annotations

import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Callable, Iterable, Iterator, Literal

from studio import devices
from studio.config import format_size
from studio.modalities import resolve
from studio.registry import ModelSpec, Registry
from studio.weights import ensure_local, estimate_bytes


class State(str, Enum):
    LOADING = "loading"
    RESIDENT = "resident"
    EVICTING = "evicting"
    FAILED = "failed"  # terminal: the entry has left the table


class CacheError(RuntimeError):
    """A model could not be made available; the message is meant for the user."""


class ModelTooLarge(CacheError):
    pass


class CacheBusy(CacheError):
    pass


class ModelLoadError(CacheError):
    pass


@dataclass(frozen=True)
class CacheEvent:
    """What a listener hears: a request found its model resident (hit), a load finished or failed, an eviction."""

    kind: Literal["hit", "load", "load_failed", "evict"]
    model: str
    seconds: float | None = None  # load time
    bytes: int | None = None  # the model's size (load, evict)
    error: str | None = None  # the failed load's exception type


Listener = Callable[[CacheEvent], None]


@dataclass(frozen=True)
class Workspace:
    """What a loaded model may use beyond its weights while it serves: memory reserved from the budget (False:
    it does not fit now; ask again later), and how many requests it may serve at once and wait for memory."""

    reserve: Callable[[int], bool]
    release: Callable[[int], None]
    max_sequences: int  # --max-batch
    max_wait_s: float  # --load-timeout


@dataclass(eq=False)
class Entry:
    spec: ModelSpec
    state: State
    bytes: int  # the estimate while LOADING, the measured size once RESIDENT
    model: Any = None
    pins: int = 0
    last_used: float = 0.0
    load_seconds: float = 0.0
    error: BaseException | None = None
    moved_to: str | None = None  # the device a call moved the model to (ZeroGPU); None: the cache's device
    moving: threading.Lock = field(default_factory=threading.Lock)
    workspace: int = 0  # bytes reserved while serving, beyond the weights (KV cache)


@dataclass(frozen=True)
class Lease:
    """What a request holds while it uses a model, plus what the request log wants to know about it."""

    model: Any
    spec: ModelSpec
    hit: bool  # the model was already resident
    wait_seconds: float  # waiting for memory or for another request's load of the same model
    load_seconds: float  # this request's own load (0 on a hit)


@dataclass(frozen=True)
class ModelStatus:
    id: str
    modality: str
    state: str
    bytes: int
    pins: int  # requests using it now
    idle_seconds: float
    load_seconds: float
    device: str  # where it computes now: the cache's device, or a call's (ZeroGPU) while one uses it
    workspace_bytes: int = 0  # reserved beyond the weights while serving (a batching engine's KV cache)
    kept: bool = False  # kept loaded: eviction passes it by
    running: int | None = None  # sequences in its batch now (models that batch)
    waiting: int | None = None  # requests waiting for a batch slot or workspace


@dataclass(frozen=True)
class CacheSnapshot:
    device: str
    strategy: str
    budget_bytes: int
    used_bytes: int  # held by resident (and not yet freed) models, their workspace included
    peak_bytes: int
    hits: int
    misses: int
    loads: int
    load_failures: int
    evictions: int
    load_seconds: float
    models: list[ModelStatus] = field(default_factory=list)


_PATH = re.compile(r"(?<![\w.:/])/(?:[^/\s'\"():]+/)+([^/\s'\"():]+)")


def without_paths(message: str) -> str:
    """An error message without this machine's paths: an absolute path becomes the file's own name."""
    return _PATH.sub(r"\1", message)


def load_from_registry(spec: ModelSpec, device: str) -> Any:
    """The default loader: get the files onto the disk, then call the backend named by the registry."""
    path = ensure_local(spec)
    return resolve(spec.loader)(spec, path, device, spec.dtype(device))


class ModelCache:
    def __init__(
        self,
        registry: Registry,
        *,
        budget: int,
        device: str = "cpu",
        strategy: str = "lru",
        load_timeout: float = 300.0,
        max_batch: int = 16,
        loader: Callable[[ModelSpec, str], Any] = load_from_registry,
        estimate: Callable[[ModelSpec, str], int] | None = None,
        measure: Callable[[Any], int] = devices.module_bytes,
    ):
        self.registry = registry
        self.budget = budget
        self.device = device
        self.strategy = strategy
        self.load_timeout = load_timeout
        self.max_batch = max_batch
        self._loader = loader
        self._estimate = estimate or (lambda spec, dev: 0 if spec.external else estimate_bytes(spec, spec.dtype(dev)))
        self._measure = measure
        self._cond = threading.Condition(threading.RLock())
        self._entries: dict[str, Entry] = {}
        self._kept: set[str] = set()
        self._last_used: dict[str, float] = {}  # wall-clock time of each model's last use, kept after eviction
        self._listeners: list[Listener] = []
        self._peak = 0
        self._counts = {"hits": 0, "misses": 0, "loads": 0, "load_failures": 0, "evictions": 0}
        self._load_seconds = 0.0

    # ------------------------------------------------------------------ public API

    @contextmanager
    def use(self, model_id: str, run_on: str | None = None) -> Iterator[Lease]:
        """Pin the model for the duration of the block, loading it first if needed.

        `run_on` is a device the model computes on during the block when it differs from the cache's own
        (ZeroGPU: models are kept on the CPU and the GPU exists only during a call); the model moves back to
        the cache's device when its last user is done.
        """
        spec = self.registry.get(model_id)
        entry, hit, waited, load_seconds = self._acquire(spec)
        try:
            if run_on and run_on != self.device:
                self._move(entry, run_on)
            yield Lease(entry.model, spec, hit, waited, load_seconds)
        finally:
            self._release(entry)

    def preload(self, model_ids: Iterable[str]) -> None:
        """Load models now (the `preload` strategy, or `--preload`), so the first request does not wait."""
        for model_id in model_ids:
            with self.use(model_id):
                pass

    def unload(self, model_id: str) -> bool:
        """Evict one idle model now (the Models tab's button), kept loaded or not (it stops being kept); False if
        it is in use or not resident."""
        with self._cond:
            entry = self._entries.get(model_id)
            if entry is None or entry.state is not State.RESIDENT or entry.pins:
                return False
            entry.state = State.EVICTING
            self._kept.discard(model_id)
        self._evict([entry])
        return True

    def keep(self, model_id: str, on: bool = True) -> None:
        """Keep a model loaded, or stop keeping it. Keeping loads it now (waiting for the load) and no eviction
        chooses it until `keep(id, False)` or an explicit `unload`; a load that fails keeps nothing."""
        self.registry.get(model_id)  # an unknown id is the caller's error
        with self._cond:
            if on:
                self._kept.add(model_id)
            else:
                self._kept.discard(model_id)
                self._cond.notify_all()  # a load waiting for memory may get it now
        if not on:
            return
        try:
            self.preload([model_id])
        except BaseException:
            with self._cond:
                self._kept.discard(model_id)
            raise

    def kept(self) -> set[str]:
        """The models kept loaded."""
        with self._cond:
            return set(self._kept)

    def last_used(self) -> dict[str, float]:
        """When each model was last used (time.time()), also after it was evicted."""
        with self._cond:
            return dict(self._last_used)

    def forget(self, model_id: str) -> None:
        """Drop what the cache remembers of a model that left the registry (it must not be resident)."""
        with self._cond:
            self._kept.discard(model_id)
            self._last_used.pop(model_id, None)

    def grow(self, model_id: str, nbytes: int) -> None:
        """Count memory a pinned model gained while in use (a LoRA adapter loaded into it; negative when freed).

        Idle models are evicted, least recently used first, to stay within the budget; when every other model
        is in use the budget is exceeded until they are released, as after a load measured above its estimate.
        """
        with self._cond:
            entry = self._entries.get(model_id)
            if entry is None or not entry.pins:
                raise ValueError(f"{model_id} is not in use; only a pinned model can grow")
            entry.bytes += nbytes
            victims = self._victims(0) if nbytes > 0 else []
            if victims is None:  # the rest is in use too: free what we can
                victims = self._evictable()
            for victim in victims:
                victim.state = State.EVICTING
            self._peak = max(self._peak, self._held())
            self._cond.notify_all()  # a shrink may let a waiting load in
        self._evict(victims)

    def clear(self) -> list[str]:
        """Evict every idle model; models in use and models kept loaded stay."""
        with self._cond:
            victims = self._evictable()
            for entry in victims:
                entry.state = State.EVICTING
        self._evict(victims)
        return [e.spec.id for e in victims]

    def add_listener(self, callback: Listener) -> None:
        """Called with every CacheEvent (metrics and the cache log)."""
        self._listeners.append(callback)

    def resident(self, model_id: str) -> bool:
        """Whether the model is in memory now (a request for it will not wait for a load)."""
        with self._cond:
            entry = self._entries.get(model_id)
            return entry is not None and entry.state is State.RESIDENT

    def snapshot(self) -> CacheSnapshot:
        now = time.monotonic()
        with self._cond:
            entries = list(self._entries.values())
            models = [
                ModelStatus(e.spec.id, e.spec.modality, e.state.value, e.bytes, e.pins,
                            0.0 if e.pins else round(now - e.last_used, 1), round(e.load_seconds, 3),
                            e.moved_to or self.device, e.workspace, e.spec.id in self._kept)
                for e in entries
            ]
            snap = CacheSnapshot(self.device, self.strategy, self.budget, self._held(), self._peak,
                                 load_seconds=round(self._load_seconds, 3), models=models, **self._counts)
        for index, entry in enumerate(entries):  # outside the lock: a model's own lock may be waiting for ours
            serving = getattr(entry.model, "serving", None)
            if serving is not None:
                running, waiting = serving()
                models[index] = replace(models[index], running=running, waiting=waiting)
        return snap

    # ------------------------------------------------------------------ internals

    def _used(self) -> int:
        """Memory spoken for: held by models and their workspace, plus reserved for loads in progress (what
        admission checks)."""
        return sum(e.bytes + e.workspace for e in self._entries.values())

    def _held(self) -> int:
        """Memory models really hold. A load frees its victims before it starts and loads run one at a time,
        so this, not `_used`, is what the device sees."""
        return sum(e.bytes + e.workspace for e in self._entries.values() if e.state is not State.LOADING)

    def _emit(self, kind: str, model: str, **details: Any) -> None:
        event = CacheEvent(kind, model, **details)
        for callback in self._listeners:
            callback(event)

    def _acquire(self, spec: ModelSpec) -> tuple[Entry, bool, float, float]:
        start = time.monotonic()
        deadline = start + self.load_timeout
        waited_on_another = False
        with self._cond:
            entry = self._entries.get(spec.id)
            if entry is not None and entry.state is State.RESIDENT:
                return self._pin(entry), True, time.monotonic() - start, 0.0
        need = self._sized(spec)  # a miss: size it before taking the lock (it reads the weights' headers)
        with self._cond:
            while True:
                entry = self._entries.get(spec.id)
                if entry is not None and entry.state is State.RESIDENT:
                    return self._pin(entry), not waited_on_another, time.monotonic() - start, 0.0
                if entry is not None:  # LOADING or EVICTING: wait for it to settle
                    waited_on_another = True
                    self._cond.wait(timeout=1.0)
                    if entry.state is State.FAILED:
                        raise ModelLoadError(str(entry.error)) from entry.error
                    continue
                if need > self.budget:
                    raise ModelTooLarge(
                        f"{spec.id} needs about {format_size(need)} at {spec.dtype(self.device)}, more than the "
                        f"whole memory budget of {format_size(self.budget)}; raise --memory-budget or pick a "
                        "smaller model")
                victims = self._victims(need)
                if victims is None:
                    self._refuse_if_kept_in_the_way(spec, need)
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise CacheBusy(
                            f"{spec.id} needs {format_size(need)} but every resident model is in use; waited "
                            f"{self.load_timeout:.0f} s. Try again when the other requests finish.")
                    self._cond.wait(timeout=min(remaining, 1.0))
                    continue
                for victim in victims:
                    victim.state = State.EVICTING
                entry = Entry(spec, State.LOADING, bytes=need, pins=1)
                self._entries[spec.id] = entry
                self._counts["misses"] += 1
                break
        waited = time.monotonic() - start
        self._evict(victims)
        self._load(entry)
        return entry, False, waited, entry.load_seconds

    def _pin(self, entry: Entry) -> Entry:
        entry.pins += 1
        self._counts["hits"] += 1
        self._emit("hit", entry.spec.id)
        return entry

    def _sized(self, spec: ModelSpec) -> int:
        """The model's estimated size; weights that cannot even be sized (a damaged file) are a failed load."""
        try:
            return self._estimate(spec, self.device)
        except Exception as exc:
            with self._cond:
                self._counts["load_failures"] += 1
            self._emit("load_failed", spec.id, error=type(exc).__name__)
            raise ModelLoadError(f"could not load {spec.id}: {without_paths(str(exc))}") from exc

    def _evictable(self) -> list[Entry]:
        """Resident models nobody uses and nobody asked to keep loaded."""
        return [e for e in self._entries.values()
                if e.state is State.RESIDENT and not e.pins and e.spec.id not in self._kept]

    def _refuse_if_kept_in_the_way(self, spec: ModelSpec, need: int) -> None:
        """Waiting helps when models in use will be released; it does not when models kept loaded hold the room."""
        kept = [e for e in self._entries.values() if e.spec.id in self._kept]
        if kept and need > self.budget - sum(e.bytes + e.workspace for e in kept):
            names = ", ".join(sorted(e.spec.id for e in kept))
            raise ModelTooLarge(
                f"{spec.id} needs about {format_size(need)}, but models kept loaded ({names}) hold "
                f"{format_size(sum(e.bytes + e.workspace for e in kept))} of the {format_size(self.budget)} budget; stop keeping "
                "one loaded (Models tab) or raise --memory-budget")

    def _victims(self, need: int) -> list[Entry] | None:
        """Least recently used idle models whose eviction makes room for `need` bytes; None if impossible."""
        free = self.budget - self._used()
        if need <= free:
            return []
        victims = []
        idle = sorted(self._evictable(), key=lambda e: e.last_used)
        for entry in idle:
            victims.append(entry)
            free += entry.bytes + entry.workspace
            if need <= free:
                return victims
        return None

    @contextmanager
    def working_memory(self, model_id: str, nbytes: int) -> Iterator[None]:
        """Hold `nbytes` of the budget beside a pinned model while it computes (a generation's activations on a
        GPU), evicting idle models for them; waits up to the load timeout for room, and refuses at once a
        generation that could never fit (ModelTooLarge: the model and its working memory exceed the budget)."""
        if nbytes <= 0:
            yield
            return
        with self._cond:
            entry = self._entries.get(model_id)
            if entry is None or not entry.pins:
                raise ValueError(f"{model_id} is not in use; only a pinned model computes")
            if entry.bytes + entry.workspace + nbytes > self.budget:
                raise ModelTooLarge(
                    f"{model_id}: this generation needs about {format_size(nbytes)} of working memory beside the "
                    f"model's {format_size(entry.bytes)}, more than the {format_size(self.budget)} budget; make "
                    "it smaller (size, images, frames) or raise --memory-budget")
        deadline = time.monotonic() + self.load_timeout
        while not self._reserve(entry, nbytes):
            with self._cond:
                if time.monotonic() >= deadline:
                    raise CacheBusy(f"{model_id}: no room for this generation's working memory within "
                                    f"{self.load_timeout:.0f} s. Try again when the other requests finish.")
                self._cond.wait(min(1.0, max(0.0, deadline - time.monotonic())))
        try:
            yield
        finally:
            self._unreserve(entry, nbytes)

    def _reserve(self, entry: Entry, nbytes: int) -> bool:
        """Reserve workspace for a resident model (a sequence's KV cache), evicting idle models, least recently
        used first, if that makes room; False when it cannot fit now (the caller waits and asks again)."""
        with self._cond:
            victims = self._victims(nbytes)  # idle models only: the model reserving is in use, so never itself
            if entry.state is not State.RESIDENT or victims is None:
                return False
            for victim in victims:
                victim.state = State.EVICTING
            entry.workspace += nbytes
        self._evict(victims)  # before the caller allocates: the peak is what is held once they are gone
        with self._cond:
            self._peak = max(self._peak, self._held())
        return True

    def _unreserve(self, entry: Entry, nbytes: int) -> None:
        with self._cond:
            entry.workspace = max(0, entry.workspace - nbytes)
            self._cond.notify_all()

    def _load(self, entry: Entry) -> None:
        spec = entry.spec
        try:
            with devices.loading:  # one load at a time, process-wide: see there; also exact CUDA memory deltas
                before = devices.allocated_bytes(self.device)
                start = time.monotonic()
                model = self._loader(spec, self.device)
                seconds = time.monotonic() - start
                after = devices.allocated_bytes(self.device)
            measured = after - before if before is not None and after is not None else self._measure(model)
        except BaseException as exc:
            with self._cond:
                entry.state, entry.error = State.FAILED, exc
                del self._entries[spec.id]
                self._counts["load_failures"] += 1
                self._cond.notify_all()
            devices.release_memory(self.device)
            self._emit("load_failed", spec.id, error=type(exc).__name__)
            if isinstance(exc, CacheError):
                raise
            raise ModelLoadError(f"could not load {spec.id} from {spec.source}: {without_paths(str(exc))}") from exc
        bind = getattr(model, "bind_workspace", None)
        if bind is not None:
            bind(Workspace(lambda nbytes: self._reserve(entry, nbytes), lambda nbytes: self._unreserve(entry, nbytes),
                           self.max_batch, self.load_timeout))
        with self._cond:
            entry.model = model
            entry.bytes = measured or entry.bytes
            entry.load_seconds = seconds
            entry.state = State.RESIDENT
            self._counts["loads"] += 1
            self._load_seconds += seconds
            self._peak = max(self._peak, self._held())
            victims = self._victims(0)  # [] unless the measured size came out above the estimate
            if victims is None:  # the estimate was low and the rest is in use: free what we can
                victims = self._evictable()
            for victim in victims:
                victim.state = State.EVICTING
            self._cond.notify_all()
        self._evict(victims)
        self._emit("load", spec.id, seconds=seconds, bytes=entry.bytes)

    def _move(self, entry: Entry, device: str) -> None:
        """Move a model between the cache's device and a call's; back home only once nobody uses it."""
        with entry.moving:
            with self._cond:
                model, busy = entry.model, entry.pins > 0
            current, home = entry.moved_to or self.device, device == self.device
            if model is None or current == device or (home and busy):
                return
            entry.moved_to = None if home else device  # set first: a move that fails halfway is undone on release
            devices.move(model, device)
            if home:
                devices.release_memory(current)

    def _release(self, entry: Entry) -> None:
        with self._cond:
            entry.pins -= 1
            entry.last_used = time.monotonic()
            self._last_used[entry.spec.id] = time.time()
        if entry.moved_to:
            self._move(entry, self.device)
        with self._cond:
            evict = (self.strategy == "swap" and entry.pins == 0 and entry.state is State.RESIDENT
                     and entry.spec.id not in self._kept)
            if evict:
                entry.state = State.EVICTING
            self._cond.notify_all()
        if evict:
            self._evict([entry])

    def _evict(self, victims: list[Entry]) -> None:
        """Drop every reference the cache holds, collect, and give the memory back to the device."""
        if not victims:
            return
        for entry in victims:
            close = getattr(entry.model, "close", None)
            if close is not None:
                close()
            entry.model = None
        devices.release_memory(self.device)
        with self._cond:
            for entry in victims:
                if self._entries.get(entry.spec.id) is entry:
                    del self._entries[entry.spec.id]
                self._counts["evictions"] += 1
            self._cond.notify_all()
        for entry in victims:
            self._emit("evict", entry.spec.id, bytes=entry.bytes)
