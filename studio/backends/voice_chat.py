"""Voice chat: the user speaks, the studio transcribes, the chat model answers as a stream, and the answer is spoken
sentence by sentence while its text still streams in, so the first sentence sounds before the reply is finished.

A turn is the three services one after another: `transcribe`, `stream_chat`, and `synthesize` for each sentence as
soon as it is complete (the chat model keeps writing in its own thread meanwhile). Each goes through the cache,
the memory budget and the request log like any other request (one speech-to-text row, one chat row and one
text-to-speech row per spoken sentence, all under the turn's request id), so nothing here loads or runs a model
itself; the models need to fit the budget together, since the chat model is still pinned while a sentence is
spoken. The turn's cancel event (Stop) ends whichever service is running, and the turn with it.

It lives here, not in the tab, because it is a service of its own: the tab, the tests and `bench/voice_chat.py`
drive the same function and read the same timings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Iterator

import numpy as np

from studio.backends import chat, speech, transcription
from studio.backends.chat import ChatEvent, ChatOptions, ChatRequest, stream_chat
from studio.backends.speech import SpeechOptions, SpeechRequest, speakable, split_sentences, synthesize
from studio.backends.transcription import TranscriptionRequest, TranscriptionResult, transcribe
from studio.contract import InputError
from studio.runtime import Call, Studio

REPLY_CHARS_PER_TOKEN = 4  # to guess how long speaking a reply of max_new_tokens takes (ZeroGPU)
PROBE = "Hello."  # a text every voice speaks: checks the voice model and voice before anything is heard


@dataclass
class VoiceChatRequest:
    heard: TranscriptionRequest  # the recording, and the model and language to hear it with
    chat: ChatRequest  # the conversation before this turn, the chat model and its sampling
    speech: SpeechRequest  # the voice model and voice (`text` is unused: each sentence of the reply is spoken)


@dataclass
class Timings:
    """Seconds from the end of the user's speech (when the recording reaches the service) to each milestone."""

    heard: float | None = None  # the transcript is ready
    first_token: float | None = None  # the chat model's first piece of text
    first_sentence: float | None = None  # the reply's first complete sentence
    first_sound: float | None = None  # its audio is ready to play

    def split(self) -> dict[str, float | None]:
        """The wait for the first sound in its three parts: transcription, first token, first spoken sentence."""
        def gap(later: float | None, earlier: float | None) -> float | None:
            return None if later is None or earlier is None else round(later - earlier, 3)

        return {"transcription_s": gap(self.heard, 0.0), "first_token_s": gap(self.first_token, self.heard),
                "first_spoken_sentence_s": gap(self.first_sound, self.first_token),
                "end_of_speech_to_first_sound_s": gap(self.first_sound, 0.0)}


@dataclass
class Loading:
    """A model of the turn is not in memory yet: the next step loads it first."""

    model: str
    modality: str


@dataclass
class Heard:
    text: str  # empty when the recording held no speech: the turn ends there
    result: TranscriptionResult


@dataclass
class Replying:
    text: str  # the reply's next piece


@dataclass
class Spoken:
    sentence: str
    audio: np.ndarray  # float32 mono
    sample_rate: int


@dataclass
class Finished:
    timings: Timings
    reply: ChatEvent | None = None  # the chat's final event (usage, finish reason, seed); None: nothing was asked
    sentences: int = 0  # sentences spoken
    stopped: bool = False


VoiceEvent = Loading | Heard | Replying | Spoken | Finished


@dataclass
class _Turn:
    """What one turn has said so far, and when."""

    started: float = field(default_factory=time.perf_counter)
    timings: Timings = field(default_factory=Timings)
    reply: str = ""
    done: int = 0  # sentences of the reply spoken or skipped so far
    said: int = 0  # of them, those spoken

    def mark(self, milestone: str) -> None:
        """Note the time of a milestone (a field of Timings) the first time it is reached."""
        if getattr(self.timings, milestone) is None:
            setattr(self.timings, milestone, round(time.perf_counter() - self.started, 3))


