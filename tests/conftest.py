"""Shared fixtures: every test runs offline on the tiny profile, with its own log folder."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("STUDIO_TINY_DIR", os.path.join(os.path.expanduser("~"), ".cache", "studio", "tiny-tests"))

import pytest  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from studio.config import parse_settings  # noqa: E402
from studio.runtime import Call, Studio, create_studio  # noqa: E402


def call(client: str = "rest", entry: str = "test", **fields) -> Call:
    """The Call of a test's generation (client "rest" unless it says otherwise)."""
    return Call(client, entry, **fields)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_studio(log_dir: Path, *argv: str, env: dict | None = None) -> Studio:
    """A tiny-profile Studio from command-line style arguments, logging into `log_dir`; its video jobs, user catalog
    and drop-in folder sit beside it (never the repository's own models.yaml and models/)."""
    args = ["--profile", "tiny", "--log-dir", str(log_dir), "--video-dir", str(log_dir.parent / "videos"),
            "--memory-budget", "2GiB", "--models", str(log_dir.parent / "models.yaml"),
            "--models-dir", str(log_dir.parent / "models"), *argv]
    return create_studio(parse_settings(args, env=env or {}))


def collect_rows(studio: Studio) -> list[dict]:
    """A list that receives every request-log row the studio writes from now on."""
    rows: list[dict] = []
    studio.log.add_listener(rows.append)
    return rows


@contextmanager
def routes(studio: Studio) -> Iterator[TestClient]:
    """The studio's HTTP routes, error handlers and middleware on a plain FastAPI app (no Gradio)."""
    from studio.server import app_kwargs

    with TestClient(FastAPI(**app_kwargs(studio))) as client:  # entering runs the lifespan
        yield client


@contextmanager
def serving(studio: Studio) -> Iterator[tuple[object, str]]:
    """The real server (Gradio UI, its client API and the studio's routes on one port): (Blocks, base URL)."""
    from studio.server import launch

    demo, url = launch(studio, block=False)
    try:
        yield demo, url.rstrip("/")
    finally:
        demo.close()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest, and steadiest on a shared machine, on one thread (a module uses it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_studio(tmp_path):
    """Build a tiny-profile Studio from command-line style arguments, e.g. make_studio("--strategy", "swap")."""
    return lambda *argv, env=None: tiny_studio(tmp_path / "logs", *argv, env=env)


@pytest.fixture
def studio(make_studio) -> Studio:
    return make_studio()


@pytest.fixture
def http(studio) -> TestClient:
    with routes(studio) as client:
        yield client


@pytest.fixture(scope="session")
def live_server(tmp_path_factory):
    """The real server, started once for the session: (studio, base URL)."""
    studio = tiny_studio(tmp_path_factory.mktemp("live-logs"), "--port", str(free_port()), "--memory-budget", "4GiB")
    with serving(studio) as (_demo, url):
        yield studio, url
