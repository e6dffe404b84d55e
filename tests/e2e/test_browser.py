"""The studio in a real browser (Debian's Chromium through Playwright), on the tiny profile: a streamed chat reply,
an image with a LoRA adapter at a chosen weight, speech in the audio player, a 3D shape in the viewer, a video
clip playing in the Video tab, Analytics counting those requests, Stop ending a generation early, the login page
when auth is on, and no request to any host other than the studio's own.

The tests share one server and check what it logged; Analytics runs after the generations so that its figures
show every modality."""

from __future__ import annotations

import io
import re
import time
from collections import Counter
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

from e2e.conftest import API_KEY, CHROMIUM, LOGIN, LORA_NAME
from studio.ui.controls import BUSY

if not CHROMIUM.exists():
    pytest.skip(f"the browser tests need Debian's Chromium at {CHROMIUM} (apt-get install chromium)",
                allow_module_level=True)

from playwright.sync_api import Locator, Page, expect  # noqa: E402

PROMPT = re.compile(r"^Prompt")  # not "Negative prompt"
LOCAL_SCHEMES = ("data", "blob", "about")  # content the page holds itself, no network

# From now on, record the text of the last element matching a selector at every change of the page.
WATCH = """(selector) => {
    const seen = (window.seen ??= {})[selector] = [];
    new MutationObserver(() => {
        const found = document.querySelectorAll(selector);
        if (found.length) seen.push(found[found.length - 1].innerText);
    }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""
# The bars of the first figure on the visible tab, once they add up to `total`: {trace name: sum of its bars}.
PLOTTED = """(total) => {
    const plot = [...document.querySelectorAll('.js-plotly-plot')].find(el => el.offsetParent !== null);
    const bars = Object.fromEntries((plot?.data ?? []).map(t => [t.name, t.y.reduce((a, b) => a + b, 0)]));
    return Object.values(bars).reduce((a, b) => a + b, 0) === total && bars;
}"""
DURATION = """(audio) => audio.readyState >= 1 ? audio.duration
    : new Promise(done => audio.addEventListener("loadedmetadata", () => done(audio.duration), {once: true}))"""
# Play (muted, as browsers allow without a click) until the playhead moves; returns where it is.
PLAYED = """async (video) => {
    video.muted = true;
    await video.play();
    while (video.currentTime === 0) await new Promise(done => setTimeout(done, 50));
    return video.currentTime;
}"""
REPLY = '#chat-history [data-testid="bot"]'
PROGRESS = ".progress-level-inner"  # the progress bar's text, e.g. "Step 3 of 50"


def open_tab(page: Page, *names: str) -> Locator:
    """Click a tab (then a sub-tab of it, when named) and return the innermost panel shown: a tab with sub-tabs
    shows its panel and its selected sub-tab's (Playwright's role selectors skip the hidden panels)."""
    for name in names:
        page.get_by_role("tab", name=name, exact=True).click()
    panel = page.get_by_role("tabpanel").filter(has_not=page.get_by_role("tabpanel"))
    expect(panel).to_have_count(1)
    return panel


def open_studio(page: Page, url: str, *tabs: str) -> Locator:
    page.goto(url)
    return open_tab(page, *tabs)


def fill(box: Locator, value: float | str) -> None:
    """Type a value and leave the box, which is when Gradio takes it."""
    box.fill(str(value))
    box.press("Tab")


def set_slider(panel: Locator, label: str, value: float) -> None:
    fill(panel.get_by_label(f"number input for {label}", exact=True), value)


def choose(page: Page, panel: Locator, label: str, option: str | re.Pattern) -> None:
    """Pick an option of a dropdown (also of a multiselect one): its whole text, or a pattern."""
    panel.get_by_role("combobox", name=label).click()
    page.get_by_role("option", name=option, exact=isinstance(option, str)).click()
    page.keyboard.press("Escape")  # a multiselect dropdown stays open


def idle(panel: Locator) -> None:
    """No event of the tab is running: its progress trackers are gone."""
    expect(panel.locator(".progress-text, .progress-level, .eta-bar")).to_have_count(0)


def last_row(server, modality: str) -> dict:
    rows = [row for row in server.rows if row["modality"] == modality]
    assert rows, f"no {modality} request was logged"
    return rows[-1]


def make_image(page: Page, url: str, adapter: str, weight: float) -> Locator:
    """Generate an image on the Image tab with one adapter at `weight`; returns the gallery's new image."""
    panel = open_studio(page, url, "Image")
    panel.get_by_role("textbox", name=PROMPT).fill("a watercolor fox in the snow")
    fill(panel.get_by_role("textbox", name="Seed"), 7)  # label and info text name it
    choose(page, panel, "Adapters", adapter)
    set_slider(panel, adapter, weight)  # the adapter's weight slider is labelled with its name
    panel.get_by_role("button", name="Generate", exact=True).click()
    image = panel.get_by_role("img", name=f"seed 7 · 1 steps · {adapter}:{weight:g}")  # its caption
    expect(image).to_be_visible()
    return image