def validate(studio: Studio, req: VoiceChatRequest) -> VoiceChatRequest:
    """The request with its three models named; the voice is checked before anything is heard. The recording
    and the conversation are checked by their services (the user's message is the transcript)."""
    heard = studio.model(req.heard.model, "speech-to-text")
    talker = studio.model(req.chat.model, "chat")
    _spec, voice = speech.validate(studio, replace(req.speech, text=PROBE))
    return replace(req, heard=replace(req.heard, model=heard.id), chat=replace(req.chat, model=talker.id),
                   speech=replace(voice, text=""))


def gpu_seconds(req: VoiceChatRequest) -> float:
    """Hearing, answering, and speaking an answer as long as the reply may grow."""
    tokens = req.chat.max_new_tokens or ChatOptions.default_max_new_tokens
    return (transcription.gpu_seconds(req.heard) + chat.gpu_seconds(req.chat)
            + tokens * REPLY_CHARS_PER_TOKEN / speech.CHARS_PER_SECOND)


def voice_chat(studio: Studio, req: VoiceChatRequest, call: Call) -> Iterator[VoiceEvent]:
    """One turn: the transcript, the reply as it streams, each sentence's audio as soon as it is spoken, then the
    totals and timings. A stopped call ends the turn after the running step."""
    turn = _Turn()
    req = validate(studio, req)
    quiet = replace(call, progress=None)  # only the transcription's chunks move the progress bar

    # 1. Hear
    yield from _loading(studio, req.heard.model, "speech-to-text")
    heard = transcribe(studio, req.heard, call)
    turn.mark("heard")
    yield Heard(heard.text, heard)
    if not heard.text or call.stopped:
        yield Finished(turn.timings, stopped=call.stopped)
        return

    # 2. Answer, speaking every sentence as soon as the next one begins
    question = replace(req.chat, messages=[*req.chat.messages, {"role": "user", "content": heard.text}])
    max_chars = SpeechOptions.of(studio.registry.get(req.speech.model)).max_piece_chars or speech.MAX_TEXT_CHARS
    yield from _loading(studio, req.chat.model, "chat")
    final = None
    for event in stream_chat(studio, question, quiet):
        if event.done:
            final = event
            break
        turn.mark("first_token")
        turn.reply += event.text
        yield Replying(event.text)
        complete = split_sentences(turn.reply, max_chars)[:-1]  # the last one may still grow
        yield from _speak(studio, req.speech, complete, turn, quiet)

    # 3. Speak the last sentence
    yield from _speak(studio, req.speech, split_sentences(turn.reply, max_chars), turn, quiet)
    yield Finished(turn.timings, final, turn.said, call.stopped)


def _loading(studio: Studio, model_id: str, modality: str) -> Iterator[Loading]:
    if not studio.cache.resident(model_id):
        yield Loading(model_id, modality)


def _speak(studio: Studio, voice: SpeechRequest, sentences: list[str], turn: _Turn,
           call: Call) -> Iterator[VoiceEvent]:
    """Speak the sentences not spoken yet (the split of the text before the last sentence never changes as text
    is added, so counting them is enough)."""
    for sentence in sentences[turn.done:]:
        if call.stopped:
            return
        turn.done += 1
        turn.mark("first_sentence")
        text = speakable(sentence)
        if not any(ch.isalnum() for ch in text):  # "..." or an emoji: nothing to say
            continue
        yield from _loading(studio, voice.model, "text-to-speech")
        try:
            clip = synthesize(studio, replace(voice, text=text), call)
        except InputError as exc:
            if exc.field != "text":
                raise
            continue  # characters this voice cannot speak: the text shows them, the audio skips them
        if clip.audio.size:
            turn.mark("first_sound")
            turn.said += 1
            yield Spoken(text, clip.audio, clip.sample_rate)
