"""Speech to text: Whisper (transformers) and the offline PocketSphinx model, audio decoding, chunking and the
output formats of OpenAI's `/v1/audio/transcriptions`.

Each loader returns a dataclass with `sample_rate`, `languages` (ISO 639-1 codes it can be told, or None),
`max_chunk_seconds` and one method, `transcribe(samples, language, prompt, temperature) -> ChunkTranscript`, for
one chunk of float32 mono audio at `sample_rate`: the only place that knows the model's own calling convention.
`transcribe_long` splits longer audio at quiet points into chunks the model takes, shifts their timestamps, reports
progress per chunk and stops between chunks when asked, keeping what it has.
"""

from __future__ import annotations

import io
import re
import threading
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from studio.registry import ModelSpec

FRAME_SECONDS = 0.1  # energy frames for finding quiet cut points and silent chunks
CUT_SEARCH_SECONDS = 5.0  # a chunk ends at the quietest frame of its last 5 seconds
SILENCE_RMS = 10 ** (-60 / 20)  # a chunk whose loudest frame is below -60 dBFS is not sent to the model
SPHINX_CHUNK_SECONDS = 30.0  # a few seconds of decoding per chunk on a CPU: a fine-grained progress bar and Stop
SPHINX_PAD_SECONDS = 0.3  # speech detected by the VAD is decoded with this much audio either side
SPHINX_PAUSE_SECONDS = 0.3  # a pause this long between two words starts a new segment
SPHINX_SEGMENT_SECONDS = 10.0  # and so does a segment this long: subtitle cues stay readable
_SPHINX_FILLER = re.compile(r"^(<.*>|\[.*\]|\+\+.*\+\+)$")  # <s>, </s>, <sil>, [NOISE], ++GARBAGE++
_SPHINX_VARIANT = re.compile(r"\(\d+\)$")  # "read(2)": the dictionary's second pronunciation of "read"


class AudioDecodeError(ValueError):
    """The bytes are not audio that any decoder here can read; the message starts with the field's name."""


@dataclass
class Segment:
    """One timed piece of text; the extra fields fill OpenAI's verbose_json (0.0 where a model gives no value)."""

    start: float  # seconds from the start of the clip
    end: float
    text: str
    tokens: list[int] = field(default_factory=list)
    temperature: float = 0.0
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0
    seek: int = 0  # where the chunk this segment came from starts, in 10 ms frames (OpenAI's `seek`)


@dataclass
class ChunkTranscript:
    segments: list[Segment]
    language: str | None  # ISO 639-1 code the model was told or detected; None if it cannot say


@dataclass
class Transcript:
    segments: list[Segment]
    language: str | None
    duration: float  # seconds of audio in
    stopped: bool = False  # Stop ended it before the last chunk
    chunks: int = 0  # chunks transcribed (silent ones are skipped but counted)
    total_chunks: int = 0

    @property
    def text(self) -> str:
        return to_text(self.segments)


# ---------------------------------------------------------------------------------------------- models


@dataclass
class WhisperTranscriber:
    model: torch.nn.Module  # WhisperForConditionalGeneration
    processor: Any  # WhisperProcessor: log-mel features in, token ids out
    sample_rate: int
    languages: list[str]
    max_chunk_seconds: float = 30.0  # Whisper's encoder sees exactly 30 s windows

    def transcribe(self, samples: np.ndarray, language: str | None, prompt: str | None,
                   temperature: float) -> ChunkTranscript:
        features = self.processor.feature_extractor(samples, sampling_rate=self.sample_rate, return_tensors="pt")
        features = features.input_features.to(self.model.device, self.model.dtype)
        kwargs = {}
        if prompt:
            kwargs["prompt_ids"] = self.processor.get_prompt_ids(prompt, return_tensors="pt").to(self.model.device)
        with torch.inference_mode():
            language = language or self._detect(features)
            out = self.model.generate(features, language=language, task="transcribe", temperature=temperature,
                                      return_timestamps=True, return_segments=True, **kwargs)
        seconds = len(samples) / self.sample_rate
        # The 30 s window is padded with silence past the end of a shorter chunk: segments placed there are dropped.
        segments = [self._segment(seg, seconds, temperature) for seg in out["segments"][0]
                    if float(seg["start"]) < seconds]
        return ChunkTranscript([s for s in segments if s.text], language)

    def _detect(self, features: torch.Tensor) -> str:
        """The language token Whisper finds most likely, as a code; done here so that it can be reported."""
        token = self.processor.tokenizer.decode(self.model.detect_language(features)[0])
        return token.strip("<|>")

    def _segment(self, seg: dict, seconds: float, temperature: float) -> Segment:
        start = max(float(seg["start"]), 0.0)
        end = min(max(float(seg["end"]), start), seconds)
        tokens = [int(t) for t in seg["tokens"]]
        text = self.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        return Segment(start, end, text, tokens, temperature)


