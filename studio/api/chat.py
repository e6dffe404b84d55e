"""Chat over HTTP: `POST /generate/text` (JSON, or Server-Sent Events with `"stream": true`) and the OpenAI-compatible
`POST /v1/chat/completions`. Both translate the body into a `ChatRequest` and relay the chat service's events.

The studio's stream: each piece of the reply is one `data: {"text": ..., "done": false}` event, then one event with
`"done": true` and the totals, then `data: [DONE]`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, field_validator, model_validator
from starlette.concurrency import run_in_threadpool

from studio.api.disconnect import watched
from studio.api.errors import ERROR_RESPONSES, public
from studio.api.openai import Usage, failure, only, openai_router, renamed
from studio.api.security import guard
from studio.api.streaming import first_event, frame, relay
from studio.backends.chat import (MAX_STOP_STRINGS, REPETITION_PENALTY, TEMPERATURE, ChatEvent, ChatRequest,
                                  ChatResult, complete_chat, stream_chat)
from studio.contract import SEED_RANGE
from studio.runtime import Call, Studio
from studio.telemetry.requestlog import REQUEST_ID

SSE_HEADERS = {"Cache-Control": "no-cache"}
FINISH_REASONS = {"length": "length"}  # OpenAI knows no "cancelled": a stopped reply ends as "stop"


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class TextBody(BaseModel):
    """Give `prompt` for a single turn, or `messages` for a conversation (ending with the user's message).

    Sampling fields left out take the model's defaults (GET /v1/models lists them); `seed` left out is drawn at
    random and returned."""

    prompt: str | None = Field(None, description="the user's message (or give `messages`)")
    messages: list[Message] | None = Field(None, description="the conversation so far, oldest first")
    model: str | None = Field(None, description="a chat model id; default: the first chat model")
    system: str | None = Field(None, description="system prompt")
    max_new_tokens: int | None = Field(None, ge=1, description="at most the model's cap")
    temperature: float | None = Field(None, ge=0, le=TEMPERATURE[1], description="0 = greedy, else at least "
                                                                                  f"{TEMPERATURE[0]}")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="0 = off")
    repetition_penalty: float | None = Field(None, ge=REPETITION_PENALTY[0], le=REPETITION_PENALTY[1],
                                             description="1 = off")
    seed: int | None = Field(None, ge=0, lt=SEED_RANGE)
    stop: list[str] | None = Field(None, max_length=MAX_STOP_STRINGS,
                                   description="end the reply before any of these strings")
    stream: bool = Field(False, description="stream Server-Sent Events")

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> "TextBody":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self

    def request(self) -> ChatRequest:
        messages = ([{"role": "user", "content": self.prompt}] if self.prompt is not None
                    else [m.model_dump() for m in self.messages])
        return ChatRequest(messages=messages, model=self.model, system=self.system,
                           max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                           top_k=self.top_k, repetition_penalty=self.repetition_penalty, seed=self.seed,
                           stop=self.stop)


class TextResponse(BaseModel):
    text: str
    model: str
    usage: Usage
    seed: int
    finish_reason: Literal["stop", "length", "cancelled"]
    dropped_turns: int = Field(description="oldest messages left out to fit the model's context window")
    tokens_per_s: float


def _response(done: ChatEvent | ChatResult, text: str) -> TextResponse:
    """The JSON answer, and the payload of the stream's final event: both carry the same totals."""
    return TextResponse(text=text, model=done.model, usage=Usage.of(done.usage), seed=done.seed,
                        finish_reason=done.finish_reason, dropped_turns=done.dropped_turns,
                        tokens_per_s=done.tokens_per_s)


def _rest_failure(exc: Exception) -> dict:
    status, message, field = public(exc, REQUEST_ID.get() or "unknown")
    return {"error": message, "status": status, "field": field, "done": True}


# ---------------------------------------------------------------------------------------------- OpenAI


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
    temperature: float | None = Field(None, ge=0.0, le=TEMPERATURE[1], description="default: the model's; 0 is greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="default: the model's")
    top_k: int | None = Field(None, ge=0, description="extension (as in vLLM): 0 turns it off")
    repetition_penalty: float | None = Field(None, ge=REPETITION_PENALTY[0], le=REPETITION_PENALTY[1],
                                             description="extension (as in vLLM)")
    presence_penalty: float = Field(0.0, description="only 0: use repetition_penalty")
    frequency_penalty: float = Field(0.0, description="only 0: use repetition_penalty")
    n: int = Field(1, description="only 1 choice per request")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=SEED_RANGE)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="extension (as in vLLM): generate max_tokens whatever the model says")

    def request(self) -> ChatRequest:
        only(self, n=1, presence_penalty=0.0, frequency_penalty=0.0)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in self.messages]
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        return ChatRequest(messages=messages, model=self.model,
                           max_new_tokens=self.max_completion_tokens or self.max_tokens, temperature=self.temperature,
                           top_p=self.top_p, top_k=self.top_k, repetition_penalty=self.repetition_penalty,
                           seed=self.seed, stop=stop or None, ignore_eos=self.ignore_eos)


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    seed: int | None = None


