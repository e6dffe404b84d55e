"""Video, the low-level pieces (tiny profile): every tiny video model renders, its MP4 decodes with the asked
frames, size and fps, seeds reproduce, an SD 1.5 LoRA changes AnimateDiff's frames and removing it restores
them, Stop returns nothing quickly, GIF and WebP decode."""

from __future__ import annotations

import io
import json
import threading
import time

import av
import numpy as np
import pytest
from PIL import Image

from studio import devices
from studio.backends.lora import LoraError, LoraInfo, PipelineLoras
from studio.backends.video import (check_shape, encode_gif, encode_mp4, encode_webp, load_animatediff, load_wan,
                                   render_frames, thumbnail)
from studio.catalog import TINY_MODELS
from studio.contract import InputError
from studio.tiny.image import random_lora
from studio.weights import ensure_local, safetensors_bytes

ANIMATEDIFF, WAN = (next(s for s in TINY_MODELS if s.id == name) for name in ("tiny-animatediff", "tiny-wan"))
# (spec, loader, frames, size): Wan's frame counts are 4k + 1.
MODELS = {"animatediff": (ANIMATEDIFF, load_animatediff, 8, 64), "wan": (WAN, load_wan, 9, 64)}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest and steadiest


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    """(model, frames, size, folder) for each tiny video model, loaded once for the module."""
    spec, loader, frames, size = MODELS[request.param]
    folder = ensure_local(spec)
    return loader(spec, folder, "cpu", "float32"), frames, size, folder


def render(model, frames: int, size: int, *, prompt: str = "a red fox running", seed: int = 7, steps: int = 3,
           **kwargs):
    return render_frames(model, prompt=prompt, negative_prompt="blurry", frames=frames, width=size, height=size,
                         steps=steps, guidance=5.0, seed=seed, **kwargs)


def pixels(frames: list) -> np.ndarray:
    return np.stack([np.asarray(frame) for frame in frames])


def test_renders_and_the_mp4_decodes_with_the_asked_frames_size_and_fps(case):
    model, frames, size, _ = case
    progress: list[tuple[int, int]] = []
    clip = render(model, frames, size, on_step=lambda done, total: progress.append((done, total)))
    assert len(clip) == frames and clip[0].size == (size, size)
    assert progress == [(1, 3), (2, 3), (3, 3)]
    assert pixels(clip).std() > 0 and np.abs(np.diff(pixels(clip).astype(int), axis=0)).mean() > 0  # frames move
    with av.open(io.BytesIO(encode_mp4(clip, fps=8))) as container:
        stream = container.streams.video[0]
        decoded = list(container.decode(stream))
        assert (stream.codec_context.name, stream.codec_context.profile, stream.format.name) == ("h264", "High",
                                                                                                 "yuv420p")
        assert stream.average_rate == 8
    assert len(decoded) == frames and (decoded[0].width, decoded[0].height) == (size, size)


def test_same_seed_and_settings_give_the_same_frames_and_bytes(case):
    model, frames, size, _ = case
    first, again, other = render(model, frames, size), render(model, frames, size), render(model, frames, size, seed=8)
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))
    assert encode_mp4(first, 8) == encode_mp4(again, 8)


def test_stop_returns_nothing_after_the_running_step(case):
    model, frames, size, _ = case
    cancel, steps = threading.Event(), []

    def on_step(done: int, total: int) -> None:
        steps.append(done)
        cancel.set()

    started = time.perf_counter()
    assert render(model, frames, size, steps=50, cancel=cancel, on_step=on_step) is None
    assert steps == [1] and time.perf_counter() - started < 5
    assert render(model, frames, size, cancel=cancel) is None  # already stopped: nothing runs
    assert len(render(model, frames, size)) == frames  # the pipeline is fine afterwards


def test_the_size_estimate_from_the_folder_is_the_loaded_size(case):
    """The motion adapter's weights live in the UNetMotionModel only (the loader drops the adapter's copy), so the
    safetensors headers (SD 1.5 parts + motion_adapter/) size the loaded model; buffers not saved differ a little."""
    model, _, _, folder = case
    loaded, estimate = devices.module_bytes(model), safetensors_bytes(folder, "float32")
    assert abs(loaded - estimate) / loaded < 0.01


