"""The Image tab: Stable Diffusion with LoRA adapters picked from lora_adapters/ (each with its own weight), a
gallery of this session's results whose settings can be seen and reused, and a Stop button.

Stop sets the session's cancel event; the pipeline's step callback raises diffusers' interrupt flag, so the
current image ends after the running step and is shown partly denoised.
"""

from __future__ import annotations

import tempfile

import gradio as gr
from gradio.data_classes import FileData

from studio.backends.image import (MAX_GUIDANCE, MIN_SIZE, SIZE_STEP, ImageOptions, ImageRequest, ImageResult,
                                   generate_images, png_bytes)
from studio.runtime import Studio
from studio.ui.controls import Runner, parse_seed, seed_box
from studio.ui.loras import LoraPicker

HISTORY = 48  # images kept per session in the gallery


def _model_controls(studio: Studio, model_id: str) -> list[dict]:
    """Steps, guidance, width, height, number of images and negative prompt set to a model's defaults and caps
    (an external model without published caps gets generous sliders; its provider checks the values)."""
    opts = ImageOptions.of(studio.registry.get(model_id))
    size = {"minimum": MIN_SIZE, "maximum": opts.max_size or 2048, "step": SIZE_STEP}
    return [
        gr.update(minimum=1, maximum=opts.max_steps or 100, value=opts.steps or 25),
        gr.update(value=opts.guidance if opts.guidance is not None else 7.5),
        gr.update(**size, value=opts.width or 512),
        gr.update(**size, value=opts.height or 512),
        gr.update(maximum=opts.max_images or 4, value=1),
        gr.update(visible=opts.negative_prompt is not False, value=""),
    ]


def runner(studio: Studio) -> Runner[ImageRequest, ImageResult]:
    return Runner(studio, "image", generate_images)


def _save_png(image, settings: dict) -> str:
    """A PNG file with its settings inside (the "parameters" text chunk), for the gallery and downloads."""
    with tempfile.NamedTemporaryFile(prefix="image-", suffix=".png", delete=False) as fh:
        fh.write(png_bytes(image, settings))
        return fh.name


def _caption(settings: dict) -> str:
    adapters = ", ".join(f"{name}:{w:g}" for name, w in settings["adapters"].items()) or "no adapters"
    return f"seed {settings['seed']} · {settings['steps']} steps · {adapters}"


