"""Switching LoRA adapters and image modes the studio's way against reloading, on a Stable Diffusion 1.5-size UNet.

The UNet is built from stable-diffusion-v1-5's real unet/config.json with random weights (float32, CPU, no
download); the VAE and the text encoder are small (the text encoder keeps SD 1.5's width of 768, which the UNet's
cross-attention needs). The pipeline is saved once and loaded by the studio's loader through a ModelCache. Two
rank-16 adapters are built in the run and saved as safetensors.

Side by side in one run, interleaved, medians:
- switch: the studio's `PipelineLoras.activate` from adapter A to B and back (both loaded once; what a request
  runs when it names another adapter), against reloading the pipeline from its folder and loading the other
  adapter (what tools that reload on a LoRA change pay);
- mode: switching the loaded model from text to image to inpainting (`DiffusersImage.pipeline("inpaint")`: the
  inpainting pipeline made with `from_pipe` from the loaded components; each time afresh, the first switch's cost)
  against loading the inpainting pipeline from its folder (`AutoPipelineForInpainting.from_pretrained`, what a tool
  without shared components pays);
- step: one denoising step at 512x512 (64x64 latents) with adapter A active, through `generate_images` (validation,
  request log, queue, cache lease, adapter check, step callback) against the raw diffusers pipeline call on the
  same pipeline object.

    nice python bench/lora_switch.py [--repeats 3]     # writes bench/results/lora_switch.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Run as `python bench/lora_switch.py`: import the studio from the repo, and not bench/'s own modules as top-level
# ones (a bench script's name must not shadow a standard module such as `logging`).
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
from diffusers import (AutoencoderKL, AutoPipelineForInpainting, EulerDiscreteScheduler,  # noqa: E402
                       StableDiffusionPipeline, UNet2DConditionModel)
from diffusers.utils.logging import disable_progress_bar  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from studio.backends.image import ImageRequest, generate_images  # noqa: E402
from studio.backends.image_pipelines import TASKS, load_pipeline  # noqa: E402
from studio.backends.lora import find  # noqa: E402
from studio.cache import ModelCache  # noqa: E402
from studio.config import Settings  # noqa: E402
from studio.registry import ModelSpec, Registry  # noqa: E402
from studio.runtime import Call, Studio  # noqa: E402
from studio.telemetry.requestlog import RequestLog  # noqa: E402
from studio.tiny.image import clip_tokenizer, random_lora  # noqa: E402

# stable-diffusion-v1-5/stable-diffusion-v1-5 unet/config.json
UNET = dict(sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
            freq_shift=0, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                            "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1,
            mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768,
            attention_head_dim=8)
# Small stand-ins: a 2-layer CLIP text encoder of SD 1.5's width, a narrow VAE with the real 8x scale factor.
TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=2, num_attention_heads=12,
            max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
VAE = dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=32,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
RANK = 16
MODEL_ID = "sd15-size-random"
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
TARGETS = {"switch_over_reload": "<= 0.02", "mode_switch_over_reload": "<= 0.02", "step_time_ratio": ">= 0.95"}
RESULTS = Path(__file__).parent / "results" / "lora_switch.json"


def build(folder: Path) -> None:
    torch.manual_seed(0)
    tokenizer = clip_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**VAE), text_encoder=CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **TEXT)),
        tokenizer=tokenizer, unet=UNet2DConditionModel(**UNET),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         steps_offset=1, timestep_spacing="trailing"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "model")
    for seed, name in ((1, "A"), (2, "B")):
        random_lora(folder / "loras" / f"{name}.safetensors", pipe.unet, pipe.text_encoder, rank=RANK, seed=seed)


def make_studio(folder: Path) -> Studio:
    spec = ModelSpec(id=MODEL_ID, modality="image", label="SD 1.5-size UNet (random weights)", family="sd15",
                     loader="studio.backends.image_pipelines:load_pipeline", params=900_000_000,
                     options={"steps": 1, "max_steps": 4, "guidance": 0.0, "width": 512, "height": 512,
                              "max_size": 512, "negative_prompt": False, "max_images": 1, "sampler": "Euler"})
    registry = Registry("bench", [spec])
    cache = ModelCache(registry, budget=16 * 2**30,
                       loader=lambda s, device: load_pipeline(s, folder / "model", device, "float32"),
                       estimate=lambda _spec, _device: 4 * 2**30)
    settings = Settings(log_dir=folder / "logs", lora_dir=folder / "loras")
    return Studio(settings, registry, cache, RequestLog(settings.log_dir))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(folder: Path, repeats: int, switches: int) -> dict:
    t0 = time.perf_counter()
    build(folder)
    gc.collect()
    print(f"built and saved the SD 1.5-size pipeline and two rank-{RANK} adapters in {time.perf_counter() - t0:.1f} s",
          flush=True)
    studio = make_studio(folder)
    request = ImageRequest(prompt=PROMPT, model=MODEL_ID, steps=1, guidance=0.0, width=512, height=512, seed=0,
                           adapters={"A": 1.0})
    generate_images(studio, request, Call("rest", "bench"))  # load the model and adapter A (warm-up)
    loras = {name: find(studio.settings, name) for name in ("A", "B")}

    def reload(target) -> None:  # what a tool that reloads on every LoRA change pays
        pipe = StableDiffusionPipeline.from_pretrained(folder / "model", dtype=torch.float32)
        pipe.load_lora_weights(str(target.path), adapter_name=target.name)

    def switch_mode() -> None:  # the first switch to inpainting: the pipeline is made from the loaded components
        model.modes.pop(TASKS["inpaint"], None)
        model.pipeline("inpaint")

    def load_inpainting() -> None:  # what a tool that loads each mode's pipeline pays
        AutoPipelineForInpainting.from_pretrained(folder / "model", dtype=torch.float32)

    switch_s, reload_s, mode_s, mode_reload_s, studio_step, raw_step = [], [], [], [], [], []
    with studio.cache.use(MODEL_ID) as lease:  # pinned for the whole measurement; requests pin it again
        model = lease.model
        grow = partial(studio.cache.grow, MODEL_ID)
        model.loras.activate(model.pipe, MODEL_ID, {loras["B"]: 1.0}, grow)  # B loaded once, like any first use
        for round_ in range(repeats):  # interleaved: a run of switches, then one reload
            for i in range(switches // repeats):
                select = partial(model.loras.activate, model.pipe, MODEL_ID, {loras["AB"[i % 2]]: 1.0}, grow)
                switch_s.append(timed(select))
            reload_s.append(timed(partial(reload, loras["AB"[round_ % 2]])))
            gc.collect()
            for _ in range(switches // repeats):
                mode_s.append(timed(switch_mode))
            mode_reload_s.append(timed(load_inpainting))
            gc.collect()

        def raw() -> None:  # the same pipeline, adapter A active (the request below sets it), called directly
            model.pipe(PROMPT, num_inference_steps=1, guidance_scale=0.0, width=512, height=512,
                       generator=torch.Generator("cpu").manual_seed(0))

        def through_studio() -> None:
            generate_images(studio, request, Call("rest", "bench"))

        through_studio()  # back to adapter A
        for i in range(repeats):  # interleaved, alternating which goes first
            pair = [(studio_step, through_studio), (raw_step, raw)]
            for samples, fn in pair if i % 2 == 0 else pair[::-1]:
                samples.append(timed(fn))

    median = statistics.median
    return {
        "switch_ms": round(median(switch_s) * 1000, 2),
        "reload_s": round(median(reload_s), 3),
        "switch_over_reload": round(median(switch_s) / median(reload_s), 5),
        "mode_switch_ms": round(median(mode_s) * 1000, 2),
        "inpaint_load_s": round(median(mode_reload_s), 3),
        "mode_switch_over_reload": round(median(mode_s) / median(mode_reload_s), 5),
        "studio_step_s": round(median(studio_step), 3),
        "raw_step_s": round(median(raw_step), 3),
        "step_time_ratio": round(median(raw_step) / median(studio_step), 4),
        "targets": TARGETS,
        "samples": {"switch_ms": [round(s * 1000, 2) for s in switch_s], "reload_s": [round(s, 3) for s in reload_s],
                    "mode_switch_ms": [round(s * 1000, 2) for s in mode_s],
                    "inpaint_load_s": [round(s, 3) for s in mode_reload_s],
                    "studio_step_s": [round(s, 3) for s in studio_step], "raw_step_s": [round(s, 3) for s in raw_step]},
        "setup": {"unet": "stable-diffusion-v1-5 config, random weights, float32", "lora_rank": RANK,
                  "image": "512x512 (64x64 latents), 1 step, guidance 0", "device": "cpu",
                  "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                  "torch": torch.__version__},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="reloads and denoising steps per variant")
    parser.add_argument("--switches", type=int, default=30, help="studio adapter switches in all")
    args = parser.parse_args()
    disable_progress_bar()  # the baseline's reloads would print bars
    folder = Path(tempfile.mkdtemp(prefix="lora-switch-"))  # about 3.5 GB of weights, removed at the end
    try:
        results = measure(folder, args.repeats, args.switches)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in ("switch_ms", "reload_s", "switch_over_reload", "mode_switch_ms",
                                              "inpaint_load_s", "mode_switch_over_reload", "studio_step_s",
                                              "raw_step_s", "step_time_ratio")}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
