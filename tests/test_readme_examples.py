"""Every curl and Python example in README.md, run as written against a live tiny-profile studio.

The examples are read from README.md itself, so the file and this test cannot drift: an example that names a real
model (`sd-1.5`) runs on its tiny stand-in through the tiny profile's aliases. The files the examples read
(photo.png, meeting.mp3, ...) and the `styles/ink` adapter are made here. Only the commands in `NOT_RUN` are left
out, each with the reason printed; any other command that is not curl fails the test, so a new example is run or
explicitly excused.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, serving, tiny_studio

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PORT_IN_README = "7860"
# Commands that cannot run in a test, by their start: why.
NOT_RUN = {
    "python3 -m venv": "installs the packages (network; the test already runs inside the environment)",
    "pip install": "installs the packages (network; the test already runs inside the environment)",
    "python app.py": "starts a second studio in the foreground (the test runs its own)",
    "python bench/": "benchmarks take minutes each",
}
# Commands that need the network, by a string they contain: why.
NEEDS_NETWORK = {
    '"source": "Qwen/Qwen2.5-0.5B-Instruct"': "downloads a model from the Hugging Face Hub",
}


def examples() -> list[tuple[str, int, str]]:
    """(language, line number, code) of each command of README's bash blocks and each of its Python blocks."""
    found, block, language, start = [], [], None, 0
    for number, line in enumerate(README.read_text(encoding="utf-8").splitlines(), 1):
        fence = re.match(r"^```(\w*)", line)
        if fence and language is None:
            language, start, block = fence.group(1), number + 1, []
        elif fence:
            if language == "python":
                found.append(("python", start, "\n".join(block)))
            elif language == "bash":
                found.extend(("bash", n, command) for n, command in commands(block, start))
            language = None
        elif language is not None:
            block.append(line)
    return found


def commands(lines: list[str], first: int) -> list[tuple[int, str]]:
    """A bash block's commands: a line continued with a backslash or inside an open quote joins the next one."""
    out, current, start = [], [], first
    for number, line in enumerate(lines, first):
        if not current:
            start = number
        current.append(line)
        text = "\n".join(current)
        if line.rstrip().endswith("\\") or text.count("'") % 2:
            continue
        if text.strip() and not text.lstrip().startswith("#"):
            out.append((start, text))
        current = []
    return out


EXAMPLES = examples()


def reason_not_run(code: str) -> str | None:
    stripped = code.lstrip()
    for start, why in NOT_RUN.items():
        if stripped.startswith(start):
            return why
    return next((why for text, why in NEEDS_NETWORK.items() if text in code), None)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The studio, its URL and a folder holding the files the examples read."""
    base = tmp_path_factory.mktemp("readme")
    loras = base / "loras"
    make_lora(loras / "styles" / "ink.safetensors")
    studio = tiny_studio(base / "logs", "--port", str(free_port()), "--memory-budget", "4GiB",
                         "--lora-dir", str(loras))
    work = base / "work"
    work.mkdir()
    make_inputs(work)
    (work / "logs").symlink_to(base / "logs")
    with serving(studio) as (_demo, url):
        yield url, work


def make_lora(path: Path) -> None:
    """A Stable Diffusion 1.5 adapter (the tiny SD 1.5's shapes, SD 1.5's metadata) for `styles/ink`."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from studio.catalog import tiny_registry
    from studio.tiny.image import random_lora
    from studio.weights import ensure_local

    model = ensure_local(tiny_registry().get("sd-1.5"))
    path.parent.mkdir(parents=True)
    random_lora(path, UNet2DConditionModel.from_pretrained(model / "unet"),
                CLIPTextModel.from_pretrained(model / "text_encoder"), seed=3,
                metadata={"modelspec.architecture": "stable-diffusion-v1/lora", "modelspec.title": "Ink"})


def make_inputs(folder: Path) -> None:
    """photo.png, its masks, small.png, chair.png, a second of sound as meeting.mp3 and memo.wav."""
    import soundfile
    from PIL import Image

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    for name in ("photo.png", "small.png", "chair.png"):
        photo.save(folder / name)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    Image.fromarray(np.dstack([np.zeros((64, 64, 3), np.uint8), 255 - mask])).save(folder / "mask-rgba.png")
    sound = (0.1 * np.sin(np.arange(16000) * 2 * np.pi * 440 / 16000)).astype(np.float32)
    soundfile.write(folder / "meeting.mp3", sound, 16000, format="MP3")
    soundfile.write(folder / "memo.wav", sound, 16000)


def test_readme_has_examples():
    assert sum(language == "bash" for language, _, _ in EXAMPLES) >= 20
    assert sum(language == "python" for language, _, _ in EXAMPLES) >= 6


@pytest.mark.parametrize("language, line, code", EXAMPLES, ids=[f"{lang}-line{n}" for lang, n, _ in EXAMPLES])
def test_example_runs(site, language, line, code):
    url, work = site
    why = reason_not_run(code)
    if why is not None:
        print(f"README line {line} not run: {why}")
        pytest.skip(why)
    host = url.removeprefix("http://")
    code = code.replace(f"127.0.0.1:{PORT_IN_README}", host).replace(f"localhost:{PORT_IN_README}", host)
    env = {**os.environ, "KEY": "unused", "PYTHONPATH": str(ROOT)}
    if language == "bash":
        assert code.lstrip().startswith("curl "), f"README line {line}: not a curl command; run it or excuse it"
        script = "set -e -o pipefail\n" + code.replace("curl ", "curl --fail-with-body ", 1)
        done = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, timeout=600)
    else:
        done = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, timeout=600)
    output = (done.stdout[-2000:] + done.stderr[-3000:]).decode(errors="replace")
    assert done.returncode == 0, f"README line {line} failed:\n{code}\n---\n{output}"
