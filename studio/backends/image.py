"""Text to image: Stable Diffusion with LoRA adapters, or an external provider's image model; one service behind
the Image tab, `POST /generate/image`, `/v1/images/generations` and the Gradio client / MCP tool.

Reproducibility is the rule: each image i of a request is drawn from its own CPU generator seeded `seed + i`,
so an image's settings (with its own seed and n=1) give that image again, on any device. Stopping sets the
pipeline's interrupt flag from `callback_on_step_end`: the remaining steps are skipped and the partly denoised
image is returned.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

import openai
import torch
from PIL import Image

from studio.backends.lora import LoraInfo, PipelineLoras, chosen, library, parse_prompt
from studio.backends.remote import ProviderClient, ProviderError, calling, connect_client
from studio.contract import SEED_RANGE, ModelOptions, check_range, check_seed, check_text, pick_seed, require
from studio.registry import ModelSpec
from studio.runtime import Call, Studio

MIN_SIZE = 64
SIZE_STEP = 8  # the VAE scales by 8
MAX_GUIDANCE = 30.0
MAX_PROMPT_CHARS = 4000
SECONDS_PER_STEP = 0.15  # Stable Diffusion 1.5 at 512x512 in half precision on a ZeroGPU slice, plus 1 s to decode


@dataclass(frozen=True)
class ImageOptions(ModelOptions):
    """An image model's defaults and caps (a catalog entry overrides them)."""

    steps: int | None = 25
    max_steps: int | None = 100
    guidance: float | None = 7.5
    width: int | None = 512
    height: int | None = 512
    max_size: int | None = 1024  # the largest width or height
    negative_prompt: bool | None = True  # False: the model ignores one (no guidance), so it is refused
    max_images: int | None = 4


@dataclass(kw_only=True)
class ImageRequest:
    """Fields left as None take the model's defaults."""

    prompt: str
    negative_prompt: str = ""
    model: str | None = None  # None: the first image model
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None  # None: a random seed, reported in the result
    n: int = 1
    adapters: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class ImagePlan:
    """A validated request: the model's defaults filled in (an external model's unset fields stay None and are not
    sent), `<lora:>` tags taken out of the prompt, the adapters found on disk."""

    model: str
    prompt: str
    negative_prompt: str
    steps: int | None
    guidance: float | None
    width: int | None
    height: int | None
    n: int
    seed: int | None
    adapters: dict[LoraInfo, float]

    def settings(self) -> dict:
        """Everything that made the images, as stored in each PNG and restored by "Use these settings"."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "adapters"}
        return {**values, "adapters": {info.name: w for info, w in self.adapters.items()}}


@dataclass
class ImageResult:
    images: list  # PIL images
    seed: int  # the first image's seed; image i used (seed + i) % 2**32
    settings: dict  # ImagePlan.settings()
    stopped: bool = False

    def image_settings(self, index: int) -> dict:
        """The settings that make image `index` again on its own."""
        return {**self.settings, "seed": image_seed(self.seed, index), "n": 1}


class ImageBackend(Protocol):
    """What the cache holds for an image model, local or external: it draws the plan's images."""

    def draw(self, plan: ImagePlan, call: Call, on_output: Callable[[], None],
             grow: Callable[[int], None]) -> list: ...


def image_seed(seed: int, index: int) -> int:
    return (seed + index) % SEED_RANGE


def list_loras(studio: Studio, refresh: bool = False) -> list[LoraInfo]:
    """The adapters found by the last scan (`refresh` scans the folders again), unusable ones with their error."""
    return list(library(studio.settings, refresh).values())


# ---------------------------------------------------------------------------------------------- validation


def validate(studio: Studio, req: ImageRequest) -> ImagePlan:
    """Check the request against the model's caps and resolve defaults and adapters; raises InputError."""
    spec = studio.model(req.model, "image")
    opts = ImageOptions.of(spec)
    check_text("prompt", req.prompt, max_chars=MAX_PROMPT_CHARS)
    prompt, tagged = parse_prompt(req.prompt)
    require(bool(prompt), "prompt", "must not be empty (besides its <lora:> tags)")
    negative = check_text("negative_prompt", req.negative_prompt or "", max_chars=MAX_PROMPT_CHARS,
                          required=False).strip()
    require(not negative or opts.negative_prompt is not False, "negative_prompt",
            f"{spec.id} does not use a negative prompt; leave it empty")
    steps = opts.steps if req.steps is None else req.steps
    if steps is not None:
        check_range("steps", steps, 1, opts.max_steps, spec.id, whole=True)
    guidance = opts.guidance if req.guidance is None else req.guidance
    if guidance is not None:
        check_range("guidance", guidance, 0, MAX_GUIDANCE)
    sizes = {}
    for name, value in (("width", req.width), ("height", req.height)):
        size = getattr(opts, name) if value is None else value
        if size is not None:
            require(isinstance(size, int) and size % SIZE_STEP == 0 and MIN_SIZE <= size <= (opts.max_size or size),
                    name, f"must be a multiple of {SIZE_STEP} from {MIN_SIZE} to {opts.max_size or 'any size'} "
                          f"for {spec.id}")
        sizes[name] = size
    check_range("n", req.n, 1, opts.max_images, spec.id, whole=True)
    check_seed(req.seed)
    adapters = chosen(studio.settings, req.adapters, tagged)
    return ImagePlan(model=spec.id, prompt=prompt, negative_prompt=negative, steps=steps,
                     guidance=None if guidance is None else float(guidance), width=sizes["width"],
                     height=sizes["height"], n=req.n, seed=req.seed, adapters=adapters)


