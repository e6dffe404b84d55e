"""Text to video over HTTP: `POST /generate/video` answers with the clip itself; OpenAI's videos API under
`/v1/videos` runs the same service as asynchronous jobs (create, retrieve, list, delete, download the content).

How OpenAI's fields map onto a model (its defaults and caps are in `GET /v1/models`):
- `size` "WIDTHxHEIGHT" is taken as it is, never scaled: both sides must be multiples of the model's step (8 for
  AnimateDiff, 16 for Wan) from 64 to its `max_size`; omitted, the model's default size.
- `seconds` becomes frames at the clip's frame rate (the `fps` extension, else the model's: 8 for AnimateDiff,
  16 for Wan): seconds × fps, rounded to a frame count the model makes (Wan: 4k + 1, so "4" at 16 fps is 65
  frames); above the model's `max_frames` it is refused, naming `seconds`. Omitted, the model's default length.
  The `frames` extension, when given, wins over `seconds`.
- Extensions, as `extra_body` of the openai client: negative_prompt, frames, fps, steps, guidance_scale, seed,
  adapters. `input_reference` (image to video) is refused.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from studio.api.disconnect import watched
from studio.api.errors import ERROR_RESPONSES
from studio.api.openai import dimensions, openai_router, renamed
from studio.api.security import guard
from studio.backends.lora import MAX_WEIGHT
from studio.backends.video import (FORMATS, MAX_FPS, MAX_GUIDANCE, MAX_PROMPT_CHARS, MIN_SIZE, SHAPES, VideoOptions,
                                   VideoRequest, frames_for, generate_video)
from studio.backends.video_jobs import VideoJob, VideoJobs
from studio.contract import SEED_RANGE, InputError, require
from studio.registry import ModelSpec
from studio.runtime import Call, Studio

POLL_AFTER_MS = 500  # what `openai-poll-after-ms` tells the openai client's create_and_poll


class VideoBody(BaseModel):
    prompt: str = Field(max_length=MAX_PROMPT_CHARS, description="what to show; <lora:name:weight> tags pick "
                                                                  "adapters too (AnimateDiff)")
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="what to avoid")
    model: str | None = Field(None, description="a video model id; default: the first video model")
    frames: int | None = Field(None, ge=1, description="number of frames, up to the model's cap (Wan: 4k + 1)")
    fps: float | None = Field(None, gt=0, le=MAX_FPS, description="frames per second of the clip")
    width: int | None = Field(None, description="a multiple of 8 (Wan: 16) up to the model's cap")
    height: int | None = Field(None, description="a multiple of 8 (Wan: 16) up to the model's cap")
    steps: int | None = Field(None, ge=1, description="denoising steps, up to the model's cap")
    guidance: float | None = Field(None, ge=0, le=MAX_GUIDANCE, description="guidance scale")
    seed: int | None = Field(None, ge=0, lt=SEED_RANGE, description="empty for random; returned in X-Seed")
    adapters: dict[str, float] = Field(default_factory=dict, description=f"LoRA adapter name -> weight "
                                                                         f"(-{MAX_WEIGHT:g} to {MAX_WEIGHT:g})")
    format: Literal["mp4", "gif", "webp"] = Field("mp4", description="H.264 MP4, or an animated GIF or WebP")


# ---------------------------------------------------------------------------------------------- OpenAI


class VideoCreate(BaseModel):
    """OpenAI's create-video request (JSON or multipart form); the extensions are the studio's own fields."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = Field(None, description="a video model id; default: the first video model")
    seconds: str | float | None = Field(None, description="length of the clip; see the module's mapping rules")
    size: str | None = Field(None, description="WIDTHxHEIGHT, e.g. 512x512; default: the model's size")
    input_reference: Any = Field(None, description="not supported (image to video)")
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="extension")
    frames: int | None = Field(None, ge=1, description="extension: the number of frames (wins over seconds)")
    fps: float | None = Field(None, gt=0, le=MAX_FPS, description="extension: frames per second")
    steps: int | None = Field(None, ge=1, description="extension: denoising steps")
    guidance_scale: float | None = Field(None, ge=0, le=MAX_GUIDANCE, description="extension: guidance")
    seed: int | None = Field(None, ge=0, lt=SEED_RANGE, description="extension: the seed")
    adapters: dict[str, float] = Field(default_factory=dict, description="extension: LoRA name -> weight")


