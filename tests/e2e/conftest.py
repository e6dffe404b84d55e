"""Fixtures for the browser tests: the studio (tiny profile) served on a free port, driven through Debian's
Chromium by Playwright. Every request a page makes is recorded, so a test can check that the studio's page talks
to no host but the studio's own, and every test leaves a screenshot in tests/artifacts/.

Every studio here runs with --api-key: the key guards Gradio's queue, uploads and client API against programs,
so each browser test also shows that the page a person opens works with the key on."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest
from conftest import free_port  # tests/conftest.py: also makes every test offline

from studio.config import parse_settings
from studio.runtime import Studio, create_studio

CHROMIUM = Path("/usr/bin/chromium")  # Debian's; Playwright's own browser download does not work offline
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-quic", "--no-first-run", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
VIEWPORT = {"width": 1280, "height": 1200}  # every tab fits: no full-page screenshot, which blanks WebGL
TIMEOUT_MS = 60_000  # for actions and expectations: a 2-core machine shared with other work is slow at times
LORA_MODEL = "tiny-sd-turbo"  # the Image tab's default model, so the test need not switch models
LORA_NAME = "e2e-style"
LOGIN = ("e2e", "not-a-real-password")
API_KEY = "e2e-api-key"  # every studio served here requires it on every programmatic door


@dataclass
class Served:
    """A running studio: its object (to read what it logged), its URL and the request-log rows written so far."""

    studio: Studio
    url: str
    rows: list[dict] = field(default_factory=list)


def build_lora(folder: Path) -> str:
    """Write a tiny random LoRA for the tiny SD model with the same helper the image tests use; returns its name."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from studio.catalog import TINY_MODELS
    from studio.registry import Registry
    from studio.tiny.image import random_lora
    from studio.weights import ensure_local

    model = ensure_local(Registry("tiny", TINY_MODELS).get(LORA_MODEL))
    random_lora(folder / f"{LORA_NAME}.safetensors", UNet2DConditionModel.from_pretrained(model / "unet"),
                CLIPTextModel.from_pretrained(model / "text_encoder"), seed=1)
    return LORA_NAME


@contextmanager
def serve(*argv: str) -> Iterator[Served]:
    """Start the real server (UI, client API and routes on one port) on the tiny profile, with the API key on;
    close it afterwards."""
    from studio.server import launch

    settings = parse_settings(["--profile", "tiny", "--port", str(free_port()), "--memory-budget", "4GiB",
                               "--api-key", API_KEY, *argv], env={})
    served = Served(create_studio(settings), "")
    served.studio.log.add_listener(served.rows.append)
    demo, url = launch(served.studio, block=False)
    served.url = url.rstrip("/")
    try:
        yield served
    finally:
        demo.close()


@contextmanager
def chromium():
    """Debian's Chromium, headless, with its own background traffic (updates, sync, QUIC probes) turned off."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Served]:
    """The studio under test, with one LoRA adapter in its --lora-dir."""
    loras = tmp_path_factory.mktemp("e2e-loras")
    build_lora(loras)
    with serve("--log-dir", str(tmp_path_factory.mktemp("e2e-logs")), "--lora-dir", str(loras)) as served:
        yield served


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory) -> Iterator[Served]:
    """A second studio that asks for a login (--auth user:password)."""
    with serve("--log-dir", str(tmp_path_factory.mktemp("e2e-auth-logs")), "--auth", ":".join(LOGIN)) as served:
        yield served


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    with chromium() as browser:
        yield browser


@pytest.fixture(scope="module")
def requested_urls() -> list[str]:
    """Every URL any page of this module requested."""
    return []


@contextmanager
def session_page(browser, name: str, **options) -> Iterator:
    """A fresh browser session (its own Gradio session) that leaves a screenshot of how the test ended in
    tests/artifacts/<name>.png, passed or failed; `options` are the browser context's (viewport, touch...)."""
    context = browser.new_context(**options)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    yield page
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))
    context.close()


@pytest.fixture
def page(browser, requested_urls, request):
    """A desktop-sized session that records every request it makes."""
    with session_page(browser, request.node.name, viewport=VIEWPORT) as page:
        page.on("request", lambda req: requested_urls.append(req.url))
        yield page
