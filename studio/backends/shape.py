"""Text or an image to 3D with Shap-E: the one service behind the 3D tab, `POST /generate/3d` and the Gradio client /
MCP tool. A text model (openai/shap-e) takes a prompt, an image model (openai/shap-e-img2img, `input: image` in its
options) a picture of one object; both give the same mesh, turntable and downloads.

One denoising run, two decodings. The pipeline runs with `output_type="latent"`, then its renderer decodes that
latent into a marching-cubes mesh with vertex colours (what `output_type="mesh"` returns) and, when asked, into the
20 turntable frames (what `output_type="pil"` returns): mesh and turntable come from the same shape without
denoising twice.

The full mesh is what downloads (GLB, PLY, OBJ). The browser preview is simplified to at most PREVIEW_MAX_FACES
faces by quadric decimation (`fast_simplification`, the library behind trimesh's `simplify_quadric_decimation`),
because Shap-E's grid of 128 can give a mesh of over a million faces and a WebGL viewer then stalls.

diffusers' Shap-E pipelines have no `callback_on_step_end`; `_Stepped` gets per-step progress and Stop from the
generator their denoising loop iterates over (see there).
"""

from __future__ import annotations

import copy
import io
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import trimesh
from diffusers import ShapEImg2ImgPipeline, ShapEPipeline
from PIL import Image

from studio.backends.image_inputs import open_image, rgb
from studio.contract import InputError, ModelOptions, check_range, check_seed, check_text, pick_seed, require
from studio.registry import ModelSpec
from studio.runtime import Call, Studio

MEDIA_TYPES = {
    "glb": "model/gltf-binary",
    "ply": "application/x-ply",  # PLY has no registered media type; this is the common unregistered name
    "obj": "model/obj",
}
PREVIEW_MAX_FACES = 100_000  # the viewer gets a simplified copy above this; downloads keep every face
MAX_GUIDANCE = 30.0
MAX_PROMPT_CHARS = 2000  # CLIP reads the first 77 tokens; the rest is cut (diffusers warns)
SECONDS_PER_STEP = 0.2  # Shap-E's prior on a ZeroGPU slice, plus about 5 s to decode the mesh
FRAME_STEP = 32  # the renderer casts rays in batches of 4096; 20 views of size**2 rays divide evenly for these
# Shap-E's shapes are z-up; glTF viewers (gr.Model3D) are y-up and look down -z: stand the shape up, facing the
# viewer (the same turn as the Shap-E demo Space applies before exporting GLB).
Y_UP = trimesh.transformations.rotation_matrix(math.pi, [0, 1, 0]) @ trimesh.transformations.rotation_matrix(
    -math.pi / 2, [1, 0, 0])

_simplify_lock = threading.Lock()  # fast_simplification keeps its working mesh in module globals


@dataclass(frozen=True)
class ShapeOptions(ModelOptions):
    """A 3D model's defaults and caps (a catalog entry overrides them)."""

    steps: int = 64
    max_steps: int = 128
    guidance: float = 15.0
    frame_size: int = 64  # turntable frames, in pixels
    max_frame_size: int = 256
    grid_size: int = 128  # marching-cubes grid of the mesh
    render_samples: tuple[int, int] = (64, 128)  # coarse and fine ray samples of the turntable
    input: str = "text"  # what it makes shapes from: "text" (a prompt) or "image"


@dataclass(eq=False)
class ShapEModel:
    """What the cache holds. Decoding writes the latent into the renderer's own MLP weights, so two decodings at
    once would mix shapes: `decode_lock` serialises them. Denoising needs no lock (each run gets its scheduler)."""

    pipe: ShapEPipeline | ShapEImg2ImgPipeline
    decode_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def load_shap_e(spec: ModelSpec, path: Path, device: str, dtype: str) -> ShapEModel:
    pipeline = ShapEImg2ImgPipeline if ShapeOptions.of(spec).input == "image" else ShapEPipeline
    return ShapEModel(pipeline.from_pretrained(path, dtype=getattr(torch, dtype)).to(device))


@dataclass
class ShapeRequest:
    """Unset guidance, steps and frame size take the model's defaults. A text model needs the prompt, an image
    model the image."""

    prompt: str = ""
    guidance: float | None = None
    steps: int | None = None
    frame_size: int | None = None  # turntable frame width and height in pixels
    seed: int | None = None  # None: a random seed, reported in the result
    model: str | None = None  # None: the first 3D model
    turntable: bool = True  # also render the 20 turntable frames (the REST route, which returns a mesh, skips them)
    image: bytes | Image.Image | None = None  # for an image model: a picture of one object (None: the first 3D
    # model that takes images is used when `model` is None)


