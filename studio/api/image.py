"""Images over HTTP: `POST /generate/image` (every mode; PNG, or JSON with base64 images), the LoRA adapters and
their cards (`GET /loras`, `PATCH /loras/{name}`, `PUT` and `GET /loras/{name}/preview`), and the OpenAI-compatible
`POST /v1/images/generations` and `POST /v1/images/edits`.

`/generate/image` takes its fields as JSON (input image and mask as base64, plain or as a `data:` URL) or as
multipart/form-data (the images as files, `adapters` as a JSON object in a text field): one body model either way.
"""

from __future__ import annotations

import base64
import time
from typing import Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, Field

from studio.api.disconnect import watched
from studio.api.errors import ERROR_RESPONSES
from studio.api.openai import dimensions, openai_router, renamed
from studio.api.security import guard
from studio.api.uploads import body_doc, decode_image, form_or_json, parsed
from studio.backends.image import (MAX_GUIDANCE, MAX_PROMPT_CHARS, MAX_SCALE, ImageOptions, ImageRequest, ImageResult,
                                   generate_images, list_loras)
from studio.backends.image_families import MODES
from studio.backends.image_inputs import MAX_INPUT_BYTES, MAX_INPUT_SIDE, MAX_MASK_BLUR, MIN_SIZE, SIZE_STEP, open_image
from studio.backends.image_png import png_bytes
from studio.backends.lora import MAX_WEIGHT, LoraInfo, base_label, find, fits, save_card
from studio.contract import SEED_RANGE, InputError
from studio.runtime import Call, Studio

IMAGE_DOC = (f"base64 (or a data: URL) in JSON, a file in multipart; PNG, JPEG or WebP up to "
             f"{MAX_INPUT_BYTES // 2**20} MiB and {MAX_INPUT_SIDE} pixels a side")


class ImageBody(BaseModel):
    prompt: str = Field(max_length=MAX_PROMPT_CHARS, description="what to draw; <lora:name:weight> tags pick "
                                                                  "adapters too; may be empty for upscale")
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="what to avoid (models with guidance)")
    model: str | None = Field(None, description="an image model id; default: the first image model")
    mode: Literal[MODES] = Field("txt2img", description="txt2img, img2img (redraw `image`), inpaint (redraw where "
                                                        "`mask` is white) or upscale (`scale` times, then redraw)")
    image: str | bytes | None = Field(None, description=f"the input image of img2img, inpaint, upscale: {IMAGE_DOC}")
    mask: str | bytes | None = Field(None, description="inpaint: white is repainted, black kept (painted strokes on "
                                                       "a transparent layer work too); the image's size")
    strength: float | None = Field(None, gt=0, le=1, description="img2img, inpaint, upscale: how much is redrawn; "
                                                                 "default: the model's (0.75; upscale 0.35)")
    mask_blur: int | None = Field(None, ge=0, le=MAX_MASK_BLUR, description="inpaint: feather of the mask edge in "
                                                                            "pixels; default 4")
    scale: float | None = Field(None, gt=1, le=MAX_SCALE, description="upscale: the factor; default 2")
    sampler: str | None = Field(None, description="A1111's name (Euler a, DPM++ 2M Karras, DDIM, UniPC, ...); "
                                                  "default: the model's; GET /v1/models lists each model's samplers")
    steps: int | None = Field(None, ge=1, description="denoising steps, up to the model's cap; default: the model's")
    guidance: float | None = Field(None, ge=0, le=MAX_GUIDANCE, description="guidance scale; default: the model's")
    width: int | None = Field(None, description="a multiple of 8 up to the model's cap; default: the model's "
                                                "(img2img, inpaint: the input's)")
    height: int | None = Field(None, description="a multiple of 8 up to the model's cap; default: the model's "
                                                 "(img2img, inpaint: the input's)")
    seed: int | None = Field(None, ge=0, lt=SEED_RANGE, description="empty for random; the seed used is returned")
    n: int = Field(1, ge=1, description="number of images; more than one needs response_format b64_json")
    adapters: dict[str, float] = Field(default_factory=dict, description=f"LoRA adapter name -> weight "
                                                                         f"(-{MAX_WEIGHT:g} to {MAX_WEIGHT:g})")
    response_format: Literal["png", "b64_json"] = "png"


class ImageData(BaseModel):
    b64_json: str
    seed: int


class ImageResponse(BaseModel):
    seed: int
    stopped: bool
    settings: dict
    images: list[ImageData]


class Tag(BaseModel):
    tag: str
    count: int


class Lora(BaseModel):
    name: str
    format: str
    file: str  # its folder's name and its path inside it: no server paths
    error: str | None
    base: str | None = Field(description="the image family it was trained for (sd15, sd2, sdxl, sd3, flux); "
                                         "null: unknown")
    base_label: str | None
    models: list[str] = Field(description="this studio's image models it may be used with")
    title: str | None
    description: str
    trigger_words: list[str]
    tags: list[Tag] = Field(description="training tags, most frequent first")
    preferred_weight: float
    note: str
    preview: str | None = Field(description="URL of its preview image; null: none set")


