"""The OpenAI-compatible API under /v1, so any OpenAI client (the `openai` package, LangChain, curl) can use the
studio's models, local or external: models, chat completions (streamed as Server-Sent Events or not), image
generations and speech.

Requests go through the same services as the UI (studio.backends.*), so they are validated, queued, pinned and
logged the same way (client "openai"). Every failure under /v1 is answered in OpenAI's error shape
{"error": {"message", "type", "param", "code"}}; the rest of the API keeps FastAPI's {"detail": ...}.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable, Iterator, Literal

import anyio
from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from studio.api.errors import validation_problems
from studio.api.security import guard
from studio.backends.chat import ChatEvent, ChatRequest, complete_chat, stream_chat, validate_chat
from studio.backends.image import ImageRequest, default_model, generate_images, png_bytes, validate_image
from studio.backends.speech import SpeechRequest, synthesize, validate_speech, wav_bytes
from studio.registry import ModelSpec
from studio.runtime import Studio

SERVED = ("chat", "image", "speech")  # the modalities the OpenAI API has endpoints for
OPENAI_NAMES = {"max_new_tokens": "max_tokens", "text": "input", "guidance": "guidance_scale"}  # service -> here
FINISH_REASONS = {"length": "length"}  # everything else ends as "stop" ("cancelled" only reaches a gone client)


# ---------------------------------------------------------------------------------------------- errors


def error_body(status: int, message: str, param: str | None = None) -> dict:
    """OpenAI's error object; `type` and `code` follow the status the way OpenAI's own API sets them."""
    kind = ("authentication_error" if status in (401, 403) else "rate_limit_error" if status == 429
            else "server_error" if status >= 500 else "invalid_request_error")
    code = {401: "invalid_api_key", 404: "model_not_found" if param == "model" else "not_found",
            429: "rate_limit_exceeded"}.get(status)
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _param(message: str) -> str | None:
    """The studio's messages start with the field ("steps: must be ..."); OpenAI clients want it as `param`."""
    match = re.match(r"([a-z_][a-z0-9_.\[\]]*): ", message)
    return match.group(1) if match else None


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    _status, problems = validation_problems(exc)  # OpenAI answers every invalid request with 400
    param, message = problems[0]
    return JSONResponse(error_body(400, message, param), status_code=400)


async def _reshaped(request: Request, exc: Exception) -> Response | None:
    """Answer with the app's own handler for this error (same status and message), in OpenAI's shape."""
    handlers = request.app.exception_handlers
    handler = next((handlers[cls] for cls in type(exc).__mro__ if cls in handlers), None)
    if handler is None:
        return None
    answer = await handler(request, exc)
    detail = json.loads(answer.body)
    message = str(detail.get("detail", detail))
    param = detail.get("field") or _param(message)
    return JSONResponse(error_body(answer.status_code, message, param), status_code=answer.status_code)


class OpenAIRoute(APIRoute):
    """A route whose failures come back in OpenAI's error shape, whatever raised them."""

    def get_route_handler(self) -> Callable:
        handle = super().get_route_handler()

        async def openai_errors(request: Request) -> Response:
            try:
                return await handle(request)
            except RequestValidationError as exc:
                return _validation_error(exc)
            except HTTPException as exc:
                message = str(exc.detail)
                return JSONResponse(error_body(exc.status_code, message, _param(message)),
                                    status_code=exc.status_code, headers=exc.headers)
            except Exception as exc:
                answer = await _reshaped(request, exc)
                if answer is None:
                    raise
                return answer

        return openai_errors


