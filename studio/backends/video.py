"""Text to video: AnimateDiff (Stable Diffusion 1.5 with motion modules, so SD 1.5 LoRA adapters work) and Wan 2.1
(a diffusion transformer); one service behind the Video tab, `POST /generate/video`, the `/v1/videos` jobs and the
Gradio client / MCP tool.

Reproducibility as in the image backend: the noise comes from a CPU generator seeded with the request's seed,
so the same settings give the same frames on any device, and the same frames give the same MP4 bytes. Stop raises
out of `callback_on_step_end` after the running step: unlike an interrupted image, a half-denoised clip is not
worth its VAE decode (seconds for a real model), so a stopped generation returns no video at all.
"""

from __future__ import annotations

import io
import os
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from studio import devices
from studio.backends.image import MAX_GUIDANCE, MAX_PROMPT_CHARS
from studio.backends.lora import LoraInfo, PipelineLoras, chosen, parse_prompt
from studio.contract import ModelOptions, check_range, check_seed, check_text, pick_seed, require
from studio.registry import ModelSpec
from studio.runtime import Call, Studio

MIN_SIZE = 64
MAX_FPS = 60.0
STEP_SHARE = 0.95  # of the progress bar: denoising; the rest is decoding and encoding
# AnimateDiff, 512x512, half precision, one denoising step of one frame on a ZeroGPU slice (both guidance passes).
SECONDS_PER_FRAME_STEP = 0.06


@dataclass(frozen=True)
class Shape:
    """What a family's architecture allows: sizes in multiples of `size_multiple`, frames = k * frames_step + 1."""

    size_multiple: int
    frames_step: int
    max_frames: int | None = None


# AnimateDiff: the SD VAE's 8x; any frame count up to the motion modules' 32 positions (v2 and v3 adapters).
# Wan 2.1: VAE 8x times the transformer's 2x2 patches; the VAE packs 4 frames per latent after the first.
SHAPES = {"animatediff": Shape(size_multiple=8, frames_step=1, max_frames=32),
          "wan": Shape(size_multiple=16, frames_step=4)}


@dataclass(frozen=True)
class VideoOptions(ModelOptions):
    """A video model's defaults and caps (AnimateDiff's here; a catalog entry overrides them)."""

    family: str | None = "animatediff"  # a key of SHAPES: the architecture's size and frame-count rules
    frames: int | None = 16
    max_frames: int | None = 32
    fps: float | None = 8.0  # playback rate: the frames are the same at any rate, only the clip's length changes
    width: int | None = 512
    height: int | None = 512
    max_size: int | None = 768  # the largest width or height
    steps: int | None = 25
    max_steps: int | None = 100
    guidance: float | None = 7.5
    negative_prompt: bool | None = True
    loras: bool | None = True  # takes Stable Diffusion 1.5 LoRA adapters (AnimateDiff; Wan does not)


@dataclass(kw_only=True)
class VideoRequest:
    """Fields left as None take the model's defaults."""

    prompt: str
    negative_prompt: str = ""
    model: str | None = None  # None: the first video model
    frames: int | None = None
    fps: float | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None  # None: a random seed, reported in the result
    adapters: dict[str, float] = field(default_factory=dict)
    formats: tuple[str, ...] = ("mp4",)  # the files to encode, from FORMATS


@dataclass(frozen=True, kw_only=True)
class VideoPlan:
    """A validated request: defaults filled in, `<lora:>` tags taken out of the prompt, adapters found on disk."""

    model: str
    family: str
    prompt: str
    negative_prompt: str
    frames: int
    fps: float
    width: int
    height: int
    steps: int
    guidance: float
    seed: int | None
    adapters: dict[LoraInfo, float]
    formats: tuple[str, ...]

    @property
    def seconds(self) -> float:
        return self.frames / self.fps

    def settings(self) -> dict:
        """What made the clip, as shown with it and restored by "Use these settings"."""
        skip = ("family", "adapters", "formats")
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        return {**values, "adapters": {info.name: w for info, w in self.adapters.items()}}


@dataclass
class VideoResult:
    files: dict[str, bytes]  # format -> the encoded clip; empty when stopped
    thumbnail: bytes | None  # the middle frame as PNG; None when stopped
    seed: int
    settings: dict  # VideoPlan.settings(), with the seed used
    stopped: bool = False


