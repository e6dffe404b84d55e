"""Hugging Face Spaces: README front matter, the environment a Space gives app.py, storage and ZeroGPU."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from conftest import call, free_port
from studio import spaces
from studio.config import parse_settings
from studio.catalog import DEFAULT_MODELS

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "app.py"
HARDWARE = {"cpu-basic", "cpu-upgrade", "t4-small", "t4-medium", "l4x1", "l4x4", "l40sx1", "a10g-small",
            "a10g-large", "a100-large", "zero-a10g"}
COLORS = {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}


class AppProcess:
    """`python app.py ...` as a subprocess; a thread collects its output line by line."""

    def __init__(self, *argv: str, cwd: Path, env: dict | None = None):
        self.argv, self.cwd = argv, cwd
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})}
        self.lines: list[str] = []

    def __enter__(self) -> "AppProcess":
        self.proc = subprocess.Popen([sys.executable, str(APP), *self.argv], cwd=self.cwd, env=self.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(timeout=5)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line.rstrip("\n") for line in list(self.lines) if text in line]
            if found:
                return found[0]
            assert self.proc.poll() is None, f"app.py exited with {self.proc.returncode}:\n{self.output}"
            time.sleep(0.2)
        raise AssertionError(f"{text!r} not printed within {timeout} s:\n{self.output}")

    def health(self, url: str, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"app.py exited with {self.proc.returncode}:\n{self.output}"
            try:
                return httpx.get(url + "/health", timeout=2).json()
            except httpx.HTTPError:
                time.sleep(0.5)
        raise AssertionError(f"no answer from {url}/health within {timeout} s:\n{self.output}")


def front_matter() -> dict:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert match, "README.md must start with a YAML block between --- lines"
    return yaml.safe_load(match.group(1))


def gradio_pin() -> str:
    match = re.search(r"^gradio(?:\[[^\]]*\])?==([\w.]+)\s*$", (ROOT / "requirements.txt").read_text(), re.M)
    assert match, "requirements.txt must pin gradio with =="
    return match.group(1)


def test_front_matter_describes_the_space():
    meta = front_matter()
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == gradio_pin()
    assert meta["app_file"] == "app.py" and (ROOT / meta["app_file"]).is_file()
    assert isinstance(meta["python_version"], str) and re.fullmatch(r"3\.\d+", meta["python_version"])
    assert isinstance(meta["title"], str) and meta["title"] and len(meta.get("short_description", "")) <= 60
    repos = list(dict.fromkeys(source.repo for spec in DEFAULT_MODELS for source in spec.sources().values()))
    assert meta["models"] == repos
    assert [entry.split()[0] for entry in meta["preload_from_hub"]] == repos
    assert meta["suggested_hardware"] in HARDWARE and meta["suggested_storage"] in ("small", "medium", "large")
    assert re.fullmatch(r"\d+[mh]", meta["startup_duration_timeout"])
    assert {meta["colorFrom"], meta["colorTo"]} <= COLORS


def test_app_starts_with_the_environment_spaces_gives_it(tmp_path):
    port = free_port()
    env = {"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": str(port), "SPACE_ID": "someone/genai-studio",
           "SYSTEM": "spaces", "HF_HUB_OFFLINE": "1"}
    with AppProcess("--profile", "tiny", cwd=tmp_path, env=env) as app:
        url = f"http://127.0.0.1:{port}"
        health = app.health(url)
        assert health["status"] == "ok" and health["profile"] == "tiny"
        listening = {c.laddr for c in psutil.Process(app.proc.pid).net_connections("inet") if c.status == "LISTEN"}
        assert ("0.0.0.0", port) in listening  # GRADIO_SERVER_NAME: every interface, as Spaces' proxy needs
        assert httpx.get(url + "/").status_code == 200  # the UI
        assert httpx.get(url + "/config").json()["max_file_size"] == 50 * 2**20  # a Space is public: limits on
    assert (tmp_path / "logs").is_dir()  # no /data here: logs beside the app


def test_persistent_storage_holds_the_hub_cache(tmp_path):
    env: dict[str, str] = {}
    spaces.configure(env, data=tmp_path)
    assert env["HF_HOME"] == str(tmp_path / ".huggingface")

    env = {"HF_HOME": "/elsewhere"}
    spaces.configure(env, data=tmp_path)
    assert env["HF_HOME"] == "/elsewhere"  # an explicit setting wins

    env = {}
    spaces.configure(env, data=tmp_path / "not-mounted")
    assert "HF_HOME" not in env


def test_app_points_the_hub_cache_at_storage_before_the_hub_is_imported(tmp_path):
    code = (f"import sys, pathlib, studio.config\n"
            f"studio.config.SPACES_DATA = pathlib.Path({str(tmp_path)!r})  # stands for a mounted /data\n"
            "import app\n"
            "assert 'huggingface_hub' not in sys.modules and 'torch' not in sys.modules\n"
            "from huggingface_hub import constants\n"
            "print(constants.HF_HOME)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "HF_HUB_CACHE")}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / ".huggingface")


def test_without_zero_gpu_nothing_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")  # the variable alone, without the `spaces` package
    assert not spaces.zero_gpu()

    def generate(steps: int) -> int:
        return steps

    assert spaces.gpu(lambda steps: spaces.reserve(steps))(generate) is generate
    env = {"SPACES_ZERO_GPU": "true"}
    spaces.configure(env, data=tmp_path / "none")
    assert "STUDIO_DEVICE" not in env


@pytest.fixture
def fake_spaces(tmp_path, monkeypatch):
    """A stand-in `spaces` package whose GPU decorator records the reserved duration of each call."""
    (tmp_path / "spaces.py").write_text(
        "import functools\n"
        "calls = []\n"
        "def GPU(duration=None):\n"
        "    def decorate(fn):\n"
        "        @functools.wraps(fn)\n"
        "        def run(*args, **kwargs):\n"
        "            calls.append(duration(*args, **kwargs))\n"
        "            return fn(*args, **kwargs)\n"
        "        return run\n"
        "    return decorate\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    yield
    sys.modules.pop("spaces", None)


def test_on_zero_gpu_generation_runs_under_spaces_gpu(fake_spaces, tmp_path):
    assert spaces.zero_gpu()

    @spaces.gpu(lambda prompt, steps: spaces.reserve(steps * 0.5))
    def generate(prompt: str, steps: int) -> str:
        return f"{prompt}/{steps}"

    assert generate("a cat", 20) == "a cat/20" and generate("a cat", 40) == "a cat/40"
    import spaces as fake

    assert fake.calls == [spaces.reserve(10), spaces.reserve(20)] and fake.calls[0] < fake.calls[1]

    env = {"SPACES_ZERO_GPU": "true"}
    spaces.configure(env, data=tmp_path / "none")
    assert env["STUDIO_DEVICE"] == "cpu"  # the cache keeps models in RAM; the GPU exists only inside a call
    assert parse_settings(["--profile", "tiny"], env=env).device == "cpu"
    env = {"SPACES_ZERO_GPU": "true", "STUDIO_DEVICE": "cuda"}
    spaces.configure(env, data=tmp_path / "none")
    assert env["STUDIO_DEVICE"] == "cuda"


def test_gpu_durations_grow_with_the_request_and_are_capped():
    from studio.backends import chat, image, shape, speech

    def reserved(module, req) -> int:
        return spaces.reserve(module.gpu_seconds(req))

    hi = [{"role": "user", "content": "hi"}]
    assert reserved(chat, chat.ChatRequest(hi, max_new_tokens=64)) < reserved(chat, chat.ChatRequest(
        hi, max_new_tokens=1024)) <= spaces.MAX_GPU_SECONDS
    small, big = image.ImageRequest(prompt="x", steps=4), image.ImageRequest(prompt="x", steps=25)
    assert reserved(image, small) < reserved(image, big) < reserved(image, image.ImageRequest(
        prompt="x", steps=25, width=1024, height=1024))
    assert reserved(image, big) < reserved(image, image.ImageRequest(prompt="x", steps=25, n=4))
    assert reserved(speech, speech.SpeechRequest("Hi.")) < reserved(speech, speech.SpeechRequest("A sentence. " * 30))
    assert reserved(shape, shape.ShapeRequest("a chair", steps=16)) < reserved(shape, shape.ShapeRequest(
        "a chair", steps=64))
    assert spaces.reserve(10**6) == spaces.MAX_GPU_SECONDS and spaces.reserve(0) == spaces.BASE_SECONDS


def test_on_zero_gpu_each_generation_moves_its_model_to_the_gpu_for_the_call(fake_spaces, make_studio, monkeypatch):
    """Every tab generates through its modality's Runner, and the Runner's calls (the tabs' events and the
    client/MCP endpoints) run under `spaces.GPU`; inside the call the cache moves the model to CUDA and back to the
    CPU afterwards. This machine has no GPU, so the moves are recorded instead of made; the models still compute
    (on the CPU)."""
    import gradio as gr
    from gradio_client import Client

    from studio import devices
    from studio.backends.chat import ChatRequest
    from studio.backends.image import ImageRequest
    from studio.backends.shape import ShapeRequest
    from studio.backends.speech import SpeechRequest
    from studio.backends.video import VideoRequest
    from studio.server import launch
    from studio.ui import chat_tab, image_tab, shape_tab, speech_tab, video_tab
    import spaces as fake

    moves = []
    monkeypatch.setattr(devices, "move", lambda model, device: moves.append((type(model).__name__, device)))
    studio = make_studio("--port", str(free_port()))

    def on_gpu(run, *args, **kwargs):
        before = len(fake.calls)
        result = run(*args, **kwargs)
        result = list(result) if inspect.isgenerator(result) else result
        assert len(fake.calls) == before + 1 and fake.calls[-1] >= spaces.BASE_SECONDS
        assert moves[-2:] == [(moves[-2][0], "cuda"), (moves[-2][0], "cpu")]  # there and back, once
        assert all(m.device == "cpu" for m in studio.cache.snapshot().models)
        return result

    progress = gr.Progress()
    hi = [{"role": "user", "content": "Hi"}]
    assert on_gpu(chat_tab.runner(studio).stream, ChatRequest(hi, max_new_tokens=4, seed=5), "zero", progress)[-1].done
    assert on_gpu(speech_tab.runner(studio).run, SpeechRequest("Hello there.", "tiny-vits"), "zero", progress).pieces
    assert on_gpu(image_tab.runner(studio).run, ImageRequest(prompt="a fox", steps=1), "zero", progress).images
    assert on_gpu(shape_tab.runner(studio).run, ShapeRequest("a chair", steps=2, turntable=False), "zero").mesh
    assert on_gpu(video_tab.runner(studio).run, VideoRequest(prompt="a fox", steps=1, frames=4), "zero").files
    assert {name for name, _ in moves} >= {"TransformersChat", "DiffusersImage", "VitsSpeech", "ShapEModel",
                                           "VideoModel"}

    demo, url = launch(studio, block=False)  # the client / MCP endpoints, called over HTTP
    try:
        client = Client(url, verbose=False)
        moves.clear()
        assert on_gpu(client.predict, "Hello", api_name="/generate_text")
        assert on_gpu(client.predict, "Hello there.", "tiny-vits", api_name="/generate_speech")
        assert on_gpu(client.predict, "a fox", api_name="/generate_image")
        assert on_gpu(client.predict, "a chair", None, 2, api_name="/generate_3d")
        assert on_gpu(client.predict, "a fox", frames=4, steps=1, api_name="/generate_video")
    finally:
        demo.close()

    moves.clear()
    with studio.generation(studio.registry.get("tiny-llama"), call()):
        pass  # outside a GPU call (the HTTP routes): the model stays where the cache keeps it
    assert moves == []


def test_a_model_shared_by_two_calls_goes_back_after_the_last(monkeypatch):
    from studio import devices
    from studio.cache import ModelCache
    from studio.registry import ModelSpec, Registry

    moves = []
    monkeypatch.setattr(devices, "move", lambda model, device: moves.append(device))
    reg = Registry("t", [ModelSpec(id="m", modality="chat", label="m", loader="x:y", params=10)])
    cache = ModelCache(reg, budget=100, loader=lambda spec, device: object(), estimate=lambda spec, device: 10,
                       measure=lambda model: 10)
    with cache.use("m", run_on="cuda"):
        with cache.use("m", run_on="cuda"):
            assert moves == ["cuda"]
        assert moves == ["cuda"]  # the first call still computes there
    assert moves == ["cuda", "cpu"]
    with cache.use("m"), cache.use("m", run_on="cpu"):
        pass
    assert moves == ["cuda", "cpu"]  # no call device, or the cache's own: nothing moves

    def out_of_memory(model, device):
        moves.append(device)
        if device == "cuda":
            raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(devices, "move", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"), cache.use("m", run_on="cuda"):
        pass
    assert moves[-2:] == ["cuda", "cpu"]  # what a failed move had moved goes back
    assert [m.device for m in cache.snapshot().models] == ["cpu"]


def test_a_gpu_call_keeps_its_device_in_every_step_of_a_stream():
    from concurrent.futures import ThreadPoolExecutor

    from studio import devices

    def steps():
        for _ in range(3):
            yield devices.call_device()

    stream = devices.run_on("cuda", steps)()
    with ThreadPoolExecutor(2) as pool:  # Gradio steps a streaming handler from worker threads
        seen = [pool.submit(next, stream).result() for _ in range(3)]
    assert seen == ["cuda"] * 3
    assert devices.run_on("cuda", devices.call_device)() == "cuda"
    assert devices.call_device() is None  # the caller's context is untouched


def test_preload_lists_only_the_files_the_loaders_read():
    """`preload_from_hub` named whole repositories: SD 1.5's holds multi-GB root checkpoints (.ckpt and
    .safetensors, full and EMA-only) beside the diffusers folders, tens of GB a Space build fetched for nothing."""
    from studio.registry import ModelSpec, Source
    from studio.spaces import preload_entries

    trees = {
        "sd/v1-5": ["model_index.json", "v1-5-pruned.ckpt", "v1-5-pruned.safetensors", "v1-5-pruned-emaonly.ckpt",
                    "README.md", ".gitattributes", "v1-inference.yaml", "scheduler/scheduler_config.json",
                    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                    "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.bin",
                    "unet/diffusion_pytorch_model.non_ema.safetensors", "safety_checker/config.json",
                    "safety_checker/model.safetensors", "tokenizer/vocab.json", "vae/flax_model.msgpack"],
        "guoyww/motion": ["config.json", "diffusion_pytorch_model.safetensors",
                          "diffusion_pytorch_model.fp16.safetensors", "README.md"],
        "org/llm": ["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json", "tf_model.h5"],
    }
    specs = [
        ModelSpec(id="sd", modality="image", label="", loader="x:y", params=1, repo="sd/v1-5"),
        ModelSpec(id="ad", modality="video", label="", loader="x:y", params=1, repo="sd/v1-5",
                  skip=("safety_checker/",), parts={"motion_adapter": Source("guoyww/motion", skip=("*.fp16.*",))}),
        ModelSpec(id="llm", modality="chat", label="", loader="x:y", params=1, repo="org/llm"),
    ]
    asked = []
    entries = preload_entries(specs, lambda repo, rev: asked.append((repo, rev)) or trees[repo])
    by_repo = {entry.split()[0]: set(entry.split()[1].split(",")) for entry in entries}
    assert by_repo["sd/v1-5"] == {"model_index.json", "scheduler/scheduler_config.json",
                                  "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                                  "safety_checker/config.json", "safety_checker/model.safetensors",
                                  "tokenizer/vocab.json"}  # the image model reads the safety checker's folder
    assert by_repo["guoyww/motion"] == {"config.json", "diffusion_pytorch_model.safetensors"}
    assert by_repo["org/llm"] == {"config.json", "model.safetensors", "tokenizer.json"}
    assert ("sd/v1-5", "main") in asked and [e.split()[0] for e in entries] == ["sd/v1-5", "guoyww/motion", "org/llm"]
