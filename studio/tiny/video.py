"""Tiny text-to-video models: AnimateDiff on the tiny Stable Diffusion 1.5, and Wan 2.1 (a diffusion transformer).

Each folder has the layout the matching loader in `studio.backends.video` reads for the real checkpoints:
AnimateDiff is the SD 1.5 pipeline folder plus the motion adapter in `motion_adapter/`; Wan is a `WanPipeline`
folder like `Wan-AI/Wan2.1-T2V-1.3B-Diffusers`. The SD part of AnimateDiff is built by the same code and seed as
the tiny SD 1.5 image model, so an adapter made for that UNet fits this one, as real SD 1.5 LoRAs fit AnimateDiff.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from studio.registry import ModelSpec
from studio.tiny import seeded
from studio.tiny.image import build_stable_diffusion

SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# Characters the tiny T5 tokenizer knows, each alone and word-initial ("▁a"); the rest become <unk>.
T5_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()"


def build_animatediff(folder: Path, spec: ModelSpec) -> None:
    """The tiny SD 1.5 pipeline, and a motion adapter for its UNet in `motion_adapter/`."""
    from diffusers import MotionAdapter

    build_stable_diffusion(folder, dataclasses.replace(spec, stands_for=SD15_REPO))
    seeded()
    # The real adapters' shape (AnimateDiff v3: no mid-block motion module, 32 positions) at the tiny UNet's widths;
    # motion layers per block must equal the UNet's layers per block.
    adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1, motion_num_attention_heads=4,
                            motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=False)
    adapter.save_pretrained(folder / "motion_adapter")


def t5_tokenizer():
    """A T5 (Unigram) tokenizer with the real special tokens and ids (<pad> 0, </s> 1, <unk> 2), one piece per
    character: T5's SentencePiece model cannot be downloaded here, and a fast tokenizer needs no file to build."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in T5_CHARS] + [("▁" + c, -3.0) for c in T5_CHARS]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
    assert tokenizer("a cat")["input_ids"][:-1], "tiny T5 tokenizer encodes nothing"
    return tokenizer


def build_wan(folder: Path, spec: ModelSpec) -> None:
    """Wan 2.1 text-to-video: UMT5 text encoder, 3D causal VAE (8x spatial, 4x temporal), a DiT, UniPC."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = t5_tokenizer()
    seeded()
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    # The real VAE's scale factors, latent channels and latent statistics (the defaults) at a tiny width.
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32)
    # Wan 2.1's own sampler settings (flow matching, shift 3 for 480p), as in the 1.3B Diffusers repo.
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        num_train_timesteps=1000)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer)
    pipe.save_pretrained(folder)