def _checked(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a service function; its ValueError("field: message") means bad input, answered with 400 and the
    field's name in this API."""
    try:
        return call(*args, **kwargs)
    except ValueError as exc:
        field, sep, rest = str(exc).partition(": ")
        message = f"{OPENAI_NAMES[field]}: {rest}" if sep and field in OPENAI_NAMES else str(exc)
        raise HTTPException(400, message) from None


def _only(body: BaseModel, **neutral: Any) -> None:
    """Standard fields this server does not implement are accepted at their neutral value only."""
    for name, value in neutral.items():
        if getattr(body, name) != value:
            raise HTTPException(400, f"{name}: only {value} is supported by this server")


# ---------------------------------------------------------------------------------------------- models


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str  # "studio" for local models, the provider's name for external ones
    modality: str
    external: bool
    label: str
    voices: list[str] | None = None  # speech models: the values `voice` takes


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def _card(spec: ModelSpec) -> ModelCard:
    owner = spec.options["provider"].name if spec.external else "studio"
    voices = list(spec.options.get("voices", [])) if spec.modality == "speech" else None
    return ModelCard(id=spec.id, owned_by=owner, modality=spec.modality, external=spec.external, label=spec.label,
                     voices=voices)


# ---------------------------------------------------------------------------------------------- chat


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="default: the model's")
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="default: the model's; 0 is greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="default: the model's")
    top_k: int | None = Field(None, ge=0, description="extension (as in vLLM): 0 turns it off")
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0, description="extension (as in vLLM)")
    presence_penalty: float = Field(0.0, description="only 0: use repetition_penalty")
    frequency_penalty: float = Field(0.0, description="only 0: use repetition_penalty")
    n: int = Field(1, description="only 1 choice per request")
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    finish_reason: str


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    seed: int | None = None


def _usage(usage: dict) -> Usage:
    prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _chat_request(studio: Studio, body: ChatCompletionRequest) -> ChatRequest:
    _only(body, n=1, presence_penalty=0.0, frequency_penalty=0.0)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    req = ChatRequest(messages=messages, model=body.model, max_new_tokens=body.max_completion_tokens or body.max_tokens,
                      temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                      repetition_penalty=body.repetition_penalty, seed=body.seed, stop=stop or None)
    _checked(validate_chat, studio, req)
    return req


def _chunk(cid: str, created: int, model: str, delta: dict, finish: str | None = None) -> str:
    chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(chunk)}\n\n"


async def _sse(events: Iterator[ChatEvent], first: ChatEvent | None, cancel: threading.Event, model: str,
               include_usage: bool) -> AsyncIterator[str]:
    """Relay the chat service's events as OpenAI chunks. The model runs in a worker thread; a client that goes
    away stops it (cancel) and the generator is closed there, so its request-log row is written."""
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    try:
        yield _chunk(cid, created, model, {"role": "assistant", "content": ""})
        event = first
        while event is not None:
            if event.text:
                yield _chunk(cid, created, model, {"content": event.text})
            if event.done:
                yield _chunk(cid, created, model, {}, FINISH_REASONS.get(event.finish_reason, "stop"))
                if include_usage:
                    usage = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                             "choices": [], "usage": _usage(event.usage).model_dump()}
                    yield f"data: {json.dumps(usage)}\n\n"
                break
            event = await run_in_threadpool(next, events, None)
        yield "data: [DONE]\n\n"
    except Exception as exc:  # after the headers went out: report it in the stream, as OpenAI does
        status = getattr(exc, "status", 400 if isinstance(exc, ValueError) else 500)
        yield f"data: {json.dumps(error_body(status, str(exc), _param(str(exc))))}\n\n"
    finally:
        cancel.set()
        with anyio.CancelScope(shield=True):
            await run_in_threadpool(events.close)


# ---------------------------------------------------------------------------------------------- images


class ImageGenerationRequest(BaseModel):
    prompt: str = Field(min_length=1)
    model: str | None = Field(None, description="default: the first image model")
    n: int = Field(1, ge=1)
    size: str | None = Field(None, description="WIDTHxHEIGHT, e.g. 512x512; default: the model's size")
    response_format: Literal["b64_json"] = "b64_json"
    negative_prompt: str = ""
    steps: int | None = Field(None, ge=1, description="extension: denoising steps")
    guidance_scale: float | None = Field(None, ge=0.0, description="extension: classifier-free guidance")
    seed: int | None = None
    adapters: dict[str, float] = Field(default_factory=dict, description="extension: LoRA name -> weight")


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    seed: int


