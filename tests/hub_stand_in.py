"""A local stand-in for the Hugging Face Hub: a small HTTP server that serves model folders as Hub repos and the
few API answers `huggingface_hub` asks for (repo info, the file tree, HEAD and ranged GET of `resolve` URLs), so the
real download code (progress, cache layout, completeness, the safetensors headers) runs offline in the tests.

`hub_at(server, monkeypatch)` points huggingface_hub at it (HF_ENDPOINT, a cache of its own, online). A `gate`
holds a file's download after its first `gate_after` bytes until the test opens it: progress is then seen mid-way
and a cancel lands mid-file, with no timing involved.
"""

from __future__ import annotations

import hashlib
import json
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlparse

CHUNK = 16 * 1024  # the stand-in writes files in pieces this size, so progress has steps


@dataclass
class Repo:
    folder: Path
    commit: str = field(default_factory=lambda: hashlib.sha1(str(id(object())).encode()).hexdigest())

    def files(self) -> list[Path]:
        return sorted(f for f in self.folder.rglob("*") if f.is_file() and not f.name.startswith("."))

    def path(self, name: str) -> Path | None:
        file = (self.folder / name).resolve()
        return file if file.is_file() and self.folder.resolve() in file.parents else None


@dataclass
class StandIn:
    url: str
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range header)
    gate: threading.Event = field(default_factory=threading.Event)  # set: nothing is held back
    gated_file: str | None = None  # the file held back after `gate_after` bytes until `gate` is set
    gate_after: int = 0
    reached_gate: threading.Event = field(default_factory=threading.Event)

    def add(self, repo_id: str, folder: Path) -> Repo:
        self.repos[repo_id] = Repo(Path(folder))
        return self.repos[repo_id]

    def hold(self, file: str, after: int) -> None:
        """Hold back `file` after its first `after` bytes until `release()`."""
        self.gated_file, self.gate_after = file, after
        self.gate.clear()
        self.reached_gate.clear()

    def release(self) -> None:
        self.gate.set()

    def downloads(self) -> list[str]:
        """The files whose bytes were fetched in full or from the start (GET without a Range, or from byte 0)."""
        return [path for method, path, ranged in self.requests
                if method == "GET" and "/resolve/" in path and (ranged is None or ranged.startswith("bytes=0-")
                                                                 and not ranged.endswith("-100000"))]


def _handler(hub: StandIn):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            path = unquote(urlparse(self.path).path)
            hub.requests.append((self.command, path, self.headers.get("Range")))
            if path.startswith("/api/models/"):
                return self._api(path.removeprefix("/api/models/"))
            if "/resolve/" in path:
                repo_id, _, rest = path.lstrip("/").partition("/resolve/")
                _revision, _, name = rest.partition("/")
                return self._file(repo_id, name, body)
            self._json({"error": "not found"}, 404)

        def _api(self, rest: str) -> None:
            for repo_id, repo in hub.repos.items():
                if rest.startswith(repo_id + "/revision/") or rest == repo_id:
                    files = [f.relative_to(repo.folder).as_posix() for f in repo.files()]
                    return self._json({"id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False,
                                       "siblings": [{"rfilename": f} for f in files]})
                if rest.startswith(repo_id + "/tree/"):
                    return self._json([{"type": "file", "path": f.relative_to(repo.folder).as_posix(),
                                        "size": f.stat().st_size, "oid": _etag(f)} for f in repo.files()])
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _file(self, repo_id: str, name: str, body: bool) -> None:
            repo = hub.repos.get(repo_id)
            file = repo.path(name) if repo else None
            if file is None:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound" if repo else "RepoNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = file.read_bytes()
            start, end = 0, len(data) - 1
            ranged = self.headers.get("Range")
            if ranged and ranged.startswith("bytes="):
                first, _, last = ranged.removeprefix("bytes=").partition("-")
                start, end = int(first or 0), min(int(last) if last else len(data) - 1, len(data) - 1)
            part = data[start:end + 1]
            self.send_response(206 if ranged else 200)
            self.send_header("Content-Length", str(len(part)))
            self.send_header("ETag", f'"{_etag(file)}"')
            self.send_header("X-Repo-Commit", repo.commit)
            if ranged:
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            self.end_headers()
            if not body:
                return
            held = name == hub.gated_file and not ranged
            for offset in range(0, len(part), CHUNK):
                if held and offset >= hub.gate_after and not hub.gate.is_set():
                    hub.reached_gate.set()
                    hub.gate.wait(timeout=60)
                try:
                    self.wfile.write(part[offset:offset + CHUNK])
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    return

        def _json(self, value: object, status: int = 200) -> None:
            data = json.dumps(value).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


def _etag(file: Path) -> str:
    return hashlib.sha1(file.read_bytes()).hexdigest()


@contextmanager
def stand_in() -> Iterator[StandIn]:
    """The stand-in Hub on a free local port, for the duration of the block."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), None)  # type: ignore[arg-type]
    hub = StandIn(f"http://127.0.0.1:{server.server_address[1]}")
    hub.gate.set()
    server.RequestHandlerClass = _handler(hub)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        hub.gate.set()
        server.shutdown()
        server.server_close()


def hub_at(hub: StandIn, cache: Path, monkeypatch) -> None:
    """Point huggingface_hub at the stand-in (what HF_ENDPOINT does at import), online, with its own cache; files
    come in 16 KiB pieces so that their progress has steps."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