def gpu_seconds(req: ImageRequest) -> float:
    scale = (req.width or 512) * (req.height or 512) / (512 * 512)
    return req.n * ((req.steps or ImageOptions.steps) * SECONDS_PER_STEP + 1) * scale


# ---------------------------------------------------------------------------------------------- the service


def generate_images(studio: Studio, req: ImageRequest, call: Call) -> ImageResult:
    """Generate `req.n` images; when the call is stopped, end after the current step and return what exists."""
    plan = validate(studio, req)
    plan = replace(plan, seed=pick_seed(plan.seed))
    spec = studio.registry.get(plan.model)
    with studio.generation(spec, call) as (lease, rec):
        rec.set(prompt=plan.prompt, seed=plan.seed, steps=plan.steps, adapters=plan.settings()["adapters"])
        model: ImageBackend = lease.model
        images = model.draw(plan, call, rec.first_output, lambda nbytes: studio.cache.grow(spec.id, nbytes))
        stopped = len(images) < plan.n or call.stopped
        rec.set(images=len(images), output_pixels=sum(im.width * im.height for im in images), stopped=stopped)
    return ImageResult(images, plan.seed, plan.settings(), stopped)


def png_bytes(image: Any, settings: dict | None = None) -> bytes:
    """PNG-encode an image, with its settings as a "parameters" text chunk (where A1111 keeps them)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if settings is not None:
        info.add_text("parameters", json.dumps(settings, sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- local models


def load_stable_diffusion(spec: ModelSpec, path: Path, device: str, dtype: str) -> DiffusersImage:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, dtype=getattr(torch, dtype)).to(device)
    pipe.set_progress_bar_config(disable=True)  # progress goes to the caller's callback instead
    return DiffusersImage(pipe)


@dataclass(eq=False)
class DiffusersImage:
    """A diffusers pipeline. The lock lets one generation at a time use it: its scheduler and its active adapters
    are state of the pipeline, not of the request."""

    pipe: Any
    loras: PipelineLoras = field(default_factory=PipelineLoras)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def draw(self, plan: ImagePlan, call: Call, on_output: Callable[[], None],
             grow: Callable[[int], None]) -> list:
        images = []
        with self.lock:
            self.loras.activate(self.pipe, plan.model, plan.adapters, grow)
            for index in range(plan.n):
                if call.stopped:
                    break
                images.append(self._one(plan, index, call, on_output))
        return images

    def _one(self, plan: ImagePlan, index: int, call: Call, on_output: Callable[[], None]):
        def on_step_end(pipeline: Any, step: int, _timestep: Any, tensors: dict) -> dict:
            on_output()
            done = (index * plan.steps + step + 1) / (plan.n * plan.steps)
            call.report(done, f"image {index + 1}/{plan.n} · step {step + 1}/{plan.steps}")
            if call.stopped:
                pipeline._interrupt = True  # diffusers skips the remaining steps and decodes what it has
            return tensors

        return self.pipe(prompt=plan.prompt, negative_prompt=plan.negative_prompt or None,
                         num_inference_steps=plan.steps, guidance_scale=plan.guidance, width=plan.width,
                         height=plan.height, generator=torch.Generator("cpu").manual_seed(image_seed(plan.seed, index)),
                         callback_on_step_end=on_step_end).images[0]


# ---------------------------------------------------------------------------------------------- external models


def connect(spec: ModelSpec, path: Path | None, device: str, dtype: str) -> ProviderImage:
    """The cache's loader for an external image model: a client, no weights."""
    return ProviderImage(*connect_client(spec))


@dataclass
class ProviderImage(ProviderClient):
    """A provider's image model: one call per image, with seed + i as locally, so Stop works between images.
    Only the fields the request set (or its catalog entry) are sent; the rest is the provider's default."""

    def draw(self, plan: ImagePlan, call: Call, on_output: Callable[[], None],
             grow: Callable[[int], None]) -> list:
        images = []
        for index in range(plan.n):
            if call.stopped:
                break
            call.report(index / plan.n, f"image {index + 1}/{plan.n} · {self.provider.name}")
            images.append(self._one(plan, image_seed(plan.seed, index)))
            on_output()
        return images

    def _one(self, plan: ImagePlan, seed: int) -> Image.Image:
        extra = None
        if self.provider.extensions:
            wanted = {"negative_prompt": plan.negative_prompt or None, "steps": plan.steps,
                      "guidance_scale": plan.guidance, "seed": seed,
                      "adapters": {info.name: w for info, w in plan.adapters.items()} or None}
            extra = {k: v for k, v in wanted.items() if v is not None}
        size = f"{plan.width}x{plan.height}" if plan.width and plan.height else openai.omit
        with calling(self):
            answer = self.client.images.generate(model=self.model, prompt=plan.prompt, n=1, size=size,
                                                 response_format="b64_json", extra_body=extra)
        encoded = answer.data[0].b64_json if answer.data else None
        if not encoded:
            raise ProviderError(f"provider {self.provider.name} answered without a b64_json image")
        return Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB")
