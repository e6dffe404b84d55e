"""Tiny Stable Diffusion pipelines: the real UNet / VAE / CLIP text encoder classes with tiny configs.

The VAE keeps the real 8x down-scaling (four blocks), so image sizes mean what they mean for the real models.
SD-Turbo is a Stable Diffusion 2.1 model: a wider text encoder (the real one is 1024 wide, SD 1.5's is 768)
and linear attention projections. The tiny copies keep that difference, so an adapter trained for one base
really does not fit the other, as with real LoRAs.
"""

from __future__ import annotations

from pathlib import Path

from studio.registry import ModelSpec
from studio.tiny import seeded

# Per real model: the architecture details that decide whether a LoRA fits (SD 1.5 unless listed).
ARCHITECTURES = {
    "stabilityai/sd-turbo": {"text_width": 64, "use_linear_projection": True},
}
SD15 = {"text_width": 32, "use_linear_projection": False}


def clip_tokenizer():
    """CLIP's tokenizer minus the merges: its two specials, then each byte character alone and word-final."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    tokenizer = CLIPTokenizer(vocab={token: i for i, token in enumerate(tokens)}, merges=[], model_max_length=77)
    assert tokenizer("a cat")["input_ids"][1:-1], "tiny CLIP tokenizer encodes nothing"
    return tokenizer


def build_stable_diffusion(folder: Path, spec: ModelSpec) -> None:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    arch = ARCHITECTURES.get(spec.stands_for or "", SD15)
    tokenizer = clip_tokenizer()
    seeded()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=arch["text_width"], intermediate_size=2 * arch["text_width"],
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(
        sample_size=spec.options.get("width", 64) // 8, in_channels=4, out_channels=4,
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=arch["text_width"], use_linear_projection=arch["use_linear_projection"])
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=spec.options.get("width", 64))
    # Stable Diffusion's noise schedule; "trailing" spacing is what SD-Turbo's few-step sampling uses.
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="trailing")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)


# The layers LoRA trainers usually adapt: attention projections of the UNet and of the CLIP text encoder.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")


def random_lora(path: Path, unet, text_encoder=None, *, rank: int = 4, seed: int = 0, kohya: bool = False,
                strength: float = 0.05) -> Path:
    """Write a LoRA with random weights for these modules, in the diffusers or the kohya / A1111 format.

    Tests and benchmarks make their own adapters with it. Both formats of the same seed hold the same weights
    (kohya's alpha is set to the rank, a scale of 1), so they must give the same image.
    """
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for prefix, kohya_prefix, model in (("unet", "lora_unet", unet), ("text_encoder", "lora_te", text_encoder)):
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
    save_file(tensors, path)
    return path
