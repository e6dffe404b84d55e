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
from typing import Any

import httpx
import yaml

from studio import modalities
from studio.config import ConfigError
from studio.registry import ModelSpec, Provider, Registry

logger = logging.getLogger(__name__)

PROVIDER_KEYS = {"name", "base_url", "api_key_env", "timeout", "max_retries", "extensions", "models"}
MODEL_KEYS = {"id", "name", "modality", "label", "options"}


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
        entry = mapping(item, where, PROVIDER_KEYS)
        provider = Provider(
            name=text(entry, "name", where),
            base_url=text(entry, "base_url", where).rstrip("/"),
            api_key_env=text(entry, "api_key_env", where, required=False),
            timeout=_number(entry, "timeout", where, Provider.timeout),
            max_retries=int(_number(entry, "max_retries", where, Provider.max_retries)),
            extensions=_flag(entry, "extensions", where),
        )
        if not provider.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"{where}: base_url must start with http:// or https://, got {provider.base_url!r}")
        models = entry.get("models")
        if not isinstance(models, list) or not models:
            raise ConfigError(f"{where} ({provider.name}): models must be a non-empty list")
        for model_number, model in enumerate(models, 1):
            model_where = f"{where} ({provider.name}), model {model_number}"
            specs.append(_spec(provider, mapping(model, model_where, MODEL_KEYS), model_where))
    return specs


def _spec(provider: Provider, entry: dict, where: str) -> ModelSpec:
    model_id = text(entry, "id", where)
    kind = modality(entry, where, external=True)
    remote = text(entry, "name", where, required=False) or model_id
    label = text(entry, "label", where, required=False) or remote
    return ModelSpec(id=model_id, modality=kind.name, label=f"{label} · {provider.name} (external)",
                     loader=kind.connect, params=0, provider=provider, remote=remote,
                     options=options(entry, kind, where))


def modality(entry: dict, where: str, external: bool = False) -> modalities.Modality:
    """The entry's registered modality (external: one that providers can serve)."""
    name = text(entry, "modality", where)
    offered = [m.name for m in modalities.registered() if m.connect or not external]
    if name not in offered:
        raise ConfigError(f"{where}: modality {name!r} is not one of {', '.join(offered)}")
    return modalities.get(name)


def options(entry: dict, kind: modalities.Modality, where: str) -> dict:
    """The entry's `options`, checked against its modality's option names."""
    values = entry.get("options") or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: options must be a mapping")
    problems = modalities.resolve(kind.options).problems(values)
    if problems:
        raise ConfigError(f"{where}: options.{problems[0]}")
    return values


def mapping(item: Any, where: str, keys: set[str]) -> dict:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: expected a mapping with {', '.join(sorted(keys))}")
    unknown = sorted(set(item) - keys)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(sorted(keys))}")
    return item


def text(entry: dict, key: str, where: str, required: bool = True) -> str | None:
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


def _flag(entry: dict, key: str, where: str) -> bool:
    value = entry.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
    return value


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
