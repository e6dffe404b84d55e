"""The models the studio knows: where their weights come from, how to load them, and how big they are.

Two profiles describe the same kinds of model. `default` names real checkpoints on the Hugging Face Hub;
`tiny` builds the same architectures with tiny configs and random weights on first use (no download), so the
studio starts and is tested offline. Both load through the same `from_pretrained` code in `studio.backends`.
"""

from __future__ import annotations

import importlib
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping
from urllib.parse import urlparse

Modality = Literal["chat", "speech", "image", "3d"]
MODALITIES: tuple[Modality, ...] = ("chat", "speech", "image", "3d")

GPU_HALF = {"cuda": "float16", "mps": "float16", "cpu": "float32"}
GPU_BF16 = {"cuda": "bfloat16", "mps": "float16", "cpu": "bfloat16"}
FP32 = {"cuda": "float32", "mps": "float32", "cpu": "float32"}


class UnknownModelError(KeyError):
    def __init__(self, model_id: str, known: Iterable[str]):
        super().__init__(model_id)
        self.model_id = model_id
        self.message = f"unknown model {model_id!r}; available: {', '.join(sorted(known))}"

    def __str__(self) -> str:
        return self.message


def resolve(ref: str) -> Callable[..., Any]:
    """Import 'package.module:function' lazily, so the registry stays cheap to import."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class ModelSpec:
    """One model entry. `options` holds the modality's own defaults and caps (steps, sizes, voices...)."""

    id: str
    modality: Modality
    label: str
    loader: str  # "module:function" taking (spec, path, device, dtype) and returning the loaded model
    params: int  # parameter count, for the size estimate before the weights are on disk
    repo: str | None = None  # Hugging Face Hub repo id
    revision: str = "main"
    build: str | None = None  # tiny profile: "module:function" that writes the model into a folder
    dtypes: Mapping[str, str] = field(default_factory=lambda: dict(FP32))
    stands_for: str | None = None  # tiny profile: the real model this one mimics
    external: bool = False  # served by an external OpenAI-compatible provider
    options: Mapping[str, Any] = field(default_factory=dict)

    def dtype(self, device: str) -> str:
        return self.dtypes.get(device, "float32")

    @property
    def source(self) -> str:
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
        self._specs[spec.id] = spec

    def get(self, model_id: str) -> ModelSpec:
        try:
            return self._specs[model_id]
        except KeyError:
            raise UnknownModelError(model_id, self._specs) from None

    def of(self, modality: Modality) -> list[ModelSpec]:
        return [s for s in self._specs.values() if s.modality == modality]

    def __iter__(self):
        return iter(self._specs.values())

    def __contains__(self, model_id: str) -> bool:
        return model_id in self._specs


PIPER = ModelSpec(
    id="piper-joe", modality="speech", label="Piper · Joe (US English, offline)",
    loader="studio.backends.speech:load_piper", params=16_000_000,
    options={"voices": ["joe"], "max_piece_chars": 400},
)

