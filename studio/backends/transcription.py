"""Speech to text: Whisper (transformers), the offline PocketSphinx model or an external provider's model, behind
one service behind the Speech tab's "Speech to text", `POST /generate/transcript`, `/v1/audio/transcriptions`, the
Gradio client / MCP tool and the voice chat; audio decoding, chunking and the output formats of OpenAI's API.

Each loader returns a dataclass with `sample_rate`, `languages` (ISO 639-1 codes it can be told, or None),
`max_chunk_seconds` and one method, `transcribe(samples, language, prompt, temperature) -> ChunkTranscript`, for
one chunk of float32 mono audio at `sample_rate`: the only place that knows the model's own calling convention.
`transcribe_long` splits longer audio at quiet points into chunks the model takes, shifts their timestamps, reports
progress per chunk and stops between chunks when asked, keeping what it has.

A silent or empty recording is not an error: it gives an empty text (Whisper would make words up from silence,
so silent chunks never reach a model). A file that is not audio, or longer than --max-audio-seconds, or larger
than --max-upload-size, is refused naming the field `file`.
"""

from __future__ import annotations

import io
import re
import threading
import time
import zlib
from dataclasses import dataclass, field, replace
from itertools import chain
from pathlib import Path
from typing import Any, Callable

import numpy as np
import openai
import torch
from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

from studio.backends.remote import ProviderClient, calling, connect_client
from studio.contract import InputError, ModelOptions, check_range, check_text, require
from studio.registry import ModelSpec
from studio.runtime import Call, Studio

FRAME_SECONDS = 0.1  # energy frames for finding quiet cut points and silent chunks
CUT_SEARCH_SECONDS = 5.0  # a chunk ends at the quietest frame of its last 5 seconds
SILENCE_RMS = 10 ** (-60 / 20)  # a chunk whose loudest frame is below -60 dBFS is not sent to the model
SPHINX_CHUNK_SECONDS = 30.0  # a few seconds of decoding per chunk on a CPU: a fine-grained progress bar and Stop
SPHINX_PAD_SECONDS = 0.3  # speech detected by the VAD is decoded with this much audio either side
SPHINX_PAUSE_SECONDS = 0.3  # a pause this long between two words starts a new segment
SPHINX_SEGMENT_SECONDS = 10.0  # and so does a segment this long: subtitle cues stay readable
_SPHINX_FILLER = re.compile(r"^(<.*>|\[.*\]|\+\+.*\+\+)$")  # <s>, </s>, <sil>, [NOISE], ++GARBAGE++
_SPHINX_VARIANT = re.compile(r"\(\d+\)$")  # "read(2)": the dictionary's second pronunciation of "read"
MAX_PROMPT_CHARS = 2000  # Whisper reads only the prompt's last 223 tokens anyway
PROVIDER_CHUNK_SECONDS = 600.0  # 10 minutes of 16 kHz 16-bit WAV is 19 MB, under OpenAI's 25 MB per file
BYTES_PER_AUDIO_SECOND = 4000  # 32 kbit/s, about the leanest speech file: a duration guess that errs long
GPU_RTF = 0.05  # Whisper-small on a ZeroGPU slice transcribes some 20 times faster than real time
# whisper-small's 99 languages (large-v3 added Cantonese, "yue", as a 100th).
WHISPER_LANGUAGES = tuple(code for code in LANGUAGES if code != "yue")


class AudioDecodeError(InputError):
    """The upload is not audio that any decoder here can read, or too long: an input error about `file`."""

    def __init__(self, message: str):
        super().__init__("file", message)


@dataclass(frozen=True)
class TranscriptionOptions(ModelOptions):
    """A speech-to-text model's defaults and caps (a catalog entry overrides them)."""

    languages: tuple[str, ...] | None = WHISPER_LANGUAGES  # the codes `language` takes; one: the model hears
    # only that language and detects nothing


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


@dataclass
class TranscriptionRequest:
    audio: bytes  # the whole file as uploaded or recorded: WAV, FLAC, OGG, MP3, M4A, WebM...
    filename: str | None = None  # its name, for messages
    model: str | None = None  # None: the first speech-to-text model
    language: str | None = None  # ISO 639-1 code ("en"); None: detected (or the model's only language)
    prompt: str | None = None  # words and style to follow (Whisper); PocketSphinx ignores it
    temperature: float | None = None  # 0 to 1; None: greedy (0) here, the provider's choice for external models


