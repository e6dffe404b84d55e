"""Text or an image to 3D over HTTP: `POST /generate/3d` (JSON, the image base64; or multipart/form-data, the image a
file), answered as a GLB, PLY or OBJ mesh with vertex colours."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, Field

from studio.api.disconnect import watched
from studio.api.errors import ERROR_RESPONSES
from studio.api.security import guard
from studio.api.uploads import body_doc, decode_image, form_or_json, parsed
from studio.backends.shape import MAX_GUIDANCE, MAX_PROMPT_CHARS, MEDIA_TYPES, ShapeRequest, export_mesh, generate_shape
from studio.contract import SEED_RANGE
from studio.runtime import Call, Studio


class ShapeBody(BaseModel):
    prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="the object to make, e.g. 'a red wooden chair' "
                                                                      "(text models)")
    image: str | bytes | None = Field(None, description="a picture of one object (image models): base64 in JSON, a "
                                                        "file in multipart")
    model: str | None = Field(None, description="a 3D model id (GET /v1/models lists them; `options.input` says "
                                                "text or image); default: the first one that takes the input given")
    guidance: float | None = Field(None, ge=0, le=MAX_GUIDANCE, description="guidance scale; default: the model's "
                                                                            "(15 for Shap-E)")
    steps: int | None = Field(None, ge=1, description="denoising steps, up to the model's cap; default: the model's "
                                                      "(64 for Shap-E)")
    seed: int | None = Field(None, ge=0, lt=SEED_RANGE, description="same seed and settings, same mesh; default: "
                                                                     "random, returned in the X-Seed header")
    format: Literal["glb", "ply", "obj"] = Field("glb", description="mesh file format")


async def shape_body(request: Request) -> ShapeBody:
    return parsed(ShapeBody, await form_or_json(request))


def router(studio: Studio) -> APIRouter:
    api = APIRouter(tags=["3d"], dependencies=[guard(studio)], responses=ERROR_RESPONSES)

    @api.post("/generate/3d", response_class=Response, openapi_extra=body_doc(ShapeBody), responses={200: {
        "content": {media: {} for media in MEDIA_TYPES.values()},
        "description": "the full mesh with vertex colours, y-up",
        "headers": {"X-Seed": {"description": "the seed used"}, "X-Faces": {"description": "faces of the mesh"},
                    "X-Steps": {"description": "denoising steps done"}}}})
    def generate_3d(body: ShapeBody = Depends(shape_body), call: Call = watched("rest", "/generate/3d")) -> Response:
        """Make a mesh from the prompt, or from the image with an image-to-3D model."""
        image = decode_image("image", body.image) if body.image is not None else None
        req = ShapeRequest(prompt=body.prompt, model=body.model, guidance=body.guidance, steps=body.steps,
                           seed=body.seed, turntable=False, image=image)
        result = generate_shape(studio, req, call)
        headers = {"X-Seed": str(result.seed), "X-Faces": str(len(result.mesh.faces)), "X-Steps": str(result.steps),
                   "Content-Disposition": f'attachment; filename="shape-{result.seed}.{body.format}"'}
        return Response(export_mesh(result.mesh, body.format), media_type=MEDIA_TYPES[body.format], headers=headers)

    return api
