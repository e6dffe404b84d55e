"""What a model entry is (`ModelSpec`: where its weights come from, how to load it, how big it is) and the
`Registry` of the entries a studio serves. Which models exist is the catalog's business (studio.catalog)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from studio import modalities
from studio.contract import UnknownModelError

FP32 = {"cuda": "float32", "mps": "float32", "cpu": "float32"}


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
class ModelSpec:
    """One model entry. `options` override its modality's defaults and caps (see `ModelOptions.of`)."""

    id: str
    modality: str  # a registered modality's name (studio.modalities)
    label: str
    loader: modalities.Ref  # "module:function" taking (spec, path, device, dtype), returning the loaded model
    params: int  # parameter count, for the size estimate before the weights are on disk
    repo: str | None = None  # Hugging Face Hub repo id
    revision: str = "main"
    build: str | None = None  # tiny profile: "module:function" that writes the model into a folder
    dtypes: Mapping[str, str] = field(default_factory=lambda: dict(FP32))
    stands_for: str | None = None  # tiny profile: the real model this one mimics
    provider: Provider | None = None  # served by this external provider instead of a local load
    remote: str | None = None  # the provider's name for the model
    # Its family within the modality (`studio.contract.Family`): the defaults and caps under `options`.
    family: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def dtype(self, device: str) -> str:
        return self.dtypes.get(device, "float32")

    @property
    def external(self) -> bool:
        return self.provider is not None

    @property
    def source(self) -> str:
        if self.provider:
            return f"{self.provider.name} ({self.provider.base_url})"
        if self.repo:
            return f"{self.repo}@{self.revision}"
        return "built locally (tiny profile)" if self.build else "bundled"


class Registry:
    """The models of the active profile, by id; external providers add theirs at start-up."""

    def __init__(self, name: str, specs: Iterable[ModelSpec]):
        self.name = name
        self._specs: dict[str, ModelSpec] = {}
        for spec in specs:
            self.add(spec)

    def add(self, spec: ModelSpec) -> None:
        if spec.id in self._specs:
            raise ValueError(f"model id {spec.id!r} is registered twice")
        if spec.modality not in modalities.names():
            raise ValueError(f"model {spec.id!r}: modality {spec.modality!r} is not one of "
                             f"{', '.join(modalities.names())}")
        self._specs[spec.id] = spec

    def replace(self, spec: ModelSpec) -> None:
        """Put an updated entry in place of the one with the same id (an external model's limits, read late)."""
        self.get(spec.id)
        self._specs[spec.id] = spec

    def get(self, model_id: str) -> ModelSpec:
        try:
            return self._specs[model_id]
        except (KeyError, TypeError):
            raise UnknownModelError(str(model_id), self._specs) from None

    def of(self, modality: str) -> list[ModelSpec]:
        return [s for s in self._specs.values() if s.modality == modality]

    def __iter__(self):
        return iter(self._specs.values())

    def __contains__(self, model_id: str) -> bool:
        return model_id in self._specs


def tiny_root() -> Path:
    """Where the tiny profile writes its generated models: outside the repository, never committed."""
    return Path(os.environ.get("STUDIO_TINY_DIR") or Path.home() / ".cache" / "studio" / "tiny")
