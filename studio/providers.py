"""External providers: models served by vLLM, TGI, Ollama, llama.cpp, a hosted API or another studio.

Anything that speaks the OpenAI API can serve the studio's chat, image and speech models, which is how the studio
grows past one machine: the heavy models run on a GPU server or cluster and the studio stays the front end.
A YAML file (`--providers`) lists the providers and the models to expose; each model becomes an external
`ModelSpec`. The model cache "loads" it as a small client object (no memory budget), and the chat, image and
speech services hand the work to the functions here, which call the provider through the `openai` package.
Every provider failure becomes a `ProviderError` whose message is meant for the user.
"""

from __future__ import annotations

import io
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import openai
import yaml

from studio.cache import CacheError
from studio.config import ConfigError
from studio.registry import ModelSpec, Registry

if TYPE_CHECKING:
    import threading

    import numpy as np
    from PIL import Image

MODALITIES = ("chat", "image", "speech")
PROVIDER_KEYS = {"name", "base_url", "api_key_env", "timeout", "max_retries", "models"}
MODEL_KEYS = {"id", "name", "modality", "label", "options"}
# Caps for the tabs' sliders and the services' checks; a model's `options` in the file override them.
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "chat": {"context_length": 8192, "max_new_tokens": 2048},
    "image": {"steps": 30, "max_steps": 100, "guidance": 7.0, "width": 1024, "height": 1024, "max_size": 2048,
              "negative_prompt": True},
    "speech": {"voices": ["alloy"], "default_voice": "alloy"},
}


class ProviderError(CacheError):
    """The provider could not serve the request; `status` is the HTTP status the studio's API answers with."""

    def __init__(self, message: str, status: int = 502):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Provider:
    name: str
    base_url: str
    api_key_env: str | None = None  # None: the server needs no key (a local vLLM, Ollama, llama.cpp)
    timeout: float = 120.0  # seconds for one request (connect, and each read while streaming)
    max_retries: int = 1  # the openai package retries connection errors, 429 and 5xx with back-off


@dataclass
class ProviderClient:
    """What the model cache holds for an external model: a client and the provider's name for the model."""

    provider: Provider
    model: str
    client: openai.OpenAI


# ---------------------------------------------------------------------------------------------- configuration


def read_config(path: Path) -> list[ModelSpec]:
    """Parse the providers file into external ModelSpecs; raises ConfigError naming the bad entry."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--providers: cannot read {path}: {exc}") from None
    if not isinstance(data, list) or not data:
        raise ConfigError(f"--providers: {path} must hold a YAML list of providers (see README)")
    specs: list[ModelSpec] = []
    for number, item in enumerate(data, 1):
        where = f"--providers: {path}: provider {number}"
        entry = _mapping(item, where, PROVIDER_KEYS)
        provider = Provider(
            name=_text(entry, "name", where),
            base_url=_text(entry, "base_url", where).rstrip("/"),
            api_key_env=_text(entry, "api_key_env", where, required=False),
            timeout=_number(entry, "timeout", where, Provider.timeout),
            max_retries=int(_number(entry, "max_retries", where, Provider.max_retries)),
        )
        if not provider.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"{where}: base_url must start with http:// or https://, got {provider.base_url!r}")
        models = entry.get("models")
        if not isinstance(models, list) or not models:
            raise ConfigError(f"{where} ({provider.name}): models must be a non-empty list")
        for model_number, model in enumerate(models, 1):
            specs.append(_spec(provider, _mapping(model, f"{where} ({provider.name}), model {model_number}",
                                                  MODEL_KEYS), f"{where} ({provider.name}), model {model_number}"))
    return specs


def _spec(provider: Provider, entry: dict, where: str) -> ModelSpec:
    model_id = _text(entry, "id", where)
    modality = _text(entry, "modality", where)
    if modality not in MODALITIES:
        raise ConfigError(f"{where}: modality {modality!r} is not one of {', '.join(MODALITIES)}")
    options = entry.get("options") or {}
    if not isinstance(options, dict):
        raise ConfigError(f"{where}: options must be a mapping")
    remote = _text(entry, "name", where, required=False) or model_id
    label = _text(entry, "label", where, required=False) or remote
    return ModelSpec(id=model_id, modality=modality, label=f"{label} · {provider.name} (external)",
                     loader="studio.providers:load_client", params=0, external=True,
                     options={**DEFAULT_OPTIONS[modality], **options, "provider": provider, "remote_model": remote})


def _mapping(item: Any, where: str, keys: set[str]) -> dict:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: expected a mapping with {', '.join(sorted(keys))}")
    unknown = sorted(set(item) - keys)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(sorted(keys))}")
    return item


def _text(entry: dict, key: str, where: str, required: bool = True) -> str | None:
    value = entry.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, (str, int)) or isinstance(value, bool) or not str(value).strip():
        raise ConfigError(f"{where}: {key} must be a non-empty string")
    return str(value).strip()


def _number(entry: dict, key: str, where: str, default: float) -> float:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"{where}: {key} must be a number >= 0, got {value!r}")
    return float(value)


def register(registry: Registry, path: Path) -> list[ModelSpec]:
    """Add the providers' models to the registry at start-up (their ids must not clash with local ones)."""
    specs = read_config(path)
    for spec in specs:
        try:
            registry.add(spec)
        except ValueError:
            raise ConfigError(f"--providers: model id {spec.id!r} is already taken; give the external model "
                              "another id (and its provider's name for it in `name`)") from None
    return specs


def provider_of(spec: ModelSpec) -> Provider:
    return spec.options["provider"]


# ---------------------------------------------------------------------------------------------- the client


def load_client(spec: ModelSpec, path: Path | None, device: str, dtype: str) -> ProviderClient:
    """The cache's loader for external models: a client object, no weights and no memory budget."""
    provider = provider_of(spec)
    key = "not-needed"  # the openai package insists on a key; keyless servers ignore it
    if provider.api_key_env:
        key = os.environ.get(provider.api_key_env, "")
        if not key:
            raise ProviderError(f"{spec.id}: set the environment variable {provider.api_key_env} to "
                                f"{provider.name}'s API key and restart the studio", status=503)
    client = openai.OpenAI(base_url=provider.base_url, api_key=key, timeout=provider.timeout,
                           max_retries=provider.max_retries)
    return ProviderClient(provider, spec.options["remote_model"], client)


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
def _calling(handle: ProviderClient) -> Iterator[None]:
    try:
        yield
    except openai.OpenAIError as exc:
        raise as_provider_error(handle, exc) from exc
