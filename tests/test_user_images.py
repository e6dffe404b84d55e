"""User image models through the modality interface: the image modality's `detect` and families recognise a
diffusers folder or a single-file checkpoint brought through the catalog file, the drop-in folder and the Add box,
and the model draws from its REST and OpenAI routes."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import routes
from studio.registry import ModelSpec
from studio.tiny import image as tiny_image

SMALL = {"width": 64, "height": 64, "max_size": 128, "steps": 2}
# A diffusers folder of each family the tiny profile builds, and an A1111-layout single-file SD 1.5 checkpoint.
BUILDERS = ["build_stable_diffusion", "build_sdxl", "build_sd3", "build_single_file"]


def built(tmp_path: Path, builder: str) -> Path:
    """The tiny model a builder writes: its folder, or the single file in it (a single-file checkpoint)."""
    build = getattr(tiny_image, builder)
    folder = tmp_path / builder
    folder.mkdir()
    build(folder, ModelSpec(id=builder, modality="image", label=builder, loader="unused:unused", params=0))
    files = list(folder.glob("*.safetensors"))
    return files[0] if len(files) == 1 and not (folder / "model_index.json").exists() else folder


@pytest.mark.parametrize("builder", BUILDERS)
def test_an_image_family_works_from_every_door_however_it_came(make_studio, tmp_path, builder):
    source = built(tmp_path, builder)
    entry = {"id": "img-catalog", "modality": "image", "source": str(source), "options": SMALL}
    (tmp_path / "models.yaml").write_text(yaml.safe_dump({"models": [entry]}))
    drop = tmp_path / "models" / "image"
    drop.mkdir(parents=True)
    (shutil.copytree if source.is_dir() else shutil.copy)(source, drop / f"img-drop{source.suffix}")
    if source.is_file():  # its configs, a folder of the same name beside it (offline: not fetched from the Hub)
        shutil.copytree(source.with_suffix(""), drop / "img-drop")
    studio = make_studio("--models", str(tmp_path / "models.yaml"), "--models-dir", str(tmp_path / "models"))
    with routes(studio) as http:
        added = http.post("/models", json={"source": str(source), "id": "img-added", "options": SMALL})
        assert added.status_code == 200 and '"event": "done"' in added.text, added.text
        for model_id in ("img-catalog", "img-drop", "img-added"):
            spec = studio.registry.get(model_id)
            assert spec.modality == "image" and spec.family, spec
            rest = http.post("/generate/image", json={"prompt": "a red cube", "model": model_id, "steps": 2,
                                                      "width": 64, "height": 64, "seed": 1,
                                                      "negative_prompt": ""})
            assert rest.status_code == 200 and rest.headers["content-type"] == "image/png", rest.text
            openai = http.post("/v1/images/generations", json={"prompt": "a red cube", "model": model_id,
                                                               "size": "64x64", "steps": 2, "seed": 1})
            assert openai.status_code == 200, openai.text
            assert base64.b64decode(openai.json()["data"][0]["b64_json"])[:4] == b"\x89PNG"
        listed = {m["id"]: m for m in http.get("/models", params={"modality": "image"}).json()["models"]}
        assert listed["img-drop"]["origin"] == "drop-in" and listed["img-added"]["on_disk"]


def test_a_chat_model_in_the_image_drop_in_folder_is_left_out_with_the_reason(make_studio, tmp_path):
    from studio.tiny.text import build_phi3

    folder = tmp_path / "models" / "image" / "not-a-picture"
    folder.mkdir(parents=True)
    build_phi3(folder, SimpleNamespace(options={}))
    studio = make_studio("--models-dir", str(tmp_path / "models"))
    assert "not-a-picture" not in studio.registry
    assert "is a chat model" in studio.manager.problems[0].message
    assert json.loads((folder / "config.json").read_text())  # the user's files are untouched