DEFAULT_MODELS = (
    ModelSpec(id="tinyllama-1.1b-chat", modality="chat", label="TinyLlama 1.1B Chat",
              repo="TinyLlama/TinyLlama-1.1B-Chat-v1.0", loader="studio.backends.chat:load_causal_lm",
              params=1_100_048_384, dtypes=GPU_BF16,
              options={"context_length": 2048, "max_new_tokens": 1024, "default_max_new_tokens": 256,
                       "temperature": 0.7, "top_p": 0.95, "top_k": 50, "repetition_penalty": 1.1}),
    ModelSpec(id="qwen2.5-0.5b-instruct", modality="chat", label="Qwen2.5 0.5B Instruct",
              repo="Qwen/Qwen2.5-0.5B-Instruct", loader="studio.backends.chat:load_causal_lm",
              params=494_032_768, dtypes=GPU_BF16,
              options={"context_length": 32768, "max_new_tokens": 2048, "default_max_new_tokens": 512,
                       "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}),
    ModelSpec(id="bark-small", modality="speech", label="Bark small (Suno)", repo="suno/bark-small",
              loader="studio.backends.speech:load_bark", params=450_000_000, dtypes=GPU_HALF,
              options={"voices": [f"v2/{lang}_speaker_{i}" for lang in ("en", "de", "es", "fr", "hi", "it", "ja", "ko",
                                                                         "pl", "pt", "ru", "tr", "zh") for i in range(10)],
                       "default_voice": "v2/en_speaker_6", "max_piece_chars": 200, "cues": True}),
    ModelSpec(id="mms-tts-eng", modality="speech", label="MMS-TTS English (VITS)", repo="facebook/mms-tts-eng",
              loader="studio.backends.speech:load_vits", params=36_300_000,
              options={"voices": [], "max_piece_chars": 400}),
    PIPER,
    ModelSpec(id="sd-turbo", modality="image", label="SD-Turbo", repo="stabilityai/sd-turbo",
              loader="studio.backends.image:load_stable_diffusion", params=1_300_000_000, dtypes=GPU_HALF,
              options={"steps": 1, "max_steps": 4, "guidance": 0.0, "width": 512, "height": 512, "max_size": 768,
                       "negative_prompt": False, "max_images": 4}),
    ModelSpec(id="sd-1.5", modality="image", label="Stable Diffusion 1.5",
              repo="stable-diffusion-v1-5/stable-diffusion-v1-5",
              loader="studio.backends.image:load_stable_diffusion", params=1_066_000_000, dtypes=GPU_HALF,
              options={"steps": 25, "max_steps": 100, "guidance": 7.5, "width": 512, "height": 512,
                       "max_size": 1024, "negative_prompt": True, "max_images": 4}),
    ModelSpec(id="shap-e", modality="3d", label="Shap-E (OpenAI)", repo="openai/shap-e",
              loader="studio.backends.shape:load_shap_e", params=640_000_000, dtypes=GPU_HALF,
              options={"steps": 64, "max_steps": 128, "guidance": 15.0, "frame_size": 64, "max_frame_size": 256,
                       "grid_size": 128, "render_samples": (64, 128)}),
)

TINY_MODELS = (
    ModelSpec(id="tiny-llama", modality="chat", label="Tiny Llama (random weights)",
              build="studio.tiny.text:build_llama", loader="studio.backends.chat:load_causal_lm", params=200_000,
              stands_for="TinyLlama/TinyLlama-1.1B-Chat-v1.0",
              options={"context_length": 256, "max_new_tokens": 128, "default_max_new_tokens": 64, "temperature": 0.7,
                       "top_p": 0.95, "top_k": 50, "repetition_penalty": 1.1}),
    ModelSpec(id="tiny-qwen2", modality="chat", label="Tiny Qwen2 (random weights)",
              build="studio.tiny.text:build_qwen2", loader="studio.backends.chat:load_causal_lm", params=200_000,
              stands_for="Qwen/Qwen2.5-0.5B-Instruct",
              options={"context_length": 256, "max_new_tokens": 128, "default_max_new_tokens": 64, "temperature": 0.7,
                       "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}),
    ModelSpec(id="tiny-bark", modality="speech", label="Tiny Bark (random weights)",
              build="studio.tiny.speech:build_bark", loader="studio.backends.speech:load_bark", params=45_000_000,
              stands_for="suno/bark-small",
              options={"voices": [], "default_voice": None, "max_piece_chars": 200, "cues": True,
                       "semantic_max_new_tokens": 16}),
    ModelSpec(id="tiny-vits", modality="speech", label="Tiny VITS / MMS-TTS (random weights)",
              build="studio.tiny.speech:build_vits", loader="studio.backends.speech:load_vits", params=500_000,
              stands_for="facebook/mms-tts-eng", options={"voices": [], "max_piece_chars": 400}),
    PIPER,
    ModelSpec(id="tiny-sd-turbo", modality="image", label="Tiny SD-Turbo (random weights)",
              build="studio.tiny.image:build_stable_diffusion", loader="studio.backends.image:load_stable_diffusion",
              params=2_000_000, stands_for="stabilityai/sd-turbo",
              options={"steps": 1, "max_steps": 4, "guidance": 0.0, "width": 64, "height": 64, "max_size": 128,
                       "negative_prompt": False, "max_images": 4}),
    ModelSpec(id="tiny-sd", modality="image", label="Tiny Stable Diffusion 1.5 (random weights)",
              build="studio.tiny.image:build_stable_diffusion", loader="studio.backends.image:load_stable_diffusion",
              params=2_000_000, stands_for="stable-diffusion-v1-5/stable-diffusion-v1-5",
              options={"steps": 4, "max_steps": 50, "guidance": 7.5, "width": 64, "height": 64, "max_size": 128,
                       "negative_prompt": True, "max_images": 4}),
    ModelSpec(id="tiny-shap-e", modality="3d", label="Tiny Shap-E (random weights)",
              build="studio.tiny.shape:build_shap_e", loader="studio.backends.shape:load_shap_e", params=3_000_000,
              stands_for="openai/shap-e",
              options={"steps": 4, "max_steps": 64, "guidance": 15.0, "frame_size": 32, "max_frame_size": 64,
                       "grid_size": 32, "render_samples": (8, 16)}),
)


def hub_reachable(timeout: float = 2.0) -> bool:
    """One TCP connect to the Hub, made only when a real model would have to be downloaded."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@dataclass(frozen=True)
class ProfileChoice:
    registry: Registry
    notice: str | None  # shown in the terminal and as a UI banner when the studio fell back


def select_profile(requested: str) -> ProfileChoice:
    """`auto` uses the real models unless the machine is offline with none of them cached."""
    from studio.weights import is_cached

    if requested == "tiny":
        return ProfileChoice(Registry("tiny", TINY_MODELS), None)
    if requested == "default" or any(is_cached(s) for s in DEFAULT_MODELS if s.repo) or hub_reachable():
        return ProfileChoice(Registry("default", DEFAULT_MODELS), None)
    real = ", ".join(s.repo for s in DEFAULT_MODELS if s.repo)
    notice = (
        "No network and no cached models: running the tiny profile (small random-weight models, "
        f"plus the Piper voice). With a connection the studio uses: {real}."
    )
    return ProfileChoice(Registry("tiny", TINY_MODELS), notice)


def tiny_root() -> Path:
    """Where the tiny profile writes its generated models: outside the repository, never committed."""
    return Path(os.environ.get("STUDIO_TINY_DIR") or Path.home() / ".cache" / "studio" / "tiny")