def _size(size: str | None) -> tuple[int | None, int | None]:
    """'512x768' -> (512, 768); None or 'auto' -> the model's default size."""
    if size is None or size == "auto":
        return None, None
    match = re.fullmatch(r"(\d+)x(\d+)", size)
    if not match:
        raise HTTPException(400, f"size: expected WIDTHxHEIGHT such as 512x512, got {size!r}")
    return int(match.group(1)), int(match.group(2))


def _image_request(studio: Studio, body: ImageGenerationRequest) -> ImageRequest:
    width, height = _size(body.size)
    req = ImageRequest(prompt=body.prompt, negative_prompt=body.negative_prompt,
                       model=body.model or _checked(default_model, studio), steps=body.steps,
                       guidance=body.guidance_scale, width=width, height=height, seed=body.seed, n=body.n,
                       adapters=body.adapters)
    _checked(validate_image, studio, req)
    return req


# ---------------------------------------------------------------------------------------------- speech


class SpeechGenerationRequest(BaseModel):
    model: str
    input: str
    voice: str | None = Field(None, description="one of the model's voices; ignored by single-voice models")
    response_format: Literal["wav"] = "wav"
    speed: float = Field(1.0, description="only 1.0")
    seed: int | None = None


def _speech_request(studio: Studio, body: SpeechGenerationRequest) -> SpeechRequest:
    _only(body, speed=1.0)
    spec = studio.registry.get(body.model)
    voice = body.voice if spec.options.get("voices") else None
    req = SpeechRequest(text=body.input, model=body.model, voice=voice, seed=body.seed)
    _checked(validate_speech, studio, req)
    return req


# ---------------------------------------------------------------------------------------------- routes


def router(studio: Studio) -> APIRouter:
    api = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute, dependencies=[guard(studio)])

    @api.get("/models")
    def list_models() -> ModelList:
        """Every chat, image and speech model; external ones are owned by their provider."""
        return ModelList(data=[_card(spec) for spec in studio.registry if spec.modality in SERVED])

    @api.get("/models/{model_id}")
    def get_model(model_id: str) -> ModelCard:
        return _card(studio.registry.get(model_id))

    @api.post("/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest) -> ChatCompletion | StreamingResponse:
        """Chat with a model; `stream: true` sends the reply as Server-Sent Events, token by token."""
        req = _chat_request(studio, body)
        kwargs = {"client": "openai", "endpoint": "/v1/chat/completions"}
        if not body.stream:
            result = await run_in_threadpool(lambda: _checked(complete_chat, studio, req, **kwargs))
            return ChatCompletion(
                id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=body.model, seed=result.seed,
                choices=[ChatChoice(message=ChatChoiceMessage(content=result.text),
                                    finish_reason=FINISH_REASONS.get(result.finish_reason, "stop"))],
                usage=_usage(result.usage))
        cancel = threading.Event()
        events = stream_chat(studio, req, cancel=cancel, **kwargs)
        try:  # the first token, so that a failure before it is a real HTTP error, not a broken stream
            first = await run_in_threadpool(_checked, next, events, None)
        except Exception:
            await run_in_threadpool(events.close)
            raise
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(events, first, cancel, body.model, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @api.post("/images/generations")
    def image_generations(body: ImageGenerationRequest) -> ImagesResponse:
        """Text to image; `b64_json` PNGs. Extensions: negative_prompt, steps, guidance_scale, seed, adapters."""
        req = _image_request(studio, body)
        result = _checked(generate_images, studio, req, client="openai", endpoint="/v1/images/generations")
        data = [ImageData(b64_json=base64.b64encode(png_bytes(image, result.image_settings(i))).decode("ascii"))
                for i, image in enumerate(result.images)]
        return ImagesResponse(created=int(time.time()), seed=result.seed, data=data)

    @api.post("/audio/speech", response_class=Response)
    def audio_speech(body: SpeechGenerationRequest) -> Response:
        """Text to speech, answered as a WAV file."""
        req = _speech_request(studio, body)
        result = _checked(synthesize, studio, req, client="openai", endpoint="/v1/audio/speech")
        return Response(wav_bytes(result), media_type="audio/wav")

    return api
