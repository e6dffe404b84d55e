"""The Image tab: text to image, image to image, inpainting (paint the mask in the editor) and upscaling, a sampler,
LoRA adapters picked from their cards (each with its own weight), a gallery of this session's results whose images
can be edited, upscaled, turned into 3D or used as an adapter's preview, and whose settings (or those of a dropped
PNG, the studio's or AUTOMATIC1111's) can be restored.

Stop sets the session's cancel event; the pipeline's step callback raises diffusers' interrupt flag, so the
current image ends after the running step and is shown partly denoised.
"""

from __future__ import annotations


import gradio as gr
from gradio.data_classes import FileData
from PIL import Image

from studio.backends.image import (MAX_GUIDANCE, MAX_SCALE, ImageOptions, ImageRequest, ImageResult, family_label,
                                   generate_images, list_loras)
from studio.backends.image_inputs import MAX_MASK_BLUR, MIN_SIZE, SIZE_STEP
from studio.backends.image_png import png_bytes, read_settings
from studio.backends.lora import MAX_WEIGHT, save_card
from studio.backends.shape import ShapeOptions
from studio.runtime import Studio
from studio.ui.controls import output_folder
from studio.ui import controls, lora_cards
from studio.ui.controls import (Runner, new_request_id, parse_seed, seed_box, shown_to_user, traced,
                                wire_generation)
from studio.ui.loras import SLOTS, sliders

HISTORY = 48  # images kept per session in the gallery
MODE_LABELS = {"txt2img": "Text to image", "img2img": "Image to image", "inpaint": "Inpaint", "upscale": "Upscale"}
TO_3D = "3d-image"  # the 3D tab's image input (studio/ui/shape_tab.py accepts it under this name)


def _options(studio: Studio, model_id: str) -> ImageOptions:
    return ImageOptions.of(studio.registry.get(model_id))


def _model_controls(studio: Studio, model_id: str) -> list[dict]:
    """Steps, guidance, width, height, number of images, negative prompt, modes and sampler set to a model's
    defaults and caps (an external model without published caps gets generous sliders; its provider checks)."""
    opts = _options(studio, model_id)
    cap = opts.max_size or 2048
    # The slider sets a typed value past its cap to the cap: say the cap where the value is typed.
    size = {"minimum": MIN_SIZE, "maximum": cap, "step": SIZE_STEP,
            "info": f"{MIN_SIZE} to {cap:,} px for this model (a larger value is set to {cap:,})"}
    modes = opts.modes or ("txt2img",)
    samplers = list(opts.samplers or ())
    return [
        gr.update(minimum=1, maximum=opts.max_steps or 100, value=opts.steps or 25),
        gr.update(value=opts.guidance if opts.guidance is not None else 7.5),
        gr.update(**size, value=opts.width or 512),
        gr.update(**size, value=opts.height or 512),
        gr.update(maximum=opts.max_images or 4, value=1),
        gr.update(visible=opts.negative_prompt is not False, value=""),
        gr.update(choices=[(MODE_LABELS[m], m) for m in modes], value="txt2img"),
        gr.update(choices=samplers, value=opts.sampler if opts.sampler in samplers else None,
                  visible=bool(samplers)),
    ]


def _mode_controls(studio: Studio, model_id: str, mode: str) -> list[dict]:
    """The editor, strength, mask blur, scale and size controls a mode uses, shown; the rest hidden."""
    opts = _options(studio, model_id)
    strength = opts.upscale_strength if mode == "upscale" else opts.strength
    label = {"inpaint": "Input image: paint the area to redraw (white brush)",
             "upscale": "Input image: upscaled, then redrawn lightly for detail"}.get(mode, "Input image")
    return [gr.update(visible=mode != "txt2img", label=label),
            gr.update(visible=mode != "txt2img", value=strength if strength is not None else 0.75),
            gr.update(visible=mode == "inpaint"), gr.update(visible=mode == "upscale"),
            gr.update(visible=mode == "txt2img"), gr.update(visible=mode == "txt2img")]


def runner(studio: Studio) -> Runner[ImageRequest, ImageResult]:
    return Runner(studio, "image", generate_images)