class VideoError(BaseModel):
    code: str
    message: str
    param: str | None = None


class VideoObject(BaseModel):
    """OpenAI's video job object, plus the settings that make the clip (its seed once it ran)."""

    id: str
    object: Literal["video"] = "video"
    created_at: int
    completed_at: int | None
    expires_at: int | None = None  # kept until deleted or pushed out by --video-dir-limit
    error: VideoError | None
    model: str
    progress: int
    prompt: str
    remixed_from_video_id: str | None = None
    seconds: str
    size: str
    status: Literal["queued", "in_progress", "completed", "failed"]
    settings: dict

    @classmethod
    def of(cls, job: VideoJob) -> "VideoObject":
        return cls(id=job.id, created_at=job.created_at, completed_at=job.completed_at, model=job.model,
                   error=VideoError(**job.error) if job.error else None, progress=job.progress, prompt=job.prompt,
                   seconds=job.seconds, size=job.size, status=job.status, settings=job.settings)


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VideoObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool


async def _create_body(request: Request) -> VideoCreate:
    """The body as JSON, or as the multipart form the openai client sends (`adapters[name]=0.8` for a dict)."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        fields: dict[str, Any] = {}
        for key, value in (await request.form()).multi_items():
            if isinstance(value, UploadFile):
                value = value.filename or "a file"
            nested = re.fullmatch(r"(\w+)\[(.+)\]", key)
            if nested:
                fields.setdefault(nested.group(1), {})[nested.group(2)] = value
            else:
                fields[key] = value
    else:
        try:
            fields = await request.json()
        except ValueError:
            raise RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": "invalid JSON"}])
    try:
        return VideoCreate.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def _seconds(value: str | float) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    require(math.isfinite(seconds) and seconds > 0, "seconds", f"must be a number of seconds above 0 such as "
                                                               f"\"4\", got {value!r}")
    return seconds


def _size_error(spec: ModelSpec, opts: VideoOptions, size: str) -> InputError:
    step = SHAPES[opts.family].size_multiple
    return InputError("size", f"{spec.id} does not make {size}; it takes WIDTHxHEIGHT with sides that are multiples "
                              f"of {step} from {MIN_SIZE} to {opts.max_size}, e.g. {opts.width}x{opts.height}")


def create_job(studio: Studio, jobs: VideoJobs, body: VideoCreate) -> VideoJob:
    """Map OpenAI's fields onto the studio's request (the rules in the module's docstring) and queue the job;
    a field the model cannot do is refused under the name the request used."""
    require(body.input_reference is None, "input_reference", "image to video is not supported; send a prompt only")
    spec = studio.model(body.model, "video")
    opts = VideoOptions.of(spec)
    width, height = dimensions(body.size)
    fps = body.fps or opts.fps
    frames = body.frames
    if frames is None and body.seconds is not None:
        frames = frames_for(_seconds(body.seconds), fps, opts.family)
    req = VideoRequest(prompt=body.prompt, negative_prompt=body.negative_prompt, model=spec.id, frames=frames,
                       fps=body.fps, width=width, height=height, steps=body.steps, guidance=body.guidance_scale,
                       seed=body.seed, adapters=body.adapters)
    try:
        with renamed({"guidance": "guidance_scale"}):
            return jobs.create(req)
    except InputError as exc:
        if exc.field in ("width", "height") and body.size is not None:
            raise _size_error(spec, opts, body.size) from None
        if exc.field == "frames" and body.frames is None and body.seconds is not None:
            raise InputError("seconds", f"{body.seconds} s at {fps:g} fps is {frames} frames; {spec.id} makes at "
                                        f"most {opts.max_frames} ({opts.max_frames / fps:g} s at {fps:g} fps)"
                             ) from None
        raise


def _missing(video_id: str) -> HTTPException:
    return HTTPException(404, f"no video {video_id!r}: it was never made here, was deleted, or was removed to keep "
                              f"--video-dir within its size limit")


def _found(jobs: VideoJobs, video_id: str) -> VideoJob:
    job = jobs.get(video_id)
    if job is None:
        raise _missing(video_id)
    return job


# ---------------------------------------------------------------------------------------------- routes


def router(studio: Studio) -> APIRouter:
    api = APIRouter(tags=["video"], dependencies=[guard(studio)], responses=ERROR_RESPONSES)
    jobs = VideoJobs(studio, studio.settings.video_dir, studio.settings.video_dir_limit)

    @api.post("/generate/video", response_class=Response, responses={200: {
        "description": "the clip", "content": {fmt.media_type: {} for fmt in FORMATS.values()},
        "headers": {"X-Seed": {"description": "the seed used"}, "X-Frames": {"description": "frames in the clip"},
                    "X-Fps": {"description": "frames per second"},
                    "X-Video-Seconds": {"description": "the clip's length"}}}})
    def generate_video_route(body: VideoBody, call: Call = watched("rest", "/generate/video")) -> Response:
        """Make a video clip from the prompt (AnimateDiff with optional LoRA adapters, or Wan 2.1)."""
        req = VideoRequest(**body.model_dump(exclude={"format"}), formats=(body.format,))
        result = generate_video(studio, req, call)
        settings = result.settings
        headers = {"X-Seed": str(result.seed), "X-Frames": str(settings["frames"]), "X-Fps": f"{settings['fps']:g}",
                   "X-Video-Seconds": f"{settings['frames'] / settings['fps']:g}",
                   "Content-Disposition": f'attachment; filename="video-{result.seed}.{body.format}"'}
        return Response(result.files[body.format], media_type=FORMATS[body.format].media_type, headers=headers)

    v1 = openai_router(studio)
    schema = VideoCreate.model_json_schema()

    @v1.post("/videos", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": schema}, "multipart/form-data": {"schema": schema}}}})
    async def create_video(request: Request) -> VideoObject:
        """Queue a video job; poll GET /v1/videos/{id} until it is completed or failed."""
        body = await _create_body(request)
        return VideoObject.of(await run_in_threadpool(create_job, studio, jobs, body))

    @v1.get("/videos")
    def list_videos(after: str | None = None, limit: int = Query(20, ge=1, le=100),
                    order: Literal["asc", "desc"] = "desc") -> VideoList:
        """The jobs kept here, newest first unless order=asc; `after` an id to page on."""
        listed = jobs.list()
        if order == "desc":
            listed.reverse()
        if after is not None:
            ids = [job.id for job in listed]
            if after not in ids:
                raise _missing(after)
            listed = listed[ids.index(after) + 1:]
        page = listed[:limit]
        return VideoList(data=[VideoObject.of(job) for job in page], first_id=page[0].id if page else None,
                         last_id=page[-1].id if page else None, has_more=len(listed) > limit)

    @v1.get("/videos/{video_id}")
    def retrieve_video(video_id: str) -> JSONResponse:
        """The job: status, progress, and its error when it failed."""
        job = _found(jobs, video_id)
        headers = {} if job.finished else {"openai-poll-after-ms": str(POLL_AFTER_MS)}
        return JSONResponse(VideoObject.of(job).model_dump(), headers=headers)

    @v1.delete("/videos/{video_id}")
    def delete_video(video_id: str) -> VideoDeleted:
        """Delete the job and its files; a running job stops after its current step."""
        if not jobs.delete(video_id):
            raise _missing(video_id)
        return VideoDeleted(id=video_id, deleted=True)

    @v1.get("/videos/{video_id}/content", response_class=FileResponse, responses={200: {
        "content": {"video/mp4": {}, "image/png": {}}, "description": "the MP4, or its middle frame as PNG"}})
    def video_content(video_id: str, variant: str = "video") -> FileResponse:
        """The finished video (`variant=video`, MP4) or its thumbnail (`variant=thumbnail`, PNG)."""
        require(variant in ("video", "thumbnail"), "variant", f"must be video or thumbnail, not {variant!r}")
        job = _found(jobs, video_id)
        path = jobs.file(video_id, variant)
        if path is None or not path.exists():
            raise HTTPException(409, f"video {video_id} has no content: its status is {job.status}")
        media = "video/mp4" if variant == "video" else "image/png"
        return FileResponse(path, media_type=media, filename=f"{video_id}{path.suffix}")

    api.include_router(v1)
    return api
