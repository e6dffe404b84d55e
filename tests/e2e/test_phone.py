"""The studio on a phone (390×844, touch): every tab one tap away, the offline banner one line, a chat turn, and an
image that lands right under the Generate button. The server falls back to the tiny profile as a newcomer's
offline machine does (`--profile auto`), so the offline banner is there."""

from __future__ import annotations

import re

import pytest

from e2e.conftest import CHROMIUM, LORA_NAME, build_lora, serve

if not CHROMIUM.exists():
    pytest.skip(f"the browser tests need Debian's Chromium at {CHROMIUM} (apt-get install chromium)",
                allow_module_level=True)

from playwright.sync_api import Page, expect  # noqa: E402

from e2e.test_browser import PROMPT, idle, open_tab  # noqa: E402

PHONE = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True, "device_scale_factor": 3}
TABS = ("Chat", "Image", "Speech", "3D", "Video", "Analytics", "Models")


@pytest.fixture(scope="module")
def offline_server(tmp_path_factory):
    loras = tmp_path_factory.mktemp("phone-loras")  # empty when the app is built
    with serve("--profile", "auto", "--log-dir", str(tmp_path_factory.mktemp("phone-logs")),
               "--lora-dir", str(loras)) as served:
        served.loras = loras
        yield served


@pytest.fixture
def phone(browser, request):
    from e2e.conftest import session_page

    with session_page(browser, request.node.name, **PHONE) as page:
        yield page


def test_every_tab_is_one_tap_away_and_the_banner_is_one_line(offline_server, phone: Page):
    phone.goto(offline_server.url)
    for name in TABS:
        tab = phone.get_by_role("tab", name=name, exact=True)
        expect(tab).to_be_visible()
        box = tab.bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390, f"{name} is off screen: {box}"
    banner = phone.locator("#profile-notice")
    expect(banner).to_contain_text("Offline mode")
    assert banner.bounding_box()["height"] < 80  # one line, closed: the studio fills the first screen
    open_tab(phone, "Models")  # reached by one tap
    expect(phone.get_by_role("tab", name="Models", exact=True)).to_have_attribute("aria-selected", "true")


def test_chat_on_a_phone(offline_server, phone: Page):
    phone.goto(offline_server.url)
    panel = open_tab(phone, "Chat")
    box = panel.get_by_placeholder("Type a message and press Enter")
    send = panel.get_by_role("button", name="Send", exact=True)
    assert box.bounding_box()["width"] >= 150  # not cramped beside the buttons
    send.tap()  # an empty message does nothing: no error, no turn
    expect(panel.get_by_test_id("user")).to_have_count(0)
    expect(phone.locator(".toast-body")).to_have_count(0)
    box.fill("Hello from a phone")
    send.tap()
    expect(panel.get_by_test_id("user")).to_have_text("Hello from a phone")
    expect(panel.locator("#chat-status")).to_contain_text(re.compile(r"tokens/s .* request [0-9a-f]{32}"))
    expect(panel.get_by_test_id("bot")).to_have_count(1)
    expect(send).to_be_enabled()  # the turn is over: Send again, nothing left to stop
    expect(panel.get_by_role("button", name="Stop", exact=True)).to_be_disabled()


def test_the_image_lands_under_the_generate_button(offline_server, phone: Page):
    phone.goto(offline_server.url)
    panel = open_tab(phone, "Image")
    panel.get_by_role("textbox", name=PROMPT).fill("a fox")
    generate = panel.get_by_role("button", name="Generate", exact=True)
    generate.tap()
    image = panel.get_by_role("img", name=re.compile(r"^seed \d+ · "))
    expect(image).to_be_visible()
    idle(panel)
    below = image.bounding_box()["y"] - (generate.bounding_box()["y"] + generate.bounding_box()["height"])
    assert 0 <= below < 200, f"the image is {below:.0f} px below Generate"


def test_an_adapter_added_after_the_start_is_listed_when_a_page_opens(offline_server, phone: Page):
    """No Refresh needed: the Image tab's cards and the Video tab's picker read the folders at page load."""
    build_lora(offline_server.loras)
    phone.goto(offline_server.url)
    panel = open_tab(phone, "Image")
    expect(panel.locator("#lora-cards")).to_contain_text(LORA_NAME)
    expect(panel.get_by_text("No adapters found")).to_have_count(0)
    video = open_tab(phone, "Video")
    video.get_by_role("combobox", name="Adapters").click()
    expect(phone.get_by_role("option", name=LORA_NAME)).to_be_visible()
