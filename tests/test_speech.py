"""Speech: every tiny-profile model and Piper speak a readable WAV; long text is split, spoken in order and joined;
Stop returns the partial clip; bad input gets a 4xx naming the field."""

from __future__ import annotations

import io
import json
import random
import threading

import numpy as np
import pytest
import soundfile as sf

from conftest import call, collect_rows, routes, tiny_studio
from studio.backends.speech import (MAX_TEXT_CHARS, PAUSE_SECONDS, SpeechRequest, join_clips, split_sentences,
                                    synthesize, validate, wav_bytes)
from studio.contract import InputError, UnknownModelError
from studio.ui.controls import StopFlags

SAMPLE_RATES = {"tiny-bark": 24_000, "tiny-vits": 16_000, "piper-joe": 22_050}  # Bark/EnCodec, MMS-TTS, Joe medium
THREE = "The first sentence is here. Then comes the second one! Is this the third?"


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """One studio for the module, so each model loads once."""
    return tiny_studio(tmp_path_factory.mktemp("speech-logs"))


@pytest.fixture(scope="module")
def log_rows(studio) -> list[dict]:
    return collect_rows(studio)


@pytest.fixture(scope="module")
def http(studio):
    with routes(studio) as client:
        yield client


@pytest.fixture
def rows(studio, log_rows):
    """The request-log rows written during one test."""
    log_rows.clear()
    return log_rows


def speak(studio, text: str, model: str = "tiny-vits", seed: int | None = None, **fields):
    return synthesize(studio, SpeechRequest(text, model, seed=seed), call(**fields))


# ---------------------------------------------------------------------------------------------- splitting


def test_split_gives_sentences_in_order():
    text = 'One two.  Three, four!\nFive six? He said "seven." Eight… Nine 你好。再见！'
    assert split_sentences(text, 200) == ["One two.", "Three, four!", "Five six?", 'He said "seven."', "Eight…",
                                          "Nine 你好。", "再见！"]


def test_split_breaks_a_long_sentence_at_a_comma_then_a_space_then_anywhere():
    assert split_sentences("aaaa bbbb, cccc dddd eeee.", 16) == ["aaaa bbbb,", "cccc dddd eeee."]
    assert split_sentences("aaaa bbbb cccc dddd eeee.", 16) == ["aaaa bbbb cccc", "dddd eeee."]
    assert split_sentences("x" * 45, 20) == ["x" * 20, "x" * 20, "x" * 5]


@pytest.mark.parametrize("seed", range(20))
def test_split_never_loses_text(seed):
    rng = random.Random(seed)
    words = ["alpha", "beta,", "gamma.", "delta!", "epsilon?", "[laughs]", "—", "zeta;", "x" * 70, "\n", "é", "。"]
    text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 200)))
    limit = rng.choice([20, 60, 200])
    pieces = split_sentences(text, limit)
    assert all(0 < len(piece) <= limit for piece in pieces)
    assert "".join("".join(piece.split()) for piece in pieces) == "".join(text.split())


def test_join_puts_a_pause_between_non_empty_clips():
    a, b = np.ones(3, np.float32), np.full(2, 0.5, np.float32)
    joined = join_clips([a, np.zeros(0, np.float32), b], sample_rate=8)
    pause = int(PAUSE_SECONDS * 8)
    np.testing.assert_array_equal(joined, np.concatenate([a, np.zeros(pause, np.float32), b]))


# ---------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("model", ["tiny-bark", "tiny-vits", "piper-joe"])
def test_each_speech_model_returns_a_readable_wav(studio, model):
    assert model in studio.models("text-to-speech")
    result = speak(studio, "Hello there.", model, seed=7)
    data, rate = sf.read(io.BytesIO(wav_bytes(result)), dtype="float32")
    assert rate == result.sample_rate == SAMPLE_RATES[model]
    assert data.ndim == 1 and len(data) / rate == pytest.approx(result.seconds) and result.seconds > 0
    assert np.isfinite(data).all() and np.abs(data).max() > 0
    assert result.pieces == result.total_pieces == 1 and result.rtf > 0 and not result.stopped


def test_piper_is_sized_from_its_estimate(studio):
    speak(studio, "Hi.", "piper-joe")
    piper = next(m for m in studio.cache.snapshot().models if m.id == "piper-joe")
    assert piper.bytes > 50 * 2**20  # the onnx file is about 63 MB; torch sees no modules in it


def test_a_seed_repeats_a_clip_and_another_seed_changes_it(studio):
    first, again, other = (speak(studio, "Same words.", seed=seed) for seed in (1, 1, 2))
    np.testing.assert_array_equal(first.audio, again.audio)
    assert first.seed == 1 and not np.array_equal(first.audio, other.audio)
    assert speak(studio, "Same words.").seed is not None  # a random seed is reported back


