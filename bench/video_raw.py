"""The raw cost of a video: AnimateDiff on the real-size SD 1.5 UNet architecture, and encoding the result.

The pipeline is built in memory with random weights (float32, CPU, no download): the UNet from
stable-diffusion-v1-5's unet/config.json turned into a UNetMotionModel with AnimateDiff v3's motion modules
(guoyww/animatediff-motion-adapter-v1-5-3's config), SD 1.5's VAE and CLIP text encoder at their real sizes, the
loader's DDIM scheduler. Random weights cost the same arithmetic as trained ones. It measures, at one clip setting:
- the raw diffusers pipeline call, timed whole;
- `render_frames` on the same pipeline object, with the time of each denoising step and of the VAE decode;
- MP4 (and GIF, WebP) encoding of the frames, and its share of the generation time.

    nice python bench/video_raw.py [--frames 8 --size 128 --steps 2 --repeats 1]   # writes bench/results/video_raw.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path[0] = str(Path(__file__).resolve().parents[1])  # import the studio from the repo, not bench/'s modules

import torch  # noqa: E402

from studio import devices  # noqa: E402
from studio.backends.video import VideoModel, encode_gif, encode_mp4, encode_webp, render_frames  # noqa: E402
from studio.tiny.image import clip_tokenizer  # noqa: E402

# stable-diffusion-v1-5/stable-diffusion-v1-5 unet/config.json
UNET = dict(sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
            freq_shift=0, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                            "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1,
            mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768,
            attention_head_dim=8)
# AnimateDiff v3 (animatediff-motion-adapter-v1-5-3): no mid-block motion module, 32 frame positions.
MOTION = dict(block_out_channels=(320, 640, 1280, 1280), motion_layers_per_block=2, motion_num_attention_heads=8,
              motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=False)
# SD 1.5's vae/config.json and text_encoder/config.json (CLIP ViT-L/14's text tower).
VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=1,
            pad_token_id=1)
PROMPT = "a lighthouse on a cliff at dusk, waves crashing, oil painting"
NEGATIVE = "blurry, low quality"
GUIDANCE, FPS = 7.5, 8
RESULTS = Path(__file__).parent / "results" / "video_raw.json"


def build_animatediff() -> VideoModel:
    """The real-size AnimateDiff pipeline with random weights, as `load_animatediff` would return it."""
    from diffusers import (AnimateDiffPipeline, AutoencoderKL, DDIMScheduler, MotionAdapter, UNet2DConditionModel,
                           UNetMotionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):  # only the configs: from_unet2d merges them without allocating weights
        config = UNetMotionModel.from_unet2d(UNet2DConditionModel(**UNET), MotionAdapter(**MOTION),
                                             load_weights=False).config
    torch.manual_seed(0)
    tokenizer = clip_tokenizer()
    pipe = AnimateDiffPipeline(
        vae=AutoencoderKL(**VAE), text_encoder=CLIPTextModel(CLIPTextConfig(vocab_size=49408, **TEXT)),
        tokenizer=tokenizer, unet=UNetMotionModel.from_config(config), motion_adapter=None,
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False,
                                timestep_spacing="linspace", steps_offset=1))
    pipe.set_progress_bar_config(disable=True)
    return VideoModel(pipe, "animatediff")


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def measure(frames: int, size: int, steps: int, repeats: int) -> dict:
    build_s, model = timed(build_animatediff)
    params = {name: sum(p.numel() for p in module.parameters())
              for name, module in model.pipe.components.items() if isinstance(module, torch.nn.Module)}
    print(f"built the pipeline in {build_s:.1f} s: {params}", flush=True)
    clip = dict(prompt=PROMPT, negative_prompt=NEGATIVE, frames=frames, width=size, height=size, steps=steps,
                guidance=GUIDANCE)

    def raw() -> list:
        return model.pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_frames=frames, width=size, height=size,
                          num_inference_steps=steps, guidance_scale=GUIDANCE,
                          generator=torch.Generator("cpu").manual_seed(0)).frames[0]

    raw_s, render_s, step_s, decode_s = [], [], [], []
    for i in range(repeats):  # interleaved, alternating which goes first
        marks: list[float] = []

        def rendered() -> list:
            marks.append(time.perf_counter())
            return render_frames(model, seed=0, on_step=lambda done, total: marks.append(time.perf_counter()), **clip)

        for name in (("raw", "render") if i % 2 == 0 else ("render", "raw")):
            gc.collect()
            if name == "raw":
                seconds, _ = timed(raw)
                raw_s.append(seconds)
            else:
                seconds, result = timed(rendered)
                render_s.append(seconds)
                step_s += [b - a for a, b in zip(marks[1:], marks[2:])]  # steps 2..n (1 also encodes the prompt)
                decode_s.append(marks[0] + seconds - marks[-1])  # after the last step: VAE decode and to PIL
                frames_out = result
            print(f"{name}: {seconds:.1f} s", flush=True)

    encodes = {}
    for name, encode in (("mp4", encode_mp4), ("gif", encode_gif), ("webp", encode_webp)):
        times = [timed(lambda: encode(frames_out, FPS)) for _ in range(3)]
        encodes[name] = {"s": round(statistics.median(t for t, _ in times), 4), "bytes": len(times[0][1])}
    generation = statistics.median(render_s)
    median = statistics.median
    return {
        "raw_generation_s": round(median(raw_s), 2),
        "render_frames_s": round(generation, 2),
        "step_s": round(median(step_s), 2),
        "decode_s": round(median(decode_s), 2),
        "encode": encodes,
        "mp4_encode_over_generation": round(encodes["mp4"]["s"] / generation, 5),
        "samples": {"raw_s": [round(s, 2) for s in raw_s], "render_s": [round(s, 2) for s in render_s],
                    "step_s": [round(s, 2) for s in step_s], "decode_s": [round(s, 2) for s in decode_s]},
        "setup": {"clip": f"{frames} frames, {size}x{size}, {steps} steps, guidance {GUIDANCE} (2 UNet passes a "
                          f"step), {FPS} fps", "params": params, "bytes": devices.module_bytes(model),
                  "weights": "random, float32", "build_s": round(build_s, 1), "device": "cpu",
                  "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                  "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "torch": torch.__version__},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=128, help="width and height (multiple of 8)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="generations per variant (raw and render_frames)")
    args = parser.parse_args()
    results = measure(args.frames, args.size, args.steps, args.repeats)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "samples"}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
