"""The studio's video path against the raw diffusers `AnimateDiffPipeline` call, on the same model object.

The pipeline is AnimateDiff at its real size with random weights, float32 on the CPU (no download; built as in
bench/video_raw.py): SD 1.5's UNet with AnimateDiff v3's motion modules (a UNetMotionModel), SD 1.5's VAE and CLIP
text encoder, the loader's DDIM scheduler. It is registered in a Registry whose loader hands it to a ModelCache, so
both variants run the SAME pipeline object: the studio through `generate_video` (validation, request log,
per-model queue, cache lease, adapter selection, per-step progress and Stop checks, then the MP4 encoding), the
baseline through `pipe(...)` with a step-end callback that only records the time.

- `step_time_ratio` = median raw step / median studio step, each step timed between two step-end callbacks
  (steps 2..n; the first also encodes the prompt), over interleaved repeats (which variant goes first alternates).
  Target >= 0.95.
- `encode_overhead_ratio` = the studio's MP4 encoding (from its "encoding MP4" report to the return) / the
  generation before it, medians. Target <= 0.05.

    nice python bench/video.py [--frames 8 --size 128 --steps 4 --repeats 3]   # writes bench/results/video.json
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python bench/video.py` puts bench/ first on the path, where bench/logging.py would hide the standard library's
# logging (torch imports it): look in the repository root instead, which also makes `studio` importable.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from bench.video_raw import FPS, GUIDANCE, NEGATIVE, PROMPT, build_animatediff  # noqa: E402
from studio import devices  # noqa: E402
from studio.backends.video import VideoModel, VideoRequest, generate_video  # noqa: E402
from studio.cache import ModelCache  # noqa: E402
from studio.config import Settings  # noqa: E402
from studio.registry import ModelSpec, Registry  # noqa: E402
from studio.runtime import Call, Studio  # noqa: E402
from studio.telemetry.requestlog import RequestLog  # noqa: E402

MODEL_ID = "animatediff-random"
TARGETS = {"step_time_ratio": ">= 0.95", "encode_overhead_ratio": "<= 0.05"}
RESULTS = Path(__file__).parent / "results" / "video.json"


def make_studio(model: VideoModel, log_dir: Path, frames: int, size: int, steps: int) -> Studio:
    spec = ModelSpec(id=MODEL_ID, modality="video", label="AnimateDiff architecture (random weights)",
                     loader="bench.video:unused", params=devices.module_bytes(model) // 4,
                     options={"frames": frames, "width": size, "height": size, "max_size": 512, "steps": steps,
                              "guidance": GUIDANCE, "fps": FPS})
    registry = Registry("bench", [spec])
    cache = ModelCache(registry, budget=32 * 2**30, loader=lambda _spec, _device: model,
                       estimate=lambda _spec, _device: devices.module_bytes(model))
    return Studio(Settings(log_dir=log_dir), registry, cache, RequestLog(log_dir))


def steps_of(marks: list[float]) -> list[float]:
    """Seconds of steps 2..n from the times of the step ends."""
    return [b - a for a, b in zip(marks, marks[1:])]


def run_raw(model: VideoModel, frames: int, size: int, steps: int) -> dict:
    marks: list[float] = []

    def on_step_end(_pipe, _step, _timestep, tensors: dict) -> dict:
        marks.append(time.perf_counter())
        return tensors

    start = time.perf_counter()
    model.pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_frames=frames, width=size, height=size,
               num_inference_steps=steps, guidance_scale=GUIDANCE, generator=torch.Generator("cpu").manual_seed(0),
               callback_on_step_end=on_step_end)
    return {"steps": steps_of(marks), "total": time.perf_counter() - start}


def run_studio(studio: Studio) -> dict:
    marks: list[float] = []
    encoding: list[float] = []

    def progress(_fraction: float, text: str) -> None:
        (encoding if text.startswith("encoding") else marks).append(time.perf_counter())

    start = time.perf_counter()
    result = generate_video(studio, VideoRequest(prompt=PROMPT, negative_prompt=NEGATIVE, model=MODEL_ID, seed=0),
                            Call("rest", "/bench", progress=progress))
    end = time.perf_counter()
    assert not result.stopped and result.files["mp4"]
    return {"steps": steps_of(marks), "generation": encoding[0] - start, "encode": end - encoding[0],
            "total": end - start, "mp4_bytes": len(result.files["mp4"])}


def measure(frames: int, size: int, steps: int, repeats: int) -> dict:
    build_start = time.perf_counter()
    model = build_animatediff()
    build_s = time.perf_counter() - build_start
    print(f"built the pipeline in {build_s:.1f} s ({devices.module_bytes(model) / 2**30:.2f} GiB)", flush=True)
    studio = make_studio(model, Path(tempfile.mkdtemp(prefix="bench-video-logs-")), frames, size, steps)
    raw, ours = [], []
    for i in range(repeats):  # interleaved, alternating which goes first
        for name in (("raw", "studio") if i % 2 == 0 else ("studio", "raw")):
            gc.collect()
            if name == "raw":
                raw.append(run_raw(model, frames, size, steps))
                print(f"raw: {raw[-1]['total']:.1f} s, steps {[round(s, 1) for s in raw[-1]['steps']]}", flush=True)
            else:
                ours.append(run_studio(studio))
                print(f"studio: {ours[-1]['total']:.1f} s, steps {[round(s, 1) for s in ours[-1]['steps']]}, "
                      f"encode {ours[-1]['encode']:.3f} s", flush=True)
    median = statistics.median
    raw_step = median(s for run in raw for s in run["steps"])
    studio_step = median(s for run in ours for s in run["steps"])
    generation, encode = median(run["generation"] for run in ours), median(run["encode"] for run in ours)
    return {
        "step_time_ratio": round(raw_step / studio_step, 3),
        "encode_overhead_ratio": round(encode / generation, 5),
        "targets": TARGETS,
        "raw_step_s": round(raw_step, 2),
        "studio_step_s": round(studio_step, 2),
        "raw_total_s": round(median(run["total"] for run in raw), 1),
        "studio_generation_s": round(generation, 1),
        "mp4_encode_s": round(encode, 3),
        "samples": {"raw_steps_s": [[round(s, 2) for s in run["steps"]] for run in raw],
                    "studio_steps_s": [[round(s, 2) for s in run["steps"]] for run in ours],
                    "studio_generation_s": [round(run["generation"], 1) for run in ours],
                    "mp4_encode_s": [round(run["encode"], 3) for run in ours]},
        "setup": {"clip": f"{frames} frames, {size}x{size}, {steps} steps, guidance {GUIDANCE} (2 UNet passes a "
                          f"step), {FPS} fps; MP4 {ours[0]['mp4_bytes']:,} bytes",
                  "bytes": devices.module_bytes(model), "weights": "random, float32", "build_s": round(build_s, 1),
                  "repeats": repeats, "device": "cpu", "torch_threads": torch.get_num_threads(),
                  "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                  "load_average": os.getloadavg(), "torch": torch.__version__},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=128, help="width and height (multiple of 8, 64 to 512)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps; steps 2..n are timed")
    parser.add_argument("--repeats", type=int, default=3, help="generations per variant")
    args = parser.parse_args()
    results = measure(args.frames, args.size, args.steps, args.repeats)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "samples"}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