def drawn(page: Page, canvas: Locator, seconds: float = 30) -> bool:
    """Whether colour appears on the canvas within `seconds` (its background and labels are grey). WebGL keeps
    no drawing buffer to read back, so look at screenshots of it."""
    for _ in range(int(seconds * 2)):
        shot = np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("RGB"), dtype=np.int16)
        if (shot.max(axis=2) - shot.min(axis=2) > 30).mean() > 0.001:
            return True
        page.wait_for_timeout(500)
    return False


def slow_down(module, seconds: float, monkeypatch) -> None:
    """Make each forward of a loaded model last `seconds` longer (a real model's pace), so that a generation
    outlasts the clicks a test makes during it however slow the browser is."""
    forward = module.forward
    monkeypatch.setattr(module, "forward", lambda *a, **k: (time.sleep(seconds), forward(*a, **k))[1])


def send_chat(panel: Locator, message: str) -> None:
    """Send a message on the Chat tab and wait for the reply to finish."""
    panel.get_by_placeholder("Type a message and press Enter").fill(message)
    panel.get_by_role("button", name="Send", exact=True).click()
    expect(panel.locator("#chat-status")).to_contain_text("tokens/s")  # the summary under a finished reply


def test_chat_streams_a_reply(server, page):
    panel = open_studio(page, server.url, "Chat")
    set_slider(panel, "Max new tokens", 128)  # random weights rarely end early: many pieces to stream
    fill(panel.get_by_role("textbox", name="Seed"), 5)  # some seeds stream in one piece (held-back partial UTF-8)
    page.evaluate(WATCH, REPLY)
    send_chat(panel, "Hello there, studio")
    expect(panel.get_by_test_id("user")).to_have_text("Hello there, studio")
    reply = panel.get_by_test_id("bot").inner_text()
    lengths = [len(text) for text in page.evaluate("s => window.seen[s]", REPLY) if text]
    assert len(set(lengths)) >= 2 and lengths == sorted(lengths), f"the reply did not grow: {lengths}"
    assert lengths[-1] == len(reply)
    row = last_row(server, "chat")
    assert (row["client"], row["status"]) == ("ui", "ok") and row["completion_tokens"] > 0


def test_image_with_a_lora_at_a_chosen_weight(server, page):
    image = make_image(page, server.url, LORA_NAME, 0.6)
    expect(page.get_by_role("tabpanel").get_by_text("Seed used: 7")).to_be_visible()
    assert image.evaluate("img => img.complete && img.naturalWidth") == 64  # the tiny model's 64×64 image
    row = last_row(server, "image")
    assert (row["client"], row["status"], row["seed"]) == ("ui", "ok", 7)
    assert row["adapters"] == {LORA_NAME: 0.6}


