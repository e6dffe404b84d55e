"""The user's own models: the user catalog file (`--models`), the drop-in folders (`--models-dir`), and telling
which family a model's files belong to.

The catalog file is the providers file's model entry plus where the weights are:

    models:
      - {id: qwen2.5-1.5b, modality: chat, source: Qwen/Qwen2.5-1.5B-Instruct, quantize: int8}
      - {id: my-sd, modality: image, source: /models/dreamshaper_8.safetensors, label: DreamShaper 8}

A `source` is a Hub repo id, a local folder in a Hub repo's layout, or a single-file checkpoint (a relative path
is relative to the catalog file's folder). Families are never asked of the user: every registered modality's
`detect` looks at the files (studio.contract.Family), for a Hub repo at its small config files, fetched into the
Hugging Face cache first. A bad entry stops start-up with one line naming the file, the entry and the field.

The drop-in folders hold one subfolder per modality (`models/chat/<model folder>`, `models/image/<file>.safetensors`,
`models/text-to-speech/<voice>.onnx`); their entries are made from the names. A drop-in that cannot be served is
reported (start-up warnings, the Models tab) and left out; the studio starts anyway.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from studio import hub, modalities
from studio.config import ConfigError
from studio.contract import Family, InputError, UnsupportedModel, config_json
from studio.entries import MODEL_KEYS, choice, load, mapping, model_entry, text
from studio.quantization import QUANTIZE_CHOICES, QuantizationError, check
from studio.registry import FP32, ModelSpec, Registry

logger = logging.getLogger(__name__)

CATALOG_KEYS = MODEL_KEYS | {"source", "revision", "dtype", "quantize"}
DTYPES = ("float32", "float16", "bfloat16")
DEVICES = ("cuda", "mps", "cpu")
# Files in a drop-in folder that are a model by themselves (folders always are a candidate).
MODEL_FILES = (".safetensors", ".ckpt", ".onnx", ".bin", ".pt", ".pth", ".gguf")
_writing = threading.Lock()  # one writer of the catalog file at a time


class Unreachable(RuntimeError):
    """A Hub model whose files are not cached while the Hub cannot be asked (offline): nothing wrong with the
    entry, but it cannot be recognised (or served) now."""


@dataclass(frozen=True)
class UserEntry:
    """One model of the user catalog, as written (checked for shape; its files are looked at by `resolve`)."""

    id: str
    modality: str
    source: str
    label: str | None = None
    revision: str | None = None
    dtype: str | None = None
    quantize: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def as_yaml(self) -> dict[str, Any]:
        """The entry as the catalog file holds it: only what is set."""
        values = {"id": self.id, "modality": self.modality, "source": self.source, "label": self.label,
                  "revision": self.revision, "dtype": self.dtype, "quantize": self.quantize,
                  "options": self.options or None}
        return {key: value for key, value in values.items() if value is not None}


@dataclass(frozen=True)
class Problem:
    """A drop-in or catalog model that was left out, and why (shown at start-up and in the Models tab)."""

    where: str
    message: str


# ---------------------------------------------------------------------------------------------- the catalog file


def read_catalog(path: Path) -> list[UserEntry]:
    """The entries of the user catalog file; ConfigError naming the file, the entry and the field."""
    data = load(path, "--models")
    if data is None:
        return []
    if not isinstance(data, dict) or set(data) - {"models"} or not isinstance(data.get("models") or [], list):
        raise ConfigError(f"--models: {path} must hold a top-level `models:` list (see README)")
    entries, seen = [], set()
    for number, item in enumerate(data.get("models") or [], 1):
        where = f"--models: {path}: model {number}"
        entry = entry_of(mapping(item, where, CATALOG_KEYS), f"{where}{_named(item)}")
        if entry.id in seen:
            raise ConfigError(f"{where} ({entry.id}): id: {entry.id!r} is used twice in the file")
        seen.add(entry.id)
        entries.append(entry)
    return entries


def _named(item: dict) -> str:
    return f" ({item['id']})" if isinstance(item.get("id"), str) else ""


def entry_of(item: dict, where: str) -> UserEntry:
    """A catalog file's entry, checked (the keys of every model entry, then the catalog's own)."""
    model = model_entry(item, where)
    return UserEntry(id=model.id, modality=model.modality.name, source=text(item, "source", where),
                     label=model.label, revision=text(item, "revision", where, required=False),
                     dtype=choice(item, "dtype", where, DTYPES),
                     quantize=choice(item, "quantize", where, QUANTIZE_CHOICES), options=model.options)


def append_entry(path: Path, entry: UserEntry) -> None:
    """Add an entry to the catalog file (created when missing). The entry goes in as one line at the end of the
    `models:` list, so the user's comments and layout stay; only a file where that would not parse the same (a
    flow-style list, say) is rewritten whole."""
    with _writing:
        old = Path(path).read_text() if Path(path).exists() else ""
        models = _models(old)
        line = "  - " + yaml.safe_dump(entry.as_yaml(), default_flow_style=True, width=10**6, sort_keys=False)
        new = (old if old.strip() else "models:\n") + ("" if old.endswith("\n") or not old.strip() else "\n") + line
        if not _parses_to(new, models + [entry.as_yaml()]):
            new = _dump(models + [entry.as_yaml()])
        _write(Path(path), new)


def remove_entry(path: Path, model_id: str) -> bool:
    """Take the entry with `model_id` out of the catalog file; False when the file has none. A one-line entry
    (as the studio writes them) is cut out alone; otherwise the file is rewritten without it."""
    with _writing:
        if not Path(path).exists():
            return False
        old = Path(path).read_text()
        models = _models(old)
        kept = [m for m in models if not (isinstance(m, dict) and m.get("id") == model_id)]
        if len(kept) == len(models):
            return False
        lines = old.splitlines(keepends=True)
        for number, line in enumerate(lines):
            candidate = "".join(lines[:number] + lines[number + 1:])
            if line.lstrip().startswith("- ") and model_id in line and _parses_to(candidate, kept):
                _write(Path(path), candidate)
                return True
        _write(Path(path), _dump(kept))
        return True


def _models(content: str) -> list:
    data = yaml.safe_load(content) if content.strip() else None
    return list((data or {}).get("models") or [])


def _parses_to(content: str, models: list) -> bool:
    try:
        return _models(content) == models
    except yaml.YAMLError:
        return False


def _dump(models: list) -> str:
    return "# The studio's user catalog (see README: Bring your own models).\n" + yaml.safe_dump(
        {"models": models}, default_flow_style=None, width=120, sort_keys=False)


def _write(path: Path, content: str) -> None:
    """Write via a temporary file and a rename, so a crash never leaves half a catalog."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(content)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- recognising models