# ---------------------------------------------------------------------------------------------- validation


def validate(studio: Studio, req: VideoRequest) -> VideoPlan:
    """Check the request against the model's caps and resolve defaults and adapters; raises InputError."""
    spec = studio.model(req.model, "video")
    opts = VideoOptions.of(spec)
    check_text("prompt", req.prompt, max_chars=MAX_PROMPT_CHARS)
    prompt, tagged = parse_prompt(req.prompt)
    require(bool(prompt), "prompt", "must not be empty (besides its <lora:> tags)")
    negative = check_text("negative_prompt", req.negative_prompt or "", max_chars=MAX_PROMPT_CHARS,
                          required=False).strip()
    require(not negative or opts.negative_prompt, "negative_prompt",
            f"{spec.id} does not use a negative prompt; leave it empty")
    frames = opts.frames if req.frames is None else req.frames
    check_range("frames", frames, 1, opts.max_frames, spec.id, whole=True)
    fps = opts.fps if req.fps is None else req.fps
    check_range("fps", fps, 1, MAX_FPS)
    width = opts.width if req.width is None else req.width
    height = opts.height if req.height is None else req.height
    for name, size in (("width", width), ("height", height)):
        check_range(name, size, MIN_SIZE, opts.max_size, spec.id, whole=True)
    check_shape(opts.family, frames, width, height, spec.id)
    steps = opts.steps if req.steps is None else req.steps
    check_range("steps", steps, 1, opts.max_steps, spec.id, whole=True)
    guidance = opts.guidance if req.guidance is None else req.guidance
    check_range("guidance", guidance, 0, MAX_GUIDANCE)
    check_seed(req.seed)
    require(not (req.adapters or tagged) or opts.loras, "adapters",
            f"{spec.id} takes no LoRA adapters (they are made for Stable Diffusion 1.5: use an AnimateDiff model)")
    require(bool(req.formats) and set(req.formats) <= set(FORMATS), "formats",
            f"must be some of {', '.join(FORMATS)}")
    return VideoPlan(model=spec.id, family=opts.family, prompt=prompt, negative_prompt=negative, frames=frames,
                     fps=float(fps), width=width, height=height, steps=steps, guidance=float(guidance),
                     seed=req.seed, adapters=chosen(studio.settings, req.adapters, tagged),
                     formats=tuple(dict.fromkeys(req.formats)))


def gpu_seconds(req: VideoRequest) -> float:
    frames, steps = req.frames or VideoOptions.frames, req.steps or VideoOptions.steps
    scale = (req.width or 512) * (req.height or 512) / (512 * 512)
    return (frames * steps * SECONDS_PER_FRAME_STEP + 0.1 * frames) * scale


# ---------------------------------------------------------------------------------------------- the service


def generate_video(studio: Studio, req: VideoRequest, call: Call) -> VideoResult:
    """Render the clip and encode it in the asked formats; when the call is stopped, end after the running
    denoising step and return no video."""
    plan = validate(studio, req)
    plan = replace(plan, seed=pick_seed(plan.seed))
    spec = studio.registry.get(plan.model)
    working = devices.working_memory(studio.device, plan.width * plan.height * plan.frames, spec.dtype(studio.device))
    with studio.generation(spec, call) as (lease, rec), studio.cache.working_memory(spec.id, working):
        rec.set(prompt=plan.prompt, seed=plan.seed, steps=plan.steps, adapters=plan.settings()["adapters"],
                fps=plan.fps)

        def on_step(done: int, total: int) -> None:
            rec.first_output()
            call.report(STEP_SHARE * done / total, f"step {done}/{total}")

        model: VideoModel = lease.model
        with model.lock:
            model.loras.activate(model.pipe, spec.id, plan.adapters, lambda n: studio.cache.grow(spec.id, n))
            clip = render_frames(model, prompt=plan.prompt, negative_prompt=plan.negative_prompt,
                                 frames=plan.frames, width=plan.width, height=plan.height, steps=plan.steps,
                                 guidance=plan.guidance, seed=plan.seed, cancel=call.cancel, on_step=on_step)
        if clip is None:
            rec.set(stopped=True)
            return VideoResult({}, None, plan.seed, plan.settings(), stopped=True)
        files = {}
        for index, fmt in enumerate(plan.formats):
            call.report(STEP_SHARE + (1 - STEP_SHARE) * index / len(plan.formats), f"encoding {fmt.upper()}")
            files[fmt] = FORMATS[fmt].encode(clip, plan.fps)
        rec.set(frames=len(clip), video_seconds=plan.seconds)
    return VideoResult(files, thumbnail(clip), plan.seed, plan.settings())