def _adapters(studio: Studio, model_id: str, refresh: bool = False) -> tuple[list[tuple[str, str]], str, str]:
    """The picker's choices for the model, the cards, and a note on the adapter folders."""
    infos = list_loras(studio, refresh)
    spec = studio.registry.get(model_id)
    base = _options(studio, model_id).lora
    note = "" if infos else ("No adapters found: drop `.safetensors` LoRA files into `lora_adapters/` (or "
                             "`--lora-dir`) and press Refresh.")
    return (lora_cards.choices(infos, base), lora_cards.cards_html(infos, base, spec.id, family_label(spec)), note)


def _card_names(studio: Studio) -> list[str]:
    """Every usable adapter, whatever the model: any card can be edited."""
    return [info.name for info in list_loras(studio) if not info.error]


def _save_png(image, settings: dict) -> str:
    """A PNG file with its settings inside (the "parameters" text chunk), for the gallery and downloads."""
    path = output_folder("image") / f"image-{settings.get('seed', '')}.png"
    path.write_bytes(png_bytes(image, settings))
    return str(path)


def _caption(settings: dict) -> str:
    adapters = ", ".join(f"{name}:{w:g}" for name, w in settings["adapters"].items()) or "no adapters"
    sampler = f" · {settings['sampler']}" if settings.get("sampler") else ""
    return (f"seed {settings['seed']} · {settings['steps']} steps · {adapters} · "
            f"{MODE_LABELS.get(settings.get('mode'), '')}{sampler}")


def editor_inputs(value: dict | None, mode: str) -> tuple[Image.Image | None, Image.Image | None]:
    """The input image and, for inpainting, the mask (white where any layer is painted) of the editor's value."""
    if mode == "txt2img":
        return None, None
    background = (value or {}).get("background")
    if background is None:
        raise gr.Error("image: put an image in the editor (upload one, or pick one in the gallery and press Edit)",
                       print_exception=False)
    if mode != "inpaint":
        return background, None
    mask = Image.new("L", background.size, 0)
    for layer in (value or {}).get("layers") or []:
        if layer is not None and "A" in layer.getbands():
            painted = layer.getchannel("A").point(lambda a: 255 if a > 0 else 0)
            mask.paste(255, (0, 0), painted.resize(background.size, Image.NEAREST))
    return background, mask


