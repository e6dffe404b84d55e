"""Text-to-video, the low-level pieces: loading AnimateDiff and Wan 2.1, rendering frames, encoding them.

Reproducibility as in the image backend: the noise comes from a CPU generator seeded with the request's seed,
so the same settings give the same frames on any device. Stop raises out of `callback_on_step_end` after the
running step: unlike an interrupted image, a half-denoised clip is not worth its VAE decode (seconds for a real
model), so a stopped render returns nothing at all.
"""

from __future__ import annotations

import io
import os
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from studio.backends.lora import PipelineLoras
from studio.registry import ModelSpec


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


def check_shape(family: str, frames: int, width: int, height: int) -> None:
    """Raise ValueError("field: message") for a clip shape the family cannot make exactly (diffusers would
    round Wan's sizes and frame counts silently)."""
    shape = SHAPES[family]
    for name, size in (("width", width), ("height", height)):
        if not (isinstance(size, int) and size > 0 and size % shape.size_multiple == 0):
            raise ValueError(f"{name}: must be a positive multiple of {shape.size_multiple}")
    if not (isinstance(frames, int) and frames >= 1 and (frames - 1) % shape.frames_step == 0):
        rule = f"{shape.frames_step}k + 1 (1, {shape.frames_step + 1}, {2 * shape.frames_step + 1}, ...)"
        raise ValueError(f"frames: must be {rule if shape.frames_step > 1 else 'at least 1'}")
    if shape.max_frames is not None and frames > shape.max_frames:
        raise ValueError(f"frames: at most {shape.max_frames} for this model")


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
