"""Speech to text over HTTP: the OpenAI-compatible `POST /v1/audio/transcriptions` and the studio's own
`POST /generate/transcript`, both multipart uploads (a file and form fields), as OpenAI defines its route."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel

from studio.api.disconnect import watched
from studio.api.errors import ERROR_RESPONSES
from studio.api.openai import openai_router
from studio.api.security import guard
from studio.backends.transcription import (MAX_PROMPT_CHARS, TranscriptionRequest, TranscriptionResult, to_srt,
                                           to_verbose_json, to_vtt, transcribe)
from studio.contract import InputError
from studio.runtime import Call, Studio

Format = Literal["json", "text", "srt", "vtt", "verbose_json"]
TEXT = {"content": {"text/plain": {}}, "description": "the text, SubRip or WebVTT (response_format text, srt, vtt)"}

FILE = File(None, description="the audio: WAV, FLAC, OGG, MP3, M4A/AAC or WebM, up to --max-upload-size")
LANGUAGE = Form(None, description="ISO 639-1 code of the speech (en, de, ...); default: detected")
PROMPT = Form(None, max_length=MAX_PROMPT_CHARS, description="words and style to follow (Whisper)")
TEMPERATURE = Form(None, ge=0, le=1, description="0 to 1; default 0 (greedy)")


class Segment(BaseModel):
    start: float  # seconds from the start of the recording
    end: float
    text: str


class TranscriptBody(BaseModel):
    """The studio's own answer: the text, its segments and how the transcription went."""

    text: str
    model: str
    language: str | None  # ISO 639-1, told or detected
    duration: float  # seconds of audio heard
    rtf: float  # real-time factor: seconds of compute per second of audio
    chunks: int  # pieces of at most 30 s (Whisper) the recording was transcribed in
    stopped: bool
    segments: list[Segment]


def _audio(studio: Studio, file: UploadFile | None) -> bytes:
    """The upload's bytes; reading stops one byte past the size limit, which the service then refuses."""
    if file is None:
        raise InputError("file", "is required: an audio file (WAV, FLAC, OGG, MP3, M4A, WebM...)")
    return file.file.read(studio.upload_limit + 1)


def _answer(result: TranscriptionResult, response_format: str, headers: dict[str, str] | None = None) -> Response:
    """The transcript as OpenAI's response formats write it (text, srt and vtt as plain text)."""
    transcript = result.transcript
    if response_format == "text":
        return PlainTextResponse(transcript.text, headers=headers)
    if response_format == "srt":
        return PlainTextResponse(to_srt(transcript.segments), headers=headers)
    if response_format == "vtt":
        return PlainTextResponse(to_vtt(transcript.segments), headers=headers)
    if response_format == "verbose_json":
        return JSONResponse(to_verbose_json(transcript.segments, transcript.language, transcript.duration),
                            headers=headers)
    return JSONResponse({"text": transcript.text,
                         "usage": {"type": "duration", "seconds": round(transcript.duration, 3)}}, headers=headers)


def router(studio: Studio) -> APIRouter:
    api = APIRouter(tags=["speech-to-text"], dependencies=[guard(studio)], responses=ERROR_RESPONSES)

    @api.post("/generate/transcript", response_model=TranscriptBody, responses={200: {**TEXT, "headers": {
        "X-Language": {"description": "the language heard"},
        "X-Audio-Seconds": {"description": "the recording's duration"},
        "X-RTF": {"description": "real-time factor: compute seconds per second of audio"}}}})
    def generate_transcript(file: UploadFile | None = FILE,
                            model: str | None = Form(None, description="a speech-to-text model id; default: the "
                                                                       "first one"),
                            language: str | None = LANGUAGE, prompt: str | None = PROMPT,
                            temperature: float | None = TEMPERATURE,
                            response_format: Literal["json", "text", "srt", "vtt"] = Form("json"),
                            call: Call = watched("rest", "/generate/transcript")) -> Response:
        """Transcribe a recording: JSON with the text and timed segments, or the text, SubRip or WebVTT."""
        req = TranscriptionRequest(audio=_audio(studio, file), filename=file.filename, model=model,
                                   language=language, prompt=prompt, temperature=temperature)
        result = transcribe(studio, req, call)
        transcript = result.transcript
        if response_format == "json":
            segments = [Segment(start=round(s.start, 3), end=round(s.end, 3), text=s.text)
                        for s in transcript.segments]
            return JSONResponse(TranscriptBody(
                text=transcript.text, model=result.model, language=transcript.language,
                duration=round(transcript.duration, 3), rtf=round(result.rtf, 4), chunks=transcript.chunks,
                stopped=transcript.stopped, segments=segments).model_dump())
        headers = {"X-Language": transcript.language or "", "X-Audio-Seconds": f"{transcript.duration:.3f}",
                   "X-RTF": f"{result.rtf:.4f}"}
        return _answer(result, response_format, headers)

    v1 = openai_router(studio)

    @v1.post("/audio/transcriptions", response_model=None, responses={200: {
        "description": "json: {text, usage}; verbose_json: {task, language, duration, text, segments, usage}; "
                       "text, srt, vtt: plain text", "content": {"application/json": {}, "text/plain": {}}}})
    def audio_transcriptions(file: UploadFile | None = FILE, model: str = Form(...),
                             language: str | None = LANGUAGE, prompt: str | None = PROMPT,
                             response_format: Format = Form("json"), temperature: float | None = TEMPERATURE,
                             timestamp_granularities: list[str] = Form([], alias="timestamp_granularities[]"),
                             stream: bool = Form(False),
                             call: Call = watched("openai", "/v1/audio/transcriptions")) -> Response:
        """Transcribe an audio file, as OpenAI's API does (segment timestamps; no streaming)."""
        if stream:
            raise InputError("stream", "only false is supported by this server")
        if any(granularity != "segment" for granularity in timestamp_granularities):
            raise InputError("timestamp_granularities", "only segment timestamps are supported by this server")
        req = TranscriptionRequest(audio=_audio(studio, file), filename=file.filename, model=model,
                                   language=language, prompt=prompt, temperature=temperature)
        return _answer(transcribe(studio, req, call), response_format)

    api.include_router(v1)
    return api
