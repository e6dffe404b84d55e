"""Video jobs: the asynchronous shape of OpenAI's videos API (create, poll, download), kept on disk.

- **One queue.** Jobs wait in one first-in-first-out queue and a worker thread runs them one at a time through
  `generate_video`, the Video tab's service; each then waits for its model's slot (`--concurrency`) like a
  generation from the tab, so the API and the tab share one queue per model and the memory budget.
- **On disk.** A job is `<id>.json` in `--video-dir`, replaced atomically (a temporary file, then a rename) at
  each change of status. A finished video adds `<id>.mp4` and its thumbnail `<id>.png`, written before the JSON
  says "completed", so a completed job always has its files and survives a restart.
- **After a restart.** A job found "queued" or "in_progress" was cut off when the server stopped: it is reported
  "failed" (code `interrupted`), not lost; files no completed job owns are removed.
- **A size cap.** After each finished video the oldest finished jobs are deleted until the folder's videos fit
  in `--video-dir-limit`; the newest video is always kept, even alone above the cap.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from studio.backends.video import VideoRequest, generate_video, validate
from studio.cache import CacheError
from studio.contract import InputError
from studio.runtime import Call, Studio
from studio.telemetry.requestlog import REQUEST_ID

logger = logging.getLogger(__name__)

Status = Literal["queued", "in_progress", "completed", "failed"]
Variant = Literal["video", "thumbnail"]
SUFFIXES: dict[str, str] = {"video": ".mp4", "thumbnail": ".png"}
ENTRY = "/v1/videos"  # the request log's endpoint for jobs: "openai:/v1/videos"


@dataclass
class VideoJob:
    """One job, as its JSON file holds it; `VideoJob.seconds` and `size` are written as OpenAI's API writes them."""

    id: str
    created_at: int  # Unix seconds
    order: float  # creation time with sub-second precision: jobs list in creation order
    status: Status
    model: str
    prompt: str
    seconds: str  # the clip's length, "4" or "1.125"
    size: str  # "WIDTHxHEIGHT"
    settings: dict  # what makes the clip (VideoPlan.settings); its seed once the job ran
    progress: int = 0  # percent
    completed_at: int | None = None
    error: dict | None = None  # {"code", "message", "param"} of a failed job
    request_id: str = ""  # the creating HTTP request's id, also in the generation's request-log row

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed")


@dataclass(eq=False)
class _Pending:
    request: VideoRequest
    cancel: threading.Event = field(default_factory=threading.Event)


