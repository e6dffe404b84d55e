"""Image generation with LoRA adapters (tiny profile): images are reproducible, adapters change them, A→B→A is
bit-identical, switching does not grow memory, bad adapters and bad input get clear errors, Stop works."""

from __future__ import annotations

import base64
import io
import json
import os
import threading

import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import call, collect_rows, routes, tiny_studio
from studio import devices
from studio.backends.image import ImageRequest, generate_images, list_loras, validate
from studio.backends.lora import LoraError, find, parse_prompt
from studio.cache import ModelCache
from studio.contract import InputError, UnknownModelError
from studio.registry import ModelSpec, Registry
from studio.tiny.image import random_lora
from studio.weights import ensure_local


pytestmark = pytest.mark.usefixtures("one_thread")


def _modules(studio, model_id: str):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = ensure_local(studio.registry.get(model_id))
    return UNet2DConditionModel.from_pretrained(folder / "unet"), CLIPTextModel.from_pretrained(folder / "text_encoder")


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("loras")


@pytest.fixture(scope="module")
def studio(tmp_path_factory, lora_dir):
    """One studio for the module (models load once), with adapters of both formats built for it."""
    studio = tiny_studio(tmp_path_factory.mktemp("image-logs"), "--lora-dir", str(lora_dir))
    unet, text_encoder = _modules(studio, "tiny-sd")
    random_lora(lora_dir / "a.safetensors", unet, text_encoder, seed=1)
    random_lora(lora_dir / "kohya" / "a.safetensors", unet, text_encoder, seed=1, kohya=True)  # same weights
    random_lora(lora_dir / "styles" / "b.safetensors", unet, text_encoder, seed=2, kohya=True)
    turbo_unet, turbo_text = _modules(studio, "tiny-sd-turbo")
    random_lora(lora_dir / "turbo.safetensors", turbo_unet, turbo_text, seed=3)
    save_file({"weight": torch.ones(4, 4)}, lora_dir / "not-a-lora.safetensors")
    (lora_dir / "corrupt.safetensors").write_bytes(os.urandom(64))
    (lora_dir / ".partial.safetensors").write_bytes(b"")
    list_loras(studio, refresh=True)
    return studio


@pytest.fixture(scope="module")
def rows(studio) -> list[dict]:
    return collect_rows(studio)


@pytest.fixture(scope="module")
def http(studio):
    with routes(studio) as client:
        yield client


def draw(studio, model: str = "tiny-sd", adapters: dict | None = None, prompt: str = "a red fox", *, steps: int = 2,
         seed: int | None = 7, cancel: threading.Event | None = None, progress=None, **fields):
    req = ImageRequest(prompt=prompt, model=model, steps=steps, seed=seed, adapters=adapters or {}, **fields)
    return generate_images(studio, req, call(cancel=cancel, progress=progress))


def pixels(result, index: int = 0) -> np.ndarray:
    return np.asarray(result.images[index], dtype=np.int16)


# ---------------------------------------------------------------------------------------------- generation

def test_an_image_is_made_reproducibly_and_logged(studio, rows):
    first = draw(studio, model="tiny-sd-turbo", steps=1)
    assert first.images[0].size == (64, 64) and pixels(first).std() > 0
    assert np.array_equal(pixels(first), pixels(draw(studio, model="tiny-sd-turbo", steps=1)))
    random = draw(studio, model="tiny-sd-turbo", steps=1, seed=None)
    again = draw(studio, model="tiny-sd-turbo", steps=1, seed=random.seed)
    assert np.array_equal(pixels(random), pixels(again)) and not np.array_equal(pixels(random), pixels(first))
    row = rows[-1]
    assert (row["modality"], row["model"], row["status"], row["seed"], row["steps"]) == \
        ("image", "tiny-sd-turbo", "ok", random.seed, 1)
    assert row["output_pixels"] == 64 * 64 and row["prompt_sha256"]


def test_each_image_of_a_batch_is_reproduced_by_its_own_settings(studio):
    batch = draw(studio, n=2, width=72, height=64)
    assert [im.size for im in batch.images] == [(72, 64)] * 2
    settings = batch.image_settings(1)
    assert settings["seed"] == batch.seed + 1 and settings["n"] == 1
    alone = generate_images(studio, ImageRequest.from_settings(settings), call())
    assert np.array_equal(pixels(alone), pixels(batch, 1))


