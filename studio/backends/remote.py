"""The client side of external providers: an `openai` client per model, and provider failures as clear errors.

Each modality's external model (`ProviderChat`, `ProviderImage`, `ProviderSpeech`, in their backend modules) is a
`ProviderClient` with the same interface as the modality's local models; this module gives them the client and
turns whatever the `openai` package raises into a `ProviderError` whose message a user can act on.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import openai

from studio.cache import CacheError
from studio.registry import ModelSpec, Provider


class ProviderError(CacheError):
    """The provider could not serve the request; `status` is the HTTP status the studio's API answers with.

    A CacheError (the model is not available right now), so every place that reports those to the user (the
    tabs, the API's error handlers) reports this too."""

    def __init__(self, message: str, status: int = 502):
        super().__init__(message)
        self.status = status


@dataclass
class ProviderClient:
    """What the model cache holds for an external model: a client and the provider's name for the model."""

    provider: Provider
    model: str
    client: openai.OpenAI


def connect_client(spec: ModelSpec) -> tuple[Provider, str, openai.OpenAI]:
    """A client for the spec's provider (no weights, no memory budget); the key is read from the environment now,
    so a key set after start-up is used on the next try."""
    provider = spec.provider
    key = "not-needed"  # the openai package insists on a key; keyless servers ignore it
    if provider.api_key_env:
        key = os.environ.get(provider.api_key_env, "")
        if not key:
            raise ProviderError(f"{spec.id}: set the environment variable {provider.api_key_env} to "
                                f"{provider.name}'s API key and restart the studio", status=503)
    client = openai.OpenAI(base_url=provider.base_url, api_key=key, timeout=provider.timeout,
                           max_retries=provider.max_retries)
    return provider, spec.remote or spec.id, client


def _detail(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        message = body.get("message") or body.get("detail") or body.get("error")
        if message:
            return str(message)[:300]
    return exc.message[:300]


def as_provider_error(handle: ProviderClient, exc: openai.OpenAIError) -> ProviderError:
    """Translate what the openai package raised into a message a user can act on."""
    p = handle.provider
    who = f"provider {p.name} ({p.base_url})"
    if isinstance(exc, openai.APITimeoutError):
        return ProviderError(f"{who} did not answer within {p.timeout:g} s; try again, or raise its timeout "
                             "in the providers file", 504)
    if isinstance(exc, openai.APIConnectionError):
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        return ProviderError(f"cannot reach {who}: {cause}; is the server running?", 502)
    if isinstance(exc, openai.APIStatusError):
        code = exc.status_code
        if code in (401, 403):
            fix = f"check {p.api_key_env}" if p.api_key_env else "set api_key_env in the providers file"
            return ProviderError(f"{who} refused the API key (HTTP {code}): {_detail(exc)}; {fix}", 502)
        if code == 404:
            return ProviderError(f"{who} does not serve the model {handle.model!r} (HTTP 404): {_detail(exc)}", 502)
        if code == 429:
            return ProviderError(f"{who} is rate-limiting requests (HTTP 429); try again later", 429)
        if code >= 500:
            return ProviderError(f"{who} failed (HTTP {code}): {_detail(exc)}", 503 if code == 503 else 502)
        return ProviderError(f"{who} rejected the request (HTTP {code}): {_detail(exc)}", 400)
    return ProviderError(f"{who}: {exc}", 502)


@contextmanager
def calling(handle: ProviderClient) -> Iterator[None]:
    """Around a provider call: its failures become ProviderErrors."""
    try:
        yield
    except openai.OpenAIError as exc:
        raise as_provider_error(handle, exc) from exc