def test_tiny_animatediff_is_the_tiny_sd15_image_model_plus_motion():
    """So an adapter made for the tiny SD 1.5 image model fits the tiny AnimateDiff, as real SD 1.5 LoRAs do."""
    image, video = ensure_local(next(s for s in TINY_MODELS if s.id == "tiny-sd")), ensure_local(ANIMATEDIFF)
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "vae/diffusion_pytorch_model.safetensors"):
        assert (image / part).read_bytes() == (video / part).read_bytes()


def test_an_sd15_lora_changes_animatediff_frames_and_disabling_restores_them(tmp_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    folder, frames, size = ensure_local(ANIMATEDIFF), 8, 64
    model = load_animatediff(ANIMATEDIFF, folder, "cpu", "float32")
    # Adapters made for the SD 1.5 parts of the folder: the tiny SD 1.5 image model's architecture and weights.
    unet, text_encoder = UNet2DConditionModel.from_pretrained(folder / "unet"), \
        CLIPTextModel.from_pretrained(folder / "text_encoder")
    infos = [LoraInfo(name, random_lora(tmp_path / f"{name}.safetensors", unet, text_encoder, seed=seed, kohya=kohya),
                      "kohya" if kohya else "diffusers", f"loras/{name}.safetensors")
             for name, seed, kohya in (("a", 1, False), ("a-kohya", 1, True), ("b", 2, False))]
    a, a_kohya, b = infos
    loras, grown = PipelineLoras(), []
    base = pixels(render(model, frames, size))

    def with_adapters(chosen: dict) -> np.ndarray:
        loras.activate(model.pipe, "tiny-animatediff", chosen, grown.append)
        return pixels(render(model, frames, size))

    styled = with_adapters({a: 1.0})
    assert not np.array_equal(styled, base)
    assert np.array_equal(with_adapters({}), base)  # disable_lora: exactly the frames without adapters
    assert np.array_equal(with_adapters({a_kohya: 1.0}), styled)  # the kohya format holds the same weights
    mixed = with_adapters({a: 0.5, b: 1.0})
    assert not np.array_equal(mixed, styled) and not np.array_equal(mixed, base)
    assert np.array_equal(with_adapters({a: 1.0}), styled)  # A -> mix -> A is bit-identical
    assert np.array_equal(with_adapters({}), base)
    assert sum(grown) > 0

    wan = load_wan(WAN, ensure_local(WAN), "cpu", "float32")  # another base: refused, the pipeline left as it was
    with pytest.raises(LoraError, match="^adapters: loras/a.safetensors cannot be loaded into tiny-wan"):
        PipelineLoras().activate(wan.pipe, "tiny-wan", {a: 1.0}, grown.append)
    assert wan.pipe.get_list_adapters() == {}


@pytest.mark.parametrize("family, frames, width, height, field", [
    ("animatediff", 8, 60, 64, "width"), ("animatediff", 33, 64, 64, "frames"), ("wan", 8, 64, 64, "frames"),
    ("wan", 9, 64, 72, "height"), ("wan", 0, 64, 64, "frames")])
def test_shapes_a_model_cannot_make_exactly_are_refused_naming_the_field(family, frames, width, height, field):
    with pytest.raises(InputError, match=f"^{field}: .* for this model$"):
        check_shape(family, frames, width, height)
    check_shape(family, 9, 64, 64)


def gradient(count: int, width: int, height: int) -> list:
    ramp = np.linspace(0, 255, width * height * 3).reshape(height, width, 3)
    return [Image.fromarray(((ramp + 20 * i) % 256).astype(np.uint8)) for i in range(count)]


def test_mp4_of_an_odd_size_and_a_fractional_fps_is_padded_to_even_and_keeps_the_rate_and_colours():
    frames = gradient(5, 33, 21)
    with av.open(io.BytesIO(encode_mp4(frames, fps=7.5))) as container:
        stream = container.streams.video[0]
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]  # as tagged: BT.709
        assert stream.average_rate == 7.5
    assert len(decoded) == 5 and decoded[0].shape == (22, 34, 3)
    error = np.abs(np.stack(decoded)[:, :21, :33].astype(int) - pixels(frames)).mean()
    assert error < 4  # lossy, but no colour-matrix shift


