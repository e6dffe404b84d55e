"""The real server: the Gradio UI, its client API and the studio's routes answer on one port."""

from __future__ import annotations

import httpx
import pytest
from gradio_client import Client


def test_ui_client_api_and_health_on_one_port(live_server):
    studio, url = live_server
    assert httpx.get(url + "/").status_code == 200  # the Gradio UI
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["profile"] == "tiny" and health["cache"]["device"] == "cpu"
    assert health["cache"]["budget_bytes"] == 4 * 2**30 and isinstance(health["cache"]["models"], list)

    status = Client(url, verbose=False).predict(api_name="/models")  # a Gradio endpoint, via gradio_client
    assert status["budget_bytes"] == health["cache"]["budget_bytes"] and status["strategy"] == "lru"


def test_health_lists_loaded_models(live_server):
    studio, url = live_server
    with studio.cache.use("tiny-llama"):
        pass
    models = {m["id"]: m for m in httpx.get(url + "/health").json()["cache"]["models"]}
    assert models["tiny-llama"]["state"] == "resident" and models["tiny-llama"]["bytes"] > 0


def test_preload_happens_in_the_app_lifespan(make_studio):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from studio.server import app_kwargs

    studio = make_studio("--preload", "tiny-llama,tiny-qwen2")
    assert studio.cache.snapshot().models == []
    with TestClient(FastAPI(**app_kwargs(studio))) as client:  # entering runs the lifespan
        resident = {m["id"] for m in client.get("/health").json()["cache"]["models"] if m["state"] == "resident"}
    assert resident == {"tiny-llama", "tiny-qwen2"}


def test_preload_strategy_without_a_list_loads_every_local_model(make_studio):
    from studio.runtime import preload_ids

    studio = make_studio("--strategy", "preload")
    assert preload_ids(studio) == [spec.id for spec in studio.registry]
    assert preload_ids(make_studio()) == []


@pytest.mark.parametrize("path, body, field", [
    ("/generate/text", {"prompt": "hi", "temperature": "hot"}, "temperature"),
    ("/generate/image", {"prompt": 5}, "prompt"),
    ("/generate/speech", {}, "text"),
    ("/generate/3d", {"prompt": "a chair", "steps": "many"}, "steps"),
])
def test_a_body_the_schema_refuses_is_answered_like_any_bad_input(http, path, body, field):
    """One error shape for every route: "field: message" in `detail`, the field, and every problem found."""
    answer = http.post(path, json=body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == field and answer.json()["detail"].startswith(f"{field}: ")
    assert answer.json()["errors"][0] == answer.json()["detail"]