class VideoJobs:
    """The jobs of one `--video-dir`. The folder is read on first use, so a studio that never serves a video job
    never touches it."""

    def __init__(self, studio: Studio, folder: Path, limit: int):
        self.studio = studio
        self.folder = Path(folder)
        self.limit = limit
        self._lock = threading.Lock()
        self._jobs: dict[str, VideoJob] | None = None
        self._queue: deque[str] = deque()
        self._pending: dict[str, _Pending] = {}
        self._worker: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------ the API's calls

    def create(self, req: VideoRequest) -> VideoJob:
        """Validate now (a bad request is refused at once, naming the field), then queue the job."""
        plan = validate(self.studio, req)
        now = time.time()
        job = VideoJob(id=f"video_{secrets.token_hex(12)}", created_at=int(now), order=now, status="queued",
                       model=plan.model, prompt=plan.prompt, seconds=f"{plan.seconds:g}",
                       size=f"{plan.width}x{plan.height}", settings=plan.settings(),
                       request_id=REQUEST_ID.get() or os.urandom(16).hex())
        with self._lock:
            self._loaded()[job.id] = job
            self._save(job)
            self._pending[job.id] = _Pending(req)
            self._queue.append(job.id)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="video-jobs", daemon=True)
                self._worker.start()
            return replace(job)

    def get(self, job_id: str) -> VideoJob | None:
        with self._lock:
            job = self._loaded().get(job_id)
            return None if job is None else replace(job)

    def list(self) -> list[VideoJob]:
        """Every job, oldest first."""
        with self._lock:
            return sorted((replace(job) for job in self._loaded().values()), key=lambda job: job.order)

    def delete(self, job_id: str) -> bool:
        """Forget a job and its files; a running job is stopped after its running step. False: no such job."""
        with self._lock:
            job = self._loaded().pop(job_id, None)
            if job is None:
                return False
            pending = self._pending.pop(job_id, None)
            if pending is not None:
                pending.cancel.set()
            self._remove(job_id)
            return True

    def file(self, job_id: str, variant: Variant) -> Path | None:
        """The finished job's video or thumbnail; None when the job has none (yet)."""
        with self._lock:
            job = self._loaded().get(job_id)
            return self._path(job_id, SUFFIXES[variant]) if job is not None and job.status == "completed" else None

    # ------------------------------------------------------------------------------------------ the worker

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._worker = None
                    return
                job_id = self._queue.popleft()
                pending = self._pending.get(job_id)
                if pending is None:  # deleted while queued
                    continue
                self._update(job_id, status="in_progress")
            self._run(job_id, pending)

    def _run(self, job_id: str, pending: _Pending) -> None:
        job = self.get(job_id)
        if job is None:
            return

        def progress(fraction: float, _text: str) -> None:
            self._progress(job_id, fraction)

        call = Call("openai", ENTRY, cancel=pending.cancel, progress=progress, request_id=job.request_id)
        try:
            result = generate_video(self.studio, pending.request, call)
        except (InputError, CacheError) as exc:  # the request met a changed world: an adapter gone, no memory
            self._fail(job_id, "invalid_request" if isinstance(exc, InputError) else "model_unavailable", str(exc),
                       getattr(exc, "field", None))
            return
        except Exception:  # noqa: BLE001 — the worker outlives any one job; the traceback goes to the server log
            logger.exception("video job %s failed (request %s)", job_id, job.request_id)
            self._fail(job_id, "internal_error",
                       f"internal error; the server log has the details under request id {job.request_id}")
            return
        with self._lock:
            self._pending.pop(job_id, None)
            if job_id not in self._loaded() or result.stopped:  # deleted while it ran
                return
            self._write(self._path(job_id, SUFFIXES["video"]), result.files["mp4"])
            self._write(self._path(job_id, SUFFIXES["thumbnail"]), result.thumbnail)
            self._update(job_id, status="completed", progress=100, completed_at=int(time.time()),
                         settings=result.settings)
            self._trim(keep=job_id)

    def _progress(self, job_id: str, fraction: float) -> None:
        with self._lock:
            job = self._loaded().get(job_id)
            if job is not None:
                job.progress = min(99, int(fraction * 100))  # 100 only once the files are written

    def _fail(self, job_id: str, code: str, message: str, param: str | None = None) -> None:
        with self._lock:
            self._pending.pop(job_id, None)
            if job_id in self._loaded():
                self._update(job_id, status="failed", completed_at=int(time.time()),
                             error={"code": code, "message": message, "param": param})

    # ------------------------------------------------------------------------------------------ the folder
    # Everything below runs under self._lock.

    def _loaded(self) -> dict[str, VideoJob]:
        """The jobs, read from the folder on first use; jobs cut off by a stop are marked failed there."""
        if self._jobs is not None:
            return self._jobs
        self._jobs = {}
        for path in sorted(self.folder.glob("video_*.json")) if self.folder.is_dir() else ():
            try:
                job = VideoJob(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError) as exc:  # a file from elsewhere or damaged: leave it alone
                logger.warning("ignoring %s: %s", path, exc)
                continue
            self._jobs[job.id] = job
            if not job.finished:
                self._update(job.id, status="failed", error={
                    "code": "interrupted", "param": None,
                    "message": "the server stopped before this video was finished; create it again"})
        owned = {f"{job_id}{suffix}" for job_id, job in self._jobs.items() if job.status == "completed"
                 for suffix in SUFFIXES.values()} | {f"{job_id}.json" for job_id in self._jobs}
        for path in self.folder.glob("*video_*") if self.folder.is_dir() else ():
            if path.name not in owned and not path.name.endswith(".json"):  # half-written, or of a lost job
                path.unlink(missing_ok=True)
        return self._jobs

    def _update(self, job_id: str, **changes) -> None:
        job = self._jobs[job_id]
        for name, value in changes.items():
            setattr(job, name, value)
        self._save(job)

    def _save(self, job: VideoJob) -> None:
        self._write(self._path(job.id, ".json"), json.dumps(asdict(job)).encode())

    def _write(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def _path(self, job_id: str, suffix: str) -> Path:
        return self.folder / f"{job_id}{suffix}"

    def _remove(self, job_id: str) -> None:
        for suffix in (*SUFFIXES.values(), ".json"):
            self._path(job_id, suffix).unlink(missing_ok=True)

    def _size(self, job_id: str) -> int:
        paths = [self._path(job_id, suffix) for suffix in (*SUFFIXES.values(), ".json")]
        return sum(path.stat().st_size for path in paths if path.exists())

    def _trim(self, keep: str) -> None:
        """Delete the oldest finished jobs until the finished ones fit in the limit (never `keep`)."""
        finished = sorted((job for job in self._jobs.values() if job.finished), key=lambda job: job.order)
        total = sum(self._size(job.id) for job in finished)
        for job in finished:
            if total <= self.limit:
                break
            if job.id == keep:
                continue
            total -= self._size(job.id)
            self._remove(job.id)
            del self._jobs[job.id]
            logger.info("deleted video job %s: --video-dir-limit reached", job.id)
