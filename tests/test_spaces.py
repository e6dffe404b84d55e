"""Hugging Face Spaces: README front matter, the environment a Space gives app.py, storage and ZeroGPU."""

from __future__ import annotations

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

from conftest import free_port
from studio import spaces
from studio.config import parse_settings
from studio.registry import DEFAULT_MODELS

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
    repos = [spec.repo for spec in DEFAULT_MODELS if spec.repo]
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

    assert spaces.gpu(lambda steps: spaces.image_seconds(steps, 512, 512))(generate) is generate
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

    @spaces.gpu(lambda prompt, steps, width=512, height=512: spaces.image_seconds(steps, width, height))
    def generate(prompt: str, steps: int, width: int = 512, height: int = 512) -> str:
        return f"{prompt}/{steps}/{width}x{height}"

    assert generate("a cat", 20) == "a cat/20/512x512"
    assert generate("a cat", 40, width=768, height=768) == "a cat/40/768x768"
    import spaces as fake

    assert fake.calls == [spaces.image_seconds(20, 512, 512), spaces.image_seconds(40, 768, 768)]
    assert fake.calls[0] < fake.calls[1]

    env = {"SPACES_ZERO_GPU": "true"}
    spaces.configure(env, data=tmp_path / "none")
    assert env["STUDIO_DEVICE"] == "cpu"  # the cache keeps models in RAM; the GPU exists only inside a call
    assert parse_settings(["--profile", "tiny"], env=env).device == "cpu"
    env = {"SPACES_ZERO_GPU": "true", "STUDIO_DEVICE": "cuda"}
    spaces.configure(env, data=tmp_path / "none")
    assert env["STUDIO_DEVICE"] == "cuda"


def test_gpu_durations_grow_with_the_request_and_are_capped():
    assert spaces.chat_seconds(64) < spaces.chat_seconds(1024) <= spaces.MAX_GPU_SECONDS
    assert spaces.image_seconds(4, 512, 512) < spaces.image_seconds(25, 512, 512) < spaces.image_seconds(25, 1024, 1024)
    assert spaces.image_seconds(25, 512, 512) < spaces.image_seconds(25, 512, 512, n=4)
    assert spaces.speech_seconds("Hi.") < spaces.speech_seconds("A longer sentence to read aloud. " * 10)
    assert spaces.shape_seconds(16) < spaces.shape_seconds(64)
    assert spaces.chat_seconds(10**6) == spaces.image_seconds(1000, 1024, 1024, n=8) == spaces.MAX_GPU_SECONDS
    assert min(spaces.chat_seconds(1), spaces.speech_seconds(""), spaces.shape_seconds(1)) >= spaces.BASE_SECONDS


def test_on_zero_gpu_each_generation_moves_its_model_to_the_gpu_for_the_call(fake_spaces, make_studio, monkeypatch):
    """The UI's generation handlers and the client/MCP endpoints run under `spaces.GPU`; inside the call the
    cache moves the model to CUDA and back to the CPU afterwards. This machine has no GPU, so the moves are
    recorded instead of made; the models still compute (on the CPU)."""
    import gradio as gr

    from studio import devices
    from studio.ui import build_ui

    moves = []
    monkeypatch.setattr(devices, "move", lambda model, device: moves.append((type(model).__name__, device)))
    studio = make_studio()
    demo = build_ui(studio)
    fns = {(f.fn.__module__.rsplit(".", 1)[-1], f.fn.__name__): f for f in demo.fns.values() if f.fn}
    request, progress = gr.Request(session_hash="zero"), gr.Progress()
    import spaces as fake

    def gpu_call(key, *args):
        before = len(fake.calls)
        result = fns[key].fn(*args)
        result = list(result) if key == ("chat_tab", "run") else result
        assert len(fake.calls) == before + 1 and fake.calls[-1] >= spaces.BASE_SECONDS, key
        assert moves[-2:] == [(moves[-2][0], "cuda"), (moves[-2][0], "cpu")], key  # there and back, once
        assert all(entry.moved_to is None for entry in studio.cache._entries.values())
        return result

    chat_model, image_model, shape_model = (studio.models(m)[0] for m in ("chat", "image", "3d"))
    assert gpu_call(("chat_tab", "chat"), "Hello", chat_model, "", None, 4, 0.0, None, None, None, 5)
    assert gpu_call(("chat_tab", "run"), [{"role": "user", "content": "Hi"}], chat_model, "", 4, 0.0, 1.0, 0, 1.0,
                    "5", request, progress)[-1][0][-1]["role"] == "assistant"
    assert gpu_call(("image_tab", "generate_image"), "a fox", "", image_model, 2, None, 64, 64, 1).path
    form = {c: c.value for c in fns[("image_tab", "run")].inputs}
    form[next(c for c in form if getattr(c, "label", None) == "Prompt")] = "a fox"
    gpu_call(("image_tab", "run"), form, request, progress)  # its GPU part, `paint`, is the decorated function
    vits = "tiny-vits"
    assert gpu_call(("speech_tab", "generate_speech"), "Hello there.", vits).path
    assert gpu_call(("speech_tab", "run"), "Hello there.", vits, None, "1", request, progress)[0]
    assert gpu_call(("shape_tab", "generate_3d"), "a chair", None, 2, 1, shape_model).path
    assert gpu_call(("shape_tab", "run"), shape_model, "a chair", 3.0, 2, 32, "1", False, request, progress)
    assert {name for name, _ in moves} >= {"ChatModel", "ImageModel", "VitsSpeech", "ShapEModel"}

    moves.clear()
    with studio.generation(modality="chat", model=chat_model, client="api", endpoint="test"):
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
    assert cache._entries["m"].moved_to is None


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