@dataclass
class ShapeResult:
    mesh: trimesh.Trimesh  # the full mesh, y-up, with RGBA vertex colours
    seed: int
    frames: list = field(default_factory=list)  # PIL images of the turntable; empty unless asked for
    steps: int = 0  # denoising steps done (fewer than asked when stopped)
    stopped: bool = False
    settings: dict = field(default_factory=dict)  # what made the shape: model, prompt, guidance, steps, seed, ...


def validate(studio: Studio, req: ShapeRequest) -> tuple[ModelSpec, dict, Image.Image | None]:
    """The model, the settings with its defaults filled in, and the input image (RGB) of an image model; raises
    InputError naming the first bad field."""
    spec = studio.model(req.model if req.model or req.image is None else _image_model(studio), "3d")
    opts = ShapeOptions.of(spec)
    image = None
    if opts.input == "image":
        require(req.image is not None, "image", f"{spec.id} makes shapes from an image; give one (a picture of one "
                                                "object on a plain background works best)")
        image = rgb(open_image("image", req.image))
        prompt = check_text("prompt", req.prompt or "", max_chars=MAX_PROMPT_CHARS, required=False).strip()
    else:
        require(req.image is None, "image", f"{spec.id} makes shapes from text; for an image pick an image-to-3D "
                                            "model or leave the model empty")
        prompt = check_text("prompt", req.prompt, max_chars=MAX_PROMPT_CHARS).strip()
    guidance = opts.guidance if req.guidance is None else req.guidance
    check_range("guidance", guidance, 0, MAX_GUIDANCE)
    steps = opts.steps if req.steps is None else req.steps
    check_range("steps", steps, 1, opts.max_steps, spec.id, whole=True)
    frame_size = opts.frame_size if req.frame_size is None else req.frame_size
    require(isinstance(frame_size, int) and FRAME_STEP <= frame_size <= opts.max_frame_size
            and frame_size % FRAME_STEP == 0, "frame_size",
            f"must be a multiple of {FRAME_STEP} from {FRAME_STEP} to {opts.max_frame_size} for {spec.id}")
    check_seed(req.seed)
    return spec, {"model": spec.id, "input": opts.input, "prompt": prompt, "guidance": float(guidance),
                  "steps": steps, "frame_size": frame_size, "seed": req.seed}, image


def _image_model(studio: Studio) -> str:
    """The first 3D model that makes shapes from an image."""
    for model_id in studio.models("3d"):
        if ShapeOptions.of(studio.registry.get(model_id)).input == "image":
            return model_id
    raise InputError("image", "this studio has no image-to-3D model; give a prompt instead")


def gpu_seconds(req: ShapeRequest) -> float:
    return (req.steps or ShapeOptions.steps) * SECONDS_PER_STEP + 5


class _Stepped:
    """A Shap-E pipeline with per-step progress and a Stop between steps, for one run.

    The Shap-E pipelines have no `callback_on_step_end`, but their denoising loop is `for i, t in
    enumerate(self.progress_bar(timesteps))`, so `progress_bar` runs between every two steps. Here it reports
    each finished step and, once `cancel` is set, ends the loop (what `_interrupt` does in pipelines that have a
    callback): the pipeline then returns the latents denoised so far. A run shares the loaded model's modules
    and gets its own scheduler (the scheduler keeps per-run state).
    """

    _on_step: Callable[[int, int], None]
    _cancel: threading.Event | None

    @staticmethod
    def run_of(pipe: ShapEPipeline | ShapEImg2ImgPipeline, on_step: Callable[[int, int], None],
               cancel: threading.Event | None) -> Any:
        stepped = _SteppedImg2Img if isinstance(pipe, ShapEImg2ImgPipeline) else _SteppedText
        # A copy, not `from_config`: a new Heun scheduler with Karras sigmas spends a quarter second on its
        # 1024-step training schedule.
        run = stepped(**{**pipe.components, "scheduler": copy.deepcopy(pipe.scheduler)})
        run._on_step, run._cancel, run._interrupt = on_step, cancel, False
        return run

    def progress_bar(self, iterable=None, total=None):
        for done, timestep in enumerate(iterable):
            if self._cancel is not None and self._cancel.is_set():
                self._interrupt = True
                return
            yield timestep
            self._on_step(done + 1, len(iterable))


class _SteppedText(_Stepped, ShapEPipeline):
    pass


class _SteppedImg2Img(_Stepped, ShapEImg2ImgPipeline):
    pass


