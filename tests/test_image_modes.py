"""Image editing on the tiny models of every family: img2img, inpainting and upscaling share the loaded components
(no second load, the budget counts the model once), inpainting keeps every pixel outside the feathered mask, a low
strength stays closer to the input than a high one, the same seed gives the same image in every mode, samplers
switch without a reload, families are detected from the files, and bad input gets a 4xx naming the field."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from safetensors.torch import save_file

from conftest import call, routes, tiny_studio
from studio import devices
from studio.backends.image import ImageOptions, ImageRequest, generate_images, validate
from studio.backends.image_families import FAMILIES, detect
from studio.backends.image_inputs import MAX_INPUT_SIDE, feather_reach
from studio.backends.image_png import parse_a1111, png_bytes, read_settings
from studio.backends.samplers import DDPM_SAMPLERS
from studio.contract import InputError
from studio.registry import ModelSpec
from studio.weights import ensure_local

FAMILY_MODELS = ["tiny-sd", "tiny-sd-turbo", "tiny-sdxl", "tiny-sd3", "tiny-sd15-file"]
MODES = ["txt2img", "img2img", "inpaint", "upscale"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    return tiny_studio(tmp_path_factory.mktemp("image-modes-logs"), "--lora-dir",
                       str(tmp_path_factory.mktemp("no-loras")))


@pytest.fixture(scope="module")
def http(studio):
    with routes(studio) as client:
        yield client


def picture(size: tuple[int, int] = (64, 64)) -> Image.Image:
    """A smooth colourful input: a trained VAE keeps it; the tests compare against it."""
    x, y = np.meshgrid(np.linspace(0, 1, size[0]), np.linspace(0, 1, size[1]))
    return Image.fromarray((np.stack([x, y, 1 - x * y], -1) * 255).astype(np.uint8))


def square_mask(size: tuple[int, int] = (64, 64), box=(20, 20, 44, 44)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def draw(studio, model: str = "tiny-sd", mode: str = "txt2img", *, steps: int = 2, seed: int | None = 7, **fields):
    if mode != "txt2img":
        fields.setdefault("image", picture())
    if mode == "inpaint":
        fields.setdefault("mask", square_mask())
    req = ImageRequest(prompt="a red fox", model=model, mode=mode, steps=steps, seed=seed, **fields)
    return generate_images(studio, req, call())


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- every family, mode

@pytest.mark.parametrize("model", FAMILY_MODELS)
def test_every_family_draws_in_every_mode_with_the_expected_size_and_repeats_by_seed(studio, model):
    for mode in MODES:
        first = draw(studio, model, mode, steps=4 if "turbo" in model else 2)
        expected = (128, 128) if mode == "upscale" else (64, 64)
        assert first.images[0].size == expected and pixels(first.images[0]).std() > 0, mode
        again = draw(studio, model, mode, steps=4 if "turbo" in model else 2)
        assert np.array_equal(pixels(first.images[0]), pixels(again.images[0])), f"{model} {mode}: same seed"
        assert first.settings["mode"] == mode and first.settings["mask"] == (mode == "inpaint")


def test_the_single_file_checkpoint_is_the_same_model_as_the_folder(studio):
    """The tiny single-file SD 1.5 holds tiny-sd's weights in the original key layout: from_single_file must
    convert them back exactly."""
    for mode in ("txt2img", "inpaint"):
        assert np.array_equal(pixels(draw(studio, "tiny-sd15-file", mode).images[0]),
                              pixels(draw(studio, "tiny-sd", mode).images[0])), mode


def test_switching_modes_and_samplers_loads_nothing_and_the_budget_counts_the_model_once(studio):
    draw(studio, "tiny-sdxl")
    before = studio.cache.snapshot()
    counted = next(m.bytes for m in before.models if m.id == "tiny-sdxl")
    for mode in MODES:
        for sampler in ("Euler", "Euler a", "DPM++ 2M Karras", "UniPC"):
            draw(studio, "tiny-sdxl", mode, sampler=sampler)
    after = studio.cache.snapshot()
    assert (after.loads, after.misses) == (before.loads, before.misses), "a mode or sampler switch loaded a model"
    with studio.cache.use("tiny-sdxl") as lease:
        model = lease.model
        assert len(model.modes) == 3  # text to image, image to image (also upscale), inpainting
        for pipe in model.modes.values():
            assert pipe.unet is model.pipe.unet and pipe.vae is model.pipe.vae
            assert pipe.text_encoder_2 is model.pipe.text_encoder_2
        assert devices.module_bytes(model) == devices.module_bytes(model.pipe) == counted
    assert next(m.bytes for m in after.models if m.id == "tiny-sdxl") == counted


# ---------------------------------------------------------------------------------------------- inpainting

@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sdxl", "tiny-sd3"])
def test_inpainting_keeps_every_pixel_outside_the_feathered_mask(studio, model):
    blur = 4
    image, mask = picture(), square_mask()
    result = draw(studio, model, "inpaint", image=image, mask=mask, mask_blur=blur, strength=1.0)
    out, original = pixels(result.images[0]), pixels(image)
    reach = feather_reach(blur)
    near = np.asarray(mask.filter(ImageFilter.MaxFilter(2 * reach + 1))) > 0  # the mask grown by the feather
    assert np.array_equal(out[~near], original[~near]), "a pixel outside the mask changed"
    inside = np.asarray(mask) > 0
    assert np.abs(out[inside] - original[inside]).mean() > 5, "the masked area was not redrawn"
    with studio.cache.use(model) as lease:  # without the paste-back the VAE round trip shifts colours everywhere
        pipe = lease.model.pipeline("inpaint")
        raw = pipe(prompt="a red fox", image=image, mask_image=mask, num_inference_steps=2, strength=1.0,
                   generator=torch.Generator().manual_seed(7)).images[0]
    assert not np.array_equal(pixels(raw)[~near], original[~near])


def test_a_hard_mask_edge_changes_only_the_masked_pixels(studio):
    result = draw(studio, "tiny-sd", "inpaint", mask_blur=0)
    outside = np.asarray(square_mask()) == 0
    assert np.array_equal(pixels(result.images[0])[outside], pixels(picture())[outside])


# ---------------------------------------------------------------------------------------------- img2img, upscale

@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sdxl", "tiny-sd3"])
def test_img2img_stays_closer_to_the_input_at_a_low_strength(studio, model):
    """Distance to the input as the model's VAE gives it back: the tiny models' random VAEs do not reproduce an
    image (a trained VAE returns the input itself), so the round trip is what a strength near 0 would give."""
    image = picture()
    with studio.cache.use(model) as lease:
        pipe = lease.model.pipe
        with torch.no_grad():
            latents = pipe.vae.encode(pipe.image_processor.preprocess(image)).latent_dist.mean
            seen = pixels(pipe.image_processor.postprocess(pipe.vae.decode(latents).sample)[0])
    distance = {strength: np.abs(pixels(draw(studio, model, "img2img", image=image, strength=strength, steps=10,
                                             seed=3).images[0]) - seen).mean() for strength in (0.2, 0.9)}
    assert distance[0.2] < distance[0.9], distance


def test_upscale_doubles_the_size_by_default_and_takes_a_scale(studio):
    assert draw(studio, "tiny-sd", "upscale").images[0].size == (128, 128)
    small = picture((40, 32))
    assert draw(studio, "tiny-sd", "upscale", image=small, scale=3).images[0].size == (120, 96)
    assert draw(studio, "tiny-sd", "upscale").settings["strength"] == ImageOptions.upscale_strength


def test_a_one_step_turbo_model_still_edits(studio):
    """SD-Turbo's default is 1 step; at strength 0.5 that is no step at all, so it runs 2 steps (one at 0.5)."""
    result = draw(studio, "tiny-sd-turbo", "img2img", steps=1, strength=0.5)
    assert result.images[0].size == (64, 64) and result.settings["steps"] == 1


