"""One row per generation, written the same way whether the request came from the UI or the HTTP API."""

from __future__ import annotations

import contextvars
import json
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

# Set by the HTTP middleware for the request being served, so generation rows carry the same id as the
# X-Request-ID response header.
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


class Recorder:
    """Collects one generation's fields while it runs; the request log writes them as a row at the end."""

    def __init__(self, **fields: Any):
        self.fields: dict[str, Any] = fields
        self.started = time.monotonic()

    def set(self, **fields: Any) -> None:
        self.fields.update(fields)

    def first_output(self) -> None:
        """Mark the first token / step / audio piece (time to first output), once."""
        self.fields.setdefault("ttft_ms", round((time.monotonic() - self.started) * 1000, 1))


class RequestLog:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def path_for(self, when: datetime) -> Path:
        return self.folder / f"requests-{when:%Y-%m-%d}.jsonl"

    def write(self, row: dict[str, Any]) -> None:
        line = json.dumps(row, default=str, separators=(",", ":")) + "\n"
        with self._lock, open(self.path_for(datetime.now(timezone.utc)), "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()

    @contextmanager
    def record(self, **fields: Any) -> Iterator[Recorder]:
        """Time a generation and write its row, with status and error type, however it ends."""
        rec = Recorder(**fields)
        status, error = "ok", None
        try:
            yield rec
        except GeneratorExit:
            status = "cancelled"
            raise
        except BaseException as exc:
            status, error = "error", type(exc).__name__
            raise
        finally:
            if rec.fields.pop("stopped", False) and status == "ok":
                status = "stopped"
            self.write({
                "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                "request_id": REQUEST_ID.get() or uuid.uuid4().hex,
                **rec.fields,
                "status": status,
                "error_type": error,
                "latency_ms": round((time.monotonic() - rec.started) * 1000, 1),
            })