# ---------------------------------------------------------------------------------------------- local models


@dataclass(eq=False)
class VideoModel:
    """What the cache holds for a video model; the lock serializes renders (scheduler and adapters are pipeline
    state). `loras` is used by AnimateDiff, whose pipeline takes SD 1.5 adapters."""

    pipe: Any
    family: str  # a key of SHAPES
    loras: PipelineLoras = field(default_factory=PipelineLoras)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def load_animatediff(spec: ModelSpec, path: Path, device: str, dtype: str) -> VideoModel:
    """An SD 1.5 pipeline folder with the motion adapter in `motion_adapter/`, loaded as the diffusers docs do."""
    from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter

    torch_dtype = getattr(torch, dtype)
    adapter = MotionAdapter.from_pretrained(path / "motion_adapter", dtype=torch_dtype)
    pipe = AnimateDiffPipeline.from_pretrained(path, motion_adapter=adapter, dtype=torch_dtype)
    # The pipeline copied the adapter's weights into its UNetMotionModel; keeping the adapter would hold them twice.
    pipe.register_modules(motion_adapter=None)
    # AnimateDiff's sampler (SD 1.5 ships PNDM): DDIM over linear betas, as in the diffusers AnimateDiff docs.
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, beta_schedule="linear",
                                               timestep_spacing="linspace", steps_offset=1)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return VideoModel(pipe, "animatediff")