def test_speech_shows_the_audio_player(server, page):
    panel = open_studio(page, server.url, "Speech")
    choose(page, panel, "Model", re.compile(r"^Piper · Joe .* · [\d.]+ MiB"))  # label · size (the pickers' form)
    panel.get_by_label("Text").fill("Hello from the studio.")
    panel.get_by_role("button", name="Speak", exact=True).click()
    expect(panel.get_by_text("s of audio")).to_be_visible()
    expect(panel.get_by_role("button", name="Play", exact=True)).to_be_visible()
    seconds = panel.locator("audio[src^='blob:']").evaluate(DURATION)  # the clip the player has loaded
    row = last_row(server, "text-to-speech")
    assert (row["model"], row["status"]) == ("piper-joe", "ok") and row["audio_seconds"] > 0.5
    assert seconds == pytest.approx(row["audio_seconds"], abs=0.05)


def test_3d_shape_shows_the_preview_canvas(server, page):
    panel = open_studio(page, server.url, "3D")
    panel.get_by_role("textbox", name=PROMPT).fill("a red wooden chair")
    set_slider(panel, "Steps", 2)
    panel.get_by_label("Render the turntable").uncheck()
    panel.get_by_role("button", name="Generate", exact=True).click()
    expect(panel.get_by_text("faces")).to_be_visible()
    canvas = panel.locator("canvas")  # gr.Model3D draws with WebGL (SwiftShader here)
    expect(canvas).to_be_visible()
    assert drawn(page, canvas), "the 3D preview shows no mesh"
    row = last_row(server, "3d")
    assert (row["status"], row["steps"]) == ("ok", 2) and row["faces"] > 0
    offered = [link.get_attribute("download") for link in panel.locator("a[download]").all() if link.is_visible()]
    assert sorted(offered) == sorted(f"shape-{row['seed']}.{fmt}" for fmt in ("glb", "ply", "obj")), offered


def test_a_size_typed_past_the_cap_is_set_to_it_with_a_notice(server, page):
    panel = open_studio(page, server.url, "Image")
    width = panel.get_by_label("number input for Width", exact=True)
    cap = width.get_attribute("max")
    fill(width, 10000)
    expect(width).to_have_value(cap)
    expect(panel.get_by_role("status")).to_have_text(f"10000 is more than this allows: set to {cap}.")
    fill(width, 64)  # a value in range takes the notice away
    expect(panel.locator(".clamp-notice")).to_have_count(0)


def test_video_plays_in_the_tab(server, page):
    panel = open_studio(page, server.url, "Video")
    panel.get_by_role("textbox", name=PROMPT).fill("a fox running through the snow")
    fill(panel.get_by_role("textbox", name="Seed"), 3)
    set_slider(panel, "Steps", 2)
    panel.get_by_role("button", name="Generate", exact=True).click()
    expect(panel.get_by_text("Seed used: 3")).to_be_visible()
    video = panel.locator("video")
    expect(video).to_have_count(1)
    seconds = video.evaluate(DURATION)  # the player's H.264 MP4: Chromium demuxed and decoded it
    row = last_row(server, "video")
    assert (row["client"], row["status"], row["seed"], row["frames"]) == ("ui", "ok", 3, 8)
    assert 0 < seconds == pytest.approx(row["video_seconds"], abs=0.15)
    played = video.evaluate(PLAYED)
    assert played > 0, "the clip does not play"
    expect(panel.get_by_role("img", name=re.compile("^seed 3 · 8 frames at 8 fps"))).to_be_visible()  # the list


