"""The models a studio can serve. Two built-in profiles describe the same kinds of model: `default` names real
checkpoints on the Hugging Face Hub; `tiny` builds the same architectures with tiny configs and random weights on
first use (no download), so the studio starts and is tested offline. Both load through the same `from_pretrained`
code in `studio.backends`.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from urllib.parse import urlparse

from studio.registry import ModelSpec, Registry
from studio.weights import is_cached

GPU_HALF = {"cuda": "float16", "mps": "float16", "cpu": "float32"}
GPU_BF16 = {"cuda": "bfloat16", "mps": "float16", "cpu": "bfloat16"}
IMAGE_LOADER = "studio.backends.image_pipelines:load_pipeline"  # every image family's (studio.backends.image_families)

PIPER = ModelSpec(
    id="piper-joe", modality="text-to-speech", label="Piper · Joe (US English, offline)",
    loader="studio.backends.speech:load_piper", params=16_000_000,
    options={"voices": ("joe",), "seeded": False},
)

DEFAULT_MODELS = (
    ModelSpec(id="tinyllama-1.1b-chat", modality="chat", label="TinyLlama 1.1B Chat",
              repo="TinyLlama/TinyLlama-1.1B-Chat-v1.0", loader="studio.backends.chat:load_causal_lm",
              params=1_100_048_384, dtypes=GPU_BF16, options={"context_length": 2048}),
    ModelSpec(id="qwen2.5-0.5b-instruct", modality="chat", label="Qwen2.5 0.5B Instruct",
              repo="Qwen/Qwen2.5-0.5B-Instruct", loader="studio.backends.chat:load_causal_lm",
              params=494_032_768, dtypes=GPU_BF16,
              options={"context_length": 32768, "max_new_tokens": 2048, "default_max_new_tokens": 512,
                       "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}),
    ModelSpec(id="bark-small", modality="text-to-speech", label="Bark small (Suno)", repo="suno/bark-small",
              loader="studio.backends.speech:load_bark", params=450_000_000, dtypes=GPU_HALF,
              options={"voices": tuple(f"v2/{lang}_speaker_{i}" for lang in ("en", "de", "es", "fr", "hi", "it", "ja",
                                                                             "ko", "pl", "pt", "ru", "tr", "zh")
                                       for i in range(10)),
                       "default_voice": "v2/en_speaker_6", "max_piece_chars": 200, "cues": True}),
    ModelSpec(id="mms-tts-eng", modality="text-to-speech", label="MMS-TTS English (VITS)", repo="facebook/mms-tts-eng",
              loader="studio.backends.speech:load_vits", params=36_300_000),
    PIPER,
    ModelSpec(id="sd-turbo", modality="image", label="SD-Turbo", repo="stabilityai/sd-turbo", family="sd2-turbo",
              loader=IMAGE_LOADER, params=1_300_000_000, dtypes=GPU_HALF),
    ModelSpec(id="sd-1.5", modality="image", label="Stable Diffusion 1.5", family="sd15",
              repo="stable-diffusion-v1-5/stable-diffusion-v1-5", loader=IMAGE_LOADER, params=1_066_000_000,
              dtypes=GPU_HALF),
    ModelSpec(id="shap-e", modality="3d", label="Shap-E (OpenAI)", repo="openai/shap-e",
              loader="studio.backends.shape:load_shap_e", params=640_000_000, dtypes=GPU_HALF),
    ModelSpec(id="shap-e-img2img", modality="3d", label="Shap-E image to 3D (OpenAI)", repo="openai/shap-e-img2img",
              loader="studio.backends.shape:load_shap_e", params=780_000_000, dtypes=GPU_HALF,
              options={"input": "image", "guidance": 3.0}),
)

TINY_CHAT = {"context_length": 256, "max_new_tokens": 128, "default_max_new_tokens": 64}
TINY_IMAGE = {"width": 64, "height": 64, "max_size": 128}
TINY_STEPS = {"steps": 4, "max_steps": 50}
TINY_SHAPE = {"steps": 4, "max_steps": 64, "frame_size": 32, "max_frame_size": 64, "grid_size": 32,
              "render_samples": (8, 16)}

TINY_MODELS = (
    ModelSpec(id="tiny-llama", modality="chat", label="Tiny Llama (random weights)",
              build="studio.tiny.text:build_llama", loader="studio.backends.chat:load_causal_lm", params=200_000,
              stands_for="TinyLlama/TinyLlama-1.1B-Chat-v1.0", options=TINY_CHAT),
    ModelSpec(id="tiny-qwen2", modality="chat", label="Tiny Qwen2 (random weights)",
              build="studio.tiny.text:build_qwen2", loader="studio.backends.chat:load_causal_lm", params=200_000,
              stands_for="Qwen/Qwen2.5-0.5B-Instruct",
              options={**TINY_CHAT, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}),
    ModelSpec(id="tiny-bark", modality="text-to-speech", label="Tiny Bark (random weights)",
              build="studio.tiny.speech:build_bark", loader="studio.backends.speech:load_bark", params=45_000_000,
              stands_for="suno/bark-small",
              options={"max_piece_chars": 200, "cues": True, "semantic_max_new_tokens": 16}),
    ModelSpec(id="tiny-vits", modality="text-to-speech", label="Tiny VITS / MMS-TTS (random weights)",
              build="studio.tiny.speech:build_vits", loader="studio.backends.speech:load_vits", params=500_000,
              stands_for="facebook/mms-tts-eng"),
    PIPER,
    ModelSpec(id="tiny-sd-turbo", modality="image", label="Tiny SD-Turbo (random weights)", family="sd2-turbo",
              build="studio.tiny.image:build_stable_diffusion", loader=IMAGE_LOADER, params=2_000_000,
              stands_for="stabilityai/sd-turbo", options=TINY_IMAGE),
    ModelSpec(id="tiny-sd", modality="image", label="Tiny Stable Diffusion 1.5 (random weights)", family="sd15",
              build="studio.tiny.image:build_stable_diffusion", loader=IMAGE_LOADER, params=2_000_000,
              stands_for="stable-diffusion-v1-5/stable-diffusion-v1-5", options={**TINY_IMAGE, **TINY_STEPS}),
    ModelSpec(id="tiny-sdxl", modality="image", label="Tiny SDXL (random weights)", family="sdxl",
              build="studio.tiny.image:build_sdxl", loader=IMAGE_LOADER, params=2_000_000,
              stands_for="stabilityai/stable-diffusion-xl-base-1.0", options={**TINY_IMAGE, **TINY_STEPS}),
    ModelSpec(id="tiny-sd3", modality="image", label="Tiny Stable Diffusion 3 (random weights, no T5)", family="sd3",
              build="studio.tiny.image:build_sd3", loader=IMAGE_LOADER, params=2_000_000,
              stands_for="stabilityai/stable-diffusion-3-medium-diffusers", options={**TINY_IMAGE, **TINY_STEPS}),
    ModelSpec(id="tiny-sd15-file", modality="image", label="Tiny SD 1.5 single-file checkpoint (random weights)",
              family="sd15", build="studio.tiny.image:build_single_file", loader=IMAGE_LOADER, params=2_000_000,
              stands_for="v1-5-pruned-emaonly.safetensors", options={**TINY_IMAGE, **TINY_STEPS}),
    ModelSpec(id="tiny-shap-e", modality="3d", label="Tiny Shap-E (random weights)",
              build="studio.tiny.shape:build_shap_e", loader="studio.backends.shape:load_shap_e", params=3_000_000,
              stands_for="openai/shap-e",
              options=TINY_SHAPE),
    ModelSpec(id="tiny-shap-e-img2img", modality="3d", label="Tiny Shap-E image to 3D (random weights)",
              build="studio.tiny.shape:build_shap_e_img2img", loader="studio.backends.shape:load_shap_e",
              params=3_000_000, stands_for="openai/shap-e-img2img", options={**TINY_SHAPE, "input": "image"}),
)


def hub_reachable(timeout: float = 2.0) -> bool:
    """One TCP connect to the Hub, made only when a real model would have to be downloaded."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@dataclass(frozen=True)
class ProfileChoice:
    registry: Registry
    notice: str | None  # shown in the terminal and as a UI banner when the studio fell back


def select_profile(requested: str) -> ProfileChoice:
    """`auto` uses the real models unless the machine is offline with none of them cached."""
    if requested == "tiny":
        return ProfileChoice(Registry("tiny", TINY_MODELS), None)
    if requested == "default" or any(is_cached(s) for s in DEFAULT_MODELS if s.repo) or hub_reachable():
        return ProfileChoice(Registry("default", DEFAULT_MODELS), None)
    real = ", ".join(s.repo for s in DEFAULT_MODELS if s.repo)
    notice = (
        "No network and no cached models: running the tiny profile (small random-weight models, "
        f"plus the Piper voice). With a connection the studio uses: {real}."
    )
    return ProfileChoice(Registry("tiny", TINY_MODELS), notice)