def test_adapters_change_the_image_and_switching_back_is_bit_identical(studio, rows):
    base = pixels(draw(studio))
    a = pixels(draw(studio, adapters={"a": 1.0}))
    b = pixels(draw(studio, adapters={"styles/b": 1.0}))
    a_again = pixels(draw(studio, adapters={"a": 1.0}))
    off = pixels(draw(studio))
    assert np.abs(a - base).mean() > 0.5 and np.abs(b - a).mean() > 0.5
    assert np.array_equal(a, a_again), "A -> B -> A must give exactly the first A"
    assert np.array_equal(off, base), "no adapters must give exactly the base image"
    assert np.array_equal(pixels(draw(studio, adapters={"kohya/a": 1.0})), a), "kohya and diffusers formats agree"
    half = pixels(draw(studio, adapters={"a": 0.5}))
    assert not np.array_equal(half, a) and np.array_equal(pixels(draw(studio, adapters={"a": 1.0})), a)
    both = draw(studio, adapters={"styles/b": 0.7, "a": -0.5})
    assert np.array_equal(pixels(both), pixels(draw(studio, adapters={"a": -0.5, "styles/b": 0.7})))
    assert rows[-1]["adapters"] and "styles/b" in str(rows[-1]["adapters"])


def test_lora_tags_in_the_prompt_pick_adapters_and_are_removed():
    assert parse_prompt("a fox <lora:styles/ink:0.8>, snow <lora:a>") == ("a fox , snow", {"styles/ink": 0.8, "a": 1.0})
    assert parse_prompt("no tags here") == ("no tags here", {})
    with pytest.raises(LoraError, match="^prompt: <lora:a:lots>"):
        parse_prompt("x <lora:a:lots>")


def test_a_tag_gives_the_same_image_as_the_adapters_field(studio):
    tagged = draw(studio, prompt="a red fox <lora:a:0.8>")
    assert tagged.settings["prompt"] == "a red fox" and tagged.settings["adapters"] == {"a": 0.8}
    assert np.array_equal(pixels(tagged), pixels(draw(studio, adapters={"a": 0.8})))


def test_stop_interrupts_between_steps_and_returns_the_partial_image(studio, rows):
    cancel, steps_seen = threading.Event(), []

    def progress(fraction: float, desc: str) -> None:
        steps_seen.append(desc)
        cancel.set()  # the user presses Stop during the first step

    result = draw(studio, steps=4, n=2, cancel=cancel, progress=progress)
    assert result.stopped and len(result.images) == 1 and steps_seen == ["Image 1 of 2, step 1 of 4"]
    assert rows[-1]["status"] == "stopped"
    assert not np.array_equal(pixels(result), pixels(draw(studio, steps=4))), "the image is partly denoised"


# ---------------------------------------------------------------------------------------------- adapters on disk

def test_scan_finds_both_formats_in_subfolders_and_lists_unusable_files(studio, lora_dir):
    infos = {i.name: i for i in list_loras(studio)}
    assert {n: infos[n].format for n in ("a", "kohya/a", "styles/b", "turbo")} == \
        {"a": "diffusers", "kohya/a": "kohya", "styles/b": "kohya", "turbo": "diffusers"}
    assert "not a LoRA" in infos["not-a-lora"].error and "corrupt" in infos["corrupt"].error
    assert ".partial" not in infos and infos["a"].file == f"{lora_dir.name}/a.safetensors"
    (lora_dir / "late.safetensors").write_bytes((lora_dir / "a.safetensors").read_bytes())
    assert find(studio.settings, "late").format == "diffusers", "a file added later is found without a restart"


@pytest.mark.parametrize("name, message", [
    ("../../x", "unknown adapter '../../x'"), ("/etc/passwd", "unknown adapter"),
    ("corrupt", "corrupt.safetensors cannot be read"), ("not-a-lora", "not-a-lora.safetensors is not a LoRA"),
])
def test_only_scanned_usable_adapters_are_accepted(studio, name, message):
    with pytest.raises(InputError, match=f"^adapters: .*{message}"):
        validate(studio, ImageRequest(prompt="x", model="tiny-sd", adapters={name: 1.0}))


