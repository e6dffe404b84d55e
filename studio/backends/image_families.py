"""Image model families: which kind of text-to-image model a folder or a checkpoint holds, and its defaults.

"Families, not models": every model of a family loads the same way (`studio.backends.image_pipelines`) and gets the
family's defaults and caps (size, steps, guidance, negative prompt, LoRA base, sampler, modes), so a new SD 1.5
fine-tune or SDXL checkpoint needs no code and no per-model table. A catalog entry's `options` still override
them (e.g. a fine-tune that wants 30 steps).

`detect(path)` tells the family from the files alone, without loading weights:
- a diffusers folder (the Hub's layout): `model_index.json`'s `_class_name`, then the component configs for what
  the class name does not say (SD 1.x and 2.x share a pipeline class; a distilled "turbo" model ships a
  scheduler with "trailing" timestep spacing, which few-step sampling needs);
- a single-file checkpoint (`.safetensors` in the original / AUTOMATIC1111 layout): its keys. SD 1.x carries
  OpenAI's CLIP text encoder (`cond_stage_model.transformer.`), SD 2.x OpenCLIP (`cond_stage_model.model.`), SDXL
  two encoders (`conditioner.embedders.0` and `.1`).
Any other text-to-image pipeline diffusers' `AutoPipelineForText2Image` knows loads as the generic family, with
conservative defaults: its own scheduler, text to image only, no adapters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from studio.backends.samplers import DDPM_SAMPLERS, FLOW_SAMPLERS
from studio.contract import Family

LOADER = "studio.backends.image_pipelines:load_pipeline"
GPU_HALF = {"cuda": "float16", "mps": "float16", "cpu": "float32"}
GPU_BF16 = {"cuda": "bfloat16", "mps": "bfloat16", "cpu": "float32"}
MODES = ("txt2img", "img2img", "inpaint", "upscale")  # upscale is an img2img pass (see image_pipelines)
CHECKPOINT_SUFFIXES = (".safetensors",)


def _family(name: str, label: str, dtypes: dict = GPU_HALF, **options: Any) -> Family:
    return Family(name=name, label=label, loader=LOADER, options=options, dtypes=dtypes)


SD = dict(samplers=tuple(DDPM_SAMPLERS), modes=MODES, negative_prompt=True)
TURBO = dict(steps=1, max_steps=4, guidance=0.0, negative_prompt=False, strength=0.5)
FAMILIES = {f.name: f for f in (
    _family("sd15", "Stable Diffusion 1.x", **SD, lora="sd15", sampler="DPM++ 2M Karras", width=512, height=512,
            max_size=1024, steps=25, guidance=7.5),
    _family("sd2", "Stable Diffusion 2.x", **SD, lora="sd2", sampler="DPM++ 2M Karras", width=768, height=768,
            max_size=1024, steps=25, guidance=7.5),
    _family("sd2-turbo", "SD-Turbo (Stable Diffusion 2.x, distilled)", **{**SD, **TURBO}, lora="sd2",
            sampler="Euler", width=512, height=512, max_size=768),
    _family("sdxl", "Stable Diffusion XL", **SD, lora="sdxl", sampler="DPM++ 2M Karras", width=1024, height=1024,
            max_size=1536, steps=30, guidance=5.0),
    _family("sdxl-turbo", "SDXL-Turbo (Stable Diffusion XL, distilled)", **{**SD, **TURBO}, lora="sdxl",
            sampler="Euler a", width=512, height=512, max_size=1024),
    _family("sd3", "Stable Diffusion 3", samplers=tuple(FLOW_SAMPLERS), modes=MODES, lora="sd3", sampler="Euler",
            width=1024, height=1024, max_size=1536, steps=28, guidance=7.0, negative_prompt=True),
    _family("flux", "FLUX.1", GPU_BF16, samplers=("Euler",), modes=MODES, lora="flux", sampler="Euler",
            width=1024, height=1024, max_size=1536, steps=28, guidance=3.5, negative_prompt=False),
    _family("flux-schnell", "FLUX.1 schnell (distilled)", GPU_BF16, samplers=("Euler",), modes=MODES, lora="flux",
            sampler="Euler", width=1024, height=1024, max_size=1536, steps=4, max_steps=8, guidance=0.0,
            negative_prompt=False),
    _family("pixart", "PixArt-α / Σ", samplers=tuple(DDPM_SAMPLERS), modes=("txt2img",), lora=None,
            sampler="DPM++ 2M", width=1024, height=1024, max_size=1536, steps=20, guidance=4.5, negative_prompt=True),
    _family("diffusers", "Diffusers text-to-image pipeline", samplers=(), modes=("txt2img",), lora=None,
            sampler=None, negative_prompt=False),
)}
# The diffusers pipeline class of a family's single-file checkpoints (`from_single_file`).
CHECKPOINT_PIPELINES = {"sd15": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
                        "sdxl": "StableDiffusionXLPipeline"}


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"image family {name!r} is not one of {', '.join(FAMILIES)}") from None


def detect(path: Path | str) -> Family | None:
    """The family of the image model at `path` (a diffusers folder or a single-file checkpoint); None when it is
    not a text-to-image model this studio can load."""
    path = Path(path)
    if path.is_file():
        return _from_checkpoint(path) if path.suffix in CHECKPOINT_SUFFIXES else None
    if (path / "model_index.json").is_file():
        return _from_folder(path)
    checkpoint = single_checkpoint(path)
    return _from_checkpoint(checkpoint) if checkpoint else None


def single_checkpoint(path: Path) -> Path | None:
    """The checkpoint a single-file model is: the file itself, or the one `.safetensors` file at the top of a
    folder without `model_index.json` (its components' configs may sit beside it, see `checkpoint_config`)."""
    if path.is_file():
        return path
    if (path / "model_index.json").exists():
        return None
    files = [f for f in path.glob("*") if f.suffix in CHECKPOINT_SUFFIXES and not f.name.startswith(".")]
    return files[0] if len(files) == 1 else None


def checkpoint_config(checkpoint: Path) -> Path | None:
    """A diffusers-layout folder of configs for a single-file checkpoint: `<name>/model_index.json` beside
    `<name>.safetensors`. Without one, diffusers fetches the family's configs (a few KB) from the Hub once."""
    folder = checkpoint.with_suffix("")
    return folder if (folder / "model_index.json").is_file() else None


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _turbo(folder: Path) -> bool:
    return _json(folder / "scheduler" / "scheduler_config.json").get("timestep_spacing") == "trailing"


def _from_folder(folder: Path) -> Family | None:
    name = _json(folder / "model_index.json").get("_class_name", "")
    if name == "StableDiffusionPipeline":
        unet = _json(folder / "unet" / "config.json")
        if unet.get("in_channels", 4) != 4:  # a dedicated inpainting model (9 input channels): not text to image
            return None
        sd2 = unet.get("cross_attention_dim") == 1024 or bool(unet.get("use_linear_projection"))
        return FAMILIES[("sd2-turbo" if _turbo(folder) else "sd2") if sd2 else "sd15"]
    if name == "StableDiffusionXLPipeline":
        return FAMILIES["sdxl-turbo" if _turbo(folder) else "sdxl"]
    if name == "StableDiffusion3Pipeline":
        return FAMILIES["sd3"]
    if name == "FluxPipeline":
        dev = _json(folder / "transformer" / "config.json").get("guidance_embeds", True)
        return FAMILIES["flux" if dev else "flux-schnell"]
    if name in ("PixArtAlphaPipeline", "PixArtSigmaPipeline"):
        return FAMILIES["pixart"]
    return FAMILIES["diffusers"] if name and _text_to_image(name) else None


def _text_to_image(class_name: str) -> bool:
    from diffusers.pipelines.auto_pipeline import AUTO_TEXT2IMAGE_PIPELINES_MAPPING

    return any(pipeline.__name__ == class_name for pipeline in AUTO_TEXT2IMAGE_PIPELINES_MAPPING.values())


def _from_checkpoint(path: Path) -> Family | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = set(fh.keys())
            conv_in = "model.diffusion_model.input_blocks.0.0.weight"
            channels = fh.get_slice(conv_in).get_shape()[1] if conv_in in keys else None
    except Exception:  # safetensors raises its own error type for every kind of damage
        return None
    if channels != 4:  # no LDM UNet, or an inpainting UNet (9 channels)
        return None
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return FAMILIES["sdxl"]
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return FAMILIES["sd2"]
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return FAMILIES["sd15"]
    return None