@dataclass
class SphinxTranscriber:
    decoder: Any  # pocketsphinx.Decoder; one utterance at a time, hence the lock
    sample_rate: int
    frame_rate: int  # feature frames per second: word times come in frames
    lock: threading.Lock = field(default_factory=threading.Lock)
    languages: list[str] = field(default_factory=lambda: ["en"])
    max_chunk_seconds: float = SPHINX_CHUNK_SECONDS

    def transcribe(self, samples: np.ndarray, language: str | None, prompt: str | None,
                   temperature: float) -> ChunkTranscript:
        """Decode each stretch of speech as one utterance; the prompt and temperature mean nothing to this model."""
        pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()
        words = []
        with self.lock:
            for start, end in self._speech(pcm):
                self.decoder.start_utt()
                self.decoder.process_raw(pcm[2 * start:2 * end], full_utt=True)
                self.decoder.end_utt()
                offset = start / self.sample_rate
                words += [(w.word, offset + w.start_frame / self.frame_rate,
                           offset + (w.end_frame + 1) / self.frame_rate) for w in self.decoder.seg()]
        return ChunkTranscript(_phrases(words), "en")

    def _speech(self, pcm: bytes) -> list[tuple[int, int]]:
        """Sample spans where the voice activity detector hears speech, widened because its edges clip the first
        sound of a word, and merged where they then overlap. Decoding long silence (digital zeros above all) makes
        PocketSphinx hear words in it, and costs time."""
        from pocketsphinx import Segmenter

        pad, total = int(SPHINX_PAD_SECONDS * self.sample_rate), len(pcm) // 2
        spans: list[tuple[int, int]] = []
        for region in Segmenter(sample_rate=self.sample_rate).segment(io.BytesIO(pcm)):
            start = max(0, int(region.start_time * self.sample_rate) - pad)
            end = min(total, int(region.end_time * self.sample_rate) + pad)
            if spans and start <= spans[-1][1]:
                spans[-1] = (spans[-1][0], end)
            else:
                spans.append((start, end))
        return spans


def _phrases(words: list[tuple[str, float, float]]) -> list[Segment]:
    """Group recognised words into segments, breaking at pauses and before a segment grows too long."""
    segments: list[Segment] = []
    for word, start, end in words:
        if _SPHINX_FILLER.match(word):
            continue
        word = _SPHINX_VARIANT.sub("", word)
        last = segments[-1] if segments else None
        if last and start - last.end < SPHINX_PAUSE_SECONDS and end - last.start <= SPHINX_SEGMENT_SECONDS:
            last.text, last.end = f"{last.text} {word}", end
        else:
            segments.append(Segment(start, end, word))
    return segments


def load_whisper(spec: ModelSpec, path: Path, device: str, dtype: str) -> WhisperTranscriber:
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    processor = WhisperProcessor.from_pretrained(path)
    model = WhisperForConditionalGeneration.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    languages = [token.strip("<|>") for token in model.generation_config.lang_to_id]
    return WhisperTranscriber(model, processor, int(processor.feature_extractor.sampling_rate), languages)


def load_pocketsphinx(spec: ModelSpec, path: Path | None, device: str, dtype: str) -> SphinxTranscriber:
    """US English acoustic model, CMU dictionary and trigram language model, all inside the pocketsphinx wheel."""
    from pocketsphinx import Decoder, get_model_path

    decoder = Decoder(hmm=get_model_path("en-us/en-us"), lm=get_model_path("en-us/en-us.lm.bin"),
                      dict=get_model_path("en-us/cmudict-en-us.dict"), loglevel="FATAL")
    return SphinxTranscriber(decoder, int(decoder.config["samprate"]), int(decoder.config["frate"]))


# ---------------------------------------------------------------------------------------------- audio


def decode_audio(data: bytes, filename: str | None = None) -> tuple[np.ndarray, int]:
    """float32 mono samples and their rate. libsndfile reads WAV, FLAC, OGG (Vorbis, Opus) and MP3; anything else
    (M4A/AAC, WebM from a browser's recorder...) goes through FFmpeg's decoders in PyAV."""
    import soundfile

    name = f" {filename!r}" if filename else ""
    if not data:
        raise AudioDecodeError(f"file: the file{name} is empty")
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
        return samples.mean(axis=1), int(rate)
    except soundfile.SoundFileError:
        pass
    try:
        return _decode_av(data)
    except Exception as exc:  # PyAV raises a family of FFmpeg errors, and ValueError/IndexError for no audio stream
        raise AudioDecodeError(f"file: the file{name} is not audio that can be decoded "
                               f"(WAV, FLAC, OGG, MP3, M4A/AAC, WebM...)") from exc


def _decode_av(data: bytes) -> tuple[np.ndarray, int]:
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.audio[0]
        rate = stream.rate
        mono = av.AudioResampler(format="flt", layout="mono", rate=rate)
        frames = [out for frame in container.decode(stream) for out in mono.resample(frame)]
        frames += mono.resample(None)
    parts = [frame.to_ndarray().reshape(-1) for frame in frames]
    return (np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)).astype(np.float32), int(rate)


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """float32 samples at `to_rate` (soxr's high-quality resampler)."""
    import soxr

    samples = np.asarray(samples, dtype=np.float32)
    if from_rate == to_rate or samples.size == 0:
        return samples
    return soxr.resample(samples, from_rate, to_rate, quality="HQ").astype(np.float32)


