"""How the studio's errors become HTTP answers.

Only input errors are the client's: `InputError` (422, or 400 from the OpenAI-compatible routes), an unknown model
(404), a model too large for the budget (413), a busy cache (503) and a download that would not fit on the
disk (507); a provider's failure keeps its own status.
Each answer is one plain sentence that starts with the field, e.g. `{"detail": "steps: must be from 1 to 4 for
sd-turbo", "field": "steps"}`. Anything else is an internal error: the request-id middleware answers 500 with the
request id and logs the traceback (studio.telemetry.middleware).
"""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from studio.api.disconnect import ClientGone, client_gone
from studio.backends.remote import ProviderError
from studio.cache import CacheBusy, CacheError, ModelTooLarge
from studio.contract import InputError, UnknownModelError
from studio.manager import NotEnoughDisk
from studio.telemetry.middleware import internal_message

logger = logging.getLogger("studio.api")


class ErrorBody(BaseModel):
    """Every error answer of the studio's own routes."""

    detail: str  # "field: message", one plain sentence
    field: str | None = None
    errors: list[str] | None = None  # a body the schema refused: every problem found


ERROR_RESPONSES = {  # the error answers every generation route documents in /openapi.json
    404: {"model": ErrorBody, "description": "unknown model"},
    422: {"model": ErrorBody, "description": "a field the studio cannot work with"},
}


def status_of(exc: Exception) -> int:
    """The HTTP status of an error the client can act on."""
    if isinstance(exc, UnknownModelError):
        return 404
    if isinstance(exc, InputError):
        return 422
    if isinstance(exc, ProviderError):
        return exc.status
    if isinstance(exc, ModelTooLarge):
        return 413
    if isinstance(exc, NotEnoughDisk):
        return 507
    return 503 if isinstance(exc, CacheBusy) else 502


def public(exc: Exception, request_id: str) -> tuple[int, str, str | None]:
    """The status, message and field a client may see for `exc`. An internal error is logged with its traceback
    and shown only as its request id: no exception text, stack or file path reaches the client."""
    if isinstance(exc, (InputError, CacheError)):
        return status_of(exc), str(exc), getattr(exc, "field", None)
    logger.error("internal error (request %s)", request_id, exc_info=exc)
    return 500, internal_message(request_id), None


_PLAIN = {  # pydantic's error types, as plain sentences
    "missing": "is required",
    "string_type": "must be text",
    "int_type": "must be a whole number", "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number", "float_parsing": "must be a number",
    "bool_type": "must be true or false", "bool_parsing": "must be true or false",
    "dict_type": "must be an object", "list_type": "must be a list", "model_type": "must be an object",
    "extra_forbidden": "is not a field of this request",
}


def _sentence(error: dict) -> str:
    """One pydantic finding as a plain sentence (without pydantic's "Value error, " prefixes)."""
    kind, ctx = error.get("type", ""), error.get("ctx") or {}
    if kind in _PLAIN:
        return _PLAIN[kind]
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        words = {"greater_than_equal": "at least", "greater_than": "above", "less_than_equal": "at most",
                 "less_than": "below"}[kind]
        bound = next(iter(ctx.values()), "")
        return f"must be {words} {bound}"
    if kind == "string_too_short":
        least = ctx.get("min_length", 1)
        return "must not be empty" if least == 1 else f"must have at least {least} characters"
    if kind == "string_too_long":
        return f"must have at most {ctx.get('max_length')} characters"
    if kind == "too_short":
        least = ctx.get("min_length", 1)
        return "must not be empty" if least == 1 else f"must have at least {least} items"
    if kind == "too_long":
        most = ctx.get("max_length")
        return f"must have at most {most} item{'' if most == 1 else 's'}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected', '')}".replace("'", "")
    message = str(error.get("msg", "is not valid"))
    return message.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def validation_problems(exc: RequestValidationError) -> tuple[int, list[tuple[str | None, str]]]:
    """Pydantic's findings as (status, [(field, "field: sentence"), ...]): 400 for a body that is not JSON."""
    errors = exc.errors()
    if any(error.get("type") == "json_invalid" for error in errors):
        return 400, [(None, "body: is not valid JSON")]
    problems = []
    for error in errors:
        field = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or None
        problems.append((field, f"{field or 'body'}: {_sentence(error)}"))
    return 422, problems


def _answer(status: int, message: str, field: str | None = None, **extra: object) -> JSONResponse:
    return JSONResponse(ErrorBody(detail=message, field=field, **extra).model_dump(exclude_none=True),
                        status_code=status)


async def _invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
    status, problems = validation_problems(exc)
    field, message = problems[0]
    logger.info("input error: %s", message)
    return _answer(status, message, field, errors=[text for _, text in problems])


async def _input_error(request: Request, exc: InputError) -> JSONResponse:
    logger.info("input error on %s: %s", request.url.path, exc)
    return _answer(status_of(exc), str(exc), exc.field)


async def _unavailable(request: Request, exc: CacheError) -> JSONResponse:
    logger.warning("%s: %s", request.url.path, exc)
    return _answer(status_of(exc), str(exc))


ERROR_HANDLERS = {RequestValidationError: _invalid_request, InputError: _input_error, CacheError: _unavailable,
                  ClientGone: client_gone}