def local_source(source: str, base: Path) -> Path | None:
    """The file or folder a source names on this disk (relative to `base`), or None."""
    path = Path(source).expanduser()
    path = path if path.is_absolute() else base / path
    return path.resolve() if path.exists() else None


def recognise(path: Path) -> tuple[modalities.Modality, Family]:
    """The modality and family of the model at `path`, asking every registered modality's `detect`; raises
    UnsupportedModel with the most specific reason found."""
    reasons = []
    for modality in modalities.registered():
        if modality.detect is None:
            continue
        try:
            family = modalities.resolve(modality.detect)(path)
        except UnsupportedModel as exc:
            reasons.append(str(exc))
            continue
        if family is not None:
            return modality, family
    raise UnsupportedModel(reasons[0] if reasons else _unknown(path))


def _unknown(path: Path) -> str:
    """Why nothing recognised `path`, in words the user can act on."""
    served = ", ".join(m.name for m in modalities.registered() if m.detect)
    if path.is_file():
        return (f"{path.name} is not a model file the studio recognises (it serves {served} models: a "
                "Stable Diffusion checkpoint, a Piper .onnx voice, or a folder in a Hub repo's layout)")
    config = config_json(path)
    if config is None:
        return f"{path.name} has no config.json or model_index.json: it is not a model folder in a Hub repo's layout"
    kind = ", ".join(config.get("architectures") or []) or config.get("model_type") or "its model"
    return f"{kind} is not a kind of model the studio serves (it serves {served} models)"


def hub_files(repo: str, revision: str) -> Path:
    """A folder with the repo's config files for `recognise`: from the cache, else fetched from the Hub."""
    cached = hub.snapshot(repo, revision)
    if cached is None:
        from huggingface_hub import snapshot_download

        try:  # configs fetched earlier (an Add that was cancelled, a start-up look) are enough to recognise it
            cached = Path(snapshot_download(repo, revision=revision, local_files_only=True,
                                            allow_patterns=hub.CONFIG_PATTERNS))
        except Exception:  # not cached: ask the Hub below
            cached = None
    if cached is not None:
        return cached
    if hub.offline():
        raise Unreachable(f"{repo} is not in the Hugging Face cache and HF_HUB_OFFLINE is set")
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        return hub.fetch_configs(repo, revision)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise InputError("source", f"{repo} (revision {revision}) is not a model repo on the Hub, or it is "
                                   "private or gated (log in with `hf auth login`)") from None
    except Exception as exc:  # no connection, a timeout, the Hub's own trouble: each library has its own errors
        raise Unreachable(f"{repo}: the Hub cannot be reached ({type(exc).__name__})") from exc