# ---------------------------------------------------------------------------------------------- samplers

def test_samplers_by_a1111_names_change_the_image_and_repeat(studio):
    images = {name: pixels(draw(studio, "tiny-sd", sampler=name, steps=3).images[0])
              for name in ("Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "UniPC", "PLMS")}
    assert len({im.tobytes() for im in images.values()}) >= 5, "samplers should give different images"
    assert np.array_equal(pixels(draw(studio, "tiny-sd", sampler="Euler a", steps=3).images[0]), images["Euler a"])
    result = draw(studio, "tiny-sd", sampler="DDIM")
    assert result.settings["sampler"] == "DDIM"
    assert draw(studio, "tiny-sd").settings["sampler"] == FAMILIES["sd15"].options["sampler"]


@pytest.mark.parametrize("model, sampler", [("tiny-sd", "DPM++ 3M"), ("tiny-sd3", "DPM++ 2M Karras")])
def test_a_sampler_the_model_does_not_take_is_refused(studio, model, sampler):
    with pytest.raises(InputError, match=re.escape(f"sampler: unknown sampler '{sampler}' for {model};")):
        validate(studio, ImageRequest(prompt="x", model=model, sampler=sampler))


# ---------------------------------------------------------------------------------------------- families

def test_families_are_detected_from_the_files(studio, tmp_path):
    folders = {model: ensure_local(studio.registry.get(model)) for model in FAMILY_MODELS}
    assert {model: detect(folder).name for model, folder in folders.items()} == {
        "tiny-sd": "sd15", "tiny-sd-turbo": "sd2-turbo", "tiny-sdxl": "sdxl", "tiny-sd3": "sd3",
        "tiny-sd15-file": "sd15"}
    assert detect(folders["tiny-sd15-file"] / "sd15.safetensors").name == "sd15"
    for other in ("tiny-llama", "tiny-shap-e"):  # other modalities' models are not image models
        assert detect(ensure_local(studio.registry.get(other))) is None
    for keys, family in ((["cond_stage_model.model.transformer.resblocks.0.ln_1.weight"], "sd2"),
                         (["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                           "conditioner.embedders.1.model.ln_final.weight"], "sdxl")):
        path = tmp_path / f"{family}.safetensors"
        save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
                   **{key: torch.zeros(2) for key in keys}}, path)
        assert detect(path).name == family
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 9, 3, 3),
               "cond_stage_model.transformer.x": torch.zeros(1)}, tmp_path / "inpainting.safetensors")
    (tmp_path / "notes.safetensors").write_bytes(b"not a checkpoint")
    assert detect(tmp_path / "inpainting.safetensors") is None and detect(tmp_path / "notes.safetensors") is None
    assert detect(tmp_path) is None and detect(tmp_path / "missing") is None


