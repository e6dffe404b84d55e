"""The models a studio can serve. Two built-in profiles describe the same kinds of model: `default` names real
checkpoints on the Hugging Face Hub; `tiny` builds the same architectures with tiny configs and random weights on
first use (no download), so the studio starts and is tested offline. Both load through the same `from_pretrained`
code in `studio.backends`.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from urllib.parse import urlparse

from studio import hub
from studio.registry import GPU_BF16, GPU_HALF, Alias, ModelSpec, Registry, Source
from studio.weights import is_cached

SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# Video families (studio.backends.video.VideoOptions): Wan 2.1 as its Diffusers repo and model card run it.
WAN = {"family": "wan", "frames": 33, "max_frames": 81, "fps": 16, "width": 832, "height": 480, "max_size": 832,
       "steps": 30, "guidance": 5.0, "loras": False}
IMAGE_LOADER = "studio.backends.image_pipelines:load_pipeline"  # every image family's (studio.backends.image_families)

PIPER = ModelSpec(
    id="piper-joe", modality="text-to-speech", label="Piper · Joe (US English, offline)",
    loader="studio.backends.speech:load_piper", params=16_000_000, family="piper",
    options={"voices": ("joe",), "seeded": False},
)
# Real speech to text with no download: the acoustic model, dictionary and language model ship in the pocketsphinx
# wheel. Its decoder holds about 90 MiB, sized here as 24 M float32 values.
POCKETSPHINX = ModelSpec(
    id="pocketsphinx-en", modality="speech-to-text", label="PocketSphinx (US English, offline)",
    loader="studio.backends.transcription:load_pocketsphinx", params=24_000_000, options={"languages": ("en",)},
)

DEFAULT_MODELS = (
    ModelSpec(id="tinyllama-1.1b-chat", modality="chat", label="TinyLlama 1.1B Chat",
              repo="TinyLlama/TinyLlama-1.1B-Chat-v1.0", loader="studio.backends.chat:load_causal_lm",
              family="causal-lm", params=1_100_048_384, dtypes=GPU_BF16, options={"context_length": 2048}),
    ModelSpec(id="qwen2.5-0.5b-instruct", modality="chat", label="Qwen2.5 0.5B Instruct",
              repo="Qwen/Qwen2.5-0.5B-Instruct", loader="studio.backends.chat:load_causal_lm", family="causal-lm",
              params=494_032_768, dtypes=GPU_BF16,
              options={"context_length": 32768, "max_new_tokens": 2048, "default_max_new_tokens": 512,
                       "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}),
    ModelSpec(id="bark-small", modality="text-to-speech", label="Bark small (Suno)", repo="suno/bark-small",
              loader="studio.backends.speech:load_bark", family="bark", params=450_000_000, dtypes=GPU_HALF,
              options={"voices": tuple(f"v2/{lang}_speaker_{i}" for lang in ("en", "de", "es", "fr", "hi", "it", "ja",
                                                                             "ko", "pl", "pt", "ru", "tr", "zh")
                                       for i in range(10)),
                       "default_voice": "v2/en_speaker_6", "max_piece_chars": 200, "cues": True}),
    ModelSpec(id="mms-tts-eng", modality="text-to-speech", label="MMS-TTS English (VITS)", repo="facebook/mms-tts-eng",
              loader="studio.backends.speech:load_vits", family="vits", params=36_300_000),
    PIPER,
    # Multilingual (99 languages, detected when not given) and small: about 0.5 GB in float16, faster than real
    # time on one CPU core. distil-whisper is English-only, and its multilingual large-v3 distillation is 3x larger.
    ModelSpec(id="whisper-small", modality="speech-to-text", label="Whisper small (OpenAI, 99 languages)",
              repo="openai/whisper-small", loader="studio.backends.transcription:load_whisper",
              params=241_734_912, dtypes=GPU_HALF),
    POCKETSPHINX,
    ModelSpec(id="sd-turbo", modality="image", label="SD-Turbo", repo="stabilityai/sd-turbo", family="sd2-turbo",
              loader=IMAGE_LOADER, params=1_300_000_000, dtypes=GPU_HALF),
    ModelSpec(id="sd-1.5", modality="image", label="Stable Diffusion 1.5", family="sd15", repo=SD15_REPO,
              loader=IMAGE_LOADER, params=1_066_000_000, dtypes=GPU_HALF),
    ModelSpec(id="shap-e", modality="3d", label="Shap-E (OpenAI)", repo="openai/shap-e",
              loader="studio.backends.shape:load_shap_e", params=640_000_000, dtypes=GPU_HALF),
    ModelSpec(id="shap-e-img2img", modality="3d", label="Shap-E image to 3D (OpenAI)", repo="openai/shap-e-img2img",
              loader="studio.backends.shape:load_shap_e", params=780_000_000, dtypes=GPU_HALF,
              options={"input": "image", "guidance": 3.0}),
    # SD 1.5 (as the image model, so its LoRAs fit) with AnimateDiff v3's motion modules in motion_adapter/. Its
    # own cache entry: the UNetMotionModel copies the UNet's weights, so nothing is shared with sd-1.5.
    ModelSpec(id="animatediff", modality="video", label="AnimateDiff v3 (SD 1.5)", repo=SD15_REPO,
              skip=("safety_checker/",), loader="studio.backends.video:load_animatediff", params=1_485_000_000,
              dtypes=GPU_HALF, parts={"motion_adapter": Source("guoyww/animatediff-motion-adapter-v1-5-3",
                                                               skip=("*.fp16.*",))}),
    # 1.3B transformer, UMT5-XXL text encoder (5.7B parameters, about 11 GB in bfloat16), VAE kept in float32.
    ModelSpec(id="wan2.1-t2v-1.3b", modality="video", label="Wan 2.1 T2V 1.3B",
              repo="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", loader="studio.backends.video:load_wan",
              params=7_350_000_000, dtypes=GPU_BF16, options=WAN),
)

TINY_CHAT = {"context_length": 256, "max_new_tokens": 128, "default_max_new_tokens": 64}
TINY_IMAGE = {"width": 64, "height": 64, "max_size": 128}
TINY_STEPS = {"steps": 4, "max_steps": 50}
TINY_SHAPE = {"steps": 4, "max_steps": 64, "frame_size": 32, "max_frame_size": 64, "grid_size": 32,
              "render_samples": (8, 16)}
TINY_VIDEO = {**TINY_IMAGE, **TINY_STEPS}

TINY_MODELS = (
    ModelSpec(id="tiny-llama", modality="chat", label="Tiny Llama (random weights)",
              build="studio.tiny.text:build_llama", loader="studio.backends.chat:load_causal_lm", family="causal-lm",
              params=200_000, stands_for="TinyLlama/TinyLlama-1.1B-Chat-v1.0", options=TINY_CHAT),
    ModelSpec(id="tiny-qwen2", modality="chat", label="Tiny Qwen2 (random weights)",
              build="studio.tiny.text:build_qwen2", loader="studio.backends.chat:load_causal_lm", family="causal-lm",
              params=200_000, stands_for="Qwen/Qwen2.5-0.5B-Instruct",
              options={**TINY_CHAT, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}),
    ModelSpec(id="tiny-bark", modality="text-to-speech", label="Tiny Bark (random weights)",
              build="studio.tiny.speech:build_bark", loader="studio.backends.speech:load_bark", family="bark",
              params=45_000_000, stands_for="suno/bark-small",
              options={"max_piece_chars": 200, "cues": True, "semantic_max_new_tokens": 16}),
    ModelSpec(id="tiny-vits", modality="text-to-speech", label="Tiny VITS / MMS-TTS (random weights)",
              build="studio.tiny.speech:build_vits", loader="studio.backends.speech:load_vits", family="vits",
              params=500_000, stands_for="facebook/mms-tts-eng"),
    PIPER,
    ModelSpec(id="tiny-whisper", modality="speech-to-text", label="Tiny Whisper (random weights)",
              build="studio.tiny.transcription:build_whisper", loader="studio.backends.transcription:load_whisper",
              params=162_400, stands_for="openai/whisper-small"),
    POCKETSPHINX,
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
    ModelSpec(id="tiny-animatediff", modality="video", label="Tiny AnimateDiff (random weights)",
              build="studio.tiny.video:build_animatediff", loader="studio.backends.video:load_animatediff",
              params=2_000_000, stands_for="guoyww/animatediff-motion-adapter-v1-5-3",
              options={**TINY_VIDEO, "frames": 8, "max_frames": 16}),
    ModelSpec(id="tiny-wan", modality="video", label="Tiny Wan 2.1 (random weights)",
              build="studio.tiny.video:build_wan", loader="studio.backends.video:load_wan", params=500_000,
              stands_for="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
              options={**WAN, **TINY_VIDEO, "frames": 9, "max_frames": 17}),
)


def stand_ins(real: tuple[ModelSpec, ...] = DEFAULT_MODELS, tiny: tuple[ModelSpec, ...] = TINY_MODELS) -> list[Alias]:
    """The real models' ids as aliases of their tiny stand-ins (a tiny model of the same modality that stands for
    one of the real model's repositories), so what names `sd-1.5` runs offline too."""
    tiny_ids = {spec.id for spec in tiny}
    aliases = []
    for spec in real:
        repos = {source.repo for source in spec.sources().values()}
        twin = next((t for t in tiny if t.modality == spec.modality and t.stands_for in repos), None)
        if twin is not None and spec.id not in tiny_ids:
            aliases.append(Alias(spec.id, twin.id, f"{spec.label}: tiny random-weight stand-in ({twin.id})"))
    return aliases


def tiny_registry() -> Registry:
    return Registry("tiny", TINY_MODELS, stand_ins())


def hub_reachable(timeout: float = 2.0) -> bool:
    """One TCP connect to the Hub, made only when a real model would have to be downloaded."""
    if hub.offline():
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
        return ProfileChoice(tiny_registry(), None)
    if requested == "default" or any(is_cached(s) for s in DEFAULT_MODELS if s.repo) or hub_reachable():
        return ProfileChoice(Registry("default", DEFAULT_MODELS), None)
    real = ", ".join(dict.fromkeys(source.repo for s in DEFAULT_MODELS for source in s.sources().values()))
    notice = (
        "No network and no cached models: running the tiny profile (small random-weight models, "
        f"plus the Piper voice). With a connection the studio uses: {real}."
    )
    return ProfileChoice(tiny_registry(), notice)