def test_mp4_starts_with_its_index_for_streaming_playback():
    data = encode_mp4(gradient(3, 32, 32), fps=8)
    assert data.index(b"moov") < data.index(b"mdat")  # +faststart


@pytest.mark.parametrize("encode, fmt", [(encode_gif, "GIF"), (encode_webp, "WEBP")])
def test_gif_and_webp_decode_with_every_frame_at_the_rate(encode, fmt):
    frames = gradient(6, 40, 24)
    with Image.open(io.BytesIO(encode(frames, fps=10))) as image:
        assert (image.format, image.n_frames, image.size) == (fmt, 6, (40, 24))
        image.seek(5)
        image.load()  # WebP reads a frame's duration when it decodes the frame
        assert image.info["duration"] == 100 and image.info["loop"] == 0
    assert encode(frames, fps=10) == encode(frames, fps=10)


def test_thumbnail_is_the_middle_frame_as_png():
    frames = gradient(5, 16, 16)
    with Image.open(io.BytesIO(thumbnail(frames))) as still:
        assert still.format == "PNG" and np.array_equal(np.asarray(still.convert("RGB")), np.asarray(frames[2]))
    with pytest.raises(ValueError, match="^frames: "):
        encode_mp4([], 8)


def fake_hub_snapshot(cache, repo: str, files: dict) -> None:
    """A repository as the Hugging Face cache holds it after a download: refs/main naming a snapshot folder."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    for name, source in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, snapshot / name)
        else:
            shutil.copy(source, snapshot / name)


def test_animatediff_from_two_hub_repositories_loads_from_one_folder_and_is_sized_before_loading(tmp_path,
                                                                                                 monkeypatch):
    """The default profile's AnimateDiff entry names SD 1.5 and the motion adapter's repository; the cache holds
    them as two snapshots (here: fakes holding the tiny model's files). The loader gets one folder of links,
    without what the entry skips (the safety checker, the fp16 twin); the size estimate from it is the loaded
    size. SD 1.5 fetched that way lacks the image model's safety checker, so for the image model it is not
    'cached' (the rest would be fetched)."""
    import huggingface_hub.constants

    from studio.catalog import DEFAULT_MODELS
    from studio.weights import estimate_bytes, is_cached

    tiny = ensure_local(ANIMATEDIFF)
    spec, image = (next(s for s in DEFAULT_MODELS if s.id == name) for name in ("animatediff", "sd-1.5"))
    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("STUDIO_TINY_DIR", str(tmp_path / "studio" / "tiny"))
    index = json.loads((tiny / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps(  # as on the Hub: SD 1.5 names its safety checker
        {**index, "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"]}))
    (tmp_path / "v1-5-pruned.safetensors").write_bytes((tiny / "vae" / "diffusion_pytorch_model.safetensors")
                                                       .read_bytes())  # a single-file checkpoint at the root
    fake_hub_snapshot(hub, spec.repo, {"model_index.json": tmp_path / "model_index.json",
                                       "v1-5-pruned.safetensors": tmp_path / "v1-5-pruned.safetensors",
                                       **{name: tiny / name for name in ("unet", "vae", "text_encoder", "tokenizer",
                                                                         "scheduler")}})
    adapter = tiny / "motion_adapter"
    fake_hub_snapshot(hub, spec.parts["motion_adapter"].repo, {
        "config.json": adapter / "config.json", "diffusion_pytorch_model.safetensors":
            adapter / "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors": adapter / "diffusion_pytorch_model.safetensors"})

    assert is_cached(spec) and not is_cached(image)
    folder = ensure_local(spec)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_symlink())
    assert "motion_adapter/diffusion_pytorch_model.safetensors" in files and "unet/config.json" in files
    assert not [f for f in files if "fp16" in f or "safety_checker" in f]
    assert ensure_local(spec) == folder  # built once
    estimate = estimate_bytes(spec, "float32")  # the root checkpoint is not counted
    model = load_animatediff(spec, folder, "cpu", "float32")
    assert abs(devices.module_bytes(model) - estimate) / estimate < 0.01
    assert len(render(model, 4, 64, steps=1)) == 4
