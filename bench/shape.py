"""The studio's 3D path against the raw `ShapEPipeline` call, on openai/shap-e's real architecture.

The pipeline is built from openai/shap-e's configs with random weights in float32 on the CPU (no download): the
prior (PriorTransformer, 24 layers 1024 wide over 1024 latent tokens, 316 M parameters), CLIP ViT-L/14's text
encoder, the renderer at its real size (with the marching-cubes table of the tiny builder; the real checkpoint
ships it) and Shap-E's Heun scheduler. It is registered in a Registry whose loader hands it to a ModelCache, so both
variants run the SAME pipeline object: the studio through `generate_shape` (validation, request log, per-model
queue, cache lease, a run with its own scheduler, per-step progress and Stop checks), the baseline through
`pipe(prompt, output_type="latent")`. Guidance 15 (Shap-E's default, so the prior runs on a batch of 2).

Step time: for the studio, from the call to its last step report, over the steps; for the raw call, its whole time
over the steps. Both include the one text encoding. Interleaved repeats. `step_time_ratio` (raw / studio) compares
each variant's best run: on this shared 2-core machine other processes' load changes a run by up to 2x and only
ever adds time, so the fastest of identical runs is the least disturbed one (timeit's rule). The medians and the
ratio of each back-to-back pair are written too, and, from forward hooks on the prior and the text encoder, the
time each variant spends outside the models (`studio_other_ms`, `raw_other_ms`), which that load barely moves, with
the ratio it gives at equal model time. Then the mesh: the studio's own marching-cubes extraction at `--grid`
(Shap-E uses 128), and the export of that mesh to GLB, PLY and OBJ and its simplification for the preview, each
timed. Writes bench/results/shape.json.

    nice python bench/shape.py [--repeats 5] [--steps 1] [--grid 64]
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python bench/shape.py` puts bench/ first on the path, where bench/logging.py would hide the standard library's
# logging (torch imports it): look in the repository root instead, which also makes `studio` importable.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from studio.backends.shape import (PREVIEW_MAX_FACES, ShapEModel, ShapeRequest, export_mesh,  # noqa: E402
                                   generate_shape, preview_mesh)
from studio.cache import ModelCache  # noqa: E402
from studio.config import Settings  # noqa: E402
from studio.registry import ModelSpec, Registry  # noqa: E402
from studio.runtime import Call, Studio  # noqa: E402
from studio.telemetry.requestlog import RequestLog  # noqa: E402
from studio.tiny.image import clip_tokenizer  # noqa: E402
from studio.tiny.shape import marching_cubes_table  # noqa: E402

# openai/shap-e prior/config.json. The pipeline splits the prior's output into the noise prediction and a variance,
# so `clip_embed_dim` (the output width) is 2 * 1024; `embedding_proj_dim` is the CLIP text embedding's 768.
PRIOR = dict(num_attention_heads=16, attention_head_dim=64, num_layers=24, embedding_dim=1024, num_embeddings=1024,
             additional_embeddings=0, dropout=0.0, time_embed_act_fn="gelu", norm_in_type="layer",
             embedding_proj_norm_type=None, encoder_hid_proj_type=None, added_emb_type=None, time_embed_dim=4096,
             embedding_proj_dim=768, clip_embed_dim=2048)
# openai/shap-e text_encoder/config.json (CLIP ViT-L/14's text tower with its projection); the byte-level tiny
# tokenizer stands in for CLIP's 49,408-token BPE, whose embedding table keeps its real size.
TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=1,
            pad_token_id=1)
# openai/shap-e scheduler/scheduler_config.json
SCHEDULER = dict(beta_schedule="exp", num_train_timesteps=1024, prediction_type="sample", use_karras_sigmas=True,
                 clip_sample=True, clip_sample_range=1.0)
MODEL_ID = "shap-e-random"
PROMPT = "a red wooden chair"
GUIDANCE = 15.0
TARGETS = {"step_time_ratio": ">= 0.95"}
RESULTS = Path(__file__).parent / "results" / "shape.json"


def build_pipeline():
    from diffusers import HeunDiscreteScheduler, PriorTransformer, ShapEPipeline
    from diffusers.pipelines.shap_e import ShapERenderer
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    renderer = ShapERenderer()  # its defaults are openai/shap-e's renderer config
    cases, masks = marching_cubes_table()
    renderer.mesh_decoder.cases.copy_(cases)
    renderer.mesh_decoder.masks.copy_(masks)
    pipe = ShapEPipeline(prior=PriorTransformer(**PRIOR).eval(),
                         text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**TEXT)).eval(),
                         tokenizer=clip_tokenizer(),
                         scheduler=HeunDiscreteScheduler(**SCHEDULER), shap_e_renderer=renderer.eval())
    pipe.set_progress_bar_config(disable=True)  # the studio's run prints no bar either
    return pipe


def make_studio(model: ShapEModel, log_dir: Path, steps: int, grid: int) -> Studio:
    spec = ModelSpec(id=MODEL_ID, modality="3d", label="Shap-E architecture (random weights)",
                     loader="bench.shape:unused", params=sum(p.numel() for p in model.pipe.prior.parameters()),
                     options={"steps": steps, "max_steps": 128, "guidance": GUIDANCE, "frame_size": 64,
                              "max_frame_size": 256, "grid_size": grid})
    registry = Registry("bench", [spec])
    cache = ModelCache(registry, budget=16 * 2**30, loader=lambda _spec, _device: model,
                       estimate=lambda _spec, _device: 2_000_000_000)
    return Studio(Settings(log_dir=log_dir), registry, cache, RequestLog(log_dir))


class ModelClock:
    """Seconds spent inside the given modules (forward hooks). A run's time minus its model time is the code around
    the models, the studio's own or the raw pipeline's: that part the machine's other load barely moves."""

    def __init__(self, *modules: torch.nn.Module):
        self.seconds, self._entered = 0.0, 0.0
        for module in modules:
            module.register_forward_pre_hook(self._enter)
            module.register_forward_hook(self._leave)

    def _enter(self, *_args) -> None:
        self._entered = time.perf_counter()

    def _leave(self, *_args) -> None:
        self.seconds += time.perf_counter() - self._entered

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def timed(fn, *args, **kwargs) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1, help="denoising steps (Shap-E uses 64; Heun evaluates "
                                                             "the prior 2 * steps - 1 times)")
    parser.add_argument("--grid", type=int, default=64, help="marching-cubes grid of the mesh (Shap-E uses 128)")
    args = parser.parse_args()

    pipe, build_s = timed(build_pipeline)
    print(f"built Shap-E architecture ({sum(p.numel() for p in pipe.prior.parameters()) / 1e6:.0f} M prior params, "
          f"float32) in {build_s:.1f} s; torch threads: {torch.get_num_threads()}", flush=True)
    model = ShapEModel(pipe)
    studio = make_studio(model, Path(tempfile.mkdtemp(prefix="bench-shape-")), args.steps, args.grid)
    req = ShapeRequest(prompt=PROMPT, steps=args.steps, guidance=GUIDANCE, seed=0, turntable=False)
    clock = ModelClock(pipe.text_encoder, pipe.prior)  # the renderer's decoding comes after the timed window

    def studio_run() -> dict:
        marks: dict[str, float] = {}  # when each phase ("denoising", "extracting", "done") last reported

        def mark(_fraction: float, desc: str) -> None:
            marks[desc.split(" ")[0].rstrip(":")] = time.perf_counter()

        clock.take()
        t0 = time.perf_counter()
        result = generate_shape(studio, req, Call("rest", "bench", progress=mark))
        window, model_s = marks["denoising"] - t0, clock.take()
        return {"step_s": window / args.steps, "model_s": model_s, "other_s": window - model_s,
                "decode_s": marks["done"] - marks["extracting"], "result": result}

    def raw_run() -> dict:
        clock.take()
        latents, seconds = timed(lambda: pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=GUIDANCE,
                                              generator=torch.Generator("cpu").manual_seed(0),
                                              output_type="latent").images)
        model_s = clock.take()
        return {"step_s": seconds / args.steps, "model_s": model_s, "other_s": seconds - model_s, "latents": latents}

    with studio.cache.use(MODEL_ID) as lease:  # the studio's model is the one the baseline calls
        assert lease.model.pipe is pipe
    warm_studio, warm_raw = studio_run(), raw_run()  # warm-up, and the check that both make the same shape
    raw_mesh = pipe.shap_e_renderer.decode_to_mesh(warm_raw["latents"][:1], pipe.device, grid_size=args.grid)
    mesh = warm_studio["result"].mesh
    assert (len(raw_mesh.faces), len(raw_mesh.verts)) == (len(mesh.faces), len(mesh.vertices)), "shapes differ"

    studio_runs, raw_runs = [], []
    for i in range(args.repeats):
        order = [(studio_runs, studio_run), (raw_runs, raw_run)]
        for runs, fn in order if i % 2 == 0 else reversed(order):
            runs.append(fn())
        print(f"repeat {i + 1}/{args.repeats}: studio {studio_runs[-1]['step_s']:.2f} s/step "
              f"({studio_runs[-1]['other_s'] * 1000:.1f} ms outside the models), raw {raw_runs[-1]['step_s']:.2f} "
              f"s/step ({raw_runs[-1]['other_s'] * 1000:.1f} ms outside the models)", flush=True)

    studio_steps = [r["step_s"] for r in studio_runs]
    raw_steps = [r["step_s"] for r in raw_runs]
    studio_other = statistics.median(r["other_s"] for r in studio_runs)
    raw_other = statistics.median(r["other_s"] for r in raw_runs)
    model_s = min(r["model_s"] for r in studio_runs + raw_runs)  # the models' time on a quiet machine
    exports = {fmt: timed(export_mesh, mesh, fmt) for fmt in ("glb", "ply", "obj")}
    (preview, simplified), simplify_s = timed(preview_mesh, mesh)
    results = {
        "model": "openai/shap-e architecture (prior, CLIP ViT-L/14 text encoder, renderer), random weights",
        "dtype": "float32", "device": "cpu", "torch_threads": torch.get_num_threads(), "guidance": GUIDANCE,
        "steps": args.steps, "prior_evaluations_per_run": 2 * args.steps - 1, "repeats": args.repeats,
        "studio_step_s": round(min(studio_steps), 3), "raw_step_s": round(min(raw_steps), 3),
        "step_time_ratio": round(min(raw_steps) / min(studio_steps), 4),
        "studio_step_s_median": round(statistics.median(studio_steps), 3),
        "raw_step_s_median": round(statistics.median(raw_steps), 3),
        "step_time_ratio_median": round(statistics.median(raw_steps) / statistics.median(studio_steps), 4),
        "step_time_ratio_pairs": [round(r / s, 4) for s, r in zip(studio_steps, raw_steps)],
        "studio_other_ms": round(studio_other * 1000, 2), "raw_other_ms": round(raw_other * 1000, 2),
        "studio_overhead_ms": round((studio_other - raw_other) * 1000, 2),
        # the same model time with each variant's code around it: the ratio other load cannot blur
        "step_time_ratio_at_equal_model_time": round((model_s + raw_other) / (model_s + studio_other), 5),
        "mesh_grid": args.grid, "mesh_faces": len(mesh.faces), "mesh_vertices": len(mesh.vertices),
        "mesh_extract_s": round(statistics.median(r["decode_s"] for r in studio_runs), 3),
        "mesh_export_s": {fmt: round(seconds, 3) for fmt, (_data, seconds) in exports.items()},
        "mesh_export_bytes": {fmt: len(data) for fmt, (data, _seconds) in exports.items()},
        "preview_max_faces": PREVIEW_MAX_FACES, "preview_faces": len(preview.faces), "preview_simplified": simplified,
        "preview_simplify_s": round(simplify_s, 3),
        "same_shape": True, "targets": TARGETS,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in ("studio_step_s", "raw_step_s", "step_time_ratio",
                                              "step_time_ratio_median", "step_time_ratio_pairs", "studio_other_ms",
                                              "raw_other_ms", "step_time_ratio_at_equal_model_time", "mesh_faces",
                                              "mesh_extract_s", "mesh_export_s", "preview_faces",
                                              "preview_simplify_s")}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