def test_enter_while_a_reply_runs_keeps_the_message_and_starts_nothing(server, page, monkeypatch):
    """Send and Retry are off while a reply streams; Enter in the box then must not queue a turn behind it (it
    would be sent with the history of before the reply) but keep the text and say why. Each token is made slow
    and the reply long: at least 64 tokens (the default length) of 0.2 s, never ended early by a random-weight
    end-of-sequence token."""
    with server.studio.cache.use("tiny-llama") as lease:
        slow_down(lease.model.model, 0.2, monkeypatch)
        monkeypatch.setattr(lease.model.engine, "eos", frozenset())
    panel = open_studio(page, server.url, "Chat")
    box = panel.get_by_placeholder("Type a message and press Enter")
    box.fill("first")
    box.press("Enter")
    expect(panel.get_by_test_id("bot")).not_to_be_empty()  # the reply streams
    for button in ("send", "retry", "undo", "clear"):
        expect(panel.locator(f"#chat-{button}")).to_be_disabled()
    logged = len(server.rows)
    box.fill("second")
    box.press("Enter")
    expect(page.get_by_text(BUSY)).to_be_visible()
    expect(panel.locator("#chat-status")).to_contain_text("tokens/s")  # the first reply ended
    idle(panel)
    expect(box).to_have_value("second")
    expect(panel.get_by_test_id("user")).to_have_text(["first"])
    assert len(server.rows) == logged + 1 and last_row(server, "chat")["status"] == "ok"
    expect(panel.get_by_role("button", name="Send", exact=True)).to_be_enabled()


def test_stop_ends_a_generation_early(server, page, monkeypatch):
    """Stop reaches the running generation whatever the load. Each step is made to last a quarter second (a real
    model's pace), so the 50 steps outlast the click however slow the browser is: with the tiny model's own
    50-ms steps the generation could finish before a click on a busy machine arrived, a race of the test."""
    with server.studio.cache.use("tiny-sd") as lease:
        slow_down(lease.model.pipe.unet, 0.25, monkeypatch)
    panel = open_studio(page, server.url, "Image")
    choose(page, panel, "Model", "tiny-sd")  # its largest image with guidance: the slowest steps to stop
    steps = panel.get_by_label("number input for Steps", exact=True)
    expect(steps).to_have_attribute("max", "50")  # the model's caps and defaults have arrived
    expect(panel.get_by_label("number input for Guidance scale", exact=True)).to_have_value("7.5")
    for _ in range(3):  # on a loaded machine a late model-change update can set Steps back to the default
        idle(panel)
        fill(steps, 50)
        page.wait_for_timeout(1000)
        if steps.input_value() == "50":
            break
    expect(steps).to_have_value("50")
    set_slider(panel, "Width", 128)
    set_slider(panel, "Height", 128)
    panel.get_by_role("textbox", name=PROMPT).fill("a slow, detailed landscape")
    logged = len(server.rows)
    page.evaluate(WATCH, PROGRESS)
    generate, stop = (panel.get_by_role("button", name=name, exact=True) for name in ("Generate", "Stop"))
    expect(stop).to_be_disabled()  # nothing to stop yet
    generate.click()
    expect(panel.get_by_text(re.compile(r"Step \d+ of 50")).first).to_be_visible()  # steps are running
    expect(generate).to_be_disabled()  # a second click cannot queue a second image
    panel.get_by_role("textbox", name=PROMPT).press("Shift+Enter")  # nor can submitting the (two-line) prompt
    expect(page.get_by_text(BUSY)).to_be_visible()
    expect(panel.locator(PROGRESS)).to_have_count(1)  # one progress bar, on the gallery
    stop.click()
    expect(panel.get_by_text("stopped")).to_be_visible()
    idle(panel)
    expect(generate).to_be_enabled()
    expect(stop).to_be_disabled()
    steps_shown = [int(n) for text in page.evaluate("s => window.seen[s]", PROGRESS)
                   for n in re.findall(r"Step (\d+) of 50", text)]
    assert steps_shown and max(steps_shown) < 50, f"the progress bar went on: {steps_shown}"
    assert len(server.rows) == logged + 1 and last_row(server, "image")["status"] == "stopped"


