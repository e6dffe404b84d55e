"""Text to image over HTTP: `POST /generate/image` (PNG, or JSON with base64 images), `GET /loras` and the
OpenAI-compatible `POST /v1/images/generations`."""

from __future__ import annotations

import base64
import time
from typing import Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from studio.api.errors import ERROR_RESPONSES
from studio.api.openai import dimensions, openai_router, renamed
from studio.api.security import guard
from studio.backends.image import (MAX_GUIDANCE, MAX_PROMPT_CHARS, MIN_SIZE, SIZE_STEP, ImageOptions, ImageRequest,
                                   ImageResult, generate_images, list_loras, png_bytes)
from studio.backends.lora import MAX_WEIGHT
from studio.contract import SEED_RANGE, InputError
from studio.runtime import Call, Studio


class ImageBody(BaseModel):
    prompt: str = Field(max_length=MAX_PROMPT_CHARS, description="what to draw; <lora:name:weight> tags pick "
                                                                  "adapters too")
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="what to avoid (models with guidance)")
    model: str | None = Field(None, description="an image model id; default: the first image model")
    steps: int | None = Field(None, ge=1, description="denoising steps, up to the model's cap; default: the model's")
    guidance: float | None = Field(None, ge=0, le=MAX_GUIDANCE, description="guidance scale; default: the model's")
    width: int | None = Field(None, description="a multiple of 8 up to the model's cap; default: the model's")
    height: int | None = Field(None, description="a multiple of 8 up to the model's cap; default: the model's")
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


class Lora(BaseModel):
    name: str
    format: str
    file: str  # its folder's name and its path inside it: no server paths
    error: str | None


def _b64(result: ImageResult, index: int) -> str:
    return base64.b64encode(png_bytes(result.images[index], result.image_settings(index))).decode("ascii")


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
    seed: int | None = Field(None, ge=0, lt=SEED_RANGE)
    adapters: dict[str, float] = Field(default_factory=dict, description="extension: LoRA name -> weight")


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


# ---------------------------------------------------------------------------------------------- routes


def router(studio: Studio) -> APIRouter:
    api = APIRouter(tags=["image"], dependencies=[guard(studio)], responses=ERROR_RESPONSES)

    @api.post("/generate/image", response_model=None, responses={200: {
        "description": "The image (PNG) or, with response_format b64_json, JSON",
        "content": {"image/png": {}, "application/json": {"schema": ImageResponse.model_json_schema()}},
        "headers": {"X-Seed": {"description": "the first image's seed; image i used seed + i"}}}})
    def generate_image(body: ImageBody) -> Response:
        """Generate images with Stable Diffusion and optional LoRA adapters."""
        if body.response_format == "png" and body.n != 1:
            raise InputError("n", "a PNG response holds one image; use response_format b64_json for more")
        req = ImageRequest(**body.model_dump(exclude={"response_format"}))
        result = generate_images(studio, req, Call("rest", "/generate/image"))
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
        """The LoRA adapters found in lora_adapters/ and --lora-dir; `refresh=true` scans the folders again."""
        return [Lora(name=i.name, format=i.format, file=i.file, error=i.error) for i in list_loras(studio, refresh)]

    v1 = openai_router(studio)

    @v1.post("/images/generations")
    def image_generations(body: ImageGenerationRequest) -> ImagesResponse:
        """Text to image; `b64_json` PNGs. Extensions: negative_prompt, steps, guidance_scale, seed, adapters."""
        width, height = dimensions(body.size)
        req = ImageRequest(prompt=body.prompt, negative_prompt=body.negative_prompt, model=body.model,
                           steps=body.steps, guidance=body.guidance_scale, width=width, height=height, seed=body.seed,
                           n=body.n, adapters=body.adapters)
        try:
            with renamed({"guidance": "guidance_scale"}):
                result = generate_images(studio, req, Call("openai", "/v1/images/generations"))
        except InputError as exc:
            if exc.field in ("width", "height"):
                raise _size_error(studio, body) from None
            raise
        data = [OpenAIImage(b64_json=_b64(result, i)) for i in range(len(result.images))]
        return ImagesResponse(created=int(time.time()), seed=result.seed, data=data)

    api.include_router(v1)
    return api
