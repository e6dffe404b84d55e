"""How the studio's errors become HTTP answers: a status and a `detail` message that starts with the field, never a
500 for bad input, e.g. `{"detail": "steps: must be 1 to 4 for sd-turbo"}`. Schema errors also carry `field` and
`errors` (every problem pydantic found)."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from studio.cache import CacheBusy, CacheError, ModelTooLarge
from studio.providers import ProviderError
from studio.registry import UnknownModelError


def _error(status: int, message: str, field: str | None = None, **extra: object) -> JSONResponse:
    return JSONResponse({"detail": message, **({"field": field} if field else {}), **extra}, status_code=status)


def validation_problems(exc: RequestValidationError) -> tuple[int, list[tuple[str | None, str]]]:
    """Pydantic's findings as (status, [(field, "field: message"), ...]): 400 for a body that is not JSON."""
    errors = exc.errors()
    if any(error.get("type") == "json_invalid" for error in errors):
        return 400, [(None, "the request body is not valid JSON")]
    problems = []
    for error in errors:
        field = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or None
        problems.append((field, f"{field or 'body'}: {error.get('msg', 'is not valid')}"))
    return 422, problems


async def _invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
    status, problems = validation_problems(exc)
    field, message = problems[0]
    return _error(status, message, field, errors=[text for _, text in problems])


async def _unknown_model(_request: Request, exc: UnknownModelError) -> JSONResponse:
    return _error(404, f"model: {exc.message}", "model")


async def _cache_error(_request: Request, exc: CacheError) -> JSONResponse:
    status = 413 if isinstance(exc, ModelTooLarge) else 503 if isinstance(exc, CacheBusy) else 502
    return _error(status, str(exc))


async def _provider_error(_request: Request, exc: ProviderError) -> JSONResponse:
    return _error(exc.status, str(exc))  # 502/503/504 for the provider's failures, 429 when it rate-limits


ERROR_HANDLERS = {RequestValidationError: _invalid_request, UnknownModelError: _unknown_model,
                  CacheError: _cache_error, ProviderError: _provider_error}
