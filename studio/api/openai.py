"""What the OpenAI-compatible API (/v1) shares: its error shape, its route class, token usage and /v1/models.

Each modality's API module adds its own /v1 routes with `openai_router(studio)`; they go through the same
services as the UI (so requests are validated, queued, pinned and logged the same way, client "openai"). Every
failure under /v1 is answered in OpenAI's shape {"error": {"message", "type", "param", "code"}}, input errors with
400 as OpenAI does; the rest of the API keeps {"detail": ...}.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, Callable, Iterator, Literal, Mapping

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel

from studio import modalities
from studio.api.errors import public, validation_problems
from studio.api.security import guard
from studio.contract import InputError, UnknownModelError
from studio.registry import Alias, ModelSpec
from studio.runtime import Studio
from studio.telemetry.requestlog import REQUEST_ID


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


ERROR_RESPONSES = {status: {"model": OpenAIError, "description": text} for status, text in (
    (400, "invalid request; `param` names the field"), (401, "missing or wrong API key"), (404, "unknown model"))}


def error_body(status: int, message: str, param: str | None = None) -> dict:
    """OpenAI's error object; `type` and `code` follow the status the way OpenAI's own API sets them."""
    kind = ("authentication_error" if status in (401, 403) else "rate_limit_error" if status == 429
            else "server_error" if status >= 500 else "invalid_request_error")
    code = {401: "invalid_api_key", 404: "model_not_found" if param == "model" else "not_found",
            429: "rate_limit_exceeded"}.get(status)
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def answer(exc: Exception) -> tuple[int, dict]:
    """An error's status and OpenAI error object (internal errors are logged and shown only as the request id)."""
    status, message, field = public(exc, REQUEST_ID.get() or "unknown")
    if isinstance(exc, InputError) and not isinstance(exc, UnknownModelError):
        status = 400
    return status, error_body(status, message, field)


def failure(exc: Exception) -> dict:
    """The error object of a stream that failed after it started."""
    return answer(exc)[1]


class OpenAIRoute(APIRoute):
    """A route whose failures come back in OpenAI's error shape, whatever raised them."""

    def get_route_handler(self) -> Callable:
        handle = super().get_route_handler()

        async def openai_errors(request: Request) -> Response:
            try:
                return await handle(request)
            except RequestValidationError as exc:
                _status, problems = validation_problems(exc)  # OpenAI answers every invalid request with 400
                param, message = problems[0]
                return JSONResponse(error_body(400, message, param), status_code=400)
            except HTTPException as exc:
                return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code,
                                    headers=exc.headers)
            except Exception as exc:
                status, body = answer(exc)
                return JSONResponse(body, status_code=status)

        return openai_errors


@contextmanager
def renamed(names: Mapping[str, str]) -> Iterator[None]:
    """Input errors under this API's names for the service's fields (`max_tokens` for `max_new_tokens`)."""
    try:
        yield
    except InputError as exc:
        if exc.field in names:
            raise exc.renamed(names[exc.field]) from None
        raise


def only(body: BaseModel, **neutral: Any) -> None:
    """Standard fields this server does not implement are accepted at their neutral value only."""
    for name, value in neutral.items():
        if getattr(body, name) != value:
            raise InputError(name, f"only {value} is supported by this server")


def dimensions(size: str | None) -> tuple[int | None, int | None]:
    """OpenAI's `size`: '512x768' -> (512, 768); None or 'auto' -> (None, None), the model's default size."""
    if size is None or size == "auto":
        return None, None
    match = re.fullmatch(r"(\d+)x(\d+)", size)
    if not match:
        raise InputError("size", f"expected WIDTHxHEIGHT such as 512x512, got {size!r}")
    return int(match.group(1)), int(match.group(2))


def openai_router(studio: Studio) -> APIRouter:
    """A router for a modality's /v1 routes: API keys, OpenAI's error shape."""
    return APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute, dependencies=[guard(studio)],
                     responses=ERROR_RESPONSES)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, usage: Mapping[str, int]) -> "Usage":
        prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str  # "studio" for local models, the provider's name for external ones
    modality: str
    family: str | None = None  # how it loads (causal-lm, vits, bark, piper, ...); None where the entry does not say
    external: bool
    label: str
    voices: list[str] | None = None  # text-to-speech models: the values `voice` takes
    options: dict[str, Any]  # the model's defaults and caps (another studio reads them when it is a provider)
    alias_of: str | None = None  # an alias (tiny profile: a real model's id) of this studio model


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def card(spec: ModelSpec, alias: Alias | None = None) -> ModelCard:
    """The model's card; under an alias, the alias's id and label."""
    options = asdict(modalities.resolve(modalities.get(spec.modality).options).of(spec))
    return ModelCard(id=alias.id if alias else spec.id, owned_by=spec.provider.name if spec.provider else "studio",
                     modality=spec.modality, family=spec.family, external=spec.external,
                     label=alias.label if alias else spec.label, voices=options.get("voices"),
                     options={k: v for k, v in options.items() if v is not None}, alias_of=alias and spec.id)


def router(studio: Studio) -> APIRouter:
    api = openai_router(studio)

    @api.get("/models")
    def list_models() -> ModelList:
        """Every model the studio serves, local and external (owned by their provider), with its limits; then the
        aliases (on the tiny profile, the real models' ids), each with the card of the model it names."""
        registry = studio.registry
        aliases = [card(registry.get(a.id), a) for a in registry.aliases.values() if a.id in registry]
        return ModelList(data=[card(spec) for spec in registry] + aliases)

    @api.get("/models/{model_id}")
    def get_model(model_id: str) -> ModelCard:
        spec = studio.registry.get(model_id)
        return card(spec, studio.registry.aliases.get(model_id) if spec.id != model_id else None)

    return api