def test_an_adapter_for_another_base_is_refused_and_the_model_keeps_working(make_studio, lora_dir):
    studio = make_studio("--lora-dir", str(lora_dir))  # a fresh model: the first adapter it sees is the wrong one
    wrong_base = r"^adapters: .*a\.safetensors cannot be loaded into tiny-sd-turbo: it was made for another base model"
    with pytest.raises(InputError, match=wrong_base) as caught:
        draw(studio, model="tiny-sd-turbo", steps=1, adapters={"a": 1.0})
    assert "size mismatch" not in str(caught.value) and "torch.Size" not in str(caught.value)  # no tensor dump
    base = pixels(draw(studio, model="tiny-sd-turbo", steps=1))
    own = pixels(draw(studio, model="tiny-sd-turbo", steps=1, adapters={"turbo": 1.0}))
    with pytest.raises(InputError, match=wrong_base):
        draw(studio, model="tiny-sd-turbo", steps=1, adapters={"a": 1.0, "turbo": 1.0})
    with studio.cache.use("tiny-sd-turbo") as lease:
        loaded = lease.model.pipe.get_list_adapters()
        assert all(len(names) == 1 for names in loaded.values()), f"a half-loaded adapter was left: {loaded}"
    assert np.array_equal(pixels(draw(studio, model="tiny-sd-turbo", steps=1, adapters={"turbo": 1.0})), own)
    assert np.array_equal(pixels(draw(studio, model="tiny-sd-turbo", steps=1)), base)
    fresh = pixels(draw(make_studio(), model="tiny-sd-turbo", steps=1))
    assert np.array_equal(base, fresh), "a failed load must leave the base model as it was"


def test_loaded_adapters_count_toward_the_memory_budget(studio):
    draw(studio, adapters={"a": 1.0})
    with studio.cache.use("tiny-sd") as lease:
        counted = next(m.bytes for m in studio.cache.snapshot().models if m.id == "tiny-sd")
        assert counted == devices.module_bytes(lease.model)
        adapters = sum(p.numel() * p.element_size() for n, p in lease.model.pipe.unet.named_parameters()
                       if "lora_" in n)
        assert adapters > 0


def test_memory_does_not_grow_across_100_adapter_switches(studio):
    a = pixels(draw(studio, adapters={"a": 1.0}))
    draw(studio, adapters={"styles/b": 0.5})
    picks = [find(studio.settings, "a"), find(studio.settings, "styles/b")]
    with studio.cache.use("tiny-sd") as lease:
        model = lease.model

        def switch(i: int) -> None:
            chosen = {} if i % 3 == 2 else {picks[i % 3]: 1.0 - 0.1 * (i % 7)}
            model.loras.activate(model.pipe, "tiny-sd", chosen, lambda n: studio.cache.grow("tiny-sd", n))

        for i in range(10):  # warm up allocator caches
            switch(i)
        before = (devices.module_bytes(model), studio.cache.snapshot().used_bytes, psutil.Process().memory_info().rss)
        for i in range(100):
            switch(i)
        after = (devices.module_bytes(model), studio.cache.snapshot().used_bytes, psutil.Process().memory_info().rss)
    assert after[:2] == before[:2], "switching must not load anything"
    assert after[2] - before[2] < 8 * 2**20, f"RSS grew by {(after[2] - before[2]) / 2**20:.1f} MiB"
    assert np.array_equal(pixels(draw(studio, adapters={"a": 1.0})), a)


def test_cache_grow_counts_bytes_and_evicts_idle_models_to_stay_in_budget():
    specs = [ModelSpec(id=f"m{i}", modality="image", label="m", loader="x:y", params=100) for i in range(3)]
    cache = ModelCache(Registry("t", specs), budget=1000, loader=lambda spec, device: {"w": torch.zeros(100)},
                       estimate=lambda spec, device: 400)  # each model measures 400 bytes (100 float32)
    for model_id in ("m1", "m2"):
        with cache.use(model_id):
            pass
    with cache.use("m0"):  # loading m0 evicts m1, the least recently used
        cache.grow("m0", 300)  # 700 + 400 > 1000: the idle m2 goes too
        snap = cache.snapshot()
        assert {m.id: m.bytes for m in snap.models} == {"m0": 700} and snap.evictions == 2
        cache.grow("m0", -300)
        assert cache.snapshot().used_bytes == 400
    with pytest.raises(ValueError, match="not in use"):
        cache.grow("m0", 10)


# ---------------------------------------------------------------------------------------------- HTTP

