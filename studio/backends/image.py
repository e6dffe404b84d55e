"""Images: text to image, image to image, inpainting and upscaling with LoRA adapters, or an external provider's
image model; one service behind the Image tab, `POST /generate/image`, `/v1/images/generations`,
`/v1/images/edits` and the Gradio client / MCP tool.

The pieces, one job each:
- this module: the typed request, options (a family's defaults and caps), plan and result; `validate`; the service;
  the external provider's model;
- `image_families`: which family a model is (SD 1.x, SDXL, SD3, FLUX, ...) and its defaults;
- `image_pipelines`: loading any family and drawing in every mode with shared components;
- `samplers`: A1111's sampler names as diffusers schedulers;
- `image_inputs`: uploaded images and masks, their caps, the feathered paste-back of inpainting;
- `image_png`: the settings stored in a PNG and read back (the studio's and AUTOMATIC1111's);
- `lora`: adapters on disk, their cards, and switching them.

Reproducibility is the rule: each image i of a request is drawn from its own CPU generator seeded `seed + i`,
so an image's settings (with its own seed and n=1) give that image again, in every mode, on any device. Stopping
sets the pipeline's interrupt flag from `callback_on_step_end`: the remaining steps are skipped and the partly
denoised image is returned.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping, Protocol

import openai
from PIL import Image

from studio import devices
from studio.backends.image_families import FAMILIES, MODES
from studio.backends.image_inputs import (MAX_MASK_BLUR, MIN_SIZE, SIZE_STEP, check_mask, fit, mask_of, open_image,
                                          rgb, scaled)
from studio.backends.lora import LoraInfo, check_base, chosen, library, parse_prompt
from studio.backends.remote import ProviderClient, ProviderError, calling, connect_client
from studio.contract import SEED_RANGE, ModelOptions, check_range, check_seed, check_text, pick_seed, require
from studio.registry import ModelSpec
from studio.runtime import Call, Studio

MAX_GUIDANCE = 30.0
MAX_PROMPT_CHARS = 4000
MAX_SCALE = 4.0
SECONDS_PER_STEP = 0.15  # Stable Diffusion 1.5 at 512x512 in half precision on a ZeroGPU slice, plus 1 s to decode


@dataclass(frozen=True)
class ImageOptions(ModelOptions):
    """An image model's defaults and caps: the modality's below, its family's over them (`image_families`),
    a catalog entry's over both."""

    steps: int | None = 25
    max_steps: int | None = 100
    guidance: float | None = 7.5
    width: int | None = 512
    height: int | None = 512
    max_size: int | None = 1024  # the largest width or height
    negative_prompt: bool | None = True  # False: the model ignores one (no guidance), so it is refused
    max_images: int | None = 4
    modes: tuple[str, ...] | None = ("txt2img",)  # what it does besides text to image needs diffusers' pipeline
    sampler: str | None = None  # the default sampler (A1111's name); None: the model's own scheduler
    samplers: tuple[str, ...] | None = ()  # the samplers it takes (studio.backends.samplers)
    lora: str | None = None  # the family its LoRA adapters are made for; None: it takes none
    strength: float | None = 0.75  # img2img and inpainting: how much of the input is redrawn (A1111's default)
    upscale_strength: float | None = 0.35  # the upscale's img2img pass: enough to add detail, not to change content

    @classmethod
    def family_defaults(cls, spec: Any) -> Mapping[str, Any]:
        return FAMILIES[spec.family].options if spec.family else {}


@dataclass(kw_only=True)
class ImageRequest:
    """Fields left as None take the model's defaults."""

    prompt: str
    negative_prompt: str = ""
    model: str | None = None  # None: the first image model
    mode: str = "txt2img"  # txt2img, img2img, inpaint or upscale
    image: bytes | Image.Image | None = None  # the input image of img2img, inpaint and upscale
    mask: bytes | Image.Image | None = None  # inpaint: white is repainted, black kept
    strength: float | None = None  # img2img, inpaint, upscale: 0 (keep the input) .. 1 (redraw it all)
    mask_blur: int | None = None  # inpaint: the feather of the mask's edge, in pixels
    scale: float | None = None  # upscale: the factor, above 1 and at most 4
    sampler: str | None = None
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None  # img2img and inpaint: None keeps the input's size (fitted to the model's cap)
    height: int | None = None
    seed: int | None = None  # None: a random seed, reported in the result
    n: int = 1
    adapters: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], **inputs: Any) -> "ImageRequest":
        """The request that makes an image again from its stored settings (`ImagePlan.settings`), given its
        `image` and `mask` for the editing modes; keys that are not request fields are left out."""
        names = {f.name for f in fields(cls)} - {"image", "mask"}
        return cls(**{k: v for k, v in settings.items() if k in names}, **inputs)


