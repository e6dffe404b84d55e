"""POST /generate/audio: text to speech, answered as a WAV file."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Response
from pydantic import BaseModel, Field

from studio.api.security import guard
from studio.backends.speech import (MAX_SEED, MAX_TEXT_CHARS, SpeechInputError, SpeechRequest, default_model,
                                    synthesize, wav_bytes)
from studio.runtime import Studio


class AudioRequest(BaseModel):
    text: str = Field(description=f"what to say, 1 to {MAX_TEXT_CHARS} characters; long text is spoken "
                                  "sentence by sentence and joined into one clip")
    model: str | None = Field(None, description="a speech model id (GET /health lists them); default: the "
                                                "profile's first speech model")
    voice: str | None = Field(None, description="one of the model's voices, e.g. v2/en_speaker_6 for Bark; "
                                                "default: the model's default voice")
    seed: int | None = Field(None, description=f"0 to {MAX_SEED}; same seed, same clip (Bark, VITS). Default: "
                                               "random, returned in the X-Seed header")


def router(studio: Studio) -> APIRouter:
    api = APIRouter(tags=["speech"], dependencies=[guard(studio)])

    @api.post("/generate/audio", response_class=Response,
              responses={200: {"content": {"audio/wav": {}}, "description": "16-bit mono WAV"}})
    def generate_audio(body: AudioRequest) -> Response:
        """Speak the text; the headers carry the clip's duration, real-time factor, pieces and seed."""
        req = SpeechRequest(text=body.text, model=body.model or default_model(studio) or "", voice=body.voice,
                            seed=body.seed)
        try:
            result = synthesize(studio, req, client="api", endpoint="/generate/audio")
        except SpeechInputError as exc:  # "field: message"; an unknown model is a 404 from the shared handler
            raise HTTPException(422, str(exc)) from None
        headers = {"X-Audio-Seconds": f"{result.seconds:.3f}", "X-RTF": f"{result.rtf:.3f}",
                   "X-Pieces": str(result.pieces)}
        if result.seed is not None:
            headers["X-Seed"] = str(result.seed)
        return Response(wav_bytes(result), media_type="audio/wav", headers=headers)

    return api