def test_defaults_and_caps_come_from_the_family(studio):
    for family in FAMILIES.values():
        assert ImageOptions.problems(family.options) == [], family.name
        assert family.options["sampler"] is None or family.options["sampler"] in family.options["samplers"]
    sdxl = ImageOptions.of(studio.registry.get("tiny-sdxl"))  # the family's, under the tiny entry's own options
    assert (sdxl.sampler, sdxl.lora, sdxl.guidance, sdxl.width, sdxl.max_size) == ("DPM++ 2M Karras", "sdxl", 5.0,
                                                                                   64, 128)
    turbo = ImageOptions.of(studio.registry.get("tiny-sd-turbo"))
    assert (turbo.steps, turbo.guidance, turbo.negative_prompt, turbo.lora) == (1, 0.0, False, "sd2")
    assert ImageOptions.of(studio.registry.get("tiny-sd3")).samplers == ("Euler", "Heun")


# ---------------------------------------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def pixart(studio):
    """A PixArt entry (text to image only in diffusers); validation refuses before anything loads."""
    studio.registry.add(ModelSpec(id="pixart-x", modality="image", label="PixArt", loader="x:y", params=1,
                                  family="pixart"))
    return "pixart-x"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize("change, field, words", [
    ({"mode": "inpaint", "mask": square_mask((32, 32))}, "mask", "is 32x32 pixels but the image is 64x64"),
    ({"mode": "inpaint", "mask": Image.new("L", (64, 64))}, "mask", "is empty"),
    ({"mode": "inpaint"}, "mask", "inpaint needs a mask"),
    ({"mode": "img2img", "image": b"not an image"}, "image", "is not an image"),
    ({"mode": "img2img", "image": Image.new("RGB", (MAX_INPUT_SIDE + 8, 8))}, "image", "the limit is 4096"),
    ({"mode": "img2img"}, "image", "img2img needs an input image"),
    ({"image": picture()}, "image", "text to image takes no input image"),
    ({"mode": "img2img", "image": picture(), "mask": square_mask()}, "mask", "only inpaint takes a mask"),
    ({"mode": "img2img", "image": picture(), "strength": 0}, "strength", "must be above 0"),
    ({"mode": "img2img", "image": picture(), "strength": 1.5}, "strength", "must be above 0 and at most 1"),
    ({"strength": 0.5}, "strength", "only img2img, inpaint and upscale"),
    ({"sampler": "Euler b"}, "sampler", "unknown sampler 'Euler b'"),
    ({"mode": "upscale", "image": picture(), "scale": 3}, "scale", "larger than tiny-sd's cap of 128"),
    ({"mode": "upscale", "image": picture(), "width": 64}, "width", "upscale sets the size"),
    ({"mode": "sketch"}, "mode", "must be one of txt2img, img2img, inpaint, upscale"),
    ({"model": "pixart-x", "mode": "img2img", "image": picture()}, "mode", "pixart-x (PixArt-α / Σ) has no img2img"),
])
def test_bad_editing_input_is_refused_naming_the_field(studio, pixart, change, field, words):
    if change.get("mode") == "inpaint":
        change = {"image": picture(), **change}
    with pytest.raises(InputError) as caught:
        validate(studio, ImageRequest(prompt="a fox", **{"model": "tiny-sd", **change}))
    assert caught.value.field == field and words in caught.value.message, caught.value