def resolve(entry: UserEntry, base: Path, device: str, origin: str = "catalog") -> ModelSpec:
    """The registry entry of a user model: its files found (a Hub repo's configs fetched), its family detected,
    its quantization checked for this device. Raises InputError (the entry's field at fault) or
    Unreachable."""
    local = local_source(entry.source, base)
    if local is None and not hub.is_repo_id(entry.source):
        raise InputError("source", f"{entry.source!r} is neither a file or folder on this disk nor a Hub repo "
                                   "id (org/name)")
    revision = entry.revision or "main"
    folder = local if local is not None else hub_files(entry.source, revision)
    try:
        modality, family = recognise(folder)
    except UnsupportedModel as exc:
        raise InputError("source", f"{entry.source}: {exc}") from None
    if modality.name != entry.modality:
        raise InputError("modality", f"{entry.source} is a {modality.name} model ({family.label}), not a "
                                     f"{entry.modality} model")
    try:
        check(entry.quantize, device, modality.name)
    except QuantizationError as exc:
        raise InputError("quantize", str(exc)) from None
    dtypes = {d: entry.dtype for d in DEVICES} if entry.dtype else dict(family.dtypes or FP32)
    name = local.stem if local is not None and local.is_file() else entry.source.rstrip("/").split("/")[-1]
    return ModelSpec(id=entry.id, modality=modality.name, label=entry.label or name,
                     loader=family.loader, params=0, repo=None if local is not None else entry.source,
                     revision=revision, path=str(local) if local is not None else None, dtypes=dtypes,
                     options={**family.options, **entry.options}, family=family.name, quantize=entry.quantize,
                     origin=origin)


# ---------------------------------------------------------------------------------------------- at start-up


def register_catalog(registry: Registry, path: Path, device: str) -> list[Problem]:
    """Add the catalog file's models to the registry. A bad entry raises ConfigError (start-up stops); a Hub
    model that cannot be looked at now (offline, not cached) is left out and reported."""
    if not Path(path).is_file():
        return []
    problems = []
    for number, entry in enumerate(read_catalog(path), 1):
        where = f"--models: {path}: model {number} ({entry.id})"
        if entry.id in registry:
            raise ConfigError(f"{where}: id: {entry.id!r} is already taken by a built-in or external model")
        try:
            registry.add(resolve(entry, Path(path).parent, device))
        except InputError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        except Unreachable as exc:
            problems.append(Problem(f"{path}: {entry.id}", f"left out until the Hub can be reached: {exc}"))
    return problems


def scan(models_dir: Path, registry: Registry, device: str) -> tuple[list[ModelSpec], list[Problem]]:
    """The drop-in folders' models that are not registered yet, and the ones that cannot be served."""
    found, problems = [], []
    for modality in modalities.registered():
        folder = Path(models_dir) / modality.name
        if not folder.is_dir():
            continue
        for item in sorted(folder.iterdir()):
            if item.name.startswith(".") or (item.is_file() and item.suffix not in MODEL_FILES):
                continue
            if item.is_dir() and any((item.parent / f"{item.name}{suffix}").is_file() for suffix in MODEL_FILES):
                continue  # the configs of the single-file checkpoint of the same name beside it
            if any(spec.path == str(item.resolve()) for spec in registry):
                continue  # found by an earlier scan, or listed in the catalog file
            model_id = slug(item.stem if item.is_file() else item.name)
            if model_id in registry or any(spec.id == model_id for spec in found):
                problems.append(Problem(str(item), f"the id {model_id!r} is already taken; rename it"))
                continue
            try:
                entry = UserEntry(id=model_id, modality=modality.name, source=str(item.resolve()))
                found.append(resolve(entry, folder, device, origin="drop-in"))
            except InputError as exc:
                problems.append(Problem(str(item), exc.message))
    return found, problems


def slug(name: str) -> str:
    """A model id from a file or folder name: lower case, runs of other characters as one '-'."""
    return re.sub(r"[^a-z0-9._]+", "-", name.lower()).strip("-.") or "model"


def log_problems(problems: list[Problem]) -> None:
    for problem in problems:
        logger.warning("model left out: %s: %s", problem.where, problem.message)
