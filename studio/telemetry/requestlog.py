"""One row per generation, written the same way whether the request came from the UI or the HTTP API.

Format: JSON Lines, one file per UTC day (`requests-YYYY-MM-DD.jsonl`, plus `cache-YYYY-MM-DD.jsonl` for model
loads and evictions). Each row is one self-describing JSON object on one line, so:
- a row is appended with one `write()` on a file opened with O_APPEND, under an exclusive `flock`: rows from
  many threads (a lock) and many processes (the flock) sharing a folder never interleave;
- `os.write` is unbuffered: a row is in the kernel when `write` returns, so killing the process (even with
  SIGKILL) loses at most the row being written. `fsync` runs at most once per `fsync_interval` seconds (1 s by
  default; 0 syncs every row), which bounds what a power cut or kernel crash can lose;
- a torn last line (a writer killed mid-write on a filesystem without atomic appends, a full disk) is just an
  invalid line: the reader skips and counts it, and the next writer starts a fresh line after it;
- `pandas.read_json(path, lines=True)` reads a file directly.

Every row has the same columns (`columns()`: the common ones, then those the registered modalities declare);
fields a caller sets that are not columns go into `extra`. Prompts are personal data: the text is stored only
with `--log-prompts`, otherwise only its length and SHA-256.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import os
import re
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import orjson
import psutil

from studio import modalities
from studio.cache import CacheEvent

try:
    import fcntl
except ImportError:  # Windows: O_APPEND alone orders writes from several processes
    fcntl = None

logger = logging.getLogger(__name__)

# Set by the HTTP middleware for the request being served, so generation rows carry the same id as the
# X-Request-ID response header.
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

BASE_COLUMNS: tuple[str, ...] = (
    "ts", "request_id", "client", "session", "endpoint", "modality", "model", "adapters", "status", "error_type",
    "queue_ms", "latency_ms", "ttft_ms", "load_ms", "steps", "seed", "cache", "peak_memory_bytes", "prompt_chars",
    "prompt_sha256", "prompt", "external",
)
CACHE_COLUMNS: tuple[str, ...] = ("ts", "event", "model", "seconds", "bytes", "error_type")
_ENCODE = orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


_SURROGATE = re.compile("[\ud800-\udfff]")


def _encodable(value: Any) -> Any:
    """`value` with lone surrogates (which JSON text can carry but no UTF-8 can) replaced by U+FFFD, at any depth:
    a row is never lost over its content."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, Mapping):
        return {_encodable(k): _encodable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encodable(v) for v in value]
    return value


def columns() -> tuple[str, ...]:
    """Every request row's columns: the common ones, each registered modality's outputs, then `extra`."""
    return (*BASE_COLUMNS, *(c for c in modalities.log_columns() if c not in BASE_COLUMNS), "extra")