# ---------------------------------------------------------------------------------------------- HTTP

@pytest.mark.parametrize("model", FAMILY_MODELS)
def test_every_family_generates_through_rest_and_the_openai_route(http, studio, model):
    steps = 4 if "turbo" in model else 2
    expected = pixels(draw(studio, model, steps=steps, seed=21).images[0])
    r = http.post("/generate/image", json={"prompt": "a red fox", "model": model, "steps": steps, "seed": 21})
    assert r.status_code == 200, r.text
    assert np.array_equal(pixels(Image.open(io.BytesIO(r.content)).convert("RGB")), expected)
    r = http.post("/v1/images/generations", json={"prompt": "a red fox", "model": model, "steps": steps, "seed": 21,
                                                   "size": "64x64"})
    assert r.status_code == 200, r.text
    made = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).convert("RGB")
    assert np.array_equal(pixels(made), expected)


def test_post_generate_image_edits_with_json_base64(http):
    r = http.post("/generate/image", json={"prompt": "a fox", "model": "tiny-sd", "mode": "inpaint", "steps": 2,
                                           "seed": 5, "image": "data:image/png;base64," + _b64(png(picture())),
                                           "mask": _b64(png(square_mask())), "sampler": "Euler a"})
    assert r.status_code == 200, r.text
    image = Image.open(io.BytesIO(r.content))
    settings = json.loads(image.info["parameters"])
    assert image.size == (64, 64)
    assert (settings["mode"], settings["mask"], settings["sampler"], settings["mask_blur"]) == \
        ("inpaint", True, "Euler a", 4)
    r = http.post("/generate/image", json={"prompt": "", "model": "tiny-sd", "mode": "upscale", "steps": 2,
                                           "image": _b64(png(picture())), "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]["b64_json"]))).size == (128, 128)


def test_post_generate_image_edits_with_multipart(http, studio):
    files = {"image": ("in.png", png(picture()), "image/png"), "mask": ("mask.png", png(square_mask()), "image/png")}
    data = {"prompt": "a red fox", "model": "tiny-sd", "mode": "inpaint", "steps": "2", "seed": "5", "strength": "0.8",
            "adapters": "{}"}
    r = http.post("/generate/image", files=files, data=data)
    assert r.status_code == 200, r.text
    same = draw(studio, "tiny-sd", "inpaint", seed=5, strength=0.8)
    made = Image.open(io.BytesIO(r.content))
    assert json.loads(made.info["parameters"]) == json.loads(json.dumps(same.image_settings(0)))
    assert np.array_equal(pixels(made.convert("RGB")), pixels(same.images[0]))


@pytest.mark.parametrize("change, field", [
    ({"mode": "inpaint", "image": _b64(png(picture())), "mask": _b64(png(square_mask((32, 32))))}, "mask"),
    ({"mode": "img2img", "image": "not base64!"}, "image"),
    ({"mode": "img2img", "image": _b64(b"GIF89a nothing")}, "image"),
    ({"mode": "img2img", "image": _b64(png(picture())), "strength": 1.5}, "strength"),
    ({"mode": "img2img", "image": _b64(png(picture())), "strength": 0}, "strength"),
    ({"sampler": "Euler b"}, "sampler"),
    ({"mode": "upscale", "image": _b64(png(picture())), "scale": 8}, "scale"),
    ({"mode": "outpaint"}, "mode"),
])
def test_bad_editing_input_gets_422_naming_the_field(http, change, field):
    r = http.post("/generate/image", json={"prompt": "a fox", "model": "tiny-sd", "steps": 2, **change})
    assert r.status_code == 422 and r.json()["detail"].startswith(f"{field}: "), r.text


# ---------------------------------------------------------------------------------------------- PNG settings

def test_a_studio_png_gives_back_its_settings(studio):
    result = draw(studio, "tiny-sd", "img2img", strength=0.6, sampler="DDIM")
    stored = Image.open(io.BytesIO(png_bytes(result.images[0], result.image_settings(0))))
    settings = read_settings(stored)
    assert settings == json.loads(json.dumps(result.image_settings(0)))
    assert (settings["mode"], settings["strength"], settings["sampler"], settings["mask"]) == \
        ("img2img", 0.6, "DDIM", False)
    again = generate_images(studio, ImageRequest.from_settings(settings, image=picture()), call())
    assert np.array_equal(pixels(again.images[0]), pixels(result.images[0]))


A1111 = """a lighthouse at dusk, <lora:styles/ink:0.7> oil painting
Negative prompt: blurry, lowres
Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 512x768, \
Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.55, Mask blur: 4, Version: v1.10.1"""


def test_an_automatic1111_png_gives_its_settings_in_the_studios_terms():
    settings = parse_a1111(A1111)
    assert settings["prompt"] == "a lighthouse at dusk, oil painting" and settings["adapters"] == {"styles/ink": 0.7}
    assert settings["negative_prompt"] == "blurry, lowres"
    assert {k: settings[k] for k in ("steps", "sampler", "guidance", "seed", "width", "height", "strength",
                                     "mask_blur", "mode")} == {
        "steps": 20, "sampler": "DPM++ 2M Karras", "guidance": 6.5, "seed": 1234, "width": 512, "height": 768,
        "strength": 0.55, "mask_blur": 4, "mode": "inpaint"}
    assert settings["source"] == "AUTOMATIC1111" and "Model" in settings["not_restored"]
    txt2img = parse_a1111("a cat\nSteps: 4, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64")
    assert (txt2img["mode"], txt2img["sampler"], txt2img["negative_prompt"]) == ("txt2img", "Euler a", "")
    image = Image.new("RGB", (8, 8))
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", A1111)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    assert read_settings(Image.open(buffer))["seed"] == 1234
    assert read_settings(Image.new("RGB", (8, 8))) is None
    assert set(DDPM_SAMPLERS) >= {"Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "UniPC"}
