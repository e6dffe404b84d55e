"""POST /generate/text: one chat turn, answered as JSON or streamed as Server-Sent Events.

The route is thin: it turns the body into a `ChatRequest` and relays the chat service's events. With `"stream":
true` each piece of the reply is one `data: {"text": ..., "done": false}` event, then one event with `"done": true`
and the usage, then `data: [DONE]`. The first piece is awaited before the response starts, so bad input, an unknown
model or a failed load is still a proper HTTP error; a client that disconnects stops the generation.
"""

from __future__ import annotations

import json
from typing import AsyncIterator, Iterator, Literal

import anyio
from fastapi import APIRouter, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, field_validator, model_validator
from starlette.concurrency import run_in_threadpool

from studio.api.security import guard
from studio.backends.chat import ChatEvent, ChatRequest, ChatResult, complete_chat, stream_chat, validate_chat
from studio.runtime import Studio

ENDPOINT = "/generate/text"


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class TextRequest(BaseModel):
    """Give `prompt` for a single turn, or `messages` for a conversation (ending with the user's message).

    Sampling fields left out take the model's defaults; `seed` left out is drawn at random and returned."""

    prompt: str | None = Field(None, description="the user's message (or give `messages`)")
    messages: list[Message] | None = Field(None, description="the conversation so far, oldest first")
    model: str | None = Field(None, description="a chat model id; default: the first chat model")
    system: str | None = Field(None, description="system prompt")
    max_new_tokens: int | None = Field(None, ge=1, description="at most the model's cap (see /health)")
    temperature: float | None = Field(None, ge=0, description="0 = greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="0 = off")
    repetition_penalty: float | None = Field(None, gt=0, description="1 = off")
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    stop: list[str] | None = Field(None, max_length=4, description="end the reply before any of these strings")
    stream: bool = Field(False, description="stream Server-Sent Events")

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> "TextRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TextResponse(BaseModel):
    text: str
    model: str
    usage: Usage
    seed: int
    finish_reason: Literal["stop", "length", "cancelled"]
    dropped_turns: int = Field(description="oldest messages left out to fit the model's context window")
    tokens_per_s: float


def _chat_request(studio: Studio, body: TextRequest) -> ChatRequest:
    models = studio.models("chat")
    if body.model is None and not models:
        raise HTTPException(404, "model: this studio serves no chat model")
    messages = [{"role": "user", "content": body.prompt}] if body.prompt is not None else [
        m.model_dump() for m in body.messages]
    req = ChatRequest(messages=messages, model=body.model or models[0], system=body.system,
                      max_new_tokens=body.max_new_tokens, temperature=body.temperature, top_p=body.top_p,
                      top_k=body.top_k, repetition_penalty=body.repetition_penalty, seed=body.seed, stop=body.stop)
    try:
        validate_chat(studio, req)  # an unknown model raises UnknownModelError: 404 from the shared handler
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    return req


def _response(done: ChatEvent | ChatResult, text: str, model: str) -> TextResponse:
    """The JSON answer, and the payload of the stream's final event: both carry the same totals."""
    usage = Usage(**done.usage, total_tokens=sum(done.usage.values()))
    return TextResponse(text=text, model=model, usage=usage, seed=done.seed, finish_reason=done.finish_reason,
                        dropped_turns=done.dropped_turns, tokens_per_s=done.tokens_per_s)


async def _sse(events: Iterator[ChatEvent], first: ChatEvent, model: str) -> AsyncIterator[str]:
    event = first
    try:
        while not event.done:
            yield f"data: {json.dumps({'text': event.text, 'done': False})}\n\n"
            event = await run_in_threadpool(next, events)
        yield f"data: {json.dumps({**_response(event, '', model).model_dump(), 'done': True})}\n\n"
        yield "data: [DONE]\n\n"
    except Exception as exc:  # the status line went out already: report the failure in the stream
        yield f"data: {json.dumps({'error': str(exc), 'done': True})}\n\n"
    finally:  # also on disconnect: closing the stream stops the model and writes the request's log row
        with anyio.CancelScope(shield=True):
            await run_in_threadpool(events.close)


def router(studio: Studio) -> APIRouter:
    api = APIRouter(tags=["generate"], dependencies=[guard(studio)])  # API keys / login, see studio.api.security

    @api.post(ENDPOINT, response_model=TextResponse,
              responses={200: {"content": {"text/event-stream": {}},
                               "description": "JSON, or Server-Sent Events with `stream: true`"},
                         401: {"description": "missing or wrong API key"}, 404: {"description": "unknown model"},
                         422: {"description": "invalid field"}})
    async def generate_text(body: TextRequest):
        """Chat with a local language model: the reply as JSON, or streamed token by token."""
        req = _chat_request(studio, body)
        kwargs = {"client": "api", "endpoint": ENDPOINT}
        try:
            if not body.stream:
                result = await run_in_threadpool(lambda: complete_chat(studio, req, **kwargs))
                return _response(result, result.text, req.model)
            events = stream_chat(studio, req, **kwargs)
            first = await run_in_threadpool(next, events)
        except ValueError as exc:  # e.g. the newest message alone is longer than the context window
            raise HTTPException(422, str(exc)) from None
        return StreamingResponse(_sse(events, first, req.model), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    return api