def utc_stamp(when: datetime) -> str:
    """ISO 8601 in UTC with milliseconds and a Z: sorts as text, parses fast in pandas."""
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class JsonlWriter:
    """Appends JSON objects as lines to `<folder>/<prefix>-YYYY-MM-DD.jsonl`, safe across threads and processes.

    `finished_day(path)` is called (on a thread of its own) with a day's file once the writer has moved on to the
    next day: the log reader compiles finished days into columnar copies (studio.telemetry.logreader)."""

    def __init__(self, folder: Path, prefix: str, *, fsync_interval: float = 1.0,
                 finished_day: Callable[[Path], None] | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.fsync_interval = fsync_interval
        self.finished_day = finished_day
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._day: int | None = None
        self._synced = time.monotonic()

    def write(self, row: Mapping[str, Any]) -> None:
        """Append one row to today's (UTC) file; raises OSError when the disk refuses it.

        The file is chosen by the time of writing, so each file only grows while it is today's."""
        try:
            data = orjson.dumps(row, default=str, option=_ENCODE)
        except orjson.JSONEncodeError:  # text that is not valid Unicode (a lone surrogate)
            data = orjson.dumps(_encodable(row), default=str, option=_ENCODE)
        with self._lock:
            fd = self._open(int(time.time() // 86400))
            if fcntl:
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":  # a torn row before us: start a new line
                    data = b"\n" + data
                view = memoryview(data)
                while view:  # a regular file takes it in one go; the loop only matters on odd filesystems
                    view = view[os.write(fd, view):]
                if time.monotonic() - self._synced >= self.fsync_interval:
                    os.fsync(fd)
                    self._synced = time.monotonic()
            finally:
                if fcntl:
                    fcntl.flock(fd, fcntl.LOCK_UN)

    def _open(self, day: int) -> int:
        """The descriptor for the file of `day` (days since 1970, UTC), reopened when the day changes or the
        file was deleted under us."""
        if self._fd is not None and (day != self._day or os.fstat(self._fd).st_nlink == 0):
            finished = self._path(self._day) if day != self._day else None
            self._close()
            if finished is not None and self.finished_day is not None:
                threading.Thread(target=self.finished_day, args=(finished,), name="log-day-done", daemon=True).start()
        if self._fd is None:
            self.folder.mkdir(parents=True, exist_ok=True)  # the folder may have been removed while we ran
            self._fd = os.open(self._path(day), os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            self._day = day
        return self._fd

    def _path(self, day: int) -> Path:
        return self.folder / f"{self.prefix}-{datetime.fromtimestamp(day * 86400, timezone.utc):%Y-%m-%d}.jsonl"

    def _close(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = self._day = None

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                self._close()


class _PeakMemory:
    """Peak memory while generations run: the CUDA allocator's peak, else the process's peak RSS (Linux VmHWM).

    The peak is reset when the first of overlapping generations starts, so with concurrent generations each
    row holds the peak of the whole overlapping window (an upper bound for that one request)."""

    def __init__(self, device: str):
        self.device = device
        self._active = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            self._active += 1
            if self._active == 1:
                self._reset()

    def stop(self) -> int | None:
        with self._lock:
            self._active -= 1
        try:
            return self._read()
        except (OSError, RuntimeError, AttributeError):  # no /proc, no CUDA context: the row still goes out
            return None

    def _reset(self) -> None:
        try:
            if self.device == "cuda":
                import torch

                torch.cuda.reset_peak_memory_stats()
            else:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")  # resets VmHWM to the current RSS
        except (OSError, RuntimeError):
            pass  # then the reading is the peak since start-up

    def _read(self) -> int:
        if self.device == "cuda":
            import torch

            return int(torch.cuda.max_memory_allocated())
        try:
            with open("/proc/self/status", "rb") as fh:
                return int(re.search(rb"VmHWM:\s+(\d+)", fh.read()).group(1)) * 1024
        except OSError:
            return psutil.Process().memory_info().rss


class Recorder:
    """Collects one generation's fields while it runs; the request log writes them as a row at the end.

    `set(stopped=True)` logs the generation as stopped, `set(cancelled=True)` as cancelled (its client went
    away); a streaming backend sets `stopped=False` when it reaches
    its end, so a consumer that closes the stream after the final event is not mistaken for a stop."""

    def __init__(self, request_id: str | None = None, **fields: Any):
        self.fields: dict[str, Any] = fields
        self.started = time.monotonic()
        self.ts = datetime.now(timezone.utc)
        # The caller's id (a UI generation's, which its error message shows), else the HTTP request's.
        self.request_id = request_id or REQUEST_ID.get() or os.urandom(16).hex()

    def set(self, **fields: Any) -> None:
        self.fields.update(fields)

    def first_output(self) -> None:
        """Mark the first token / step / audio piece (time to first output), once."""
        self.fields.setdefault("ttft_ms", round((time.monotonic() - self.started) * 1000, 1))


def _adapters(value: Any) -> dict[str, float] | None:
    """{name: weight}; a plain list of names means weight 1."""
    if not value:
        return None
    if isinstance(value, Mapping):
        return {str(name): float(weight) for name, weight in value.items()}
    return {str(name): 1.0 for name in value}


class RequestLog:
    """The request log of one folder. `record()` wraps a generation; listeners (metrics) see every row."""

    def __init__(self, folder: Path, *, log_prompts: bool = False, device: str = "cpu", fsync_interval: float = 1.0,
                 finished_day: Callable[[Path], None] | None = None):
        self.folder = Path(folder)
        self.log_prompts = log_prompts
        self._requests = JsonlWriter(self.folder, "requests", fsync_interval=fsync_interval, finished_day=finished_day)
        self._cache = JsonlWriter(self.folder, "cache", fsync_interval=fsync_interval, finished_day=finished_day)
        self._memory = _PeakMemory(device)
        self._listeners: list[Callable[[dict], None]] = []
        self.write_errors = 0  # rows the disk refused since the start
        self.failing = False  # the last request row could not be written (/health says "degraded")

    def add_listener(self, callback: Callable[[dict], None]) -> None:
        """Called with every row after it is written (metrics feed on them)."""
        self._listeners.append(callback)

    def shape(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """A row with exactly `columns()`: the prompt becomes length + hash (+ text with --log-prompts), unknown
        fields go into `extra`."""
        fields = dict(fields)
        prompt = fields.pop("prompt", None)
        if prompt is not None:
            text = prompt if isinstance(prompt, str) else orjson.dumps(prompt, default=str).decode()
            digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
            fields.update(prompt_chars=len(text), prompt_sha256=digest,
                          prompt=text if self.log_prompts else None)
        fields["adapters"] = _adapters(fields.get("adapters"))
        names = columns()
        extra = {k: v for k, v in fields.items() if k not in names}
        row = {column: fields.get(column) for column in names}
        row["extra"] = {**(fields.get("extra") or {}), **extra} or None
        return row

    def write(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Write one request row (shaped to COLUMNS; `ts` a datetime, ISO text or None for now) and tell the
        listeners; returns the row.

        A disk that refuses the row is reported and counted (`write_errors`), never raised into the request."""
        row = self.shape(fields)
        ts = row["ts"] or datetime.now(timezone.utc)
        when = ts if isinstance(ts, datetime) else datetime.fromisoformat(ts)
        row["ts"] = utc_stamp(when)
        try:
            self._requests.write(row)
            self.failing = False
        except OSError as exc:
            self.write_errors += 1
            self.failing = True
            logger.error("request log: could not write to %s: %s", self.folder, exc)
        for callback in self._listeners:
            try:
                callback(row)
            except Exception:
                logger.exception("request log listener failed")
        return row

    @contextmanager
    def record(self, **fields: Any) -> Iterator[Recorder]:
        """Time a generation and write its row, with status and error type, however it ends."""
        rec = Recorder(**fields)
        self._memory.start()
        status, error = "ok", None
        try:
            yield rec
        except GeneratorExit:  # the consumer stopped reading a streamed generation ...
            # ... which is normal after the final event: a backend that reached its end said stopped=False
            status = "stopped" if rec.fields.get("stopped", True) else "ok"
            raise
        except BaseException as exc:
            status, error = "error", type(exc).__name__
            raise
        finally:
            if rec.fields.pop("stopped", False) and status == "ok":
                status = "stopped"
            if rec.fields.pop("cancelled", False) and status in ("ok", "stopped"):
                status = "cancelled"  # the client went away: ended like a Stop, and nobody got the answer
            self.write({
                **rec.fields,
                "ts": rec.ts,
                "request_id": rec.request_id,
                "status": status,
                "error_type": error,
                "latency_ms": round((time.monotonic() - rec.started) * 1000, 1),
                "peak_memory_bytes": self._memory.stop(),
            })

    def cache_event(self, event: CacheEvent) -> None:
        """A ModelCache listener: loads, failed loads and evictions go to the cache log (hits are in the rows)."""
        if event.kind == "hit":
            return
        row = {"ts": utc_stamp(datetime.now(timezone.utc)), "event": event.kind, "model": event.model,
               "seconds": event.seconds, "bytes": event.bytes, "error_type": event.error}
        try:
            self._cache.write(row)
        except OSError as exc:
            self.write_errors += 1
            self.failing = True
            logger.error("cache log: could not write to %s: %s", self.folder, exc)

    def close(self) -> None:
        self._requests.close()
        self._cache.close()