def test_post_generate_image_returns_a_png_with_its_seed(http):
    r = http.post("/generate/image", json={"prompt": "a red fox", "model": "tiny-sd", "steps": 2, "seed": 11,
                                           "adapters": {"a": 0.5}})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.headers["x-seed"] == "11"
    image = Image.open(io.BytesIO(r.content))
    assert image.size == (64, 64) and '"seed": 11' in image.info["parameters"]
    assert '"a": 0.5' in image.info["parameters"]


def test_post_generate_image_b64_json_with_several_images(http, studio):
    r = http.post("/generate/image", json={"prompt": "a red fox", "model": "tiny-sd", "steps": 2, "n": 2,
                                           "response_format": "b64_json"})
    body = r.json()
    assert r.status_code == 200 and r.headers["x-seed"] == str(body["seed"])
    assert [i["seed"] for i in body["images"]] == [body["seed"], (body["seed"] + 1) % 2**32]
    second = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["images"][1]["b64_json"]))), dtype=np.int16)
    assert np.array_equal(second, pixels(draw(studio, seed=body["images"][1]["seed"])))


def test_get_loras_lists_adapters_with_format_and_errors(http):
    listed = {item["name"]: item for item in http.get("/loras").json()}
    assert listed["styles/b"]["format"] == "kohya" and listed["styles/b"]["error"] is None
    assert listed["corrupt"]["format"] == "invalid" and listed["corrupt"]["error"]
    assert all("/tmp" not in item["file"] for item in listed.values()), "no server paths in the listing"


@pytest.mark.parametrize("change, field", [
    ({"prompt": "   "}, "prompt"), ({"prompt": "<lora:a:1>"}, "prompt"), ({"steps": 0}, "steps"),
    ({"steps": 51}, "steps"), ({"width": 65}, "width"), ({"height": 136}, "height"),
    ({"adapters": {"../../x": 1}}, "adapters"), ({"adapters": {"a": 2.5}}, "adapters"),
    ({"adapters": {"a": -3}}, "adapters"), ({"model": "tiny-sd-turbo", "negative_prompt": "blur"}, "negative_prompt"),
    ({"n": 2}, "n"), ({"seed": -1}, "seed"), ({"model": "tiny-llama"}, "model")
])
def test_bad_input_gets_422_naming_the_field(http, change, field):
    r = http.post("/generate/image", json={"prompt": "a fox", "model": "tiny-sd", "steps": 2, **change})
    assert r.status_code == 422 and r.json()["detail"].startswith(f"{field}: "), r.text


def test_unknown_model_is_404(http, studio):
    r = http.post("/generate/image", json={"prompt": "a fox", "model": "sd-99"})
    assert r.status_code == 404 and "sd-99" in r.json()["detail"]
    with pytest.raises(UnknownModelError):
        validate(studio, ImageRequest(prompt="x", model="sd-99"))


# ---------------------------------------------------------------------------------------------- Gradio client

def test_gradio_client_generate_image(live_server):
    from gradio_client import Client

    _studio, url = live_server
    client = Client(url, verbose=False)
    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/generate_image"]["parameters"]
    assert [p["parameter_name"] for p in params][:3] == ["prompt", "negative_prompt", "model"]
    path = client.predict(prompt="a red fox", model="tiny-sd-turbo", seed=3, api_name="/generate_image")
    image = Image.open(path)
    assert image.size == (64, 64) and '"seed": 3' in image.info["parameters"]
    with pytest.raises(Exception, match="prompt: must not be empty"):
        client.predict(prompt="", api_name="/generate_image")


def test_gradio_client_edits_an_image(live_server, tmp_path):
    from gradio_client import Client, handle_file

    _studio, url = live_server
    Image.new("RGB", (64, 64), "teal").save(tmp_path / "in.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(tmp_path / "mask.png")
    client = Client(url, verbose=False)
    path = client.predict(prompt="a red fox", model="tiny-sd", mode="inpaint", image=handle_file(tmp_path / "in.png"),
                          mask=handle_file(tmp_path / "mask.png"), sampler="DDIM", steps=2, seed=3,
                          api_name="/generate_image")
    image = Image.open(path)
    settings = json.loads(image.info["parameters"])
    assert image.size == (64, 64) and (settings["mode"], settings["sampler"], settings["mask"]) == \
        ("inpaint", "DDIM", True)
    assert image.convert("RGB").getpixel((0, 0)) == (0, 128, 128)  # outside the mask: the input's own pixel
