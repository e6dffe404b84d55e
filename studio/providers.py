"""The providers file: external OpenAI-compatible servers (vLLM, TGI, Ollama, llama.cpp, a hosted API, another
studio) and the models the studio exposes from them.

Anything that speaks the OpenAI API can serve the studio's chat, image and speech models, which is how the studio
grows past one machine. This module only reads the file (`--providers`) into external `ModelSpec`s; each one is
loaded by its modality's `connect` loader (a client object implementing the same interface as a local model, in
`studio.backends`), so the services never ask whether a model is local.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import httpx

from studio.config import ConfigError
from studio.entries import MODEL_KEYS, flag, load, mapping, model_entry, number, text
from studio.registry import ModelSpec, Provider, Registry

logger = logging.getLogger(__name__)

PROVIDER_KEYS = {"name", "base_url", "api_key_env", "timeout", "max_retries", "extensions", "models"}
PROVIDER_MODEL_KEYS = MODEL_KEYS | {"name"}  # the provider's name for the model


def read_config(path: Path) -> list[ModelSpec]:
    """Parse the providers file into external ModelSpecs; raises ConfigError naming the bad entry."""
    data = load(path, "--providers")
    if not isinstance(data, list) or not data:
        raise ConfigError(f"--providers: {path} must hold a YAML list of providers (see README)")
    specs: list[ModelSpec] = []
    for index, item in enumerate(data, 1):
        where = f"--providers: {path}: provider {index}"
        entry = mapping(item, where, PROVIDER_KEYS)
        provider = Provider(
            name=text(entry, "name", where),
            base_url=text(entry, "base_url", where).rstrip("/"),
            api_key_env=text(entry, "api_key_env", where, required=False),
            timeout=number(entry, "timeout", where, Provider.timeout),
            max_retries=int(number(entry, "max_retries", where, Provider.max_retries)),
            extensions=flag(entry, "extensions", where),
        )
        if not provider.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"{where}: base_url must start with http:// or https://, got {provider.base_url!r}")
        models = entry.get("models")
        if not isinstance(models, list) or not models:
            raise ConfigError(f"{where} ({provider.name}): models must be a non-empty list")
        for model_number, model in enumerate(models, 1):
            model_where = f"{where} ({provider.name}), model {model_number}"
            specs.append(_spec(provider, mapping(model, model_where, PROVIDER_MODEL_KEYS), model_where))
    return specs


def _spec(provider: Provider, entry: dict, where: str) -> ModelSpec:
    model = model_entry(entry, where, external=True)
    remote = text(entry, "name", where, required=False) or model.id
    return ModelSpec(id=model.id, modality=model.modality.name,
                     label=f"{model.label or remote} · {provider.name} (external)", loader=model.modality.connect,
                     params=0, provider=provider, remote=remote, options=model.options, origin="external")


def register(registry: Registry, path: Path) -> list[ModelSpec]:
    """Add the providers' models to the registry at start-up (their ids must not clash with local ones)."""
    specs = read_config(path)
    for spec in specs:
        if spec.id in registry:
            raise ConfigError(f"--providers: model id {spec.id!r} is already taken; give the external model "
                              "another id (and its provider's name for it in `name`)")
        registry.add(spec)
    return specs


def remote_options(provider: Provider, timeout: float = 5.0) -> dict[str, dict] | None:
    """The limits and defaults another studio publishes for its models (`options` in its /v1/models), by model
    id; None when it cannot be asked now. Only providers with `extensions: true` are asked."""
    key = os.environ.get(provider.api_key_env, "") if provider.api_key_env else ""
    try:
        answer = httpx.get(f"{provider.base_url}/models", timeout=min(timeout, provider.timeout),
                           headers={"Authorization": f"Bearer {key}"} if key else {})
        answer.raise_for_status()
        cards = answer.json()["data"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        logger.warning("provider %s: could not read its models' limits (%s)", provider.name, exc)
        return None
    return {str(card["id"]): dict(card.get("options") or {}) for card in cards if isinstance(card, dict)}