def build(studio: Studio) -> None:
    models = studio.models("image")
    if not models:
        gr.Markdown("This profile has no image model.")
        return
    first = models[0]
    images = runner(studio)
    steps_u, guidance_u, width_u, height_u, n_u, negative_u = _model_controls(studio, first)
    with gr.Row():
        with gr.Column(scale=2):
            model = gr.Dropdown(models, value=first, label="Model")
            prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a watercolor fox in the snow  <lora:name:0.8>",
                                info="`<lora:name:weight>` in the prompt also picks an adapter.")
            negative = gr.Textbox(label="Negative prompt", lines=1, visible=negative_u["visible"])
            with gr.Row():
                steps = gr.Slider(label="Steps", step=1, minimum=steps_u["minimum"], maximum=steps_u["maximum"],
                                  value=steps_u["value"])
                guidance = gr.Slider(0, MAX_GUIDANCE, step=0.5, label="Guidance scale", value=guidance_u["value"])
            with gr.Row():
                width = gr.Slider(label="Width", **{k: width_u[k] for k in ("minimum", "maximum", "step", "value")})
                height = gr.Slider(label="Height", **{k: height_u[k] for k in ("minimum", "maximum", "step", "value")})
            with gr.Row():
                seed = seed_box("Empty: random. The seed used is shown below the gallery.")
                n = gr.Slider(1, n_u["maximum"], value=1, step=1, label="Number of images")
            loras = LoraPicker(studio)
            with gr.Row():
                go = gr.Button("Generate", variant="primary")
                stop = gr.Button("Stop", variant="stop")
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="This session's images", columns=3, format="png", object_fit="contain",
                                 buttons=["download", "fullscreen"])
            used = gr.Markdown()
            details = gr.JSON(label="Settings of the selected image", open=True)
            reuse = gr.Button("Use these settings")
    history = gr.State([])  # [(png path, settings)], newest request first

    def on_model(model_id: str):
        return _model_controls(studio, model_id)

    def run(form: dict, request: gr.Request, progress=gr.Progress()):
        req = ImageRequest(prompt=form[prompt] or "", negative_prompt=form[negative] or "", model=form[model],
                           steps=int(form[steps]), guidance=float(form[guidance]), width=int(form[width]),
                           height=int(form[height]), seed=parse_seed(form[seed]),
                           n=int(form[n]), adapters=loras.adapters(form))
        result: ImageResult = images.run(req, request.session_hash or "", progress)
        new = []
        for index, image in enumerate(result.images):
            settings = result.image_settings(index)
            new.append((_save_png(image, settings), settings))
        past = (new + form[history])[:HISTORY]
        text = f"Seed used: **{result.seed}**" + (" (images after the first use the next seeds)" if req.n > 1 else "")
        if result.stopped:
            text += f" · **stopped**: {len(result.images)} of {req.n} image(s), the last one partly denoised"
        return [(path, _caption(s)) for path, s in past], text, past, new[0][1] if new else None

    def on_select(past: list, evt: gr.SelectData):
        return past[evt.index][1] if 0 <= evt.index < len(past) else None

    def on_reuse(settings: dict | None):
        if not settings:
            raise gr.Error("Pick an image in the gallery first.")
        steps, guidance, width, height, n, negative = _model_controls(studio, settings["model"])
        return [gr.update(value=settings["model"]), settings["prompt"],
                {**negative, "value": settings["negative_prompt"]}, {**steps, "value": settings["steps"]},
                settings["guidance"], {**width, "value": settings["width"]}, {**height, "value": settings["height"]},
                str(settings["seed"]), n, *loras.restore(settings["adapters"])]

    def stop_generating(request: gr.Request) -> None:
        if not images.stop(request.session_hash or ""):
            gr.Info("Nothing is being generated.")

    model.input(on_model, model, [steps, guidance, width, height, n, negative], api_visibility="private")
    loras.wire()
    # The studio's per-model slots queue generations, so Gradio itself does not limit this event.
    gr.on([go.click, prompt.submit], run,  # a set of inputs: `run` gets one dict, component -> value
          {model, prompt, negative, steps, guidance, width, height, seed, n, history, *loras.inputs},
          [gallery, used, history, details], api_visibility="private", concurrency_limit=None)
    stop.click(stop_generating, None, None, queue=False, api_visibility="private")
    gallery.select(on_select, history, details, api_visibility="private")
    reuse.click(on_reuse, details, [model, prompt, negative, steps, guidance, width, height, seed, n, *loras.outputs],
                api_visibility="private")

    def generate_image(prompt: str, negative_prompt: str = "", model: str = first, steps: int | None = None,
                       guidance: float | None = None, width: int | None = None, height: int | None = None,
                       seed: int | None = None, adapters: dict[str, float] | None = None) -> FileData:
        """Draw an image with Stable Diffusion, optionally with LoRA adapters, and return it as a PNG file.

        Args:
            prompt: what to draw; `<lora:name:weight>` tags in it also pick adapters.
            negative_prompt: what to avoid; only for models with guidance (not SD-Turbo), else leave empty.
            model: the image model id: {models}.
            steps: denoising steps, 1 to the model's cap; empty for the model's default.
            guidance: classifier-free guidance scale, 0 to 30; empty for the model's default (SD-Turbo uses 0).
            width: image width, a multiple of 8 up to the model's cap; empty for the model's default.
            height: image height, a multiple of 8 up to the model's cap; empty for the model's default.
            seed: 0 to 4294967295 to repeat an image; empty for random (the PNG's "parameters" text has the seed).
            adapters: LoRA adapter name to weight (-2 to 2); names as listed by GET /loras.
        """
        req = ImageRequest(prompt=prompt, negative_prompt=negative_prompt or "", model=model, steps=steps,
                           guidance=guidance, width=width, height=height, seed=seed, adapters=adapters or {})
        result = images.run(req, entry="generate_image")
        return FileData(path=_save_png(result.images[0], result.image_settings(0)), mime_type="image/png")

    generate_image.__doc__ = generate_image.__doc__.format(models=", ".join(models))
    gr.api(generate_image, api_name="generate_image", concurrency_limit=None)
