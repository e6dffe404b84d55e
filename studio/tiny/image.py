"""Tiny image models: the real UNet / transformer / VAE / text encoder classes with tiny configs, random weights.

The VAEs keep the real 8x down-scaling (four blocks), so image sizes mean what they mean for the real models.
One builder per family the studio supports, each writing the layout its real models come in:
- SD 1.5 and SD-Turbo (a Stable Diffusion 2.1 model: a wider text encoder, the real one is 1024 wide where SD
  1.5's is 768, and linear attention projections). The tiny copies keep that difference, so an adapter trained for
  one base really does not fit the other, as with real LoRAs;
- SDXL: two CLIP text encoders, the UNet's "text_time" added conditioning;
- SD3, a diffusion transformer (MMDiT) with its two CLIP encoders and without T5 (diffusers runs SD3 without its
  third encoder; a T5 tokenizer would need files this machine cannot download);
- an SD 1.5 single-file checkpoint in the original (AUTOMATIC1111 / CompVis) key layout, with the diffusers configs
  `from_single_file` reads beside it, so it loads offline.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from studio.registry import ModelSpec
from studio.tiny import seeded

# Per real model: the architecture details that decide whether a LoRA fits (SD 1.5 unless listed).
ARCHITECTURES = {
    "stabilityai/sd-turbo": {"text_width": 64, "use_linear_projection": True},
}
SD15 = {"text_width": 32, "use_linear_projection": False}
SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def clip_tokenizer():
    """CLIP's tokenizer minus the merges: its two specials, then each byte character alone and word-final."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    tokenizer = CLIPTokenizer(vocab={token: i for i, token in enumerate(tokens)}, merges=[], model_max_length=77)
    assert tokenizer("a cat")["input_ids"][1:-1], "tiny CLIP tokenizer encodes nothing"
    return tokenizer


def _clip_text(tokenizer, width: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                            projection_dim=width, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _vae(sample_size: int, latent_channels: int = 4, **extra):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=latent_channels,
                        norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=sample_size, **extra)
    return _like_trained(vae, sample_size)


