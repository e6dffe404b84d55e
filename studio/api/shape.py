"""POST /generate/3d: text to a 3D mesh with vertex colours, answered as a GLB, PLY or OBJ file."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, HTTPException, Response
from pydantic import BaseModel, Field

from studio.api.security import guard
from studio.backends.shape import (MAX_GUIDANCE, MEDIA_TYPES, SEED_RANGE, ShapeInputError, ShapeRequest, export_mesh,
                                   generate_shape)
from studio.runtime import Studio


class ShapeBody(BaseModel):
    prompt: str = Field(description="the object to make, e.g. 'a red wooden chair'")
    model: str | None = Field(None, description="a 3D model id (GET /health lists them); default: the profile's "
                                                "first 3D model")
    guidance: float | None = Field(None, description=f"guidance scale, 0 to {MAX_GUIDANCE:g}; default: the "
                                                     "model's (15 for Shap-E)")
    steps: int | None = Field(None, description="denoising steps, 1 to the model's cap; default: the model's "
                                                "(64 for Shap-E)")
    seed: int | None = Field(None, description=f"0 to {SEED_RANGE - 1}; same seed and settings, same mesh. "
                                               "Default: random, returned in the X-Seed header")
    format: Literal["glb", "ply", "obj"] = Field("glb", description="mesh file format")


def router(studio: Studio) -> APIRouter:
    api = APIRouter(tags=["3d"], dependencies=[guard(studio)])

    @api.post("/generate/3d", response_class=Response,
              responses={200: {"content": {media: {} for media in MEDIA_TYPES.values()},
                               "description": "the full mesh with vertex colours, y-up"}})
    def generate_3d(body: ShapeBody) -> Response:
        """Make a mesh from the prompt; the headers carry the seed, the face count and the steps done."""
        req = ShapeRequest(prompt=body.prompt, model=body.model, guidance=body.guidance, steps=body.steps,
                           seed=body.seed, turntable=False)
        try:
            result = generate_shape(studio, req, client="api", endpoint="/generate/3d")
        except ShapeInputError as exc:  # "field: message"; an unknown model is a 404 from the shared handler
            raise HTTPException(422, str(exc)) from None
        headers = {"X-Seed": str(result.seed), "X-Faces": str(len(result.mesh.faces)), "X-Steps": str(result.steps),
                   "Content-Disposition": f'attachment; filename="shape-{result.seed}.{body.format}"'}
        return Response(export_mesh(result.mesh, body.format), media_type=MEDIA_TYPES[body.format], headers=headers)

    return api
