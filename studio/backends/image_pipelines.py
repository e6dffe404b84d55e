"""Loading any image family, and drawing in every mode with one set of loaded components.

One loader for every family: a diffusers folder loads with `AutoPipelineForText2Image.from_pretrained` (which
picks the family's pipeline class from `model_index.json`), a single-file checkpoint with the family's pipeline
class's `from_single_file`. What the cache holds is a `DiffusersImage`: that text-to-image pipeline, the pipelines
of the other modes made from it with `from_pipe` (the same UNet / transformer, VAE and text encoders; nothing is
loaded or copied, so the cache counts the model once), its samplers and its LoRA adapters.

The modes:
- img2img: diffusers' image-to-image pipeline of the family at the request's strength;
- inpaint: its inpainting pipeline (with an ordinary, 4-channel model diffusers keeps the unmasked latents at each
  step), then the original pixels pasted back outside the feathered mask (`image_inputs.paste_back`);
- upscale: the input enlarged with Lanczos, then an img2img pass of the same model at a low strength that adds
  detail at the new size (A1111's "hires fix" / "SD upscale"). Chosen over diffusers' upscaler pipelines because
  those are separate models (the x4 upscaler, the x2 latent upscaler), each gigabytes more to download and to
  budget, and they fit only SD 1.x/2.x latents; this pass works with every family that has img2img, with the
  LoRA adapters, at no extra memory. It upscales in pixels rather than in latents: a latent upscale smears unless
  it is redrawn at a high strength (A1111 recommends 0.5 and up), which changes the picture.

In the editing modes the model runs steps x strength denoising steps (diffusers' and A1111's rule); where that is
less than one (a 1-step turbo model at strength 0.5), the schedule gets more steps, so that one step is done.
"""

from __future__ import annotations

import inspect
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from studio.backends.image import ImagePlan, image_seed
from studio.backends.image_families import (CHECKPOINT_PIPELINES, checkpoint_config, detect, family,
                                            single_checkpoint)
from studio.backends.image_inputs import feather, paste_back
from studio.backends.lora import PipelineLoras
from studio.backends.samplers import SamplerSet
from studio.registry import ModelSpec
from studio.runtime import Call


class UnsupportedModel(ValueError):
    """The files are not a text-to-image model of a family the studio loads."""


def load_pipeline(spec: ModelSpec, path: Path, device: str, dtype: str) -> DiffusersImage:
    """The cache's loader for every local image model (`Family.loader` of every image family)."""
    import diffusers

    found = family(spec.family) if spec.family else detect(path)
    if found is None:
        raise UnsupportedModel(f"{path} is not a text-to-image model the studio can load")
    torch_dtype = getattr(torch, dtype)
    checkpoint = single_checkpoint(Path(path))
    if checkpoint is not None:
        if found.name not in CHECKPOINT_PIPELINES:
            raise UnsupportedModel(f"{checkpoint.name}: {found.label} models load from a diffusers folder, not "
                                   "from a single file")
        pipeline_class = getattr(diffusers, CHECKPOINT_PIPELINES[found.name])
        config = checkpoint_config(checkpoint)
        pipe = pipeline_class.from_single_file(str(checkpoint), config=str(config) if config else None,
                                               dtype=torch_dtype)
    else:
        pipe = diffusers.AutoPipelineForText2Image.from_pretrained(path, dtype=torch_dtype, **_left_out(path))
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)  # progress goes to the caller's callback instead
    return DiffusersImage(pipe)