class PreviewBody(BaseModel):
    image: str | bytes = Field(description=IMAGE_DOC)


class LoraCardBody(BaseModel):
    preferred_weight: float | None = Field(None, ge=-MAX_WEIGHT, le=MAX_WEIGHT)
    note: str | None = Field(None, max_length=2000)
    trigger_words: list[str] | None = Field(None, description="replaces the trigger words the file gives")


def _b64(result: ImageResult, index: int) -> str:
    return base64.b64encode(png_bytes(result.images[index], result.image_settings(index))).decode("ascii")


async def image_body(request: Request) -> ImageBody:
    return parsed(ImageBody, await form_or_json(request))


async def preview_body(request: Request) -> PreviewBody:
    return parsed(PreviewBody, await form_or_json(request))


def lora_card(studio: Studio, info: LoraInfo) -> Lora:
    card = info.card
    models = [m for m in studio.models("image") if fits(info, ImageOptions.of(studio.registry.get(m)).lora)]
    return Lora(name=info.name, format=info.format, file=info.file, error=info.error, base=info.base,
                base_label=base_label(info.base) if info.base else None, models=[] if info.error else models,
                title=card.title, description=card.description, trigger_words=list(card.trigger_words),
                tags=[Tag(tag=t, count=c) for t, c in card.tags], preferred_weight=card.preferred_weight,
                note=card.note, preview=f"/loras/{info.name}/preview" if card.preview else None)


# ---------------------------------------------------------------------------------------------- OpenAI


class ImageGenerationRequest(BaseModel):
    """OpenAI's image request; the extensions are the studio's own fields."""

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = Field(None, description="default: the first image model")
    n: int = Field(1, ge=1)
    size: str | None = Field(None, description="WIDTHxHEIGHT, e.g. 512x512; default: the model's size")
    response_format: Literal["b64_json"] = "b64_json"
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    steps: int | None = Field(None, ge=1, description="extension: denoising steps")
    guidance_scale: float | None = Field(None, ge=0.0, le=MAX_GUIDANCE, description="extension: guidance")
    sampler: str | None = Field(None, description="extension: the sampler (A1111's name)")
    seed: int | None = Field(None, ge=0, lt=SEED_RANGE)
    adapters: dict[str, float] = Field(default_factory=dict, description="extension: LoRA name -> weight")


class ImageEditRequest(ImageGenerationRequest):
    """OpenAI's image edit (multipart): `image`, an optional `mask` whose transparent pixels are edited, `prompt`,
    `n`, `size`, `response_format`; with a mask the studio inpaints, without one it redraws the whole image
    (img2img). Extensions: `strength`, `mask_blur` and the generation's."""

    image: bytes
    mask: bytes | None = None
    strength: float | None = Field(None, gt=0, le=1, description="extension: how much is redrawn")
    mask_blur: int | None = Field(None, ge=0, le=MAX_MASK_BLUR, description="extension: the mask edge's feather")


class OpenAIImage(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]
    seed: int


def _size_error(studio: Studio, body: ImageGenerationRequest) -> InputError:
    """A width or height the model does not take, said of `size`, the field the request used."""
    spec = studio.model(body.model, "image")
    opts = ImageOptions.of(spec)
    return InputError("size", f"{spec.id} does not take {body.size}; it takes WIDTHxHEIGHT with sides that are "
                              f"multiples of {SIZE_STEP} from {MIN_SIZE} to {opts.max_size}, e.g. "
                              f"{opts.width}x{opts.height}")


def openai_mask(data: bytes) -> Image.Image:
    """OpenAI's mask (a PNG whose fully transparent pixels mark the area to edit) as the studio's (white: redraw)."""
    image = open_image("mask", data)
    if "A" not in image.getbands() and "transparency" not in image.info:
        raise InputError("mask", "must be a PNG with transparency: its transparent pixels mark what to edit")
    alpha = image.convert("RGBA").getchannel("A")
    return alpha.point(lambda a: 255 if a == 0 else 0)


def transparent_area(data: bytes) -> Image.Image | None:
    """An image's fully transparent pixels as a mask (OpenAI edits them when no mask is sent); None if it has none."""
    image = open_image("image", data)
    if "A" not in image.getbands() and "transparency" not in image.info:
        return None
    mask = image.convert("RGBA").getchannel("A").point(lambda a: 255 if a == 0 else 0)
    return mask if mask.getbbox() else None


def _openai_images(studio: Studio, body: ImageGenerationRequest, req: ImageRequest, call: Call) -> ImagesResponse:
    try:
        with renamed({"guidance": "guidance_scale"}):
            result = generate_images(studio, req, call)
    except InputError as exc:
        if exc.field in ("width", "height"):
            raise _size_error(studio, body) from None
        raise
    data = [OpenAIImage(b64_json=_b64(result, i)) for i in range(len(result.images))]
    return ImagesResponse(created=int(time.time()), seed=result.seed, data=data)


async def edit_body(request: Request) -> ImageEditRequest:
    fields = await form_or_json(request)
    if "image[]" in fields and "image" not in fields:  # the openai package's name when it sends a list
        fields["image"] = fields.pop("image[]")
    for name in ("image", "mask"):
        if isinstance(fields.get(name), str):
            fields[name] = decode_image(name, fields[name])
    return parsed(ImageEditRequest, fields)


