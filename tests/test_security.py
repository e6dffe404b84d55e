"""Who may call the HTTP routes (API keys, launch auth), and a public link that is safe by default."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.testclient import TestClient

from conftest import free_port, serving, tiny_studio
from test_spaces import APP, ROOT, AppProcess
from studio.api import security
from studio.api.security import guard
from studio.config import ConfigError
from studio.server import PUBLIC_QUEUE_SIZE, Limits, app_kwargs, launch, limits


def guarded_router(studio) -> APIRouter:
    """A route of our own, guarded the way /generate/* and /v1/* routes are."""
    api = APIRouter(dependencies=[guard(studio)])

    @api.post("/generate/echo")
    def echo(body: dict) -> dict:
        return {"echo": body}

    return api


def client_for(studio) -> TestClient:
    app = FastAPI(**app_kwargs(studio))
    app.include_router(guarded_router(studio))
    return TestClient(app)


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_routes_are_open_without_keys_or_auth(make_studio):
    with client_for(make_studio()) as http:
        assert http.post("/generate/echo", json={"a": 1}).json() == {"echo": {"a": 1}}


def test_api_keys_require_bearer(make_studio):
    with client_for(make_studio("--api-key", "k-one", "--api-key", "k-two", "--auth", "alice:wonder")) as http:
        missing = http.post("/generate/echo", json={})
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert "Bearer" in missing.json()["detail"]
        assert http.post("/generate/echo", json={}, headers={"Authorization": "Bearer k-three"}).status_code == 401
        assert http.post("/generate/echo", json={}, headers={"Authorization": "k-one"}).status_code == 401
        # keys take precedence: the UI's password is not an API credential when keys are configured
        assert http.post("/generate/echo", json={}, headers=basic("alice", "wonder")).status_code == 401
        for key in ("k-one", "k-two"):
            assert http.post("/generate/echo", json={}, headers={"Authorization": f"bearer {key}"}).status_code == 200
        assert http.get("/health").status_code == 200  # stays open


def test_api_keys_from_environment(make_studio):
    with client_for(make_studio(env={"STUDIO_API_KEYS": "env-key, other"})) as http:
        assert http.post("/generate/echo", json={}).status_code == 401
        assert http.post("/generate/echo", json={}, headers={"Authorization": "Bearer other"}).status_code == 200


def test_every_key_is_compared_in_constant_time(make_studio, monkeypatch):
    calls = []
    real = security.hmac.compare_digest
    monkeypatch.setattr(security.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    with client_for(make_studio("--api-key", "first", "--api-key", "second")) as http:
        assert http.post("/generate/echo", json={}, headers={"Authorization": "Bearer first"}).status_code == 200
    assert calls == [(b"first", b"first"), (b"first", b"second")]  # no early exit on the matching key


def test_launch_auth_protects_routes_with_basic(make_studio):
    with client_for(make_studio("--auth", "alice:wonder,bob:builder")) as http:
        missing = http.post("/generate/echo", json={})
        assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Basic")
        assert "password" in missing.json()["detail"]
        assert http.post("/generate/echo", json={}, headers=basic("alice", "wonder")).status_code == 200
        assert http.post("/generate/echo", json={}, headers=basic("bob", "builder")).status_code == 200
        for bad in (basic("alice", "builder"), basic("carol", "wonder"), basic("alice", ""),
                    {"Authorization": "Basic not-base64!"}, {"Authorization": "Bearer wonder"}):
            assert http.post("/generate/echo", json={}, headers=bad).status_code == 401, bad
        assert http.get("/health").status_code == 200


def test_mcp_with_auth_is_refused(make_studio):
    with pytest.raises(ConfigError, match="--mcp"):
        make_studio("--mcp", "--auth", "alice:wonder")


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """The real server with launch auth, plus a guarded route of our own on the same app."""
    studio = tiny_studio(tmp_path_factory.mktemp("auth-logs"), "--port", str(free_port()), "--auth", "alice:wonder")
    with serving(studio) as (demo, url):
        demo.app.include_router(guarded_router(studio))
        yield demo, url


def test_live_auth_covers_ui_and_http_routes(auth_server):
    demo, url = auth_server
    with httpx.Client(base_url=url) as http:
        page = http.get("/")
        assert page.status_code == 200 and '"auth_required":true' in page.text.replace(" ", "")  # the login page
        assert http.get("/gradio_api/info").status_code == 401  # Gradio's client API wants the login too
        assert http.get("/health").status_code == 200
        paths = get_openapi(title="studio", version="0", routes=demo.app.routes)["paths"]
        guarded = {path: ops for path, ops in paths.items() if path.startswith(("/generate", "/v1"))}
        assert "/generate/echo" in guarded
        for path, ops in guarded.items():  # every route under /generate and /v1, whichever modules have landed
            for method in ops:
                answer = http.request(method.upper(), re.sub(r"\{[^}]+\}", "x", path), json={})
                assert answer.status_code == 401, (method, path)
        assert http.post("/generate/echo", json={"x": 1}, headers=basic("alice", "wonder")).json() == {"echo": {"x": 1}}

        assert http.post("/login", data={"username": "alice", "password": "nope"}).status_code == 400
        assert http.post("/login", data={"username": "alice", "password": "wonder"}).status_code == 200
        # the session cookie from the UI's login page now opens both the UI and the HTTP routes
        assert http.post("/generate/echo", json={"y": 2}).json() == {"echo": {"y": 2}}
        assert '"auth_required":true' not in http.get("/").text.replace(" ", "")


def test_share_without_auth_refuses_to_start(tmp_path):
    done = subprocess.run([sys.executable, str(APP), "--share", "--profile", "tiny"], cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("studio: error: --share:") and "--auth" in lines[0]


def test_public_mode_limits(make_studio, monkeypatch, capsys):
    monkeypatch.setenv("GRADIO_ALLOWED_PATHS", str(ROOT))
    studio = make_studio("--share", "--allow-public", "--concurrency", "2", "--port", str(free_port()))
    assert limits(studio) == Limits(public=True, queue_size=PUBLIC_QUEUE_SIZE, max_file_size=50 * 2**20,
                                    concurrency=2)
    demo, url = launch(studio, block=False)
    try:
        assert demo.max_file_size == 50 * 2**20
        assert demo.allowed_paths == [] and "GRADIO_ALLOWED_PATHS" not in os.environ
        assert httpx.get(url.rstrip("/") + "/health").status_code == 200
        too_big = httpx.post(url.rstrip("/") + "/gradio_api/upload", files={"files": ("big.bin", b"0" * (51 * 2**20))})
        assert too_big.status_code == 413
    finally:
        demo.close()
    assert "GRADIO_ALLOWED_PATHS ignored" in capsys.readouterr().out

    local = make_studio("--port", str(free_port()))
    assert limits(local) == Limits(public=False, queue_size=None, max_file_size=None, concurrency=1)


def test_share_failure_is_one_line_and_the_studio_keeps_serving(tmp_path):
    port = free_port()
    with AppProcess("--share", "--allow-public", "--profile", "tiny", "--port", str(port),
                    "--log-dir", str(tmp_path / "logs"), cwd=tmp_path) as app:
        assert app.health(f"http://127.0.0.1:{port}")["status"] == "ok"
        line = app.wait_for("Share link")
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200  # still serving after the failure
    assert line.startswith("Share link: could not be created (") and f"http://127.0.0.1:{port}" in line
    assert [ln.rstrip() for ln in app.lines if "share link" in ln.lower()] == [line], app.output
