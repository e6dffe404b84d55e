"""The real server: the Gradio UI, its client API and the studio's routes answer on one port."""

from __future__ import annotations

import httpx
from gradio_client import Client


def test_ui_client_api_and_health_on_one_port(live_server):
    studio, url = live_server
    assert httpx.get(url + "/").status_code == 200  # the Gradio UI
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["profile"] == "tiny" and health["device"] == "cpu"
    assert health["budget_bytes"] == 4 * 2**30 and isinstance(health["models"], list)

    status = Client(url, verbose=False).predict(api_name="/models")  # a Gradio endpoint, via gradio_client
    assert status["budget_bytes"] == health["budget_bytes"] and status["strategy"] == "lru"


def test_health_lists_loaded_models(live_server):
    studio, url = live_server
    with studio.cache.use("tiny-llama"):
        pass
    models = {m["id"]: m for m in httpx.get(url + "/health").json()["models"]}
    assert models["tiny-llama"]["state"] == "resident" and models["tiny-llama"]["bytes"] > 0
