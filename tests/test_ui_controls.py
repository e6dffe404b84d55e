"""What every generation tab shares (studio.ui.controls): errors that leave the results in view, Generate and Stop
that say whether something runs, and a request id per generation that is the log row's."""

from __future__ import annotations

import inspect

import gradio as gr
import pytest

from conftest import collect_rows
from studio.ui import shape_tab, speech_tab
from studio.ui.controls import busy, kept_on_error, traced


def test_an_error_keeps_the_results_and_replaces_the_stale_status():
    gallery, status, state = object(), object(), object()

    def fails(prompt: str, request: gr.Request = None):
        raise gr.Error("steps: must be from 1 to 4 for tiny-sd-turbo")

    kept = kept_on_error(fails, [gallery, status, state], status)
    assert kept("x") == [gr.update(), "⚠️ steps: must be from 1 to 4 for tiny-sd-turbo", gr.update()]
    assert kept_on_error(lambda prompt: ["image", "Seed used: 1", {}], [gallery, status, state], status)("x") == \
        ["image", "Seed used: 1", {}]
    assert "request" in inspect.signature(kept).parameters  # Gradio still sees gr.Request in the signature


def test_generate_is_off_and_stop_on_only_while_running():
    assert busy(True) == (gr.update(interactive=False), gr.update(interactive=True))
    assert busy(False) == (gr.update(interactive=True), gr.update(interactive=False))


def test_each_tab_generation_shows_its_own_log_rows_request_id(studio):
    rows = collect_rows(studio)
    speech = speech_tab.runner(studio)
    shown = [speech_tab.speak(speech, "Hello.", "piper-joe", None, None, session="s")[1] for _ in range(2)]
    ids = [row["request_id"] for row in rows]
    assert len(set(ids)) == 2 and [text.endswith(f"request `{i}`") for text, i in zip(shown, ids)] == [True, True]
    assert traced("done", "abc") == "done · request `abc`"


@pytest.mark.usefixtures("one_thread")
def test_the_turntable_is_shown_at_the_viewers_size(studio):
    from PIL import Image

    req = shape_tab.ShapeRequest(prompt="a chair", model="tiny-shap-e", steps=2, frame_size=32, turntable=True)
    _preview, gif, _files, text = shape_tab.make_shape(shape_tab.runner(studio), req, session="s")
    with Image.open(gif) as image:
        assert image.size == (shape_tab.TURNTABLE_PX, shape_tab.TURNTABLE_PX)  # not a 32-pixel speck
    assert "request `" in text
