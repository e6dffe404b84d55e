"""The Video tab: text to video with AnimateDiff (and your SD 1.5 LoRA adapters) or Wan 2.1, an H.264 MP4 in the
player with its download (GIF and WebP on request), this session's clips as a list whose settings can be seen and
reused, and a Stop button.

Stop sets the session's cancel event; the generation ends after the running denoising step and keeps nothing, so
no half-made clip is shown or written.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr
from gradio.data_classes import FileData

from studio.backends.video import (FORMATS, MAX_FPS, MAX_GUIDANCE, MIN_SIZE, SHAPES, VideoOptions, VideoRequest,
                                   VideoResult, generate_video)
from studio.runtime import Studio
from studio.ui.controls import output_folder
from studio.ui.controls import Runner, new_request_id, parse_seed, seed_box, traced, wire_generation
from studio.ui.loras import LoraPicker

HISTORY = 24  # clips kept per session in the list
EXTRA_FORMATS = {"GIF": "gif", "WebP": "webp"}  # besides the MP4 the player shows


def _model_controls(studio: Studio, model_id: str) -> list[dict]:
    """Frames, fps, width, height, steps, guidance, the negative prompt and the LoRA picker set to a model's
    defaults and caps (sliders step by what its architecture allows: Wan's frames go 1, 5, 9, ...)."""
    opts = VideoOptions.of(studio.registry.get(model_id))
    shape = SHAPES[opts.family]
    smallest = -(-MIN_SIZE // shape.size_multiple) * shape.size_multiple
    size = {"minimum": smallest, "maximum": opts.max_size, "step": shape.size_multiple}
    return [
        gr.update(minimum=1, maximum=opts.max_frames, step=shape.frames_step, value=opts.frames),
        gr.update(value=opts.fps),
        gr.update(**size, value=opts.width),
        gr.update(**size, value=opts.height),
        gr.update(maximum=opts.max_steps, value=opts.steps),
        gr.update(value=opts.guidance),
        gr.update(visible=bool(opts.negative_prompt), value=""),
        gr.update(visible=bool(opts.loras)),
    ]


def runner(studio: Studio) -> Runner[VideoRequest, VideoResult]:
    return Runner(studio, "video", generate_video)


def save_clip(result: VideoResult) -> dict:
    """The clip's files in a fresh folder: {"mp4": path, ..., "thumbnail": path}."""
    folder = output_folder("video")
    paths = {}
    for fmt, data in result.files.items():
        paths[fmt] = str(folder / f"video-{result.seed}.{fmt}")
        Path(paths[fmt]).write_bytes(data)
    paths["thumbnail"] = str(folder / f"video-{result.seed}.png")
    Path(paths["thumbnail"]).write_bytes(result.thumbnail)
    return paths


def _caption(settings: dict) -> str:
    adapters = ", ".join(f"{name}:{w:g}" for name, w in settings["adapters"].items())
    return (f"seed {settings['seed']} · {settings['frames']} frames at {settings['fps']:g} fps"
            + (f" · {adapters}" if adapters else ""))


def _shown(clip: dict) -> tuple[str, list[str], dict]:
    """The player's MP4, the downloads and the settings of one clip of the list."""
    paths = clip["paths"]
    return paths["mp4"], [path for key, path in paths.items() if key != "thumbnail"], clip["settings"]


def build(studio: Studio) -> None:
    models = studio.models("video")
    if not models:
        gr.Markdown("This profile has no video model.")
        return
    first = models[0]
    videos = runner(studio)
    frames_u, fps_u, width_u, height_u, steps_u, guidance_u, negative_u, loras_u = _model_controls(studio, first)
    slider_args = ("minimum", "maximum", "step", "value")
    with gr.Row():
        with gr.Column(scale=2):
            model = gr.Dropdown(models, value=first, label="Model")
            prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a fox running through snow  <lora:name:0.8>",
                                info="`<lora:name:weight>` in the prompt also picks an adapter (AnimateDiff).")
            negative = gr.Textbox(label="Negative prompt", lines=1, visible=negative_u["visible"])
            with gr.Row():
                frames = gr.Slider(label="Frames", **{k: frames_u[k] for k in slider_args})
                fps = gr.Slider(1, MAX_FPS, step=1, label="Frames per second", value=fps_u["value"])
            with gr.Row():
                width = gr.Slider(label="Width", **{k: width_u[k] for k in slider_args})
                height = gr.Slider(label="Height", **{k: height_u[k] for k in slider_args})
            with gr.Row():
                steps = gr.Slider(1, steps_u["maximum"], step=1, label="Steps", value=steps_u["value"])
                guidance = gr.Slider(0, MAX_GUIDANCE, step=0.5, label="Guidance scale", value=guidance_u["value"])
            with gr.Row():
                seed = seed_box("Empty: random. The seed used is shown with the clip.")
                extra = gr.CheckboxGroup(list(EXTRA_FORMATS), label="Also download as",
                                         info="The player shows the MP4 (H.264).")
            loras = LoraPicker(studio, visible=loras_u["visible"])
            with gr.Row():
                go = gr.Button("Generate", variant="primary")
                stop = gr.Button("Stop", variant="stop", interactive=False)
        with gr.Column(scale=3):
            player = gr.Video(label="Video", autoplay=True, loop=True, buttons=["download"], interactive=False,
                              elem_id="video-player")
            status = gr.Markdown()
            downloads = gr.File(label="Downloads", file_count="multiple", interactive=False)
            clips = gr.Gallery(label="This session's clips", columns=4, height=220, allow_preview=False,
                               object_fit="contain")
            details = gr.JSON(label="Settings of the selected clip", open=True)
            reuse = gr.Button("Use these settings")
    history = gr.State([])  # [{"paths": {...}, "settings": {...}}], newest first

    def on_model(model_id: str):
        return _model_controls(studio, model_id)

    def run(form: dict, request: gr.Request, progress=gr.Progress()):
        formats = ("mp4", *(EXTRA_FORMATS[name] for name in form[extra] or ()))
        req = VideoRequest(prompt=form[prompt] or "", negative_prompt=form[negative] or "", model=form[model],
                           frames=int(form[frames]), fps=float(form[fps]), width=int(form[width]),
                           height=int(form[height]), steps=int(form[steps]), guidance=float(form[guidance]),
                           seed=parse_seed(form[seed]), adapters=loras.adapters(form), formats=formats)
        request_id = new_request_id()
        result = videos.run(req, request.session_hash or "", progress, request_id=request_id)
        past = form[history]
        if result.stopped:
            text = traced("**Stopped**: the clip was not finished and nothing was kept.", request_id)
            return gr.update(), text, gr.update(), gr.update(), past, gr.update()
        clip = {"paths": save_clip(result), "settings": result.settings}
        past = [clip, *past][:HISTORY]
        settings = result.settings
        text = traced(f"Seed used: **{result.seed}** · {settings['frames']} frames · "
                      f"{settings['frames'] / settings['fps']:g} s at {settings['fps']:g} fps", request_id)
        mp4, files, _ = _shown(clip)
        gallery = [(c["paths"]["thumbnail"], _caption(c["settings"])) for c in past]
        return mp4, text, files, gallery, past, settings

    def on_select(past: list, evt: gr.SelectData):
        if not 0 <= evt.index < len(past):
            return gr.update(), gr.update(), None
        return _shown(past[evt.index])

    def on_reuse(settings: dict | None):
        if not settings:
            raise gr.Error("Pick a clip in the list first.")
        controls = _model_controls(studio, settings["model"])
        values = [settings[name] for name in ("frames", "fps", "width", "height", "steps", "guidance")]
        updated = [{**update, "value": value} for update, value in zip(controls, values)]
        negative_update = {**controls[6], "value": settings["negative_prompt"]}
        return [gr.update(value=settings["model"]), settings["prompt"], negative_update, *updated, controls[7],
                str(settings["seed"]), *loras.restore(settings["adapters"])]

    def stop_generating(request: gr.Request) -> None:
        if not videos.stop(request.session_hash or ""):
            gr.Info("Nothing is being generated.")

    model.input(on_model, model, [frames, fps, width, height, steps, guidance, negative, loras.box],
                api_visibility="private")
    loras.wire()
    # The studio's per-model slots queue generations, so Gradio itself does not limit this event.
    wire_generation([go.click, prompt.submit], run,  # a set of inputs: `run` gets one dict, component -> value
                    {model, prompt, negative, frames, fps, width, height, steps, guidance, seed, extra, history,
                     *loras.inputs},
                    [player, status, downloads, clips, history, details], status=status, go=go, stop=stop,
                    concurrency_limit=None)
    stop.click(stop_generating, None, None, queue=False, api_visibility="private")
    clips.select(on_select, history, [player, downloads, details], api_visibility="private")
    reuse.click(on_reuse, details, [model, prompt, negative, frames, fps, width, height, steps, guidance, loras.box,
                                    seed, *loras.outputs], api_visibility="private")

    # Named as its MCP tool, which Gradio names after the function (inside build() it hides the service's name).
    def generate_video(prompt: str, negative_prompt: str = "", model: str = first, frames: int | None = None,
                       fps: float | None = None, width: int | None = None, height: int | None = None,
                       steps: int | None = None, guidance: float | None = None, seed: int | None = None,
                       adapters: dict[str, float] | None = None, format: str = "mp4") -> FileData:
        """Make a short video clip from text and return it as a file (H.264 MP4 unless `format` says otherwise).

        Args:
            prompt: what the clip shows; `<lora:name:weight>` tags in it also pick adapters (AnimateDiff models).
            negative_prompt: what to avoid; empty for none.
            model: the video model id: {models}.
            frames: number of frames, up to the model's cap (Wan: 1, 5, 9, ... frames); empty for the default.
            fps: frames per second of the clip, 1 to 60; empty for the model's default (8 AnimateDiff, 16 Wan).
            width: a multiple of 8 (Wan: 16) up to the model's cap; empty for the model's default.
            height: a multiple of 8 (Wan: 16) up to the model's cap; empty for the model's default.
            steps: denoising steps, 1 to the model's cap; empty for the model's default.
            guidance: classifier-free guidance scale, 0 to 30; empty for the model's default.
            seed: 0 to 4294967295 to repeat a clip; empty for random.
            adapters: LoRA adapter name to weight (-2 to 2), AnimateDiff only; names as listed by GET /loras.
            format: "mp4" (H.264), "gif" or "webp" (animated).
        """
        req = VideoRequest(prompt=prompt, negative_prompt=negative_prompt or "", model=model, frames=frames, fps=fps,
                           width=width, height=height, steps=steps, guidance=guidance, seed=seed,
                           adapters=adapters or {}, formats=(format,))
        result = videos.run(req, entry="generate_video")
        path = save_clip(result)[format]
        return FileData(path=path, mime_type=FORMATS[format].media_type)

    generate_video.__doc__ = generate_video.__doc__.format(models=", ".join(models))
    gr.api(generate_video, api_name="generate_video", concurrency_limit=None)