@dataclass(frozen=True, kw_only=True)
class ImagePlan:
    """A validated request: the model's defaults filled in (an external model's unset fields stay None and are not
    sent), `<lora:>` tags taken out of the prompt, the adapters found on disk, the input image fitted to the size
    the model works at and the mask to it."""

    model: str
    mode: str
    prompt: str
    negative_prompt: str
    sampler: str | None
    steps: int | None
    guidance: float | None
    width: int | None
    height: int | None
    strength: float | None
    mask_blur: int | None
    scale: float | None
    n: int
    seed: int | None
    adapters: dict[LoraInfo, float]
    image: Image.Image | None = field(default=None, compare=False)  # RGB, width x height (upscale: the input)
    mask: Image.Image | None = field(default=None, compare=False)  # "L", width x height

    def settings(self) -> dict:
        """Everything that made the images, as stored in each PNG and restored by "Use these settings" (the input
        image and mask are not: `mask` says whether there was one)."""
        skip = {"adapters", "image", "mask"}
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        return {**values, "mask": self.mask is not None,
                "adapters": {info.name: w for info, w in self.adapters.items()}}


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


def family_label(spec: ModelSpec) -> str:
    return FAMILIES[spec.family].label if spec.family else spec.label


# ---------------------------------------------------------------------------------------------- validation


def validate(studio: Studio, req: ImageRequest) -> ImagePlan:
    """Check the request against the model's caps and resolve defaults, inputs and adapters; raises InputError."""
    spec = studio.model(req.model, "image")
    opts = ImageOptions.of(spec)
    mode = _check_mode(spec, opts, req)
    check_text("prompt", req.prompt, max_chars=MAX_PROMPT_CHARS, required=mode != "upscale")
    prompt, tagged = parse_prompt(req.prompt)
    require(bool(prompt) or mode == "upscale", "prompt", "must not be empty (besides its <lora:> tags)")
    negative = check_text("negative_prompt", req.negative_prompt or "", max_chars=MAX_PROMPT_CHARS,
                          required=False).strip()
    require(not negative or opts.negative_prompt is not False, "negative_prompt",
            f"{spec.id} does not use a negative prompt; leave it empty")
    sampler = req.sampler if req.sampler is not None else opts.sampler
    if req.sampler is not None and opts.samplers is not None:
        require(req.sampler in opts.samplers, "sampler",
                f"unknown sampler {req.sampler!r} for {spec.id}; it takes "
                f"{', '.join(opts.samplers) if opts.samplers else 'only its own scheduler (leave it empty)'}")
    steps = opts.steps if req.steps is None else req.steps
    if steps is not None:
        check_range("steps", steps, 1, opts.max_steps, spec.id, whole=True)
    guidance = opts.guidance if req.guidance is None else req.guidance
    if guidance is not None:
        check_range("guidance", guidance, 0, MAX_GUIDANCE)
    image, mask = _inputs(mode, req)
    width, height, scale = _size(spec, opts, mode, req, image)
    strength, mask_blur = _edit_settings(opts, mode, req)
    check_range("n", req.n, 1, opts.max_images, spec.id, whole=True)
    check_seed(req.seed)
    adapters = chosen(studio.settings, req.adapters, tagged)
    for info in adapters if not spec.external else ():
        check_base(info, opts.lora, spec.id, family_label(spec))
    if image is not None and mode != "upscale":
        image = image.resize((width, height), Image.LANCZOS) if image.size != (width, height) else image
        mask = mask.resize((width, height), Image.NEAREST) if mask is not None and mask.size != image.size else mask
    return ImagePlan(model=spec.id, mode=mode, prompt=prompt, negative_prompt=negative, sampler=sampler, steps=steps,
                     guidance=None if guidance is None else float(guidance), width=width, height=height,
                     strength=strength, mask_blur=mask_blur, scale=scale, n=req.n, seed=req.seed, adapters=adapters,
                     image=image, mask=mask)


def _check_mode(spec: ModelSpec, opts: ImageOptions, req: ImageRequest) -> str:
    mode = req.mode
    require(mode in MODES, "mode", f"must be one of {', '.join(MODES)}")
    if spec.external:
        require(mode == "txt2img", "mode", f"{spec.id} is served by {spec.provider.name}: text to image only")
    else:
        require(opts.modes is None or mode in opts.modes, "mode",
                f"{spec.id} ({family_label(spec)}) has no {mode} pipeline; it does {', '.join(opts.modes or ())}")
    return mode


def _inputs(mode: str, req: ImageRequest) -> tuple[Image.Image | None, Image.Image | None]:
    """The input image (RGB) and mask ("L") the mode needs, decoded and checked; none for text to image."""
    if mode == "txt2img":
        require(req.image is None, "image", "text to image takes no input image; use mode img2img, inpaint or upscale")
        require(req.mask is None, "mask", "only inpaint takes a mask")
        return None, None
    require(req.image is not None, "image", f"{mode} needs an input image")
    image = rgb(open_image("image", req.image))
    if mode != "inpaint":
        require(req.mask is None, "mask", "only inpaint takes a mask; use mode inpaint")
        return image, None
    require(req.mask is not None, "mask", "inpaint needs a mask (white: repaint, black: keep)")
    mask = mask_of(open_image("mask", req.mask))
    check_mask(mask, image)
    return image, mask


