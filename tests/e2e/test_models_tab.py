"""The Models tab in a real browser: add a model from a (stand-in) Hub repo, watch its download's progress bar,
chat with it in the Chat tab, remove it from disk after the confirmation; the registered models as a table and
the "nothing loaded" line."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from e2e.conftest import CHROMIUM, serve
from hub_stand_in import hub_at, stand_in

if not CHROMIUM.exists():
    pytest.skip(f"the browser tests need Debian's Chromium at {CHROMIUM} (apt-get install chromium)",
                allow_module_level=True)

from playwright.sync_api import expect  # noqa: E402

from e2e.test_browser import open_studio, open_tab, send_chat  # noqa: E402

REPO = "tiny/phi3-chat"


@pytest.fixture(scope="module")
def hub_and_server(tmp_path_factory):
    """A studio whose Hugging Face Hub is the stand-in, serving a tiny Phi-3 chat model."""
    from studio import weights
    from studio.tiny.text import build_phi3

    root = tmp_path_factory.mktemp("e2e-models")
    (root / "phi3").mkdir()
    build_phi3(root / "phi3", SimpleNamespace(options={}))
    with stand_in() as hub, pytest.MonkeyPatch.context() as patch:
        hub.add(REPO, root / "phi3")
        hub_at(hub, root / "hf-cache", patch)
        patch.setattr(weights, "_remote", {})
        with serve("--log-dir", str(root / "logs"), "--models", str(root / "models.yaml"),
                   "--models-dir", str(root / "models")) as served:
            yield hub, served, root


def test_add_a_model_watch_its_progress_chat_with_it_and_remove_it(hub_and_server, page):
    hub, server, root = hub_and_server
    panel = open_studio(page, server.url, "Models")
    expect(panel.locator("#models-summary")).to_contain_text("Nothing is loaded")
    assert "4.00 GiB" in panel.locator("#models-summary strong").all_inner_texts()  # a figure is bold with its unit
    expect(panel.locator("#models-table")).to_contain_text("tiny-llama")  # every registered model, as a table

    hub.hold("model.safetensors", after=64 * 1024)
    panel.locator("#add-source textarea").fill(REPO)
    panel.get_by_role("button", name="Check", exact=True).click()
    expect(panel.locator("#add-plan")).to_contain_text("phi3-chat · chat · Causal language model")
    panel.get_by_role("button", name="Download and add", exact=True).click()
    bar = panel.locator("#add-status[data-state='downloading'] progress")
    expect(bar).to_be_visible()
    expect(bar).not_to_have_attribute("value", "0")  # part of the file is in: the bar stands mid-way
    assert 0 < float(bar.get_attribute("value")) < float(bar.get_attribute("max"))
    expect(panel.locator("#add-status")).to_contain_text(re.compile(r"KiB of .* KiB · .*/s"))
    hub.release()
    expect(panel.locator("#add-status[data-state='done']")).to_contain_text("Added phi3-chat")
    assert "phi3-chat" in server.studio.registry

    chat = open_tab(page, "Chat")
    chat.get_by_role("combobox", name="Model").click()  # the picker reads the models again when it opens
    page.get_by_role("option", name=re.compile(r"^phi3-chat · .*iB$")).click()
    send_chat(chat, "Hello, new model!")
    assert server.rows[-1]["model"] == "phi3-chat" and server.rows[-1]["status"] == "ok"

    panel = open_tab(page, "Models")
    panel.get_by_role("combobox", name="Model").click()
    page.get_by_role("option", name="phi3-chat", exact=True).click()
    panel.get_by_role("button", name="Remove from disk", exact=True).click()
    expect(panel.locator("#models-confirm")).to_contain_text("Remove phi3-chat from disk?")
    panel.get_by_role("button", name="Yes", exact=True).click()
    expect(panel.locator("#models-table")).not_to_contain_text("phi3-chat")
    assert "phi3-chat" not in server.studio.registry
    assert "phi3-chat" not in (root / "models.yaml").read_text()