def generate_shape(studio: Studio, req: ShapeRequest, call: Call) -> ShapeResult:
    """Make a coloured mesh (and turntable frames) from text or an image; when the call is stopped, end after the
    current step and decode the shape denoised so far."""
    spec, settings, image = validate(studio, req)
    opts = ShapeOptions.of(spec)
    seed = settings["seed"] = pick_seed(settings["seed"])
    steps = settings["steps"]
    done = 0

    with studio.generation(spec, call) as (lease, rec):
        rec.set(prompt=settings["prompt"], seed=seed, steps=steps)

        def on_step(evaluations: int, total: int) -> None:
            # Heun's method evaluates the prior twice per step, once for the last: 2 * steps - 1 in all, and step k
            # is complete after evaluation 2k.
            nonlocal done
            done = evaluations * steps // total
            rec.first_output()
            call.report(0.8 * evaluations / total, f"denoising: {done}/{steps} steps")

        model: ShapEModel = lease.model
        run = _Stepped.run_of(model.pipe, on_step, call.cancel)
        latents = run(settings["prompt"] if image is None else image, num_inference_steps=steps,
                      guidance_scale=settings["guidance"], generator=torch.Generator("cpu").manual_seed(seed),
                      output_type="latent").images
        renderer, device = model.pipe.shap_e_renderer, model.pipe.device
        with model.decode_lock:
            call.report(0.8, "extracting the mesh")
            raw = renderer.decode_to_mesh(latents[:1], device, grid_size=opts.grid_size)
            stopped = call.stopped
            frames = []
            if req.turntable and not stopped:  # a Stop during the denoising or the mesh skips the turntable
                call.report(0.9, "rendering the turntable")
                coarse, fine = opts.render_samples
                images = renderer.decode_to_image(latents[:1], device, size=settings["frame_size"],
                                                  n_coarse_samples=coarse, n_fine_samples=fine)
                frames = ShapEPipeline.numpy_to_pil(images.float().cpu().numpy())
        mesh = _to_trimesh(raw)
        rec.set(steps=done, faces=len(mesh.faces), stopped=stopped)
    call.report(1.0, "done")
    return ShapeResult(mesh, seed, frames, done, stopped, settings)


def _to_trimesh(raw: Any) -> trimesh.Trimesh:
    """diffusers' MeshDecoderOutput (vertices, faces, R/G/B channels in 0..1) as a y-up trimesh."""
    colours = torch.stack([raw.vertex_channels[c] for c in "RGB"], dim=1).float().clamp(0, 1).cpu().numpy()
    mesh = trimesh.Trimesh(vertices=raw.verts.float().cpu().numpy(), faces=raw.faces.cpu().numpy(),
                           vertex_colors=np.round(colours * 255).astype(np.uint8), process=False)
    mesh.apply_transform(Y_UP)
    return mesh


def export_mesh(mesh: trimesh.Trimesh, fmt: str) -> bytes:
    """The mesh as a GLB, PLY (binary) or OBJ file, vertex colours included."""
    require(fmt in MEDIA_TYPES, "format", f"must be one of {', '.join(MEDIA_TYPES)}")
    data = mesh.export(file_type=fmt)
    return data.encode() if isinstance(data, str) else data


def preview_mesh(mesh: trimesh.Trimesh, max_faces: int = PREVIEW_MAX_FACES) -> tuple[trimesh.Trimesh, bool]:
    """The mesh for the viewer: itself up to `max_faces` faces, else a quadric-decimated copy (True: simplified).

    Each kept vertex takes the mean colour of the vertices collapsed into it. The decimator can stop above its
    target on a first pass; further passes go on from there while the face count still falls.
    """
    if len(mesh.faces) <= max_faces:
        return mesh, False
    import fast_simplification

    vertices, faces = mesh.vertices, mesh.faces
    colours = mesh.visual.vertex_colors.astype(np.float64)
    with _simplify_lock:
        while len(faces) > max_faces:
            _, _, collapses = fast_simplification.simplify(vertices, faces, target_count=max_faces,
                                                           return_collapses=True)
            new_vertices, new_faces, mapping = fast_simplification.replay_simplification(vertices, faces, collapses)
            if len(new_faces) >= len(faces):
                break
            kept = mapping >= 0  # -1: a vertex left in no face
            sums = np.zeros((len(new_vertices), colours.shape[1]))
            np.add.at(sums, mapping[kept], colours[kept])
            colours = sums / np.maximum(np.bincount(mapping[kept], minlength=len(new_vertices)), 1)[:, None]
            vertices, faces = new_vertices, new_faces
    simple = trimesh.Trimesh(vertices=vertices, faces=faces, vertex_colors=np.round(colours).astype(np.uint8),
                             process=False)
    return simple, True


def turntable_gif(frames: list, seconds: float = 2.0) -> bytes:
    """The turntable frames as an endlessly looping animated GIF, one turn in `seconds`."""
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], loop=0,
                   duration=round(1000 * seconds / len(frames)), disposal=2)
    return buffer.getvalue()