def _like_trained(vae, sample_size: int):
    """Give a random VAE two properties of a trained one that image-to-image and inpainting rely on.

    - A posterior of almost no variance: a trained encoder's log-variance is very negative; a random one's is
      about 0, so every encode would add noise of spread 1 and a low strength would redraw as much as a high one.
    - Latents of unit spread after `scaling_factor`, the way Stable Diffusion's 0.18215 was chosen: the noise a
      strength adds is then in proportion to the image's latents, as with the real models.
    """
    import torch

    channels = vae.config.latent_channels
    moments = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
    probe = torch.rand((4, 3, sample_size, sample_size), generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        moments.weight[channels:] = 0
        moments.bias[channels:] = -30.0  # the log-variance diffusers clamps to: a spread of 3e-7
        latents = vae.encode(probe).latent_dist.mean - (vae.config.shift_factor or 0)
    vae.register_to_config(scaling_factor=round(1 / float(latents.std()), 5))
    return vae


def stable_diffusion(spec: ModelSpec):
    """The tiny SD 1.5 or SD-Turbo pipeline of `spec`, in memory."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel

    arch = ARCHITECTURES.get(spec.stands_for or "", SD15)
    tokenizer = clip_tokenizer()
    seeded()
    text_encoder = _clip_text(tokenizer, arch["text_width"])
    unet = UNet2DConditionModel(
        sample_size=spec.options.get("width", 64) // 8, in_channels=4, out_channels=4,
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=arch["text_width"], use_linear_projection=arch["use_linear_projection"])
    vae = _vae(spec.options.get("width", 64))
    # Stable Diffusion's noise schedule; "trailing" spacing is what SD-Turbo's few-step sampling uses.
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="trailing")
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def build_stable_diffusion(folder: Path, spec: ModelSpec) -> None:
    stable_diffusion(spec).save_pretrained(folder)


def build_sdxl(folder: Path, spec: ModelSpec) -> None:
    """SDXL's layout: the UNet's cross-attention reads both encoders' hidden states side by side, and its
    "text_time" embedding the second encoder's pooled output plus six size numbers (original size, crop, target)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = clip_tokenizer()
    seeded()
    width, time_dim = 32, 8
    text_encoder, text_encoder_2 = _clip_text(tokenizer, width), _clip_text(tokenizer, width, projection=True)
    unet = UNet2DConditionModel(
        sample_size=spec.options.get("width", 64) // 8, in_channels=4, out_channels=4,
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, attention_head_dim=(2, 4),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + width, cross_attention_dim=2 * width)
    # SDXL base's scheduler configuration.
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    StableDiffusionXLPipeline(vae=_vae(spec.options.get("width", 64), force_upcast=False), text_encoder=text_encoder,
                              text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=clip_tokenizer(),
                              unet=unet, scheduler=scheduler).save_pretrained(folder)


def build_sd3(folder: Path, spec: ModelSpec) -> None:
    """SD3: a joint-attention transformer over 2x2 patches of a 16-channel latent (diffusers' SD3 inpainting
    insists on 16). Without T5, diffusers gives the transformer zeros in T5's place and pads the two CLIP
    encoders' states to the joint width."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer = clip_tokenizer()
    seeded()
    width = 32
    transformer = SD3Transformer2DModel(
        sample_size=spec.options.get("width", 64) // 8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=2 * width, caption_projection_dim=32,
        pooled_projection_dim=2 * width, pos_embed_max_size=32)
    vae = _vae(spec.options.get("width", 64), latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
               shift_factor=0.0609)
    StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=_clip_text(tokenizer, width, projection=True), tokenizer=tokenizer,
        text_encoder_2=_clip_text(tokenizer, width, projection=True), tokenizer_2=clip_tokenizer(),
        text_encoder_3=None, tokenizer_3=None).save_pretrained(folder)


def build_single_file(folder: Path, spec: ModelSpec) -> None:
    """The tiny SD 1.5 (same weights as `tiny-sd`) as one checkpoint in the original layout, `sd15.safetensors`,
    and beside it `sd15/`: the pipeline's configs and tokenizer without weights, for `from_single_file(config=)`."""
    from safetensors.torch import save_file

    pipe = stable_diffusion(dataclasses.replace(spec, stands_for=SD15_REPO))
    save_file(original_layout(pipe), folder / "sd15.safetensors")
    pipe.save_pretrained(folder / "sd15")
    for weights in (folder / "sd15").rglob("*.safetensors"):
        weights.unlink()


def original_layout(pipe) -> dict:
    """A Stable Diffusion pipeline's weights under the original (CompVis / A1111) key names: the inverse of what
    diffusers' `from_single_file` converts, for any number of UNet levels and layers per block."""
    state = {}
    for key, value in _renamed(pipe.unet.state_dict(), _unet_prefixes(pipe.unet.config), _RESNET).items():
        state[f"model.diffusion_model.{key}"] = value
    vae = {key: value[:, :, None, None] if ".mid.attn_1." in key and value.ndim == 2 else value
           for key, value in _renamed(pipe.vae.state_dict(), _vae_prefixes(pipe.vae.config), _VAE_PARTS).items()}
    state.update({f"first_stage_model.{key}": value for key, value in vae.items()})
    # The original checkpoints hold OpenAI's CLIPTextModel, whose keys start with "text_model." (transformers 5.6+
    # flattened the class, so its own keys may not).
    state.update({f"cond_stage_model.transformer.{'' if key.startswith('text_model.') else 'text_model.'}{key}": value
                  for key, value in pipe.text_encoder.state_dict().items()})
    return {key: value.contiguous() for key, value in state.items()}


_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_VAE_PARTS = (("conv_shortcut", "nin_shortcut"), ("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."),
              ("to_v.", "v."), ("to_out.0.", "proj_out."))


def _renamed(state: dict, prefixes: dict[str, str], parts: tuple) -> dict:
    """Keys under a diffusers prefix get the original prefix, and their inner names the original ones."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = {**DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"], **DIFFUSERS_TO_LDM_MAPPING["vae"]}
    out = {}
    for key, value in state.items():
        if key in fixed:
            out[fixed[key]] = value
            continue
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            raise KeyError(f"no original name for {key}")
        rest = key[len(prefix):]
        if ".attentions." not in prefix or "mid." in prefixes[prefix]:
            for new_name, old_name in parts:
                rest = rest.replace(new_name, old_name)
        out[prefixes[prefix] + rest] = value
    return out


def _unet_prefixes(config) -> dict[str, str]:
    levels, n = len(config.block_out_channels), config.layers_per_block
    prefixes = {"mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
                "mid_block.resnets.1.": "middle_block.2."}
    for i in range(levels):
        for j in range(n):
            prefixes[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{i * (n + 1) + j + 1}.0."
            prefixes[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{i * (n + 1) + j + 1}.1."
        if i < levels - 1:
            prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * (n + 1)}.0.op."
        for j in range(n + 1):
            prefixes[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{i * (n + 1) + j}.0."
            prefixes[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{i * (n + 1) + j}.1."
        if i < levels - 1:
            slot = 2 if config.up_block_types[i].startswith("CrossAttn") else 1
            prefixes[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{i * (n + 1) + n}.{slot}."
    return prefixes


def _vae_prefixes(config) -> dict[str, str]:
    levels, n = len(config.block_out_channels), config.layers_per_block
    prefixes = {}
    for part in ("encoder", "decoder"):
        prefixes |= {f"{part}.mid_block.resnets.0.": f"{part}.mid.block_1.",
                     f"{part}.mid_block.resnets.1.": f"{part}.mid.block_2.",
                     f"{part}.mid_block.attentions.0.": f"{part}.mid.attn_1."}
    for i in range(levels):
        for j in range(n):
            prefixes[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        for j in range(n + 1):
            prefixes[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{levels - 1 - i}.block.{j}."
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{levels - 1 - i}.upsample."
    return prefixes


# The layers LoRA trainers usually adapt: attention projections of the UNet and of the CLIP text encoder.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")


def random_lora(path: Path, unet, text_encoder=None, *, rank: int = 4, seed: int = 0, kohya: bool = False,
                strength: float = 0.05, metadata: dict[str, str] | None = None) -> Path:
    """Write a LoRA with random weights for these modules (`unet`: the denoiser, a UNet or an SD3 / FLUX
    transformer), in the diffusers or the kohya / A1111 format, with the safetensors `metadata` a trainer would
    write (kohya's `ss_*`, `modelspec.*`).

    Tests and benchmarks make their own adapters with it. Both formats of the same seed hold the same weights
    (kohya's alpha is set to the rank, a scale of 1), so they must give the same image.
    """
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    denoiser = "unet" if "UNet" in type(unet).__name__ else "transformer"
    for prefix, kohya_prefix, model in ((denoiser, "lora_unet", unet), ("text_encoder", "lora_te", text_encoder)):
        for name, module in (model.named_modules() if model is not None else ()):
            if not (isinstance(module, torch.nn.Linear) and name.endswith(LORA_TARGETS)):
                continue
            down = torch.randn(rank, module.in_features, generator=gen) / module.in_features**0.5
            up = torch.randn(module.out_features, rank, generator=gen) * strength
            if kohya:
                key = f"{kohya_prefix}_{name.replace('.', '_')}"
                tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                                f"{key}.alpha": torch.tensor(float(rank))})
            else:
                tensors.update({f"{prefix}.{name}.lora_A.weight": down, f"{prefix}.{name}.lora_B.weight": up})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata=metadata)
    return path