def build(studio: Studio) -> None:
    models = studio.models("image")
    if not models:
        gr.Markdown("This profile has no image model.")
        return
    first = models[0]
    images = runner(studio)
    steps_u, guidance_u, width_u, height_u, n_u, negative_u, mode_u, sampler_u = _model_controls(studio, first)
    lora_choices, cards, note = _adapters(studio, first)
    image_to_3d = any(ShapeOptions.of(studio.registry.get(m)).input == "image" for m in studio.models("3d"))
    with gr.Row():
        with gr.Column(scale=2):
            model = gr.Dropdown(models, value=first, label="Model")
            mode = gr.Radio(mode_u["choices"], value="txt2img", label="Mode")
            editor = gr.ImageEditor(label="Input image", type="pil", visible=False, format="png",
                                    sources=("upload", "clipboard"), layers=False, transforms=(),
                                    brush=gr.Brush(colors=["#ffffff"], default_color="#ffffff", color_mode="fixed",
                                                   default_size=24), elem_id="image-editor")
            with gr.Row():
                strength = gr.Slider(0.05, 1.0, value=0.75, step=0.05, label="Strength", visible=False,
                                     info="How much of the input is redrawn: low keeps it, 1 redraws it all.")
                mask_blur = gr.Slider(0, MAX_MASK_BLUR, value=4, step=1, label="Mask blur (px)", visible=False)
                scale = gr.Slider(1.25, MAX_SCALE, value=2, step=0.25, label="Upscale by", visible=False)
            prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a watercolor fox in the snow  <lora:name:0.8>",
                                info="`<lora:name:weight>` in the prompt also picks an adapter.")
            negative = gr.Textbox(label="Negative prompt", lines=1, visible=negative_u["visible"])
            with gr.Row():
                sampler = gr.Dropdown(sampler_u["choices"], value=sampler_u["value"], label="Sampler",
                                      visible=sampler_u["visible"])
                steps = gr.Slider(label="Steps", step=1, minimum=steps_u["minimum"], maximum=steps_u["maximum"],
                                  value=steps_u["value"])
                guidance = gr.Slider(0, MAX_GUIDANCE, step=0.5, label="Guidance scale", value=guidance_u["value"])
            with gr.Row():
                width = gr.Slider(label="Width", **{k: width_u[k] for k in ("minimum", "maximum", "step", "value",
                                                                          "info")})
                height = gr.Slider(label="Height", **{k: height_u[k] for k in ("minimum", "maximum", "step", "value",
                                                                            "info")})
            with gr.Row():
                seed = seed_box("Empty: random. The seed used is shown below the gallery.")
                n = gr.Slider(1, n_u["maximum"], value=1, step=1, label="Number of images")
            with gr.Accordion("LoRA adapters", open=True):
                with gr.Row():
                    picked = gr.Dropdown(lora_choices, value=[], multiselect=True, max_choices=SLOTS, scale=4,
                                         label="Adapters", info=f"Up to {SLOTS}, those made for this model's family; "
                                                                "switching never reloads the model.")
                    refresh = gr.Button("Refresh", scale=1)
                with gr.Row():
                    triggers = gr.Markdown()
                    add_triggers = gr.Button("Add trigger words to the prompt", visible=False, size="sm")
                weights = [gr.Slider(-MAX_WEIGHT, MAX_WEIGHT, value=1.0, step=0.05, visible=False)
                           for _ in range(SLOTS)]
                card_view = gr.HTML(cards, elem_id="lora-cards")
                lora_note = gr.Markdown(note)
                with gr.Accordion("Edit an adapter's card", open=False):
                    card_name = gr.Dropdown(_card_names(studio), label="Card to edit")
                    with gr.Row():
                        card_weight = gr.Slider(-MAX_WEIGHT, MAX_WEIGHT, value=1.0, step=0.05,
                                                label="Preferred weight")
                        card_words = gr.Textbox(label="Trigger words", info="Comma-separated.")
                    card_text = gr.Textbox(label="Note", lines=2)
                    with gr.Row():
                        save_card_btn = gr.Button("Save card", size="sm")
                        set_preview = gr.Button("Use the selected gallery image as its preview", size="sm")
        with gr.Column(scale=3):  # Generate heads the results: on a phone (one column) the image lands under it
            with gr.Row():
                go = gr.Button("Generate", variant="primary")
                stop = gr.Button("Stop", variant="stop", interactive=False)
            gallery = gr.Gallery(label="This session's images", columns=3, format="png", object_fit="contain",
                                 buttons=["download", "fullscreen"])
            used = gr.Markdown()
            with gr.Row():
                edit = gr.Button("Edit", size="sm")
                upscale = gr.Button("Upscale", size="sm")
                make_3d = gr.Button("Make 3D", size="sm", visible=image_to_3d)
                reuse = gr.Button("Use these settings", size="sm")
            details = gr.JSON(label="Settings of the selected image", open=True)
            dropped = gr.File(label="Drop a PNG (the studio's or AUTOMATIC1111's) to restore its settings",
                              file_types=[".png"], type="filepath", height=90)
    history = gr.State([])  # [(png path, settings)], newest request first
    selected = gr.State(None)  # the index in `history` of the gallery's selected image
    shown = gr.State([])  # adapter names the sliders show, in slot order
    restored = [model, mode, prompt, negative, sampler, steps, guidance, width, height, seed, n, strength, mask_blur,
                scale, picked, shown, *weights]

    def on_model(model_id: str):
        choices, html, _ = _adapters(studio, model_id)
        return [*_model_controls(studio, model_id), *_mode_controls(studio, model_id, "txt2img"),
                gr.update(choices=choices, value=[]), [], *sliders([], {}), html]

    def on_mode(model_id: str, new_mode: str):
        return _mode_controls(studio, model_id, new_mode)

    def on_pick(new: list[str], old: list[str], prompt_text: str, *values: float):
        infos = list_loras(studio)
        kept = dict(zip(old, values, strict=False))
        weights_now = {name: kept.get(name, lora_cards.preferred_weight(name, infos)) for name in new}
        return [new, *sliders(new, weights_now), *_trigger_hint(prompt_text, new)]

    def _trigger_hint(prompt_text: str, names: list[str]):
        missing = lora_cards.missing_triggers(prompt_text, names, list_loras(studio))
        text = f"Trigger words: `{', '.join(missing)}`" if missing else ""
        return gr.update(value=text), gr.update(visible=bool(missing))

    def on_add_triggers(prompt_text: str, names: list[str]):
        missing = lora_cards.missing_triggers(prompt_text, names, list_loras(studio))
        return lora_cards.with_triggers(prompt_text, missing), *_trigger_hint(
            lora_cards.with_triggers(prompt_text, missing), names)

    def on_refresh(model_id: str, current: list[str]):
        choices, html, text = _adapters(studio, model_id, refresh=True)
        usable = [name for _, name in choices]
        return (gr.update(choices=choices, value=[n for n in current if n in usable]), html, text,
                gr.update(choices=_card_names(studio)))

    def run(form: dict, request: gr.Request, progress=gr.Progress()):
        values = [form[slider] for slider in weights]
        adapters = {name: float(w) for name, w in zip(form[shown], values, strict=False)}  # SLOTS sliders
        chosen = form[mode]
        image, mask = editor_inputs(form[editor], chosen)
        edits = chosen != "txt2img"
        req = ImageRequest(prompt=form[prompt] or "", negative_prompt=form[negative] or "", model=form[model],
                           mode=chosen, image=image, mask=mask, sampler=form[sampler] or None,
                           strength=float(form[strength]) if edits else None,
                           mask_blur=int(form[mask_blur]) if chosen == "inpaint" else None,
                           scale=float(form[scale]) if chosen == "upscale" else None,
                           steps=int(form[steps]), guidance=float(form[guidance]),
                           width=None if edits else int(form[width]), height=None if edits else int(form[height]),
                           seed=parse_seed(form[seed]), n=int(form[n]), adapters=adapters)
        request_id = new_request_id()
        result: ImageResult = images.run(req, request.session_hash or "", progress, request_id=request_id)
        new = []
        for index, out in enumerate(result.images):
            settings = result.image_settings(index)
            new.append((_save_png(out, settings), settings))
        past = (new + form[history])[:HISTORY]
        text = f"Seed used: **{result.seed}**" + (" (images after the first use the next seeds)" if req.n > 1 else "")
        if result.stopped:
            text += f" · **stopped**: {len(result.images)} of {req.n} image(s), the last one partly denoised"
        return [(path, _caption(s)) for path, s in past], traced(text, request_id), past, new[0][1] if new else None, 0 if new else None

    def on_select(past: list, evt: gr.SelectData):
        inside = 0 <= evt.index < len(past)
        return (past[evt.index][1] if inside else None), (evt.index if inside else None)

    def _chosen(past: list, index: int | None) -> tuple[str, dict]:
        if index is None or not 0 <= index < len(past):
            raise gr.Error("Pick an image in the gallery first.", print_exception=False)
        return past[index]

    def to_editor(past: list, index: int | None, model_id: str, new_mode: str):
        path, settings = _chosen(past, index)
        modes = _options(studio, model_id).modes or ()
        if new_mode not in modes:
            raise gr.Error(f"mode: {model_id} has no {new_mode} pipeline", print_exception=False)
        value = {"background": path, "layers": [], "composite": path}
        return [value, gr.update(value=new_mode), settings["prompt"], *_mode_controls(studio, model_id, new_mode)]

    def restore(settings: dict | None, model_id: str):
        """Every control set from stored settings (unknown adapters and models are left out, with a warning)."""
        if not settings:
            raise gr.Error("Pick an image in the gallery first.", print_exception=False)
        target = settings.get("model") if settings.get("model") in models else model_id
        if settings.get("model") not in models:
            gr.Warning(f"These settings were made with {settings.get('model') or 'another model'}; "
                       f"keeping {target}.")
        opts = _options(studio, target)
        steps_m, guidance_m, width_m, height_m, n_m, negative_m, mode_m, sampler_m = _model_controls(studio, target)
        choices = lora_cards.choices(list_loras(studio), opts.lora)
        usable = [name for _, name in choices]
        wanted = settings.get("adapters") or {}
        chosen = [name for name in wanted if name in usable][:SLOTS]
        if len(chosen) < len(wanted):
            gr.Warning("Some adapters of these settings are not available for this model; press Refresh.")
        new_mode = settings.get("mode", "txt2img")
        new_mode = new_mode if new_mode in (opts.modes or ("txt2img",)) else "txt2img"
        new_sampler = settings.get("sampler") if settings.get("sampler") in sampler_m["choices"] else \
            sampler_m["value"]
        editor_u, strength_u, blur_u, scale_u, width_v, height_v = _mode_controls(studio, target, new_mode)

        def value(update: dict, key: str) -> dict:
            return {**update, "value": settings[key]} if settings.get(key) is not None else update

        return [gr.update(value=target), {**mode_m, "value": new_mode}, settings.get("prompt", ""),
                value(negative_m, "negative_prompt"), {**sampler_m, "value": new_sampler}, value(steps_m, "steps"),
                value(guidance_m, "guidance"), value({**width_m, **width_v}, "width"),
                value({**height_m, **height_v}, "height"), str(settings["seed"]) if settings.get("seed") is not None
                else "", n_m, value(strength_u, "strength"), value(blur_u, "mask_blur"), value(scale_u, "scale"),
                gr.update(choices=choices, value=chosen), chosen, *sliders(chosen, wanted)], editor_u

    def on_reuse(settings: dict | None, model_id: str):
        updates, editor_u = restore(settings, model_id)
        return [*updates, editor_u]

    def on_drop(path: str | None, model_id: str):
        if not path:
            return [gr.update() for _ in restored] + [gr.update(), None]
        with Image.open(path) as image:
            settings = read_settings(image)
        if settings is None:
            raise gr.Error("This PNG carries no settings (neither the studio's nor AUTOMATIC1111's).",
                           print_exception=False)
        if settings.get("source") == "AUTOMATIC1111":
            gr.Info("Restored AUTOMATIC1111 settings" + (f"; not restored: {', '.join(settings['not_restored'])}"
                                                         if settings.get("not_restored") else ""))
        updates, editor_u = restore(settings, model_id)
        return [*updates, editor_u, settings]

    def on_card(name: str | None):
        info = next((i for i in list_loras(studio) if i.name == name), None)
        if info is None:
            return 1.0, "", ""
        return info.card.preferred_weight, ", ".join(info.card.trigger_words), info.card.note

    def on_save_card(model_id: str, name: str | None, weight: float, words: str, text: str):
        if not name:
            raise gr.Error("Pick an adapter first.", print_exception=False)
        with shown_to_user():
            save_card(studio.settings, name, preferred_weight=float(weight), note=text or "",
                      trigger_words=[w for w in (words or "").split(",") if w.strip()])
        gr.Info(f"Saved the card of {name}.")
        return _adapters(studio, model_id)[1]

    def on_set_preview(model_id: str, name: str | None, past: list, index: int | None):
        if not name:
            raise gr.Error("Pick an adapter first.", print_exception=False)
        path, _ = _chosen(past, index)
        with shown_to_user(), Image.open(path) as image:
            save_card(studio.settings, name, preview=image)
        gr.Info(f"Set the preview of {name}.")
        return _adapters(studio, model_id)[1]

    def stop_generating(request: gr.Request) -> None:
        if not images.stop(request.session_hash or ""):
            gr.Info("Nothing is being generated.")

    mode_outputs = [editor, strength, mask_blur, scale, width, height]
    model.input(on_model, model, [steps, guidance, width, height, n, negative, mode, sampler, *mode_outputs, picked,
                                  shown, *weights, card_view], api_visibility="private")
    mode.input(on_mode, [model, mode], mode_outputs, api_visibility="private")
    picked.input(on_pick, [picked, shown, prompt, *weights], [shown, *weights, triggers, add_triggers],
                 api_visibility="private")
    add_triggers.click(on_add_triggers, [prompt, picked], [prompt, triggers, add_triggers], api_visibility="private")
    def on_open():
        """The adapters found now, when the page opens; nothing changes on the page when they are those it was
        built with (a needless update would shift the layout under a user who already started)."""
        if _adapters(studio, first, refresh=True) == (lora_choices, cards, note):
            return [gr.update() for _ in range(4)]
        return on_refresh(first, [])

    refresh.click(on_refresh, [model, picked], [picked, card_view, lora_note, card_name], api_visibility="private")
    # No inputs: on page load only. The list the app was built with would be stale after a Refresh or a new file.
    gr.on(None, on_open, None, [picked, card_view, lora_note, card_name], api_visibility="private",
          show_progress="hidden")
    # The studio's per-model slots queue generations, so Gradio itself does not limit this event.
    wire_generation([go.click, prompt.submit], run,  # a set of inputs: `run` gets one dict, component -> value
                    {model, mode, editor, strength, mask_blur, scale, prompt, negative, sampler, steps, guidance,
                     width, height, seed, n, shown, history, *weights},
                    [gallery, used, history, details, selected], status=used, go=go, stop=stop,
                    concurrency_limit=None)
    stop.click(stop_generating, None, None, queue=False, api_visibility="private")
    gallery.select(on_select, history, [details, selected], api_visibility="private")
    reuse.click(on_reuse, [details, model], [*restored, editor], api_visibility="private")
    dropped.upload(on_drop, [dropped, model], [*restored, editor, details], api_visibility="private")
    for button, target_mode in ((edit, "img2img"), (upscale, "upscale")):
        button.click(lambda past, index, model_id, _mode=target_mode: to_editor(past, index, model_id, _mode),
                     [history, selected, model], [editor, mode, prompt, *mode_outputs], api_visibility="private")
    controls.send(TO_3D, make_3d.click, lambda past, index: _chosen(past, index)[0], [history, selected])
    card_name.input(on_card, card_name, [card_weight, card_words, card_text], api_visibility="private")
    save_card_btn.click(on_save_card, [model, card_name, card_weight, card_words, card_text], card_view,
                        api_visibility="private")
    set_preview.click(on_set_preview, [model, card_name, history, selected], card_view, api_visibility="private")

    def generate_image(prompt: str, negative_prompt: str = "", model: str = first, mode: str = "txt2img",
                       image: FileData | None = None, mask: FileData | None = None, strength: float | None = None,
                       sampler: str | None = None, steps: int | None = None, guidance: float | None = None,
                       width: int | None = None, height: int | None = None, seed: int | None = None,
                       adapters: dict[str, float] | None = None) -> FileData:
        """Draw or edit an image with a diffusion model, optionally with LoRA adapters, and return it as a PNG file.

        Args:
            prompt: what to draw; `<lora:name:weight>` tags in it also pick adapters.
            negative_prompt: what to avoid; only for models with guidance (not SD-Turbo), else leave empty.
            model: the image model id: {models}.
            mode: txt2img (default), img2img (redraw `image`), inpaint (redraw where `mask` is white) or upscale.
            image: the input image of img2img, inpaint and upscale.
            mask: inpaint: white is repainted, black kept; the image's size.
            strength: img2img, inpaint, upscale: how much is redrawn, above 0 to 1; empty for the model's default.
            sampler: the sampler by AUTOMATIC1111's name (Euler a, DPM++ 2M Karras, DDIM, UniPC, ...); empty for
                the model's default.
            steps: denoising steps, 1 to the model's cap; empty for the model's default.
            guidance: classifier-free guidance scale, 0 to 30; empty for the model's default (SD-Turbo uses 0).
            width: image width, a multiple of 8 up to the model's cap; empty for the model's default.
            height: image height, a multiple of 8 up to the model's cap; empty for the model's default.
            seed: 0 to 4294967295 to repeat an image; empty for random (the PNG's "parameters" text has the seed).
            adapters: LoRA adapter name to weight (-2 to 2); names as listed by GET /loras.
        """
        inputs = {name: _read(data) for name, data in (("image", image), ("mask", mask)) if data is not None}
        req = ImageRequest(prompt=prompt, negative_prompt=negative_prompt or "", model=model, mode=mode,
                           strength=strength, sampler=sampler or None, steps=steps, guidance=guidance, width=width,
                           height=height, seed=seed, adapters=adapters or {}, **inputs)
        result = images.run(req, entry="generate_image")
        return FileData(path=_save_png(result.images[0], result.image_settings(0)), mime_type="image/png")

    generate_image.__doc__ = generate_image.__doc__.format(models=", ".join(models))
    gr.api(generate_image, api_name="generate_image", concurrency_limit=None)


def _read(data: FileData | dict) -> bytes:
    """The bytes of a file the Gradio client uploaded (FileData, or its dict form)."""
    path = data.get("path") if isinstance(data, dict) else data.path
    with open(path, "rb") as fh:
        return fh.read()

