"""What every modality's service shares: one input error, one seed rule, the text checks and typed options.

Each backend module (`studio.backends.<modality>`) follows the same small contract, in the spirit of a diffusers
pipeline: a typed request (fields left as None take the model's defaults), a typed result, the model family's
defaults and caps as a `ModelOptions` subclass, one `validate` that raises `InputError` naming the field, and the
service function that validates, then generates inside `Studio.generation`. The routes, the tabs and the MCP tools
only translate their input into the typed request; the service validates it, once.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

SEED_RANGE = 2**32  # seeds are 0 .. 2**32 - 1 in every modality, as in AUTOMATIC1111

O = TypeVar("O", bound="ModelOptions")


class InputError(Exception):
    """Input the studio cannot work with: the request field it is about, and one plain sentence.

    The only error (with `UnknownModelError` and the cache's "too large" and "busy") that reaches a user as their
    own mistake: an HTTP 4xx naming `field`, a Gradio error with the message. Anything else raised during a
    generation is an internal error."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def renamed(self, field: str, message: str | None = None) -> "InputError":
        """The same error under the name a caller's own request used for the field (OpenAI's `size`, `input`)."""
        return type(self)(field, message or self.message) if type(self) is InputError else self


class UnknownModelError(InputError):
    """A model id the registry does not hold (an HTTP 404)."""

    def __init__(self, model_id: str, known: Iterable[str] = ()):
        names = sorted(known)
        listed = f"; available: {', '.join(names)}" if names else ""
        super().__init__("model", f"unknown model {model_id!r}{listed}")
        self.model_id = model_id


def require(ok: bool, field: str, message: str) -> None:
    """Raise InputError(field, message) unless `ok`: the one-line check every `validate` is written with."""
    if not ok:
        raise InputError(field, message)


def check_text(field: str, value: Any, *, max_chars: int, required: bool = True) -> str:
    """Text a model can be given: a string of at most `max_chars` characters that encodes as UTF-8.

    A lone surrogate ("\\ud800", which JSON allows) would fail deep inside a tokenizer or the log writer, so it
    is refused here, naming the field."""
    require(isinstance(value, str), field, "must be text")
    require(not required or bool(value.strip()), field, "must not be empty")
    require(len(value) <= max_chars, field, f"has {len(value):,} characters; the limit is {max_chars:,}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(field, "contains characters that are not valid Unicode text (a lone surrogate)") from None
    return value


def check_seed(seed: Any, field: str = "seed") -> None:
    require(seed is None or (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < SEED_RANGE),
            field, f"must be empty (random) or a whole number from 0 to {SEED_RANGE - 1}")


def pick_seed(seed: int | None) -> int:
    """The seed a generation uses: the caller's, or a random one that the result reports back."""
    return secrets.randbelow(SEED_RANGE) if seed is None else seed


def check_range(field: str, value: Any, low: float, high: float | None, model: str | None = None,
                whole: bool = False) -> None:
    """A number within [low, high] (no upper bound when `high` is None), named with the model whose cap it is."""
    kind = (int,) if whole else (int, float)
    span = f"from {low:g} to {high:g}" if high is not None else f"at least {low:g}"
    where = f" for {model}" if model else ""
    require(isinstance(value, kind) and not isinstance(value, bool), field,
            f"must be a {'whole ' if whole else ''}number {span}{where}")
    require(low <= value and (high is None or value <= high), field, f"must be {span}{where}")


@dataclass(frozen=True)
class ModelOptions:
    """A model family's defaults and caps; each modality subclasses it with its own typed fields.

    A catalog entry's `options` override the defaults. An external model starts from all-None instead: its limits
    and defaults belong to its provider, so unset fields are not checked here and not sent there."""

    @classmethod
    def of(cls: type[O], spec: Any) -> O:
        """The options of a registry entry (a `ModelSpec`): its family's defaults over the modality's, and the
        entry's own `options` over both."""
        start = {f.name: None for f in fields(cls)} if spec.external else {}
        return cls(**{**start, **cls.family_defaults(spec), **spec.options})

    @classmethod
    def family_defaults(cls, spec: Any) -> Mapping[str, Any]:
        """The defaults and caps of the entry's `family` (a modality whose models come in families overrides
        this with a look-up of its `Family` values)."""
        return {}

    @classmethod
    def known(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """The entries of `options` this family has (another studio may publish more than this one knows)."""
        names = {f.name for f in fields(cls)}
        return {name: value for name, value in options.items() if name in names}

    @classmethod
    def problems(cls, options: Mapping[str, Any]) -> list[str]:
        """Option names this family does not know, for the start-up checks of catalog files."""
        known = {f.name for f in fields(cls)}
        return [f"{name}: not an option of {cls.__name__} (known: {', '.join(sorted(known))})"
                for name in options if name not in known]


@dataclass(frozen=True)
class Family:
    """A kind of model within a modality that loads the same way and shares defaults and caps: SD 1.5, SDXL or
    FLUX among image models, causal LMs with a chat template among chat models, VITS or Piper among voices.

    Loading is generic per family, so any model of a family works once the family does. A modality's backend
    says which family a local folder or file holds with its `detect(path) -> Family | None` (see
    `Modality.detect`), from the files themselves (a config's architecture, a checkpoint's keys)."""

    name: str  # "sd15", "sdxl", "causal-lm", "vits", ...
    label: str  # "Stable Diffusion 1.5", for people
    loader: str  # "module:function" with the loader signature (spec, path, device, dtype)
    options: Mapping[str, Any] = field(default_factory=dict)  # its defaults and caps, over the modality's own
    dtypes: Mapping[str, str] | None = None  # its dtype per device; None: float32 everywhere


class UnsupportedModel(ValueError):
    """Files a modality's `detect` recognises as its kind of model but cannot serve, with the reason (a causal
    LM without a chat template, a voice that needs a separate vocoder): the user hears why, not just "unknown"."""


def config_json(folder: Path, name: str = "config.json") -> dict | None:
    """A folder's JSON config (what most `detect`s read first); None when it is missing or not a JSON object."""
    try:
        data = json.loads((Path(folder) / name).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None