def _left_out(folder: Path) -> dict[str, None]:
    """Components a folder's `model_index.json` leaves out (`[null, null]`), passed as None: diffusers refuses to
    load SD3 without its T5 encoder unless told so, as its docs load it to save memory."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    return {name: None for name, value in index.items() if isinstance(value, list) and value == [None, None]}


TASKS = {"txt2img": "AutoPipelineForText2Image", "img2img": "AutoPipelineForImage2Image",
         "inpaint": "AutoPipelineForInpainting", "upscale": "AutoPipelineForImage2Image"}


@dataclass(eq=False)
class DiffusersImage:
    """A loaded image model: its text-to-image pipeline, the other modes' pipelines sharing its components, its
    samplers and adapters. The lock lets one generation at a time use it: the active scheduler and adapters are
    state of the shared components, not of the request."""

    pipe: Any
    samplers: SamplerSet = field(init=False)
    modes: dict[str, Any] = field(default_factory=dict)
    loras: PipelineLoras = field(default_factory=PipelineLoras)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.samplers = SamplerSet(self.pipe.scheduler)
        self.modes[TASKS["txt2img"]] = self.pipe

    def pipeline(self, mode: str) -> Any:
        """The mode's pipeline, made on first use from the loaded components (`from_pipe`: nothing is loaded)."""
        task = TASKS[mode]
        if task not in self.modes:
            import diffusers

            made = getattr(diffusers, task).from_pipe(self.pipe)
            made.set_progress_bar_config(disable=True)
            self.modes[task] = made
        return self.modes[task]

    def draw(self, plan: ImagePlan, call: Call, on_output: Callable[[], None],
             grow: Callable[[int], None]) -> list:
        images = []
        with self.lock:
            self.loras.activate(self.pipe, plan.model, plan.adapters, grow)
            pipe = self.pipeline(plan.mode)
            pipe.scheduler = self.samplers.get(plan.sampler)
            for index in range(plan.n):
                if call.stopped:
                    break
                images.append(self._one(pipe, plan, index, call, on_output))
        return images

    def _one(self, pipe: Any, plan: ImagePlan, index: int, call: Call, on_output: Callable[[], None]):
        steps = plan.steps
        while plan.mode != "txt2img" and int(steps * plan.strength) < 1:
            steps += 1  # diffusers runs int(steps * strength) steps: at least one must run
        args = dict(prompt=plan.prompt, negative_prompt=plan.negative_prompt or None, num_inference_steps=steps,
                    guidance_scale=plan.guidance, width=plan.width, height=plan.height,
                    generator=torch.Generator("cpu").manual_seed(image_seed(plan.seed, index)))
        if plan.mode == "upscale":
            args.update(image=plan.image.resize((plan.width, plan.height), Image.LANCZOS), strength=plan.strength)
        elif plan.mode != "txt2img":
            args.update(image=plan.image, strength=plan.strength)
        if plan.mode == "inpaint":
            args.update(mask_image=plan.mask)
        progress = _Progress(plan, index, call, on_output)
        image = pipe(**_accepted(pipe, {**args, **progress.hook(pipe)})).images[0]
        if plan.mode == "inpaint":
            image = paste_back(plan.image, image, feather(plan.mask, plan.mask_blur))
        return image


@dataclass
class _Progress:
    """Per-step progress and Stop for one image: `callback_on_step_end` where the pipeline has it (Stop raises its
    interrupt flag: the remaining steps are skipped and what exists is decoded), else the older `callback`
    (progress only; Stop then takes effect after the image)."""

    plan: ImagePlan
    index: int
    call: Call
    on_output: Callable[[], None]

    def hook(self, pipe: Any) -> dict:
        accepted = inspect.signature(pipe.__call__).parameters
        if "callback_on_step_end" in accepted:
            return {"callback_on_step_end": self.on_step_end}
        if "callback" in accepted:
            return {"callback": lambda step, _t, _latents: self.report(step, None)}
        return {}

    def on_step_end(self, pipeline: Any, step: int, _timestep: Any, tensors: dict) -> dict:
        self.report(step, getattr(pipeline, "num_timesteps", None))
        if self.call.stopped:
            pipeline._interrupt = True
        return tensors

    def report(self, step: int, total: int | None) -> None:
        self.on_output()
        total = total or self.plan.steps
        done = (self.index + (step + 1) / total) / self.plan.n
        image = f"Image {self.index + 1} of {self.plan.n}, step" if self.plan.n > 1 else "Step"
        self.call.report(done, f"{image} {step + 1} of {total}")


def _accepted(pipe: Any, args: dict) -> dict:
    """The arguments this pipeline's `__call__` takes (families differ: FLUX has no negative prompt, img2img
    pipelines take no size), without the unset ones."""
    accepted = inspect.signature(pipe.__call__).parameters
    return {k: v for k, v in args.items() if k in accepted and v is not None}
