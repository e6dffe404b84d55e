"""Text to speech over HTTP: `POST /generate/speech` and the OpenAI-compatible `POST /v1/audio/speech`, both
answered as a WAV file."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from studio.api.disconnect import watched
from studio.api.errors import ERROR_RESPONSES
from studio.api.openai import only, openai_router, renamed
from studio.api.security import guard
from studio.backends.speech import MAX_TEXT_CHARS, SpeechOptions, SpeechRequest, synthesize, wav_bytes
from studio.contract import SEED_RANGE
from studio.runtime import Call, Studio

WAV = {"content": {"audio/wav": {}}, "description": "16-bit mono WAV"}


class SpeechBody(BaseModel):
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS,
                      description="what to say; long text is spoken sentence by sentence and joined into one clip")
    model: str | None = Field(None, description="a text-to-speech model id (GET /v1/models lists them); default: "
                                                "the first one")
    voice: str | None = Field(None, description="one of the model's voices, e.g. v2/en_speaker_6 for Bark; "
                                                "default: the model's default voice")
    seed: int | None = Field(None, ge=0, lt=SEED_RANGE, description="same seed, same clip (Bark, VITS); default: "
                                                                     "random, returned in the X-Seed header")


class SpeechGenerationRequest(BaseModel):
    """OpenAI's speech request."""

    model: str
    input: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    voice: str | None = Field(None, description="one of the model's voices; ignored by single-voice models")
    response_format: Literal["wav"] = "wav"
    speed: float = Field(1.0, description="only 1.0")
    seed: int | None = Field(None, ge=0, lt=SEED_RANGE)


def router(studio: Studio) -> APIRouter:
    api = APIRouter(tags=["text-to-speech"], dependencies=[guard(studio)], responses=ERROR_RESPONSES)

    @api.post("/generate/speech", response_class=Response, responses={200: {**WAV, "headers": {
        "X-Audio-Seconds": {"description": "the clip's duration"},
        "X-RTF": {"description": "real-time factor: compute seconds per second of audio"},
        "X-Pieces": {"description": "sentences spoken"},
        "X-Seed": {"description": "the seed used (models that sample)"}}}})
    def generate_speech(body: SpeechBody, call: Call = watched("rest", "/generate/speech")) -> Response:
        """Speak the text."""
        req = SpeechRequest(text=body.text, model=body.model, voice=body.voice, seed=body.seed)
        result = synthesize(studio, req, call)
        headers = {"X-Audio-Seconds": f"{result.seconds:.3f}", "X-RTF": f"{result.rtf:.3f}",
                   "X-Pieces": str(result.pieces)}
        if result.seed is not None:
            headers["X-Seed"] = str(result.seed)
        return Response(wav_bytes(result), media_type="audio/wav", headers=headers)

    v1 = openai_router(studio)

    @v1.post("/audio/speech", response_class=Response, responses={200: WAV})
    def audio_speech(body: SpeechGenerationRequest, call: Call = watched("openai", "/v1/audio/speech")) -> Response:
        """Text to speech, answered as a WAV file."""
        only(body, speed=1.0)
        single_voice = SpeechOptions.of(studio.model(body.model, "text-to-speech")).voices == ()
        voice = None if single_voice else body.voice  # OpenAI clients always send one
        with renamed({"text": "input"}):
            result = synthesize(studio, SpeechRequest(text=body.input, model=body.model, voice=voice, seed=body.seed),
                                call)
        return Response(wav_bytes(result), media_type="audio/wav")

    api.include_router(v1)
    return api