def _frame_energy(samples: np.ndarray, hop: int) -> np.ndarray:
    """Mean square per frame of `hop` samples (a shorter last frame counts too)."""
    padded = np.pad(samples, (0, -len(samples) % hop))
    return np.square(padded.reshape(-1, hop), dtype=np.float64).mean(axis=1)


def chunk_bounds(samples: np.ndarray, rate: int, max_seconds: float) -> list[tuple[int, int]]:
    """(start, end) sample indices of chunks no longer than `max_seconds`, cut at the quietest frame of the last
    few seconds of each window so that a cut rarely falls inside a word."""
    hop = max(1, int(FRAME_SECONDS * rate))
    limit = int(max_seconds * rate)
    search = min(int(CUT_SEARCH_SECONDS * rate), limit // 2)
    energy = _frame_energy(samples, hop)
    bounds, start = [], 0
    while len(samples) - start > limit:
        first, last = -(-(start + limit - search) // hop), (start + limit) // hop  # frames inside the search span
        quiet = first + int(np.argmin(energy[first:last]))
        cut = min(quiet * hop + hop // 2, start + limit)
        bounds.append((start, cut))
        start = cut
    if start < len(samples):
        bounds.append((start, len(samples)))
    return bounds


def is_silent(samples: np.ndarray, rate: int) -> bool:
    """No frame louder than -60 dBFS: nothing for a model to hear (and Whisper would make text up)."""
    if samples.size == 0:
        return True
    return float(np.sqrt(_frame_energy(samples, max(1, int(FRAME_SECONDS * rate))).max())) < SILENCE_RMS


# ---------------------------------------------------------------------------------------------- long audio


def transcribe_long(model: Any, samples: np.ndarray, rate: int, *, language: str | None = None,
                    prompt: str | None = None, temperature: float = 0.0, cancel: threading.Event | None = None,
                    progress: Callable[[float, str], None] | None = None) -> Transcript:
    """Transcribe audio of any length chunk by chunk; a set `cancel` ends it after the current chunk with the
    segments so far. Without a language, the first chunk with sound decides it for the rest (as OpenAI's Whisper
    does), and the prompt conditions every chunk. Silent chunks are skipped: a silent clip gives no segments."""
    audio = resample(samples, rate, model.sample_rate)
    bounds = chunk_bounds(audio, model.sample_rate, model.max_chunk_seconds)
    segments: list[Segment] = []
    done = 0
    for index, (start, end) in enumerate(bounds):
        if cancel is not None and cancel.is_set():
            break
        if progress is not None:
            progress(index / len(bounds), f"Transcribing chunk {index + 1} of {len(bounds)}")
        piece = audio[start:end]
        if not is_silent(piece, model.sample_rate):
            chunk = model.transcribe(piece, language, prompt, temperature)
            language = language or chunk.language
            offset = start / model.sample_rate
            segments += [replace(s, start=s.start + offset, end=s.end + offset, seek=round(offset * 100))
                         for s in chunk.segments]
        done += 1
    stopped = done < len(bounds)
    if progress is not None:
        progress(1.0, "Stopped" if stopped else "Done")
    return Transcript(segments, language, len(samples) / rate, stopped, done, len(bounds))


# ---------------------------------------------------------------------------------------------- output formats


def to_text(segments: list[Segment]) -> str:
    return " ".join(s.text.strip() for s in segments if s.text.strip())


def _clock(seconds: float, separator: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def to_srt(segments: list[Segment]) -> str:
    """SubRip: numbered cues, comma before the milliseconds."""
    cues = [f"{i}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{s.text.strip()}\n"
            for i, s in enumerate(segments, 1)]
    return "\n".join(cues)


def to_vtt(segments: list[Segment]) -> str:
    """WebVTT: the header, then cues with a dot before the milliseconds."""
    cues = [f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{s.text.strip()}\n" for s in segments]
    return "\n".join(["WEBVTT\n", *cues])


def compression_ratio(text: str) -> float:
    """Bytes of text per byte of its zlib form, as OpenAI's Whisper computes it (repetitive text scores high)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def language_name(code: str | None) -> str:
    """OpenAI's verbose_json names the language in English, lower case ("english")."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    return LANGUAGES.get(code or "", code or "")


def to_verbose_json(segments: list[Segment], language: str | None, duration: float) -> dict:
    """The verbose_json body of OpenAI's `/v1/audio/transcriptions` (task, language, duration, text, segments)."""
    return {
        "task": "transcribe",
        "language": language_name(language),
        "duration": round(duration, 3),
        "text": to_text(segments),
        "segments": [{"id": i, "seek": s.seek, "start": round(s.start, 3), "end": round(s.end, 3),
                      "text": s.text.strip(), "tokens": s.tokens, "temperature": s.temperature,
                      "avg_logprob": s.avg_logprob, "compression_ratio": round(compression_ratio(s.text), 4),
                      "no_speech_prob": s.no_speech_prob} for i, s in enumerate(segments)],
        "usage": {"type": "duration", "seconds": round(duration, 3)},
    }