def _size(spec: ModelSpec, opts: ImageOptions, mode: str, req: ImageRequest,
          image: Image.Image | None) -> tuple[int | None, int | None, float | None]:
    """(width, height, scale): the request's or the model's size for text to image, the input's (fitted to the
    model's cap) for img2img and inpaint, the input's times `scale` for upscale."""
    if mode == "upscale":
        require(req.width is None and req.height is None, "width",
                "upscale sets the size from the image and the scale; leave width and height empty")
        scale = 2.0 if req.scale is None else req.scale
        require(isinstance(scale, (int, float)) and not isinstance(scale, bool) and 1 < scale <= MAX_SCALE, "scale",
                f"must be above 1 and at most {MAX_SCALE:g}")
        width, height = scaled(*image.size, scale)
        require(max(width, height) <= (opts.max_size or max(width, height)), "scale",
                f"{image.width}x{image.height} upscaled {scale:g}x is {width}x{height}, larger than {spec.id}'s cap "
                f"of {opts.max_size} pixels a side; use a smaller image or scale")
        return width, height, float(scale)
    require(req.scale is None, "scale", "only upscale takes a scale")
    defaults = fit(*image.size, opts.max_size) if image is not None else (opts.width, opts.height)
    sizes = []
    for name, value, default in zip(("width", "height"), (req.width, req.height), defaults):
        size = default if value is None else value
        if size is not None:
            require(isinstance(size, int) and size % SIZE_STEP == 0 and MIN_SIZE <= size <= (opts.max_size or size),
                    name, f"must be a multiple of {SIZE_STEP} from {MIN_SIZE} to {opts.max_size or 'any size'} "
                          f"for {spec.id}")
        sizes.append(size)
    return sizes[0], sizes[1], None


def _edit_settings(opts: ImageOptions, mode: str, req: ImageRequest) -> tuple[float | None, int | None]:
    """(strength, mask blur) of the editing modes; text to image takes neither."""
    if mode == "txt2img":
        require(req.strength is None, "strength", "only img2img, inpaint and upscale take a strength")
    require(req.mask_blur is None or mode == "inpaint", "mask_blur", "only inpaint takes a mask blur")
    if mode == "txt2img":
        return None, None
    default = opts.upscale_strength if mode == "upscale" else opts.strength
    strength = default if req.strength is None else req.strength
    require(isinstance(strength, (int, float)) and not isinstance(strength, bool) and 0 < strength <= 1, "strength",
            "must be above 0 and at most 1 (1 redraws the whole input)")
    if mode != "inpaint":
        return float(strength), None
    blur = 4 if req.mask_blur is None else req.mask_blur
    check_range("mask_blur", blur, 0, MAX_MASK_BLUR, whole=True)
    return float(strength), blur


def gpu_seconds(req: ImageRequest) -> float:
    scale = (req.width or 512) * (req.height or 512) / (512 * 512)
    if req.mode == "upscale":
        scale *= (req.scale or 2) ** 2
    return req.n * ((req.steps or ImageOptions.steps) * SECONDS_PER_STEP + 1) * scale


# ---------------------------------------------------------------------------------------------- the service


def generate_images(studio: Studio, req: ImageRequest, call: Call) -> ImageResult:
    """Generate `req.n` images; when the call is stopped, end after the current step and return what exists."""
    plan = validate(studio, req)
    plan = replace(plan, seed=pick_seed(plan.seed))
    spec = studio.registry.get(plan.model)
    pixels = (plan.width or 0) * (plan.height or 0) * plan.n
    working = devices.working_memory(studio.device, pixels, spec.dtype(studio.device)) if not spec.external else 0
    with studio.generation(spec, call) as (lease, rec), studio.cache.working_memory(spec.id, working):
        rec.set(prompt=plan.prompt, seed=plan.seed, steps=plan.steps, adapters=plan.settings()["adapters"])
        model: ImageBackend = lease.model
        images = model.draw(plan, call, rec.first_output, lambda nbytes: studio.cache.grow(spec.id, nbytes))
        stopped = len(images) < plan.n or call.stopped
        rec.set(images=len(images), output_pixels=sum(im.width * im.height for im in images), stopped=stopped)
    return ImageResult(images, plan.seed, plan.settings(), stopped)


# ---------------------------------------------------------------------------------------------- external models


def connect(spec: ModelSpec, path: Any, device: str, dtype: str) -> ProviderImage:
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
                      "guidance_scale": plan.guidance, "seed": seed, "sampler": plan.sampler,
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