OPENAI_NAMES = {"max_new_tokens": "max_tokens"}  # the service's field -> this API's


@dataclass
class _Chunks:
    """A chat stream as OpenAI's chunks: the role first, then content, the finish reason and (if asked) usage."""

    model: str
    include_usage: bool
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def chunk(self, delta: dict, finish: str | None = None, **extra) -> str:
        choices = [] if extra else [{"index": 0, "delta": delta, "finish_reason": finish}]
        return frame({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                      "choices": choices, **extra})

    def frames(self, event: ChatEvent) -> list[str]:
        out = [self.chunk({"content": event.text})] if event.text else []
        if event.done:
            out.append(self.chunk({}, FINISH_REASONS.get(event.finish_reason, "stop")))
            if self.include_usage:
                out.append(self.chunk({}, usage=Usage.of(event.usage).model_dump()))
        return out


# ---------------------------------------------------------------------------------------------- routes


def router(studio: Studio) -> APIRouter:
    api = APIRouter(tags=["chat"], dependencies=[guard(studio)], responses=ERROR_RESPONSES)

    @api.post("/generate/text", response_model=TextResponse,
              responses={200: {"content": {"text/event-stream": {}},
                               "description": "JSON, or Server-Sent Events with `stream: true`"}})
    async def generate_text(body: TextBody, call: Call = watched("rest", "/generate/text")):
        """Chat with a language model: the reply as JSON, or streamed token by token."""
        with renamed({"messages[0].content": "prompt"} if body.prompt is not None else {}):
            if not body.stream:
                result = await run_in_threadpool(complete_chat, studio, body.request(), call)
                return _response(result, result.text)
            events = stream_chat(studio, body.request(), call)
            first = await first_event(events)

        def frames(event: ChatEvent) -> list[str]:
            if event.done:
                return [frame({**_response(event, "").model_dump(), "done": True})]
            return [frame({"text": event.text, "done": False})]

        return StreamingResponse(relay(events, first, frames, lambda e: e.done, _rest_failure, call),
                                 media_type="text/event-stream", headers=SSE_HEADERS)

    v1 = openai_router(studio)

    @v1.post("/chat/completions", response_model=ChatCompletion,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "JSON, or Server-Sent Events with `stream: true`"}})
    async def chat_completions(body: ChatCompletionRequest, call: Call = watched("openai", "/v1/chat/completions")):
        """Chat completions, streamed or not. Extensions: top_k, repetition_penalty; the seed used is returned."""
        with renamed(OPENAI_NAMES):
            req = body.request()
            if not body.stream:
                result = await run_in_threadpool(complete_chat, studio, req, call)
                message = ChatChoiceMessage(content=result.text)
                return ChatCompletion(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=body.model,
                                      choices=[ChatChoice(message=message, finish_reason=FINISH_REASONS.get(
                                          result.finish_reason, "stop"))], usage=Usage.of(result.usage),
                                      seed=result.seed)
            events = stream_chat(studio, req, call)
            first = await first_event(events)
        chunks = _Chunks(body.model, bool(body.stream_options and body.stream_options.include_usage))

        async def stream():
            yield chunks.chunk({"role": "assistant", "content": ""})
            async for text in relay(events, first, chunks.frames, lambda e: e.done, failure, call):
                yield text

        return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)

    api.include_router(v1)
    return api
