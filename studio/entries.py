"""Reading the entries of the studio's YAML files: one format for the providers file (`--providers`) and the user
catalog (`--models`), so a model entry means the same in both (`id`, `modality`, `label`, `options`), and a bad
value stops start-up with one line naming the file, the entry and the field (studio.config's rule).

Every reader passes `where` ("--models: models.yaml: model 3 (qwen)"), which starts each message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from studio import modalities
from studio.config import ConfigError

MODEL_KEYS = {"id", "modality", "label", "options"}  # what every model entry has; each file adds its own keys


@dataclass(frozen=True)
class ModelEntry:
    """What every model entry says, checked: its id, its registered modality, its label and its options."""

    id: str
    modality: modalities.Modality
    label: str | None
    options: dict[str, Any]


def load(path: Path, flag: str) -> Any:
    """The YAML document in `path`; ConfigError naming the flag and the file when it cannot be read."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{flag}: cannot read {path}: {exc}") from None


def model_entry(entry: Mapping[str, Any], where: str, external: bool = False) -> ModelEntry:
    """The keys every model entry has; `external`: the modality must be one providers can serve."""
    model_id = text(entry, "id", where)
    kind = modality(entry, where, external)
    return ModelEntry(model_id, kind, text(entry, "label", where, required=False), options(entry, kind, where))


def modality(entry: Mapping[str, Any], where: str, external: bool = False) -> modalities.Modality:
    """The entry's registered modality (external: one that providers can serve)."""
    name = text(entry, "modality", where)
    offered = [m.name for m in modalities.registered() if m.connect or not external]
    if name not in offered:
        raise ConfigError(f"{where}: modality {name!r} is not one of {', '.join(offered)}")
    return modalities.get(name)


def options(entry: Mapping[str, Any], kind: modalities.Modality, where: str) -> dict:
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
    unknown = sorted(set(item) - keys, key=str)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(sorted(keys))}")
    return item


def text(entry: Mapping[str, Any], key: str, where: str, required: bool = True) -> str | None:
    value = entry.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, (str, int)) or isinstance(value, bool) or not str(value).strip():
        raise ConfigError(f"{where}: {key} must be a non-empty string")
    return str(value).strip()


def choice(entry: Mapping[str, Any], key: str, where: str, choices: tuple[str, ...]) -> str | None:
    """An optional value that must be one of `choices`."""
    value = text(entry, key, where, required=False)
    if value is not None and value not in choices:
        raise ConfigError(f"{where}: {key} {value!r} is not one of {', '.join(choices)}")
    return value


def number(entry: Mapping[str, Any], key: str, where: str, default: float) -> float:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"{where}: {key} must be a number >= 0, got {value!r}")
    return float(value)


def flag(entry: Mapping[str, Any], key: str, where: str) -> bool:
    value = entry.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
    return value