def load_wan(spec: ModelSpec, path: Path, device: str, dtype: str) -> VideoModel:
    """A `WanPipeline` folder (Wan-AI/Wan2.1-T2V-1.3B-Diffusers); the VAE stays float32, as Wan's docs load it."""
    from diffusers import AutoencoderKLWan, WanPipeline

    vae = AutoencoderKLWan.from_pretrained(path / "vae", dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(path, vae=vae, dtype=getattr(torch, dtype)).to(device)
    pipe.set_progress_bar_config(disable=True)
    return VideoModel(pipe, "wan")


def check_shape(family: str, frames: int, width: int, height: int, model: str = "this model") -> None:
    """Raise InputError naming the field for a clip shape the family cannot make exactly (diffusers would round
    Wan's sizes and frame counts silently)."""
    shape = SHAPES[family]
    for name, size in (("width", width), ("height", height)):
        require(isinstance(size, int) and size > 0 and size % shape.size_multiple == 0, name,
                f"must be a multiple of {shape.size_multiple} for {model}")
    rule = f"{shape.frames_step}k + 1 (1, {shape.frames_step + 1}, {2 * shape.frames_step + 1}, ...)"
    require(isinstance(frames, int) and frames >= 1 and (frames - 1) % shape.frames_step == 0, "frames",
            f"must be {rule if shape.frames_step > 1 else 'at least 1'} for {model}")
    require(shape.max_frames is None or frames <= shape.max_frames, "frames",
            f"must be at most {shape.max_frames} for {model}")


def frames_for(seconds: float, fps: float, family: str) -> int:
    """The frame count nearest to `seconds` at `fps` that the family can make (Wan: 4k + 1)."""
    step = SHAPES[family].frames_step
    return step * round((max(1, round(seconds * fps)) - 1) / step) + 1


class _Stopped(Exception):
    """Raised from the step callback to leave the pipeline before it decodes."""


def render_frames(model: VideoModel, *, prompt: str, negative_prompt: str = "", frames: int, width: int,
                  height: int, steps: int, guidance: float, seed: int, cancel: threading.Event | None = None,
                  on_step: Callable[[int, int], None] | None = None) -> list | None:
    """The clip's frames as PIL images, or None when `cancel` was set (checked after every denoising step).

    `on_step(done, total)` is called after each step. The caller holds `model.lock` and has set the adapters.
    """
    check_shape(model.family, frames, width, height)
    if cancel is not None and cancel.is_set():
        return None

    def on_step_end(_pipeline: Any, step: int, _timestep: Any, tensors: dict) -> dict:
        if on_step is not None:
            on_step(step + 1, steps)
        if cancel is not None and cancel.is_set():
            raise _Stopped
        return tensors

    try:
        out = model.pipe(prompt=prompt, negative_prompt=negative_prompt or None, num_frames=frames, width=width,
                         height=height, num_inference_steps=steps, guidance_scale=guidance,
                         generator=torch.Generator("cpu").manual_seed(seed), output_type="pil",
                         callback_on_step_end=on_step_end)
    except _Stopped:
        return None
    return out.frames[0]


# --- encoding -------------------------------------------------------------------------------------------------


def ffmpeg_exe() -> str:
    """The ffmpeg binary inside the imageio-ffmpeg wheel: `pip install` is all a user needs for MP4."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _rgb(frames: list) -> list:
    if not frames:
        raise ValueError("frames: nothing to encode")
    return [frame.convert("RGB") for frame in frames]


def encode_mp4(frames: list, fps: float) -> bytes:
    """H.264 in MP4 as every browser plays it: yuv420p (so even sizes: an odd edge repeats its last pixel row or
    column), the index at the front (+faststart) so playback starts before the download ends. Bit-exact flags
    and a fixed thread count (x264's output depends on it) make identical frames give identical bytes."""
    import numpy as np

    pixels = np.stack([np.asarray(frame) for frame in _rgb(frames)])
    _, height, width, _ = pixels.shape
    pixels = np.pad(pixels, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    rate = Fraction(fps).limit_denominator(1001)
    with tempfile.TemporaryDirectory(prefix="studio-mp4-") as tmp:
        out = os.path.join(tmp, "clip.mp4")
        command = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin",
                   "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{pixels.shape[2]}x{pixels.shape[1]}",
                   "-framerate", f"{rate.numerator}/{rate.denominator}", "-i", "pipe:0",
                   # BT.709, tagged: untagged H.264 leaves the colour matrix to each player's guess
                   "-vf", "scale=out_color_matrix=bt709:out_range=tv", "-colorspace", "bt709",
                   "-color_primaries", "bt709", "-color_trc", "bt709", "-color_range", "tv",
                   "-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "medium", "-crf", "18", "-threads", "2",
                   "-movflags", "+faststart", "-map_metadata", "-1", "-fflags", "+bitexact",
                   "-flags:v", "+bitexact", out]
        done = subprocess.run(command, input=pixels.tobytes(), capture_output=True)
        if done.returncode != 0:
            raise RuntimeError(f"ffmpeg failed: {done.stderr.decode(errors='replace').strip()[-500:]}")
        return Path(out).read_bytes()


def _frame_ms(fps: float) -> int:
    return max(1, round(1000 / fps))


def encode_gif(frames: list, fps: float) -> bytes:
    """Animated GIF, looping; GIF counts time in 1/100 s, so fps above 50 plays slower than asked."""
    images = _rgb(frames)
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=_frame_ms(fps), loop=0)
    return buffer.getvalue()


def encode_webp(frames: list, fps: float) -> bytes:
    """Animated WebP, looping, lossy at a quality close to the MP4's."""
    images = _rgb(frames)
    buffer = io.BytesIO()
    images[0].save(buffer, format="WEBP", save_all=True, append_images=images[1:], duration=_frame_ms(fps), loop=0,
                   quality=90, method=4)
    return buffer.getvalue()


def thumbnail(frames: list) -> bytes:
    """The middle frame as PNG: the still for a clip list and `variant=thumbnail`."""
    buffer = io.BytesIO()
    _rgb(frames)[len(frames) // 2].save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class Format:
    media_type: str
    encode: Callable[[list, float], bytes]


FORMATS = {"mp4": Format("video/mp4", encode_mp4), "gif": Format("image/gif", encode_gif),
           "webp": Format("image/webp", encode_webp)}
