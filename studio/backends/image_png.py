"""Settings stored in a PNG and read back: the studio's own, and AUTOMATIC1111's.

Both tools keep an image's settings in the PNG's "parameters" text chunk. The studio writes them as JSON (the
`ImagePlan.settings()` dict); AUTOMATIC1111 writes text: the prompt, a "Negative prompt:" line, then one line of
`Key: value` pairs ("Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x768,
Denoising strength: 0.75, Mask blur: 4, ..."). `read_settings` turns either into the studio's settings, so dropping
such a PNG on the Image tab restores what it can.
"""

from __future__ import annotations

import io
import json
import re

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from studio.backends.lora import parse_prompt
from studio.backends.samplers import DDPM_SAMPLERS

# AUTOMATIC1111's own pattern for one `Key: value` pair (modules/infotext_utils.py): values may be quoted.
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"(\d+)x(\d+)")


def png_bytes(image: Image.Image, settings: dict | None = None) -> bytes:
    """PNG-encode an image, with its settings as a "parameters" text chunk (where A1111 keeps them)."""
    info = PngInfo()
    if settings is not None:
        info.add_text("parameters", json.dumps(settings, sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_settings(image: Image.Image) -> dict | None:
    """The settings a PNG carries (the studio's, or AUTOMATIC1111's translated), or None when it has none.

    A1111 settings come with `"source": "AUTOMATIC1111"`, and the ones the studio has no field for (its model
    name, hires fix, ...) under `"not_restored"`."""
    text = image.info.get("parameters") if hasattr(image, "info") else None
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        settings = json.loads(text)
    except ValueError:
        return parse_a1111(text)
    return settings if isinstance(settings, dict) and "prompt" in settings else None


def parse_a1111(text: str) -> dict:
    """AUTOMATIC1111's "parameters" text as the studio's settings."""
    lines = text.strip().splitlines()
    last = lines[-1] if lines else ""
    pairs = dict(_PAIR.findall(last)) if last.startswith("Steps: ") or len(_PAIR.findall(last)) >= 3 else {}
    head = lines[:-1] if pairs else lines
    negative_at = next((i for i, line in enumerate(head) if line.startswith("Negative prompt:")), len(head))
    prompt = "\n".join(head[:negative_at]).strip()
    negative = "\n".join(head[negative_at:]).removeprefix("Negative prompt:").strip()
    values = {key.strip(): value.strip().strip('"') for key, value in pairs.items()}
    prompt, adapters = parse_prompt(prompt)
    settings: dict = {"source": "AUTOMATIC1111", "prompt": prompt, "negative_prompt": negative, "adapters": adapters}
    used = set()

    def take(key: str, convert):
        if key in values:
            try:
                value = convert(values[key])
            except ValueError:
                return None
            used.add(key)
            return value
        return None

    settings["steps"] = take("Steps", int)
    settings["guidance"] = take("CFG scale", float)
    settings["seed"] = take("Seed", int)
    size = take("Size", lambda v: tuple(int(n) for n in _SIZE.fullmatch(v).groups()))
    if size:
        settings["width"], settings["height"] = size
    settings["strength"] = take("Denoising strength", float)
    settings["mask_blur"] = take("Mask blur", int)
    sampler = take("Sampler", str)
    schedule = take("Schedule type", str)
    if sampler and schedule == "Karras" and not sampler.endswith("Karras"):
        sampler += " Karras"
    settings["sampler"] = sampler if sampler in DDPM_SAMPLERS else None
    if sampler and settings["sampler"] is None:
        used.discard("Sampler")
    if "Hires upscale" in values or settings["strength"] is None:
        settings["mode"] = "txt2img"  # a hires-fix pass also writes a denoising strength
        settings["strength"] = None
    else:
        settings["mode"] = "inpaint" if settings["mask_blur"] is not None else "img2img"
    settings = {key: value for key, value in settings.items() if value is not None}
    settings["not_restored"] = {key: value for key, value in values.items() if key not in used}
    return settings
