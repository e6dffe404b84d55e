"""What a model entry is (`ModelSpec`: where its weights come from, how to load it, how big it is) and the
`Registry` of the entries a studio serves. Which models exist is the catalog's business (studio.catalog)."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from studio import modalities
from studio.contract import UnknownModelError

FP32 = {"cuda": "float32", "mps": "float32", "cpu": "float32"}
GPU_HALF = {"cuda": "float16", "mps": "float16", "cpu": "float32"}
GPU_BF16 = {"cuda": "bfloat16", "mps": "float16", "cpu": "bfloat16"}
ORIGINS = ("built-in", "catalog", "drop-in", "external")  # where an entry comes from (the model manager shows it)


@dataclass(frozen=True)
class Provider:
    """An external OpenAI-compatible server that serves some of the studio's models (see studio.providers)."""

    name: str
    base_url: str
    api_key_env: str | None = None  # None: the server needs no key (a local vLLM, Ollama, llama.cpp)
    timeout: float = 120.0  # seconds for one request (connect, and each read while streaming)
    max_retries: int = 1  # the openai package retries connection errors, 429 and 5xx with back-off
    # Also send the fields beyond OpenAI's (top_k, repetition_penalty, negative_prompt, steps, guidance_scale,
    # seed, adapters), and read the models' limits from its /v1/models. vLLM and another studio understand them.
    extensions: bool = False


@dataclass(frozen=True)
class Source:
    """A Hub repository that holds part of a model's files (AnimateDiff: the motion adapter beside SD 1.5)."""

    repo: str
    revision: str = "main"
    # Its files the model never reads, as Hub glob patterns ("safety_checker/": a folder; "*.fp16.*": variants).
    skip: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelSpec:
    """One model entry. `options` override its modality's defaults and caps (see `ModelOptions.of`).

    Its weights come from one of: a Hub repo (`repo`), a local folder in a Hub repo's layout or a single-file
    checkpoint (`path`), a tiny-profile build (`build`), a Python package (none of these: the loader knows), or an
    external provider."""

    id: str
    modality: str  # a registered modality's name (studio.modalities)
    label: str
    loader: modalities.Ref  # "module:function" taking (spec, path, device, dtype), returning the loaded model
    params: int  # parameter count, for the size estimate before the weights are on disk
    repo: str | None = None  # Hugging Face Hub repo id
    revision: str = "main"
    path: str | None = None  # a local folder in a Hub repo's layout, or a single file
    skip: tuple[str, ...] = ()  # files of `repo` the model never reads (Hub glob patterns; see Source.skip)
    # More repositories, each put in a subfolder of the model's folder: {"motion_adapter": Source(...)}
    parts: Mapping[str, Source] = field(default_factory=dict)
    build: str | None = None  # tiny profile: "module:function" that writes the model into a folder
    dtypes: Mapping[str, str] = field(default_factory=lambda: dict(FP32))
    stands_for: str | None = None  # tiny profile: the real model this one mimics
    provider: Provider | None = None  # served by this external provider instead of a local load
    remote: str | None = None  # the provider's name for the model
    # Its family within the modality (`studio.contract.Family`): the defaults and caps under `options`.
    family: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    family: str | None = None  # the `studio.contract.Family` its files were recognised as (user models)
    quantize: str | None = None  # one of studio.quantization.QUANTIZE_CHOICES
    origin: str = "built-in"  # one of ORIGINS

    def sources(self) -> dict[str, Source]:
        """Where the files come from: {subfolder ("" for the model's own folder): Source}; empty for a model built
        locally or bundled."""
        if not self.repo:
            return {}
        return {"": Source(self.repo, self.revision, self.skip), **self.parts}

    def dtype(self, device: str) -> str:
        return self.dtypes.get(device, "float32")

    @property
    def external(self) -> bool:
        return self.provider is not None

    @property
    def source(self) -> str:
        if self.provider:
            return f"{self.provider.name} ({self.provider.base_url})"
        if self.path:
            return self.path
        if self.repo:
            return " + ".join([f"{self.repo}@{self.revision}",
                               *(f"{p.repo}@{p.revision} in {sub}/" for sub, p in self.parts.items())])
        return "built locally (tiny profile)" if self.build else "bundled"


@dataclass(frozen=True)
class Alias:
    """Another profile's model id that names an entry of this one (the tiny profile's stand-ins answer to the
    default profile's ids, so the same request works offline)."""

    id: str
    model: str  # the id of the entry it names
    label: str


class Registry:
    """The models of the active profile, by id; external providers, the user catalog and the drop-in folders add
    theirs at start-up, the model manager while the studio runs (so readers iterate over a copy). An alias names an
    entry too, unless an entry has that id."""

    def __init__(self, name: str, specs: Iterable[ModelSpec], aliases: Iterable[Alias] = ()):
        self.name = name
        self._specs: dict[str, ModelSpec] = {}
        self._lock = threading.Lock()
        for spec in specs:
            self.add(spec)
        self.aliases = {alias.id: alias for alias in aliases}

    def add(self, spec: ModelSpec) -> None:
        if spec.modality not in modalities.names():
            raise ValueError(f"model {spec.id!r}: modality {spec.modality!r} is not one of "
                             f"{', '.join(modalities.names())}")
        with self._lock:
            if spec.id in self._specs:
                raise ValueError(f"model id {spec.id!r} is registered twice")
            self._specs[spec.id] = spec

    def replace(self, spec: ModelSpec) -> None:
        """Put an updated entry in place of the one with the same id (an external model's limits, read late)."""
        self.get(spec.id)
        with self._lock:
            self._specs[spec.id] = spec

    def remove(self, model_id: str) -> ModelSpec:
        """Take an entry out (the model manager's Remove, a drop-in file that went away)."""
        with self._lock:
            spec = self._specs.pop(model_id, None)
        if spec is None:
            raise UnknownModelError(str(model_id), list(self._specs))
        return spec

    def get(self, model_id: str) -> ModelSpec:
        """The entry with this id, or the one this alias names."""
        try:
            return self._specs[model_id]
        except (KeyError, TypeError):
            pass
        alias = self.aliases.get(model_id) if isinstance(model_id, str) else None
        if alias is not None and alias.model in self._specs:
            return self._specs[alias.model]
        raise UnknownModelError(str(model_id), self._specs)

    def of(self, modality: str) -> list[ModelSpec]:
        return [s for s in self if s.modality == modality]

    def __iter__(self):
        with self._lock:
            return iter(list(self._specs.values()))

    def __contains__(self, model_id: str) -> bool:
        alias = self.aliases.get(model_id)
        return model_id in self._specs or (alias is not None and alias.model in self._specs)


def tiny_root() -> Path:
    """Where the tiny profile writes its generated models: outside the repository, never committed."""
    return Path(os.environ.get("STUDIO_TINY_DIR") or Path.home() / ".cache" / "studio" / "tiny")