def test_long_text_is_spoken_piece_by_piece_in_order(studio, rows):
    steps = []
    result = speak(studio, THREE, seed=11, progress=lambda fraction, desc: steps.append((fraction, desc)))
    sentences = split_sentences(THREE, 400)
    singles = [speak(studio, sentence, seed=11 + i).audio for i, sentence in enumerate(sentences)]
    assert result.pieces == result.total_pieces == 3
    np.testing.assert_array_equal(result.audio, join_clips(singles, result.sample_rate))
    assert [desc for _, desc in steps] == ["Speaking piece 1 of 3", "Speaking piece 2 of 3", "Speaking piece 3 of 3",
                                           "Done"]
    assert [round(f, 2) for f, _ in steps] == [0.0, 0.33, 0.67, 1.0]
    assert rows[0]["status"] == "ok" and rows[0]["audio_seconds"] == pytest.approx(result.seconds, abs=1e-3)


def test_stop_ends_after_the_current_piece_with_the_partial_clip(studio, rows):
    cancel = threading.Event()
    # Stop is pressed while the first piece is being spoken.
    result = speak(studio, THREE, seed=5, cancel=cancel, progress=lambda fraction, desc: cancel.set())
    first = speak(studio, split_sentences(THREE, 400)[0], seed=5)
    assert result.stopped and result.pieces == 1 and result.total_pieces == 3
    np.testing.assert_array_equal(result.audio, first.audio)
    assert rows[0]["status"] == "stopped" and rows[1]["status"] == "ok"


def test_stop_flags_stop_only_the_request_of_that_session():
    flags = StopFlags()
    with flags.running("mine") as mine, flags.running("other") as other:
        assert flags.stop("mine") and mine.is_set() and not other.is_set()
    assert not flags.stop("mine")  # nothing running there any more


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("text, model, voice, seed, field", [
    ("", "tiny-vits", None, None, "text"),
    (" \n\t ", "tiny-vits", None, None, "text"),
    ("a" * (MAX_TEXT_CHARS + 1), "tiny-vits", None, None, "text"),
    ("?!…", "tiny-vits", None, None, "text"),
    ("Hi.", "tiny-vits", "v2/en_speaker_6", None, "voice"),
    ("Hi.", "piper-joe", "amy", None, "voice"),
    ("Hi.", "tiny-vits", None, -1, "seed"),
    ("Hi.", "tiny-llama", None, None, "model"),
    ("Hi \ud800.", "tiny-vits", None, None, "text"),
    ("Hi\x00 there.", "piper-joe", None, None, "text"),
])
def test_bad_input_names_the_field(studio, http, text, model, voice, seed, field):
    with pytest.raises(InputError, match=f"^{field}: "):
        validate(studio, SpeechRequest(text, model, voice, seed))
    body = json.dumps({"text": text, "model": model, "voice": voice, "seed": seed})  # ASCII: "\ud800" as an escape
    response = http.post("/generate/speech", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and response.json()["detail"].startswith(f"{field}: ")


def test_unknown_model_is_404(studio, http):
    with pytest.raises(UnknownModelError):
        validate(studio, SpeechRequest("Hi.", "no-such-model"))
    response = http.post("/generate/speech", json={"text": "Hi.", "model": "no-such-model"})
    assert response.status_code == 404 and response.json()["detail"].startswith("model: ")


def test_text_cap_is_accepted_at_the_limit(studio):
    spec, req = validate(studio, SpeechRequest("a" * MAX_TEXT_CHARS, "tiny-vits"))
    assert spec.id == "tiny-vits" and len(req.text) == MAX_TEXT_CHARS


# ---------------------------------------------------------------------------------------------- HTTP and client


def test_post_generate_speech_returns_wav(http):
    response = http.post("/generate/speech", json={"text": THREE, "model": "tiny-vits", "seed": 3})
    assert response.status_code == 200 and response.headers["content-type"] == "audio/wav"
    data, rate = sf.read(io.BytesIO(response.content))
    assert rate == 16_000 and len(data) / rate == pytest.approx(float(response.headers["x-audio-seconds"]), abs=1e-3)
    assert response.headers["x-seed"] == "3" and response.headers["x-pieces"] == "3" and np.isfinite(data).all()


def test_post_generate_speech_defaults_to_the_first_speech_model(http, studio):
    response = http.post("/generate/speech", json={"text": "Hi."})
    assert response.status_code == 200
    assert sf.info(io.BytesIO(response.content)).samplerate == SAMPLE_RATES[studio.models("text-to-speech")[0]]


def test_gradio_client_generate_speech_returns_a_wav_path(live_server):
    from gradio_client import Client

    _studio, url = live_server
    client = Client(url, verbose=False)
    path = client.predict("Hello from the client.", "piper-joe", None, None, api_name="/generate_speech")
    data, rate = sf.read(path)
    assert str(path).endswith(".wav") and rate == 22_050 and len(data) > 0 and np.isfinite(data).all()
    with pytest.raises(Exception, match="text: must not be empty"):
        client.predict("  ", "piper-joe", None, None, api_name="/generate_speech")
