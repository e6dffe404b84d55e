"""Text-to-3D with the tiny Shap-E (tiny profile): a coloured mesh and its turntable, GLB/PLY/OBJ files that load back
with their colours, a preview under the face cap, Stop between steps, the same mesh for the same seed over HTTP and
the Gradio client, and 4xx naming the field for bad input."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
import trimesh

from conftest import call, collect_rows, routes, tiny_studio
from studio.backends.shape import (MEDIA_TYPES, ShapeRequest, export_mesh, generate_shape, preview_mesh, turntable_gif,
                                   validate)
from studio.contract import InputError
from studio.tiny.shape import marching_cubes_table
from studio.ui import shape_tab
from studio.ui.controls import parse_seed

PROMPT = "a red wooden chair"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    return tiny_studio(tmp_path_factory.mktemp("shape-logs"))


@pytest.fixture(scope="module")
def rows(studio) -> list[dict]:
    return collect_rows(studio)


@pytest.fixture(scope="module")
def http(studio):
    with routes(studio) as client:
        yield client


@pytest.fixture(scope="module")
def shape(studio, rows):
    """One shape with its turntable, shared by the tests that only look at it."""
    return generate_shape(studio, ShapeRequest(prompt=PROMPT, steps=2, seed=11), call())


def colours(mesh: trimesh.Trimesh) -> np.ndarray:
    assert mesh.visual.kind == "vertex"
    return np.asarray(mesh.visual.vertex_colors)[:, :3].astype(int)


# ---------------------------------------------------------------------------------------------- the tiny builder

def test_marching_cubes_table_gives_closed_outward_meshes():
    from diffusers.pipelines.shap_e.renderer import MeshDecoder

    decoder = MeshDecoder()
    cases, masks = marching_cubes_table()
    decoder.cases.copy_(cases)
    decoder.masks.copy_(masks)
    axis = torch.linspace(-1, 1, 24)
    points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)
    sphere = 0.6 - points.norm(dim=-1)  # positive inside, as Shap-E's signed distances
    noise = torch.randn(24, 24, 24, generator=torch.Generator().manual_seed(0))  # every case, ambiguous faces too
    noise[[0, -1]] = noise[:, [0, -1]] = noise[:, :, [0, -1]] = -1  # an outside border closes the shape, as Shap-E's
    meshes = []
    for field in (sphere, noise):
        out = decoder(field, torch.tensor([-1.0, -1.0, -1.0]), torch.tensor([2.0, 2.0, 2.0]))
        mesh = trimesh.Trimesh(out.verts.numpy(), out.faces.numpy(), process=False)
        assert len(mesh.faces) and mesh.is_watertight and mesh.is_winding_consistent
        assert mesh.volume > 0  # faces wound counter-clockwise seen from outside
        meshes.append(mesh)
    assert meshes[0].volume == pytest.approx(4 / 3 * np.pi * 0.6**3, rel=0.05)


# ---------------------------------------------------------------------------------------------- generation

def test_tiny_pipeline_yields_a_coloured_mesh_and_turntable(shape, rows):
    mesh = shape.mesh
    assert len(mesh.vertices) > 100 and len(mesh.faces) > 100 and mesh.faces.max() < len(mesh.vertices)
    assert colours(mesh).std() > 0  # real per-vertex colours, not one flat colour
    assert (shape.seed, shape.steps, shape.stopped) == (11, 2, False)
    assert len(shape.frames) == 20 and shape.frames[0].size == (32, 32)
    row = next(r for r in rows if r["endpoint"] == "rest:test")
    assert (row["status"], row["modality"], row["faces"], row["steps"], row["seed"]) == (
        "ok", "3d", len(mesh.faces), 2, 11)


@pytest.mark.parametrize("fmt", ["glb", "ply", "obj"])
def test_mesh_files_load_back_with_vertices_faces_and_colours(shape, fmt):
    loaded = trimesh.load(io.BytesIO(export_mesh(shape.mesh, fmt)), file_type=fmt, force="mesh", process=False)
    assert len(loaded.faces) == len(shape.mesh.faces)
    np.testing.assert_allclose(loaded.vertices, shape.mesh.vertices, atol=1e-5)
    assert np.abs(colours(loaded) - colours(shape.mesh)).max() <= 1  # OBJ writes colours as 0..1 decimals


def test_turntable_is_an_animated_gif(shape):
    from PIL import Image

    gif = Image.open(io.BytesIO(turntable_gif(shape.frames)))
    assert gif.format == "GIF" and gif.n_frames == 20 and gif.size == (32, 32) and gif.info["loop"] == 0


def test_preview_is_simplified_under_the_cap_with_colours(shape):
    cap = len(shape.mesh.faces) // 4
    preview, simplified = preview_mesh(shape.mesh, cap)
    assert simplified and 0 < len(preview.faces) <= cap
    assert abs(colours(preview).mean() - colours(shape.mesh).mean()) < 20  # colours carried over, not reset
    same, simplified = preview_mesh(shape.mesh, len(shape.mesh.faces))
    assert same is shape.mesh and not simplified


def test_ui_path_writes_files_and_says_when_it_simplified(studio):
    preview, gif, downloads, text = shape_tab.make_shape(
        shape_tab.runner(studio), ShapeRequest(prompt=PROMPT, steps=1, seed=3, turntable=False), session="s",
        max_faces=500)
    assert gif is None and [Path(p).suffix for p in downloads] == [".glb", ".ply", ".obj"]
    full = trimesh.load(downloads[0], force="mesh")
    shown = trimesh.load(preview, force="mesh")
    assert len(shown.faces) <= 500 < len(full.faces)
    assert "Seed used: **3**" in text and "simplified" in text and f"{len(full.faces):,} faces" in text


def test_seed_box_empty_is_random_and_text_is_refused():
    assert parse_seed("") is None and parse_seed("  ") is None and parse_seed(" 42 ") == 42
    with pytest.raises(gr.Error, match="seed: 'abc' is not a whole number"):
        parse_seed("abc")


def test_stop_ends_between_steps_and_keeps_the_shape(studio, rows):
    cancel = threading.Event()
    seen = []

    def progress(fraction: float, desc: str) -> None:
        seen.append(desc)
        if desc == "denoising: 2/6 steps":
            cancel.set()  # as the Stop button does

    result = generate_shape(studio, ShapeRequest(prompt=PROMPT, steps=6, seed=4),
                            call("ui", "stop-test", cancel=cancel, progress=progress))
    assert result.stopped and result.steps == 2 and len(result.mesh.faces) > 0 and result.frames == []
    # Heun evaluates the prior 2 * 6 - 1 times; the run ended right after the evaluation that completed step 2
    assert seen[:4] == [f"denoising: {n}/6 steps" for n in (0, 1, 1, 2)] and seen[4] == "extracting the mesh"
    assert next(r for r in rows if r["endpoint"] == "ui:stop-test")["status"] == "stopped"


# ---------------------------------------------------------------------------------------------- HTTP

@pytest.mark.parametrize("fmt", ["glb", "ply", "obj"])
def test_http_returns_the_same_mesh_for_the_same_seed(http, shape, fmt):
    resp = http.post("/generate/3d", json={"prompt": PROMPT, "steps": 2, "seed": 11, "format": fmt})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == MEDIA_TYPES[fmt] and resp.headers["x-seed"] == "11"
    assert resp.headers["content-disposition"] == f'attachment; filename="shape-11.{fmt}"'
    mesh = trimesh.load(io.BytesIO(resp.content), file_type=fmt, force="mesh", process=False)
    assert int(resp.headers["x-faces"]) == len(mesh.faces) == len(shape.mesh.faces)
    np.testing.assert_allclose(mesh.vertices, shape.mesh.vertices, atol=1e-5)


@pytest.mark.parametrize("body, status, field", [
    ({"prompt": "   "}, 422, "prompt"),
    ({"prompt": PROMPT, "steps": 0}, 422, "steps"),
    ({"prompt": PROMPT, "steps": 65}, 422, "steps"),  # the tiny model's cap is 64
    ({"prompt": PROMPT, "guidance": -1}, 422, "guidance"),
    ({"prompt": PROMPT, "guidance": 31}, 422, "guidance"),
    ({"prompt": PROMPT, "format": "stl"}, 422, "format"),
    ({"prompt": PROMPT, "seed": -5}, 422, "seed"),
    ({"prompt": PROMPT, "model": "tiny-sd"}, 422, "model"),  # an image model
    ({"prompt": PROMPT, "model": "no-such-model"}, 404, "model"),
    ({"steps": 2}, 422, "prompt"),
])
def test_bad_input_gets_4xx_naming_the_field(http, rows, body, status, field):
    before = len(rows)
    resp = http.post("/generate/3d", json=body)
    assert resp.status_code == status and field in str(resp.json()["detail"])
    assert len(rows) == before  # refused before any generation


def test_service_checks_fields_the_http_body_does_not_carry(studio, shape):
    with pytest.raises(InputError, match="frame_size: must be a multiple of 32"):
        validate(studio, ShapeRequest(prompt=PROMPT, frame_size=48))
    with pytest.raises(InputError, match="frame_size"):
        validate(studio, ShapeRequest(prompt=PROMPT, frame_size=96))  # above the tiny model's 64
    with pytest.raises(InputError, match="format: must be one of glb, ply, obj"):
        export_mesh(shape.mesh, "stl")


# ---------------------------------------------------------------------------------------------- from an image

def chair_photo() -> bytes:
    from PIL import Image

    image = Image.new("RGB", (96, 80), "white")
    image.paste((180, 40, 30), (30, 20, 66, 70))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_image_model_makes_a_shape_from_an_image_with_the_same_cache(studio, rows):
    result = generate_shape(studio, ShapeRequest(image=chair_photo(), steps=2, seed=8), call())
    assert result.settings["model"] == "tiny-shap-e-img2img" and result.settings["input"] == "image"
    assert len(result.mesh.faces) > 0 and colours(result.mesh).std() > 0 and len(result.frames) == 20
    again = generate_shape(studio, ShapeRequest(image=chair_photo(), steps=2, seed=8, turntable=False), call())
    np.testing.assert_allclose(again.mesh.vertices, result.mesh.vertices)
    assert {m.id for m in studio.cache.snapshot().models} >= {"tiny-shap-e-img2img"}
    assert rows[-1]["model"] == "tiny-shap-e-img2img" and rows[-1]["status"] == "ok"


def test_the_tab_makes_a_shape_from_an_image(studio):
    from PIL import Image

    preview, gif, downloads, text = shape_tab.make_shape(
        shape_tab.runner(studio), ShapeRequest(image=Image.open(io.BytesIO(chair_photo())), steps=1, seed=2,
                                               model="tiny-shap-e-img2img"), session="s")
    assert Path(preview).suffix == ".glb" and gif and len(downloads) == 3 and "Seed used: **2**" in text


@pytest.mark.parametrize("send", ["json", "multipart"])
def test_http_makes_a_shape_from_an_image(http, studio, send):
    import base64

    if send == "json":
        resp = http.post("/generate/3d", json={"image": base64.b64encode(chair_photo()).decode(), "steps": 2,
                                               "seed": 8, "format": "ply"})
    else:
        resp = http.post("/generate/3d", files={"image": ("chair.png", chair_photo(), "image/png")},
                         data={"steps": "2", "seed": "8", "format": "ply"})
    assert resp.status_code == 200, resp.text
    mesh = trimesh.load(io.BytesIO(resp.content), file_type="ply", force="mesh", process=False)
    same = generate_shape(studio, ShapeRequest(image=chair_photo(), steps=2, seed=8, turntable=False), call())
    assert len(mesh.faces) == len(same.mesh.faces)


@pytest.mark.parametrize("request_fields, field, words", [
    ({"image": b"\x89PNG not really"}, "image", "is not an image"),
    ({"image": chair_photo(), "model": "tiny-shap-e"}, "image", "makes shapes from text"),
    ({"model": "tiny-shap-e-img2img"}, "image", "makes shapes from an image"),
])
def test_bad_image_input_is_refused_naming_the_field(studio, request_fields, field, words):
    with pytest.raises(InputError) as caught:
        validate(studio, ShapeRequest(**request_fields))
    assert caught.value.field == field and words in caught.value.message


# ---------------------------------------------------------------------------------------------- Gradio client

def test_gradio_client_generate_3d(live_server):
    from gradio_client import Client

    _studio, url = live_server
    client = Client(url, verbose=False)
    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/generate_3d"]["parameters"]
    assert [p["parameter_name"] for p in params] == ["prompt", "guidance", "steps", "seed", "model", "image"]
    path = client.predict(prompt=PROMPT, steps=1, seed=5, api_name="/generate_3d")
    mesh = trimesh.load(path, force="mesh")
    assert Path(path).suffix == ".glb" and len(mesh.faces) > 0 and colours(mesh).std() > 0
    with pytest.raises(Exception, match="prompt: must not be empty"):
        client.predict(prompt="", api_name="/generate_3d")