@dataclass
class TranscriptionResult:
    transcript: Transcript  # segments, language, duration, stopped, chunks
    model: str
    rtf: float  # real-time factor: seconds of compute per second of audio (below 1 is faster than real time)

    @property
    def text(self) -> str:
        return self.transcript.text


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
            ids = self.processor.get_prompt_ids(prompt, return_tensors="pt")  # <|startofprev|>, then the text
            # As OpenAI's Whisper does, keep the prompt's end: half the decoder's window, less <|startofprev|>.
            keep = self.model.config.max_target_positions // 2 - 1
            kwargs["prompt_ids"] = torch.cat([ids[:1], ids[1:][-keep:]]).to(self.model.device)
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


def decode_audio(data: bytes, filename: str | None = None,
                 max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """float32 mono samples and their rate. libsndfile reads WAV, FLAC, OGG (Vorbis, Opus) and MP3; anything else
    (M4A/AAC, WebM from a browser's recorder...) goes through FFmpeg's decoders in PyAV. A recording longer than
    `max_seconds` is refused before it is all decoded (a small file can hold hours of audio)."""
    import soundfile

    name = f" {filename!r}" if filename else ""
    if not data:
        raise AudioDecodeError(f"the file{name} is empty")
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as sound:
            _check_length(sound.frames / sound.samplerate, max_seconds)
            return sound.read(dtype="float32", always_2d=True).mean(axis=1), int(sound.samplerate)
    except soundfile.SoundFileError:
        pass
    try:
        return _decode_av(data, max_seconds)
    except AudioDecodeError:
        raise
    except Exception as exc:  # PyAV raises a family of FFmpeg errors, and ValueError/IndexError for no audio stream
        raise AudioDecodeError(f"the file{name} is not audio that can be decoded "
                               f"(WAV, FLAC, OGG, MP3, M4A/AAC, WebM...)") from exc


def _decode_av(data: bytes, max_seconds: float | None) -> tuple[np.ndarray, int]:
    import av

    parts, total = [], 0
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.audio[0]
        rate = int(stream.rate)
        mono = av.AudioResampler(format="flt", layout="mono", rate=rate)
        for frame in chain(container.decode(stream), [None]):  # None: flush the resampler
            for out in mono.resample(frame):
                parts.append(out.to_ndarray().reshape(-1))
                total += out.samples
                _check_length(total / rate, max_seconds)  # many containers do not say their length up front
    return (np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)).astype(np.float32), rate


def _check_length(seconds: float, max_seconds: float | None) -> None:
    if max_seconds is not None and seconds > max_seconds:
        raise AudioDecodeError(f"the recording is longer than the limit of {_minutes(max_seconds)} "
                               f"(--max-audio-seconds); split it, or transcribe its parts one by one")


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:g} minutes" if seconds >= 60 else f"{seconds:g} seconds"


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
                    prompt: str | None = None, temperature: float | None = 0.0, cancel: threading.Event | None = None,
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


# ---------------------------------------------------------------------------------------------- the service


def validate(studio: Studio, req: TranscriptionRequest) -> tuple[ModelSpec, TranscriptionRequest, np.ndarray, int]:
    """The model, the request with its defaults, and the decoded audio (samples, rate); raises InputError naming
    the first bad field. Decoding comes last: it is the one check that costs time."""
    spec = studio.model(req.model, "speech-to-text")
    opts = TranscriptionOptions.of(spec)
    require(isinstance(req.audio, bytes) and bool(req.audio), "file", "is required: an audio file (WAV, FLAC, OGG, "
                                                                       "MP3, M4A, WebM...) or a recording")
    limit = studio.upload_limit
    require(len(req.audio) <= limit, "file", f"is larger than the limit of {limit / 1e6:g} MB (--max-upload-size)")
    require(req.language is None or isinstance(req.language, str), "language", "must be an ISO 639-1 code such as en")
    language = req.language.strip().lower() if req.language and req.language.strip() else None
    if language is not None:
        check_language(language, opts.languages, spec.id)
    if req.prompt is not None:
        check_text("prompt", req.prompt, max_chars=MAX_PROMPT_CHARS, required=False)
    temperature = req.temperature
    if temperature is not None:
        check_range("temperature", temperature, 0, 1)
    elif not spec.external:
        temperature = 0.0  # greedy, as OpenAI's default
    samples, rate = decode_audio(req.audio, req.filename, studio.settings.max_audio_seconds)
    return spec, replace(req, model=spec.id, language=language, prompt=req.prompt or None,
                         temperature=temperature), samples, rate


