"""Shared fixtures: every test runs offline on the tiny profile, with its own log folder."""

from __future__ import annotations

import os
import socket

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("STUDIO_TINY_DIR", os.path.join(os.path.expanduser("~"), ".cache", "studio", "tiny-tests"))

import pytest  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from studio.config import parse_settings  # noqa: E402
from studio.runtime import Studio, create_studio  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def make_studio(tmp_path):
    """Build a tiny-profile Studio from command-line style arguments, e.g. make_studio("--strategy", "swap")."""

    def make(*argv: str, env: dict | None = None) -> Studio:
        args = ["--profile", "tiny", "--log-dir", str(tmp_path / "logs"), "--memory-budget", "2GiB", *argv]
        return create_studio(parse_settings(args, env=env or {}))

    return make


@pytest.fixture
def studio(make_studio) -> Studio:
    return make_studio()


@pytest.fixture
def http(studio) -> TestClient:
    """The studio's HTTP routes, error handlers and middleware on a plain FastAPI app (no Gradio)."""
    from studio.server import app_kwargs

    with TestClient(FastAPI(**app_kwargs(studio))) as client:
        yield client


@pytest.fixture(scope="session")
def live_server(tmp_path_factory):
    """The real server (Gradio UI, its client API and the studio's routes on one port), started once."""
    from studio.server import launch

    logs = tmp_path_factory.mktemp("live-logs")
    settings = parse_settings(["--profile", "tiny", "--port", str(free_port()), "--log-dir", str(logs),
                               "--memory-budget", "4GiB"], env={})
    studio = create_studio(settings)
    demo, url = launch(studio, block=False)
    yield studio, url.rstrip("/")
    demo.close()
