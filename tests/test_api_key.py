"""The API key covers every programmatic door (issue 20.2): the studio's routes, Gradio's client API, its queue and
upload, and MCP; a browser that loaded the page keeps working through the session cookie that page load sets."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from conftest import free_port, serving, tiny_studio
from studio.api.security import UI_COOKIE

KEY = "k-correct"
RIGHT, WRONG = {"Authorization": f"Bearer {KEY}"}, {"Authorization": "Bearer k-wrong"}
TEXT = {"data": ["hi", [], "tiny-llama", "", 2, 0.0, 1.0, 0, 1.0, 1]}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    studio = tiny_studio(tmp_path_factory.mktemp("key-logs"), "--port", str(free_port()), "--api-key", KEY, "--mcp")
    with serving(studio) as (demo, url):
        yield studio, url


def page_cookie(http: httpx.Client) -> str:
    page = http.get("/")
    assert page.status_code == 200
    cookie = page.headers["set-cookie"]
    assert cookie.startswith(f"{UI_COOKIE}=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    return page.cookies[UI_COOKIE]


# (method, path, request fields, whether the page's cookie is enough)
DOORS = [
    ("POST", "/generate/text", {"json": {"prompt": "hi", "max_new_tokens": 2}}, False),
    ("POST", "/v1/chat/completions", {"json": {"model": "tiny-llama", "max_tokens": 2,
                                               "messages": [{"role": "user", "content": "hi"}]}}, False),
    ("POST", "/gradio_api/call/generate_text", {"json": TEXT}, False),
    ("GET", "/gradio_api/call/generate_text/not-an-event", {}, False),
    ("POST", "/gradio_api/run/generate_text", {"json": TEXT}, True),  # the page runs unqueued events here
    ("POST", "/gradio_api/api/generate_text", {"json": TEXT}, False),
    ("POST", "/gradio_api/mcp/", {"json": {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}}, False),
    ("GET", "/gradio_api/mcp/schema", {}, False),
    ("POST", "/gradio_api/queue/join", {"json": {**TEXT, "fn_index": 0, "session_hash": "s1"}}, True),
    ("POST", "/gradio_api/upload", {"files": {"files": ("a.txt", b"hello", "text/plain")}}, True),
    ("POST", "/gradio_api/cancel", {"json": {"session_hash": "s1", "fn_index": 0, "event_id": "e"}}, True),
]


def status(http: httpx.Client, method: str, path: str, **fields) -> int:
    """The answer's status only (Gradio's event streams may end abruptly for a made-up event id)."""
    with http.stream(method, path, **fields) as answer:
        return answer.status_code


@pytest.mark.parametrize("method, path, fields, page_ok", DOORS, ids=[f"{m} {p}" for m, p, _, _ in DOORS])
def test_every_programmatic_door_needs_the_key(keyed, method, path, fields, page_ok):
    _studio, url = keyed
    with httpx.Client(base_url=url, timeout=120) as http:
        for headers in ({}, WRONG, {"Authorization": KEY}, {"Authorization": "Basic Zm9vOmJhcg=="}):
            answer = http.request(method, path, headers=headers, **fields)
            assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer", (headers, answer.text)
        assert status(http, method, path, headers=RIGHT, **fields) not in (401, 403)
        cookie = page_cookie(http)
        http.cookies.clear()
        with_page = status(http, method, path, cookies={UI_COOKIE: cookie}, **fields)
        assert (with_page not in (401, 403)) == page_ok, with_page
        assert status(http, method, path, cookies={UI_COOKIE: cookie.split(".")[0] + ".00"}, **fields) == 401


def test_open_doors_stay_open(keyed):
    _studio, url = keyed
    with httpx.Client(base_url=url) as http:
        for path in ("/", "/health", "/gradio_api/info", "/config", "/openapi.json"):
            assert http.get(path).status_code == 200, path


def test_the_gradio_client_works_with_the_key(keyed):
    from gradio_client import Client

    studio, url = keyed
    with pytest.raises(Exception):  # noqa: B017 - the client's own error type for a 401 varies
        Client(url, verbose=False, download_files=False).predict("hi", api_name="/generate_text")
    client = Client(url, verbose=False, download_files=False, headers=RIGHT)
    answer = client.predict(message="hi", model="tiny-llama", max_new_tokens=2, seed=1, api_name="/generate_text")
    assert answer


def test_mcp_tools_run_with_the_key(keyed):
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    _studio, url = keyed

    async def call() -> object:
        async with httpx.AsyncClient(headers=RIGHT, timeout=120) as client:
            async with streamable_http_client(url + "/gradio_api/mcp/", http_client=client) as (read, write, _):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    return await session.call_tool("generate_text", {"message": "Hello", "model": "tiny-llama",
                                                                     "max_new_tokens": 4, "seed": 1})

    result = asyncio.run(call())
    assert not result.isError, result.content


def test_the_schema_needs_the_login_when_auth_is_on(tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from studio.server import app_kwargs
    from test_security import basic

    studio = tiny_studio(tmp_path / "logs", "--auth", "alice:wonder")
    with TestClient(FastAPI(**app_kwargs(studio), docs_url="/docs")) as http:
        for path in ("/openapi.json", "/docs"):
            assert http.get(path).status_code == 401
            assert http.get(path, headers=basic("alice", "nope")).status_code == 401
            assert http.get(path, headers=basic("alice", "wonder")).status_code == 200