# ---------------------------------------------------------------------------------------------- routes


def router(studio: Studio) -> APIRouter:
    api = APIRouter(tags=["image"], dependencies=[guard(studio)], responses=ERROR_RESPONSES)

    @api.post("/generate/image", response_model=None, openapi_extra=body_doc(ImageBody), responses={200: {
        "description": "The image (PNG) or, with response_format b64_json, JSON",
        "content": {"image/png": {}, "application/json": {"schema": ImageResponse.model_json_schema()}},
        "headers": {"X-Seed": {"description": "the first image's seed; image i used seed + i"}}}})
    def generate_image(body: ImageBody = Depends(image_body), call: Call = watched("rest", "/generate/image")) -> Response:
        """Generate or edit images with a diffusion model and optional LoRA adapters."""
        if body.response_format == "png" and body.n != 1:
            raise InputError("n", "a PNG response holds one image; use response_format b64_json for more")
        fields = body.model_dump(exclude={"response_format"})
        for name in ("image", "mask"):
            if fields[name] is not None:
                fields[name] = decode_image(name, fields[name])
        result = generate_images(studio, ImageRequest(**fields), call)
        headers = {"X-Seed": str(result.seed)}
        if body.response_format == "png":
            return Response(png_bytes(result.images[0], result.image_settings(0)), media_type="image/png",
                            headers=headers)
        images = [ImageData(b64_json=_b64(result, i), seed=result.image_settings(i)["seed"])
                  for i in range(len(result.images))]
        payload = ImageResponse(seed=result.seed, stopped=result.stopped, settings=result.settings, images=images)
        return JSONResponse(payload.model_dump(), headers=headers)

    @api.get("/loras")
    def loras(refresh: bool = False) -> list[Lora]:
        """The LoRA adapters found in lora_adapters/ and --lora-dir with their cards; `refresh=true` scans the
        folders again."""
        return [lora_card(studio, info) for info in list_loras(studio, refresh)]

    @api.get("/loras/{name:path}/preview", response_class=FileResponse, responses={404: {}})
    def lora_preview(name: str) -> FileResponse:
        """An adapter's preview image (PNG)."""
        info = find(studio.settings, name)
        if info.card.preview is None:
            raise HTTPException(404, f"{name} has no preview image")
        return FileResponse(info.card.preview, media_type="image/png")

    @api.put("/loras/{name:path}/preview", openapi_extra=body_doc(PreviewBody))
    def set_lora_preview(name: str, body: PreviewBody = Depends(preview_body)) -> Lora:
        """Set an adapter's preview: `image` (base64 in JSON, or a file in multipart), stored beside the adapter
        as `<name>.preview.png`, as AUTOMATIC1111 does."""
        image = open_image("image", decode_image("image", body.image))
        return lora_card(studio, save_card(studio.settings, name, preview=image))

    @api.patch("/loras/{name:path}")
    def edit_lora(name: str, body: LoraCardBody) -> Lora:
        """Set an adapter card's preferred weight, note or trigger words (stored beside the adapter in A1111's
        `<name>.json`)."""
        return lora_card(studio, save_card(studio.settings, name, **body.model_dump()))

    v1 = openai_router(studio)

    @v1.post("/images/generations")
    def image_generations(body: ImageGenerationRequest,
                          call: Call = watched("openai", "/v1/images/generations")) -> ImagesResponse:
        """Text to image; `b64_json` PNGs. Extensions: negative_prompt, steps, guidance_scale, sampler, seed,
        adapters."""
        width, height = dimensions(body.size)
        req = ImageRequest(prompt=body.prompt, negative_prompt=body.negative_prompt, model=body.model,
                           steps=body.steps, guidance=body.guidance_scale, width=width, height=height, seed=body.seed,
                           n=body.n, adapters=body.adapters, sampler=body.sampler)
        return _openai_images(studio, body, req, call)

    @v1.post("/images/edits", openapi_extra=body_doc(ImageEditRequest))
    def image_edits(body: ImageEditRequest = Depends(edit_body),
                    call: Call = watched("openai", "/v1/images/edits")) -> ImagesResponse:
        """Edit an image, as OpenAI's API: the mask's transparent pixels (or, without a mask, the image's own) are
        inpainted; an image without transparency and no mask is redrawn whole at `strength` (img2img). `b64_json`
        PNGs. Extensions as for generations, plus strength and mask_blur."""
        width, height = dimensions(body.size)
        mask = openai_mask(body.mask) if body.mask is not None else transparent_area(body.image)
        req = ImageRequest(prompt=body.prompt, negative_prompt=body.negative_prompt, model=body.model,
                           mode="inpaint" if mask is not None else "img2img", image=body.image, mask=mask,
                           strength=body.strength, mask_blur=body.mask_blur, sampler=body.sampler, steps=body.steps,
                           guidance=body.guidance_scale, width=width, height=height, seed=body.seed, n=body.n,
                           adapters=body.adapters)
        return _openai_images(studio, body, req, call)

    api.include_router(v1)
    return api
