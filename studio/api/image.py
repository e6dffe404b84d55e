"""POST /generate/image (PNG, or JSON with base64 images) and GET /loras."""

from __future__ import annotations

import base64
from typing import Literal

from fastapi import APIRouter, HTTPException
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from studio.backends.image import ImageRequest, default_model, generate_images, image_seed, list_loras, png_bytes
from studio.api.security import guard
from studio.runtime import Studio


class ImageBody(BaseModel):
    prompt: str = Field(description="What to draw; <lora:name:weight> tags pick adapters too")
    negative_prompt: str = Field("", description="What to avoid (models with guidance only)")
    model: str | None = Field(None, description="Image model id; default: the profile's SD-Turbo")
    steps: int | None = Field(None, description="Denoising steps; default: the model's")
    guidance: float | None = Field(None, description="Classifier-free guidance scale; default: the model's")
    width: int | None = Field(None, description="Multiple of 8, up to the model's cap")
    height: int | None = Field(None, description="Multiple of 8, up to the model's cap")
    seed: int | None = Field(None, description="Empty for a random seed; the seed used is returned")
    n: int = Field(1, description="Number of images; more than one needs response_format b64_json")
    adapters: dict[str, float] = Field(default_factory=dict, description="LoRA adapter name -> weight (-2..2)")
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
    file: str
    error: str | None


def router(studio: Studio) -> APIRouter:
    api = APIRouter(tags=["image"], dependencies=[guard(studio)])

    ok = {"description": "The image (PNG) or, with response_format b64_json, JSON; the seed is in the X-Seed header",
          "content": {"image/png": {}, "application/json": {"schema": ImageResponse.model_json_schema()}}}

    @api.post("/generate/image", response_model=None, responses={200: ok})
    def generate_image(body: ImageBody) -> Response:
        """Generate images with Stable Diffusion and optional LoRA adapters."""
        if body.response_format == "png" and body.n != 1:
            raise HTTPException(422, "n: a PNG response holds one image; use response_format b64_json for more")
        fields = body.model_dump(exclude={"response_format"})
        request = ImageRequest(**{**fields, "model": body.model or default_model(studio)})
        try:
            result = generate_images(studio, request, client="api", endpoint="/generate/image")
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        if not result.images:
            raise HTTPException(500, "no image was produced")
        headers = {"X-Seed": str(result.seed)}
        if body.response_format == "png":
            return Response(png_bytes(result.images[0], result.image_settings(0)), media_type="image/png",
                            headers=headers)
        images = [ImageData(b64_json=base64.b64encode(png_bytes(image, result.image_settings(i))).decode(),
                            seed=image_seed(result.seed, i)) for i, image in enumerate(result.images)]
        payload = ImageResponse(seed=result.seed, stopped=result.stopped, settings=result.settings, images=images)
        return JSONResponse(payload.model_dump(), headers=headers)

    @api.get("/loras")
    def loras(refresh: bool = False) -> list[Lora]:
        """The LoRA adapters found in lora_adapters/ and --lora-dir; `refresh=true` scans the folders again."""
        return [Lora(name=i.name, format=i.format, file=i.file, error=i.error) for i in list_loras(studio, refresh)]

    return api
