"""LoRA cards and families: adapters written with kohya / modelspec metadata show their base family, trigger words
and training tags in `/loras` and in the picker; an adapter for another family is refused with both names before
anything loads; the preferred weight, the note and a preview set from an image are stored beside the adapter (as
AUTOMATIC1111 does) and still there after a restart; adapters work in every mode of every family that takes them."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import call, routes, tiny_studio
from studio.backends.image import ImageRequest, generate_images, list_loras, validate
from studio.backends.lora import LoraError, base_label, base_of, find, inspect_file, save_card
from studio.config import format_size
from studio.tiny.image import random_lora
from studio.ui import lora_cards

TAGS = {"10_ohwx fox": {"ohwx": 20, "fox": 18, "snow": 3}, "5_ohwx fox": {"fox": 2, "forest": 4}}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("card-loras")


@pytest.fixture(scope="module")
def studio(tmp_path_factory, lora_dir):
    studio = tiny_studio(tmp_path_factory.mktemp("card-logs"), "--lora-dir", str(lora_dir))
    for model, name, kohya, meta in (
        ("tiny-sd", "fox", True, {"ss_base_model_version": "sd_v1", "ss_tag_frequency": json.dumps(TAGS),
                                  "ss_output_name": "ohwx-fox"}),
        ("tiny-sd", "plain", False, {}),  # no metadata: family unknown, offered with every model
        ("tiny-sdxl", "xl/style", False, {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
                                          "modelspec.trigger_phrase": "xlstyle", "modelspec.title": "XL style"}),
        ("tiny-sd3", "sd3-style", False, {"modelspec.architecture": "stable-diffusion-v3-medium/lora"}),
    ):
        with studio.cache.use(model) as lease:
            pipe = lease.model.pipe
            random_lora(lora_dir / f"{name}.safetensors", getattr(pipe, "unet", None) or pipe.transformer,
                        pipe.text_encoder, seed=4, kohya=kohya, strength=0.5, metadata=meta)
    list_loras(studio, refresh=True)
    return studio


@pytest.fixture(scope="module")
def http(studio):
    with routes(studio) as client:
        yield client


def draw(studio, model: str, adapters: dict, mode: str = "txt2img"):
    x, y = np.meshgrid(np.linspace(0, 1, 64), np.linspace(0, 1, 64))
    image = Image.fromarray((np.stack([x, y, x * y], -1) * 255).astype(np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    inputs = {"image": image} if mode != "txt2img" else {}
    if mode == "inpaint":
        inputs["mask"] = mask
    req = ImageRequest(prompt="a fox", model=model, mode=mode, steps=2, seed=9, adapters=adapters, **inputs)
    return np.asarray(generate_images(studio, req, call()).images[0], dtype=np.int16)


# ---------------------------------------------------------------------------------------------- metadata

def test_cards_show_the_family_trigger_words_and_training_tags(studio):
    infos = {info.name: info for info in list_loras(studio)}
    fox, xl, plain = infos["fox"], infos["xl/style"], infos["plain"]
    assert (fox.base, fox.card.trigger_words, fox.card.title) == ("sd15", ("ohwx fox",), "ohwx-fox")
    assert fox.card.tags[:3] == (("fox", 20), ("ohwx", 20), ("forest", 4))
    assert (xl.base, xl.card.trigger_words, xl.card.title) == ("sdxl", ("xlstyle",), "XL style")
    assert infos["sd3-style"].base == "sd3" and plain.base is None and plain.card.trigger_words == ()


@pytest.mark.parametrize("keys, base", [
    ({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": (4, 768)}, "sd15"),
    ({"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (4, 1024)}, "sd2"),
    ({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": (4, 2048)}, "sdxl"),
    ({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 1280)}, "sdxl"),
    ({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": (4, 1536)}, "sd3"),
    ({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": (4, 3072)}, "flux"),
    ({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": (4, 32)}, None),
])
def test_the_family_comes_from_the_keys_when_the_metadata_says_nothing(tmp_path, keys, base):
    path = tmp_path / "adapter.safetensors"
    save_file({key: torch.zeros(shape) for key, shape in keys.items()}, path)
    fmt, error, header = inspect_file(path)
    assert error is None and base_of(header) == base


def test_get_loras_returns_the_card_fields(http):
    listed = {item["name"]: item for item in http.get("/loras").json()}
    fox = listed["fox"]
    assert (fox["base"], fox["base_label"], fox["trigger_words"]) == ("sd15", "Stable Diffusion 1.x", ["ohwx fox"])
    assert fox["tags"][0] == {"tag": "fox", "count": 20} and fox["preferred_weight"] == 1.0
    assert "tiny-sd" in fox["models"] and "tiny-sd15-file" in fox["models"] and "tiny-sdxl" not in fox["models"]
    assert listed["xl/style"]["models"] == ["tiny-sdxl"] and listed["sd3-style"]["models"] == ["tiny-sd3"]
    assert "tiny-sdxl" in listed["plain"]["models"]  # an unknown family is offered; loading tells


def test_an_adapter_for_another_family_is_refused_naming_both_before_anything_loads(make_studio, lora_dir):
    studio = make_studio("--lora-dir", str(lora_dir))
    with pytest.raises(LoraError, match=r"^adapters: .*xl/style\.safetensors was made for Stable Diffusion XL, "
                                        r"tiny-sd is Stable Diffusion 1\.x$"):
        validate(studio, ImageRequest(prompt="x", model="tiny-sd", adapters={"xl/style": 1.0}))
    with pytest.raises(LoraError, match="fox.safetensors was made for Stable Diffusion 1.x, tiny-sd-turbo is SD-Turbo"):
        generate_images(studio, ImageRequest(prompt="x", model="tiny-sd-turbo", adapters={"fox": 1.0}), call())
    assert studio.cache.snapshot().loads == 0


def test_the_picker_offers_only_adapters_for_the_models_family_and_greys_out_the_rest(studio):
    infos = list_loras(studio)
    assert [name for _, name in lora_cards.choices(infos, "sd15")] == ["fox", "plain"]
    assert [name for _, name in lora_cards.choices(infos, "sdxl")] == ["plain", "xl/style"]
    html = lora_cards.cards_html(infos, "sd15", "tiny-sd", "Stable Diffusion 1.x")
    xl_card = html[html.index('data-lora="xl/style"'):]
    assert "lora-off" in html[html.rindex("<div", 0, html.index('data-lora="xl/style"')):html.index(
        'data-lora="xl/style"')]
    assert "made for Stable Diffusion XL, tiny-sd is Stable Diffusion 1.x" in xl_card
    for info in infos:  # each card says the family, the file's format and its size
        card = html[html.index(f'data-lora="{info.name}"'):]
        facts = f"{base_label(info.base) if info.base else 'family unknown'} · {info.format} · "
        assert f"{facts}{format_size(info.path.stat().st_size)}</span>" in card[:card.index("</div></div>")]
    assert {info.format for info in infos} == {"diffusers", "kohya"}
    assert "trigger: <code>ohwx fox</code>" in html and "fox (20)" in html
    assert lora_cards.missing_triggers("a red fox", ["fox", "plain"], infos) == ["ohwx fox"]
    assert lora_cards.missing_triggers("an ohwx fox in snow", ["fox"], infos) == []
    assert lora_cards.with_triggers("a red fox", ["ohwx fox"]) == "a red fox, ohwx fox"


# ---------------------------------------------------------------------------------------------- what the user sets

def test_weight_note_triggers_and_preview_are_stored_beside_the_adapter_and_survive_a_restart(
        studio, http, lora_dir, make_studio):
    r = http.patch("/loras/fox", json={"preferred_weight": 0.7, "note": "soft light", "trigger_words": ["ohwx"]})
    assert r.status_code == 200 and r.json()["preferred_weight"] == 0.7 and r.json()["trigger_words"] == ["ohwx"]
    user = json.loads((lora_dir / "fox.json").read_text())  # AUTOMATIC1111's user-metadata keys
    assert user == {"preferred weight": 0.7, "notes": "soft light", "activation text": "ohwx"}
    image = Image.new("RGB", (640, 320), "teal")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    r = http.put("/loras/fox/preview", json={"image": base64.b64encode(buffer.getvalue()).decode()})
    assert r.status_code == 200 and r.json()["preview"] == "/loras/fox/preview"
    assert (lora_dir / "fox.preview.png").is_file()
    r = http.put("/loras/xl/style/preview", files={"image": ("p.png", buffer.getvalue(), "image/png")})
    assert r.status_code == 200 and (lora_dir / "xl" / "style.preview.png").is_file()
    shown = Image.open(io.BytesIO(http.get("/loras/fox/preview").content))
    assert shown.size == (512, 256)  # kept as a thumbnail
    assert http.get("/loras/plain/preview").status_code == 404
    restarted = make_studio("--lora-dir", str(lora_dir))  # a new process would scan the folder afresh
    card = find(restarted.settings, "fox").card
    assert (card.preferred_weight, card.note, card.trigger_words, card.preview) == \
        (0.7, "soft light", ("ohwx",), lora_dir / "fox.preview.png")
    assert 'src="data:image/png;base64,' in lora_cards.cards_html(list_loras(restarted), "sd15", "tiny-sd", "SD")


@pytest.mark.parametrize("path, body, field", [
    ("/loras/fox", {"preferred_weight": 3}, "preferred_weight"),
    ("/loras/nope", {"note": "x"}, "adapters"),
])
def test_bad_card_edits_get_422_naming_the_field(http, path, body, field):
    r = http.patch(path, json=body)
    assert r.status_code == 422 and r.json()["detail"].startswith(f"{field}: "), r.text


def test_save_card_refuses_a_weight_out_of_range(studio):
    with pytest.raises(LoraError, match="^preferred_weight: "):
        save_card(studio.settings, "fox", preferred_weight=2.5)


# ---------------------------------------------------------------------------------------------- every mode

@pytest.mark.parametrize("model, adapter", [("tiny-sd", "fox"), ("tiny-sdxl", "xl/style"), ("tiny-sd3", "sd3-style")])
def test_adapters_work_in_every_mode(studio, model, adapter):
    for mode in ("txt2img", "img2img", "inpaint", "upscale"):
        base = draw(studio, model, {}, mode)
        styled = draw(studio, model, {adapter: 1.0}, mode)
        area = (slice(16, 48), slice(16, 48)) if mode == "inpaint" else (slice(None), slice(None))  # the mask's
        assert np.abs(styled - base)[area].mean() > 0.5, f"{model} {mode}: the adapter changed nothing"
        assert np.array_equal(draw(studio, model, {}, mode), base), f"{model} {mode}: switching off is exact"
