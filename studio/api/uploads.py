"""Request bodies that carry files: the same fields as JSON (files base64-encoded, plain or as a `data:` URL) or as
multipart/form-data (files as files), checked by one pydantic model either way, with the same 422s naming fields."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from studio.contract import InputError

OBJECT_FIELDS = ("adapters", "trigger_words")  # fields a multipart form sends as JSON text


def decode_image(field: str, value: str | bytes) -> bytes:
    """A JSON image field's bytes: base64, plain or as a `data:image/...;base64,` URL."""
    if isinstance(value, bytes):
        return value
    text = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(field, "is not base64 (send the file's bytes base64-encoded, or use multipart)") from None


async def form_or_json(request: Request) -> dict[str, Any]:
    """The request's fields: a JSON object, or multipart/form-data with files as bytes (`adapters` and the other
    object fields as JSON text)."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form()
        fields: dict[str, Any] = {}
        for key, value in form.multi_items():
            fields[key] = await value.read() if isinstance(value, UploadFile) else value
        for key in OBJECT_FIELDS:
            if isinstance(fields.get(key), str):
                try:
                    fields[key] = json.loads(fields[key])
                except ValueError:
                    raise InputError(key, "must be a JSON object in a multipart form") from None
        return fields
    try:
        body = await request.json()
    except ValueError:
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": "invalid JSON"}]) from None
    if not isinstance(body, dict):
        raise RequestValidationError([{"type": "model_type", "loc": ("body",), "msg": "must be an object"}])
    return body


def parsed(model: type[BaseModel], fields: dict[str, Any]) -> Any:
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def body_doc(model: type[BaseModel]) -> dict:
    """The request body in /openapi.json (a route that reads it itself has none): the same fields as JSON or as
    multipart/form-data."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema},
                                                          "multipart/form-data": {"schema": schema}}}}