def check_language(language: str, known: tuple[str, ...] | list[str] | None, model_id: str) -> None:
    """`language` is one the model can be told (None: whatever its provider takes)."""
    if known is None:
        return
    if len(known) == 1:
        require(language == known[0], "language", f"{model_id} hears only {language_name(known[0])} "
                                                   f"({known[0]}); leave the language out or set {known[0]!r}")
    require(language in known, "language", f"{language!r} is not a language {model_id} knows; expected an ISO "
                                           f"639-1 code such as en, de, fr, es, ja, zh (or none, to detect it)")


def gpu_seconds(req: TranscriptionRequest) -> float:
    """A guess before decoding: the file's size at a lean bit rate, at a GPU's pace, plus the model's start."""
    return 5.0 + len(req.audio or b"") / BYTES_PER_AUDIO_SECOND * GPU_RTF


def transcribe(studio: Studio, req: TranscriptionRequest, call: Call) -> TranscriptionResult:
    """Transcribe the recording chunk by chunk; a stopped call ends after the current chunk with the text so far.

    Raises InputError for bad input before anything is transcribed. A silent or empty recording gives an empty
    text."""
    spec, req, samples, rate = validate(studio, req)
    with studio.generation(spec, call, language=req.language) as (lease, rec):
        model = lease.model
        if req.language is not None:  # what the loaded model really takes (an English-only Whisper takes none)
            check_language(req.language, model.languages, spec.id)
        rec.set(prompt=req.prompt)

        def report(fraction: float, text: str) -> None:
            if fraction > 0:
                rec.first_output()  # the first chunk is done
            call.report(fraction, text)

        started = time.perf_counter()
        transcript = transcribe_long(model, samples, rate, language=req.language, prompt=req.prompt,
                                     temperature=req.temperature, cancel=call.cancel, progress=report)
        seconds = time.perf_counter() - started
        rtf = seconds / transcript.duration if transcript.duration else 0.0
        rec.set(audio_in_seconds=round(transcript.duration, 3), characters=len(transcript.text),
                rtf=round(rtf, 4), language=transcript.language, chunks=transcript.chunks, stopped=transcript.stopped)
    return TranscriptionResult(transcript, spec.id, rtf)


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


# ---------------------------------------------------------------------------------------------- external models


def connect(spec: ModelSpec, path: Path | None, device: str, dtype: str) -> ProviderTranscriber:
    """The cache's loader for an external speech-to-text model: a client, no weights."""
    return ProviderTranscriber(*connect_client(spec))


@dataclass
class ProviderTranscriber(ProviderClient):
    """A provider's `/v1/audio/transcriptions`, with the local models' interface: long audio is chunked, stopped,
    timed and logged exactly as with a local model, and each chunk goes up as a 16 kHz WAV file of float samples
    (the provider's model hears exactly what a local one would: 16-bit samples would round them)."""

    sample_rate: int = 16_000
    languages: list[str] | None = None  # the provider decides
    max_chunk_seconds: float = PROVIDER_CHUNK_SECONDS

    def transcribe(self, samples: np.ndarray, language: str | None, prompt: str | None,
                   temperature: float | None) -> ChunkTranscript:
        import soundfile

        wav = io.BytesIO()
        soundfile.write(wav, samples, self.sample_rate, format="WAV", subtype="FLOAT")
        with calling(self):
            answer = self.client.audio.transcriptions.create(
                model=self.model, file=("audio.wav", wav.getvalue(), "audio/wav"), response_format="verbose_json",
                language=language or openai.omit, prompt=prompt or openai.omit,
                temperature=openai.omit if temperature is None else temperature)
        segments = [Segment(float(s.start), float(s.end), s.text.strip(), list(s.tokens or []),
                            float(s.temperature or 0.0), float(s.avg_logprob or 0.0), float(s.no_speech_prob or 0.0))
                    for s in getattr(answer, "segments", None) or [] if s.text.strip()]
        text = (answer.text or "").strip()
        if not segments and text:  # a server that answers verbose_json without segments: one for the chunk
            segments = [Segment(0.0, len(samples) / self.sample_rate, text)]
        said = getattr(answer, "language", None)  # a name in verbose_json ("english")
        return ChunkTranscript(segments, language or (TO_LANGUAGE_CODE.get(said.lower(), said) if said else None))
