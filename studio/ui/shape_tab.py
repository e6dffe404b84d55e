"""The 3D tab: text to a coloured mesh with Shap-E, shown in a viewer that rotates and zooms, with its turntable as a
second view and the full mesh to download as GLB, PLY and OBJ.

A mesh above `PREVIEW_MAX_FACES` faces is simplified for the viewer only (the status line says so). Stop sets the
session's cancel event; the pipeline ends after the running step and the shape denoised so far is shown.
"""

from __future__ import annotations

import time
from pathlib import Path

import gradio as gr
from gradio.data_classes import FileData
from PIL import Image

from studio.backends.shape import (FRAME_STEP, MAX_GUIDANCE, MEDIA_TYPES, PREVIEW_MAX_FACES, ShapeOptions,
                                   ShapeRequest, ShapeResult, export_mesh, generate_shape, preview_mesh, turntable_gif)
from studio.contract import SEED_RANGE
from studio.runtime import Studio
from studio.ui.controls import output_folder
from studio.ui import controls
from studio.ui.controls import Runner, model_picker, new_request_id, parse_seed, seed_box, wire_generation

FROM_IMAGE = "3d-image"  # the hand-off name the Image tab's "Make 3D" sends its image under
TURNTABLE_PX = 256  # the turntable is shown this size, whatever size its frames were rendered at


def _model_controls(studio: Studio, model_id: str) -> list[dict]:
    """Guidance, steps and frame size set to a model's defaults and caps."""
    opts = ShapeOptions.of(studio.registry.get(model_id))
    return [
        gr.update(value=opts.guidance),
        gr.update(minimum=1, maximum=opts.max_steps, value=opts.steps),
        gr.update(minimum=FRAME_STEP, maximum=opts.max_frame_size, value=opts.frame_size),
    ]


def _input_models(studio: Studio) -> dict[str, list[str]]:
    """The 3D models by what they make shapes from: {"text": [...], "image": [...]}."""
    found: dict[str, list[str]] = {"text": [], "image": []}
    for model_id in studio.models("3d"):
        found[ShapeOptions.of(studio.registry.get(model_id)).input].append(model_id)
    return found


def runner(studio: Studio) -> Runner[ShapeRequest, ShapeResult]:
    return Runner(studio, "3d", generate_shape)


def make_shape(shapes: Runner, req: ShapeRequest, *, session: str, progress=None,
               max_faces: int = PREVIEW_MAX_FACES) -> tuple[str, str | None, list[str], str]:
    """Generate, then write the viewer's GLB, the turntable GIF and the three downloads into a fresh folder.

    Returns (preview GLB path, GIF path or None, [GLB, PLY, OBJ paths], status text)."""
    started = time.monotonic()
    request_id = new_request_id()
    result = shapes.run(req, session, progress, request_id=request_id)
    folder = output_folder("3d")
    downloads = []
    for fmt in MEDIA_TYPES:
        path = folder / f"shape-{result.seed}.{fmt}"
        path.write_bytes(export_mesh(result.mesh, fmt))
        downloads.append(str(path))
    preview, simplified = preview_mesh(result.mesh, max_faces)
    preview_path = downloads[0]
    if simplified:
        preview_path = str(folder / f"preview-{result.seed}.glb")
        Path(preview_path).write_bytes(export_mesh(preview, "glb"))
    gif_path = None
    if result.frames:
        gif_path = str(folder / f"turntable-{result.seed}.gif")
        shown = [frame if frame.width >= TURNTABLE_PX else frame.resize((TURNTABLE_PX, TURNTABLE_PX), Image.LANCZOS)
                 for frame in result.frames]
        Path(gif_path).write_bytes(turntable_gif(shown))
    faces = len(result.mesh.faces)
    text = (f"Seed used: **{result.seed}** · {faces:,} faces · {result.steps} steps · "
            f"{time.monotonic() - started:.1f} s · request `{request_id}`")
    if simplified:
        text += (f"\n\nThe preview is **simplified** to {len(preview.faces):,} of {faces:,} faces "
                 f"(cap {max_faces:,}); the downloads keep the full mesh.")
    if result.stopped:
        text += (f"\n\n**Stopped** after {result.steps} of {result.settings['steps']} steps: the shape is only "
                 "partly denoised.")
    return preview_path, gif_path, downloads, text


