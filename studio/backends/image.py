"""Stable Diffusion text-to-image with LoRA adapters: the one code path behind the Image tab, the REST route
and the Gradio client / MCP endpoint.

Reproducibility is the rule: each image i of a request is drawn from its own CPU generator seeded `seed + i`,
so an image's settings (with its own seed and n=1) give that image again, on any device. Stopping sets the
pipeline's interrupt flag from `callback_on_step_end`: the remaining steps are skipped and the partly denoised
image is returned.
"""

from __future__ import annotations

import io
import json
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from studio import providers
from studio.backends.lora import MAX_WEIGHT, LoraInfo, PipelineLoras, find, library, parse_prompt
from studio.registry import ModelSpec
from studio.runtime import Studio

MIN_SIZE = 64
MAX_GUIDANCE = 30.0
MAX_PROMPT_CHARS = 4000
SEED_RANGE = 2**32  # seeds are 0 .. 2**32 - 1, as in AUTOMATIC1111


@dataclass(eq=False)
class ImageModel:
    """What the cache holds for an image model. The lock lets one generation at a time use the pipeline: its
    scheduler and its active adapters are state of the pipeline, not of the request."""

    pipe: Any
    loras: PipelineLoras = field(default_factory=PipelineLoras)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def load_stable_diffusion(spec: ModelSpec, path: Path, device: str, dtype: str) -> ImageModel:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, dtype=getattr(torch, dtype)).to(device)
    pipe.set_progress_bar_config(disable=True)  # progress goes to the caller's callback instead
    return ImageModel(pipe)


@dataclass(kw_only=True)
class ImageRequest:
    """Unset steps, guidance, width and height take the model's defaults (registry options)."""

    prompt: str
    negative_prompt: str = ""
    model: str
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None  # None: a random seed, reported in the result
    n: int = 1
    adapters: dict[str, float] = field(default_factory=dict)


@dataclass
class ImageResult:
    images: list  # PIL images
    seed: int  # the first image's seed; image i used (seed + i) % 2**32
    settings: dict  # everything that made the images: prompt (without <lora:> tags), adapters, steps, ...
    stopped: bool = False

    def image_settings(self, index: int) -> dict:
        """The settings that make image `index` again on its own."""
        return {**self.settings, "seed": image_seed(self.seed, index), "n": 1}


@dataclass(frozen=True)
class _Plan:
    spec: ModelSpec
    prompt: str
    negative_prompt: str
    steps: int
    guidance: float
    width: int
    height: int
    n: int
    adapters: dict[LoraInfo, float]

    def settings(self, seed: int) -> dict:
        return {"model": self.spec.id, "prompt": self.prompt, "negative_prompt": self.negative_prompt,
                "steps": self.steps, "guidance": self.guidance, "width": self.width, "height": self.height,
                "seed": seed, "n": self.n, "adapters": {info.name: w for info, w in self.adapters.items()}}


def image_seed(seed: int, index: int) -> int:
    return (seed + index) % SEED_RANGE


def list_loras(studio: Studio, refresh: bool = False) -> list[LoraInfo]:
    """The adapters found by the last scan (`refresh` scans the folders again), unusable ones with their error."""
    return list(library(studio.settings, refresh).values())


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _plan(studio: Studio, req: ImageRequest) -> _Plan:
    """Validate the request against the model's caps and resolve defaults and adapters."""
    spec = studio.registry.get(req.model)  # UnknownModelError: 404 over HTTP
    _check(spec.modality == "image", f"model: {req.model!r} is a {spec.modality} model, not an image model")
    opts = spec.options
    _check(isinstance(req.prompt, str) and len(req.prompt) <= MAX_PROMPT_CHARS,
           f"prompt: must be text of at most {MAX_PROMPT_CHARS} characters")
    prompt, tagged = parse_prompt(req.prompt)
    _check(bool(prompt), "prompt: must not be empty")
    negative = (req.negative_prompt or "").strip()
    _check(len(negative) <= MAX_PROMPT_CHARS, f"negative_prompt: at most {MAX_PROMPT_CHARS} characters")
    _check(not negative or opts.get("negative_prompt", True),
           f"negative_prompt: {spec.id} does not use a negative prompt; leave it empty")
    steps = opts.get("steps", 20) if req.steps is None else req.steps
    max_steps = opts.get("max_steps", 100)
    _check(isinstance(steps, int) and 1 <= steps <= max_steps, f"steps: must be 1 to {max_steps} for {spec.id}")
    guidance = float(opts.get("guidance", 7.5) if req.guidance is None else req.guidance)
    _check(0 <= guidance <= MAX_GUIDANCE, f"guidance: must be 0 to {MAX_GUIDANCE:g}")
    max_size = opts.get("max_size", 1024)
    sizes = {}
    for name, value in (("width", req.width), ("height", req.height)):
        size = opts.get(name, 512) if value is None else value
        _check(isinstance(size, int) and size % 8 == 0, f"{name}: must be a multiple of 8")
        _check(MIN_SIZE <= size <= max_size, f"{name}: must be {MIN_SIZE} to {max_size} for {spec.id}")
        sizes[name] = size
    max_images = opts.get("max_images", 4)
    _check(isinstance(req.n, int) and 1 <= req.n <= max_images, f"n: must be 1 to {max_images}")
    _check(req.seed is None or (isinstance(req.seed, int) and 0 <= req.seed < SEED_RANGE),
           f"seed: must be empty (random) or 0 to {SEED_RANGE - 1}")
    adapters: dict[LoraInfo, float] = {}
    for name, weight in {**req.adapters, **tagged}.items():  # a <lora:> tag in the prompt wins over the field
        _check(isinstance(weight, (int, float)) and -MAX_WEIGHT <= weight <= MAX_WEIGHT,
               f"adapters: weight of {name!r} must be -{MAX_WEIGHT:g} to {MAX_WEIGHT:g}")
        adapters[find(studio.settings, name)] = float(weight)
    return _Plan(spec, prompt, negative, steps, guidance, sizes["width"], sizes["height"], req.n, adapters)