def test_each_generation_has_its_own_request_id_shown_with_it(server, page):
    """Two generations of one page: two log rows with different ids, each shown beside its result."""
    panel = open_studio(page, server.url, "Image")
    panel.get_by_role("textbox", name=PROMPT).fill("a lighthouse")
    shown, previous = [], "-"
    for _ in range(2):
        logged = len(server.rows)
        panel.get_by_role("button", name="Generate", exact=True).click()
        line = panel.get_by_text(re.compile(rf"^Seed used: .* · request (?!{previous})[0-9a-f]{{32}}$"))
        expect(line).to_have_count(1)  # this generation's line, not the last one's
        expect(panel.get_by_role("button", name="Generate", exact=True)).to_be_enabled()
        assert len(server.rows) == logged + 1
        shown.append((re.search(r"[0-9a-f]{32}$", line.inner_text()).group(), server.rows[-1]["request_id"]))
        previous = shown[-1][0]
        idle(panel)
    assert shown[0][0] == shown[0][1] and shown[1][0] == shown[1][1] and shown[0][0] != shown[1][0]


def test_analytics_reflects_the_requests(server, page):
    """The totals and the requests figure count every logged request (the tests above made most of them), and
    Refresh shows a new one."""
    send_chat(open_studio(page, server.url, "Chat"), "count me")
    panel = open_tab(page, "Analytics")
    panel.get_by_role("button", name="Refresh", exact=True).click()  # the tab drew its figures at page load
    totals = panel.locator("p", has_text=re.compile(r"\d+ requests"))  # the totals line
    stopped = sum(row["status"] == "stopped" for row in server.rows)
    expect(totals).to_contain_text(f"{len(server.rows):,} requests")
    expect(totals).to_contain_text(f"stopped {stopped}")
    counts = Counter(f"{row['modality']} · {row['model']}" for row in server.rows)
    plotted = page.wait_for_function(PLOTTED, arg=len(server.rows)).json_value()  # the requests figure
    assert plotted == counts

    send_chat(open_tab(page, "Chat"), "and me")
    open_tab(page, "Analytics").get_by_role("button", name="Refresh", exact=True).click()
    expect(totals).to_contain_text(f"{len(server.rows):,} requests")


def log_in(page: Page, user: str, password: str) -> None:
    page.get_by_label("username").fill(user)
    page.get_by_label("password").fill(password)
    page.get_by_role("button", name="Login").click()


def test_login_when_auth_is_on(auth_server, page):
    page.goto(auth_server.url)
    log_in(page, LOGIN[0], "wrong")
    expect(page.get_by_text("Incorrect Credentials")).to_be_visible()
    expect(page.get_by_role("tab")).to_have_count(0)
    log_in(page, *LOGIN)
    for tab in ("Chat", "Speech", "Image", "3D", "Video", "Analytics", "Models"):
        expect(page.get_by_role("tab", name=tab, exact=True)).to_be_visible()
    send_chat(open_tab(page, "Chat"), "logged in")  # the queue works with the login cookie
    assert last_row(auth_server, "chat")["status"] == "ok"


def test_programs_without_the_key_are_refused_while_the_page_works(server, page):
    """Every browser test here runs with --api-key (conftest): the key guards Gradio's queue against programs, while
    the page's own session cookie lets the UI in."""
    import httpx

    assert server.studio.settings.api_keys == (API_KEY,)
    anonymous = httpx.post(server.url + "/gradio_api/queue/join", json={"data": [], "fn_index": 0,
                                                                       "session_hash": "x"})
    assert anonymous.status_code == 401
    send_chat(open_studio(page, server.url, "Chat"), "with a key set")
    assert last_row(server, "chat")["status"] == "ok"


def test_the_page_contacts_only_the_studio(server, auth_server, page, requested_urls):
    """Checked over every request of every page in this module (generations, players, viewer, plots, login)."""
    open_studio(page, server.url, "Chat")
    for tabs in (("Chat", "Voice chat"), ("Speech",), ("Speech", "Speech to text"), ("Image",), ("3D",),
                 ("Video",), ("Analytics",), ("Models",)):
        open_tab(page, *tabs)
    own = {urlsplit(s.url).netloc for s in (server, auth_server)}
    elsewhere = {url for url in requested_urls if urlsplit(url).scheme not in LOCAL_SCHEMES
                 and urlsplit(url).netloc not in own}
    assert requested_urls and not elsewhere, f"requests to other hosts: {sorted(elsewhere)}"