def build(studio: Studio) -> None:
    models = studio.models("3d")
    if not models:
        gr.Markdown("This profile has no 3D model.")
        return
    first = models[0]
    shapes = runner(studio)
    by_input = _input_models(studio)
    guidance_u, steps_u, frame_u = _model_controls(studio, first)
    with gr.Row():
        with gr.Column(scale=2):
            model = model_picker(studio, "3d", visible=len(models) > 1)
            prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a red wooden chair")
            image = gr.Image(label="Or an image of one object (an image-to-3D model makes the shape)", type="pil",
                             sources=["upload", "clipboard"], height=200, visible=bool(by_input["image"]),
                             elem_id="shape-image")
            with gr.Row():
                guidance = gr.Slider(0, MAX_GUIDANCE, step=0.5, value=guidance_u["value"], label="Guidance scale")
                steps = gr.Slider(label="Steps", step=1, minimum=1, maximum=steps_u["maximum"], value=steps_u["value"])
            with gr.Row():
                frame_size = gr.Slider(label="Turntable frame size (px)", step=FRAME_STEP, minimum=FRAME_STEP,
                                       maximum=frame_u["maximum"], value=frame_u["value"])
                seed = seed_box(f"0 to {SEED_RANGE - 1}. Empty: random; the seed used is shown with the result.")
            turntable = gr.Checkbox(True, label="Render the turntable (20 frames; slow without a GPU)")
            with gr.Row():
                go = gr.Button("Generate", variant="primary")
                stop = gr.Button("Stop", variant="stop", interactive=False)
        with gr.Column(scale=3):
            viewer = gr.Model3D(label="Preview: drag to rotate, scroll to zoom", clear_color=(0.95, 0.95, 0.95, 1.0),
                                elem_id="shape-viewer")
            status = gr.Markdown()
            with gr.Row():
                spin = gr.Image(label="Turntable", type="filepath", interactive=False, height=TURNTABLE_PX,
                                buttons=[])  # the downloads beside it are the files to keep
                files = gr.File(label="Downloads (full mesh): GLB, PLY, OBJ", file_count="multiple",
                                interactive=False)

    def on_model(model_id: str):
        return _model_controls(studio, model_id)

    def on_image(picture, model_id: str):
        """An image picks an image-to-3D model, removing it a text one (when the current model does not fit)."""
        wanted = "image" if picture is not None else "text"
        if model_id in by_input[wanted] or not by_input[wanted]:
            return [gr.update(), *(gr.update() for _ in range(3))]
        return [gr.update(value=by_input[wanted][0]), *_model_controls(studio, by_input[wanted][0])]

    def run(model_id: str, prompt_text: str, picture, guidance_value: float, steps_value: float,
            frame_value: float, seed_text: str, turntable_on: bool, request: gr.Request, progress=gr.Progress()):
        req = ShapeRequest(prompt=prompt_text or "", model=model_id, guidance=float(guidance_value),
                           steps=int(steps_value), frame_size=int(frame_value), seed=parse_seed(seed_text),
                           turntable=turntable_on, image=picture)
        return make_shape(shapes, req, session=request.session_hash or "", progress=progress)

    def stop_generating(request: gr.Request) -> None:
        if not shapes.stop(request.session_hash or ""):
            gr.Info("Nothing is being generated.")

    model.input(on_model, model, [guidance, steps, frame_size], api_visibility="private")
    image.change(on_image, [image, model], [model, guidance, steps, frame_size], api_visibility="private")
    controls.accept(FROM_IMAGE, image)
    # The studio's per-model slots queue generations, so Gradio itself does not limit this event.
    wire_generation([go.click, prompt.submit], run, [model, prompt, image, guidance, steps, frame_size, seed, turntable],
                    [viewer, spin, files, status], status=status, go=go, stop=stop, concurrency_limit=None)
    stop.click(stop_generating, None, None, queue=False, api_visibility="private")

    def generate_3d(prompt: str, guidance: float | None = None, steps: int | None = None,
                    seed: int | None = None, model: str | None = None, image: FileData | None = None) -> FileData:
        """Make a 3D shape from text or an image with Shap-E and return it as a GLB mesh with vertex colours.

        Args:
            prompt: the object to make, e.g. "a red wooden chair" (text models); empty with an image.
            guidance: classifier-free guidance scale, 0 to 30; empty for the model's default (15 for Shap-E).
            steps: denoising steps, 1 to the model's cap; empty for the model's default (64 for Shap-E).
            seed: 0 to 4294967295 to repeat a shape; empty for random.
            model: the 3D model id: {models}; empty for the first that takes the input given.
            image: a picture of one object, for an image-to-3D model.
        """
        picture = None
        if image is not None:
            with open(image.get("path") if isinstance(image, dict) else image.path, "rb") as fh:
                picture = fh.read()
        req = ShapeRequest(prompt=prompt, guidance=guidance, steps=steps, seed=seed, model=model, turntable=False,
                           image=picture)
        result = shapes.run(req, entry="generate_3d")
        path = output_folder("3d") / f"shape-{result.seed}.glb"
        path.write_bytes(export_mesh(result.mesh, "glb"))
        return FileData(path=str(path), mime_type=MEDIA_TYPES["glb"])

    generate_3d.__doc__ = generate_3d.__doc__.format(models=", ".join(models))
    gr.api(generate_3d, api_name="generate_3d", concurrency_limit=None)