def validate_image(studio: Studio, req: ImageRequest) -> None:
    """Raise ValueError("field: message") for a bad request (UnknownModelError for an unknown model)."""
    _plan(studio, req)


def generate_images(studio: Studio, req: ImageRequest, *, client: str, endpoint: str, session: str | None = None,
                    cancel: threading.Event | None = None,
                    progress: Callable[[float, str], None] | None = None) -> ImageResult:
    """Generate `req.n` images; when `cancel` is set, stop after the current step and return what exists."""
    plan = _plan(studio, req)
    seed = secrets.randbelow(SEED_RANGE) if req.seed is None else req.seed
    settings = plan.settings(seed)
    if plan.spec.external:  # drawn by an OpenAI-compatible provider
        return providers.generate_images(studio, settings, client=client, endpoint=endpoint, session=session,
                                         cancel=cancel, progress=progress)
    images: list = []
    with studio.generation(modality="image", model=plan.spec.id, client=client, endpoint=endpoint,
                           session=session) as (lease, rec):
        rec.set(prompt=plan.prompt, seed=seed, steps=plan.steps, adapters=settings["adapters"])
        model: ImageModel = lease.model
        with model.lock:
            model.loras.activate(model.pipe, plan.spec.id, plan.adapters,
                                 lambda nbytes: studio.cache.grow(plan.spec.id, nbytes))
            for index in range(plan.n):
                if cancel is not None and cancel.is_set():
                    break
                images.append(_one_image(model.pipe, plan, image_seed(seed, index), index, rec, cancel, progress))
        stopped = cancel is not None and cancel.is_set()
        rec.set(output_pixels=plan.width * plan.height * len(images), stopped=stopped)
    return ImageResult(images, seed, settings, stopped)


def _one_image(pipe: Any, plan: _Plan, seed: int, index: int, rec: Any, cancel: threading.Event | None,
               progress: Callable[[float, str], None] | None):
    def on_step_end(pipeline: Any, step: int, _timestep: Any, tensors: dict) -> dict:
        rec.first_output()
        if progress is not None:
            done = (index * plan.steps + step + 1) / (plan.n * plan.steps)
            progress(done, f"image {index + 1}/{plan.n} · step {step + 1}/{plan.steps}")
        if cancel is not None and cancel.is_set():
            pipeline._interrupt = True  # diffusers skips the remaining steps and decodes what it has
        return tensors

    return pipe(prompt=plan.prompt, negative_prompt=plan.negative_prompt or None, num_inference_steps=plan.steps,
                guidance_scale=plan.guidance, width=plan.width, height=plan.height,
                generator=torch.Generator("cpu").manual_seed(seed), callback_on_step_end=on_step_end).images[0]


def png_bytes(image: Any, settings: dict | None = None) -> bytes:
    """PNG-encode an image, with its settings as a "parameters" text chunk (where A1111 keeps them)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if settings is not None:
        info.add_text("parameters", json.dumps(settings, sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def default_model(studio: Studio) -> str:
    """The first image model of the profile: the registry lists SD-Turbo (fast, few steps) first."""
    models = studio.models("image")
    if not models:
        raise ValueError("model: this profile has no image model")
    return models[0]

