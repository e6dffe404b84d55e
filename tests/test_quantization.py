"""Quantization: int8 chat and image models that still generate, are measurably smaller and sized right before
loading; bitsandbytes configured for CUDA; unsupported combinations refused with the reason."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from studio import quantization as sizes
from studio.backends import quantization
from studio.backends.quantization import Int8Linear
from studio.quantization import QuantizationError, check
from studio.devices import module_bytes
from studio.tiny.image import build_stable_diffusion, random_lora
from studio.tiny.text import build_llama, build_qwen2

PROMPT = torch.tensor([[1, 5, 9, 20, 30, 41, 7]])


@pytest.fixture(scope="module")
def chat_folders(tmp_path_factory) -> dict[str, Path]:
    """Llama (separate output head) and Qwen2 (output head tied to the embeddings)."""
    folders = {}
    for name, build in (("llama", build_llama), ("qwen2", build_qwen2)):
        folders[name] = tmp_path_factory.mktemp(name)
        build(folders[name], SimpleNamespace(options={}))
    return folders


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sd")
    build_stable_diffusion(folder, SimpleNamespace(stands_for=None, options={}))
    return folder


def load_chat(folder: Path, dtype: str, quantize: str | None):
    """What load_causal_lm does with a catalog entry's `quantize`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype),
                                                 **quantization.from_pretrained_kwargs(quantize, "cpu", dtype))
    return quantization.apply(model, quantize, "cpu").eval()


def next_logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(PROMPT).logits[0, -1].float()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int8_chat_model_generates_smaller_and_sized_before_loading(chat_folders, arch, dtype):
    folder = chat_folders[arch]
    full, int8 = load_chat(folder, dtype, None), load_chat(folder, dtype, "int8")
    assert any(isinstance(m, Int8Linear) for m in int8.modules())
    cosine = torch.nn.functional.cosine_similarity(next_logits(full), next_logits(int8), dim=0).item()
    assert cosine > 0.99
    with torch.inference_mode():
        out = int8.generate(PROMPT, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out.shape == (1, PROMPT.shape[1] + 6)

    measured = module_bytes(int8)
    assert measured < 0.7 * module_bytes(full)
    assert sizes.folder_bytes(folder, "int8", dtype) == pytest.approx(measured, rel=0.1)
    assert sizes.folder_bytes(folder, None, dtype) == pytest.approx(module_bytes(full), rel=0.1)


def test_a_tied_output_head_is_left_shared(chat_folders):
    model = load_chat(chat_folders["qwen2"], "float32", "int8")
    assert not isinstance(model.lm_head, Int8Linear)
    assert model.lm_head.weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("rows", [1, 8, 9, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_features", [64, 33])  # 33: not a multiple of 16, the CPU kernel must not see it
def test_int8_linear_matches_its_dequantized_weight(rows, dtype, in_features):
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, 48).to(dtype)
    layer = Int8Linear.from_weight(linear.weight, linear.bias)
    x = torch.randn(2, rows, in_features, dtype=dtype)
    expected = torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())
    got = layer(x)
    assert got.shape == (2, rows, 48) and got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)
    assert (layer.weight.float() - linear.weight.float()).abs().max() <= linear.weight.float().abs().max() / 127


def test_int8_image_pipeline_denoiser_draws_the_same_picture_and_takes_loras(sd_folder):
    from diffusers import StableDiffusionPipeline

    def draw(pipe) -> np.ndarray:
        return pipe("a red cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np").images[0]

    full = StableDiffusionPipeline.from_pretrained(sd_folder, dtype=torch.float32)
    pipe = quantization.apply(StableDiffusionPipeline.from_pretrained(sd_folder, dtype=torch.float32), "int8", "cpu")
    for p in (full, pipe):
        p.set_progress_bar_config(disable=True)
    assert any(isinstance(m, Int8Linear) for m in pipe.unet.modules())
    assert not any(isinstance(m, Int8Linear) for m in pipe.text_encoder.modules())  # only the denoiser
    reference, image = draw(full), draw(pipe)
    assert np.abs(reference - image).mean() < 0.01

    measured = module_bytes(pipe)
    assert module_bytes(pipe.unet) < 0.8 * module_bytes(full.unet)
    assert sizes.folder_bytes(sd_folder, "int8", "float32") == pytest.approx(measured, rel=0.1)

    lora = random_lora(sd_folder.parent / "lora.safetensors", pipe.unet, pipe.text_encoder, strength=0.5)
    for p in (full, pipe):
        p.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="style")
    with_lora = draw(pipe)
    assert np.abs(with_lora - image).mean() > 0.01  # the adapter changes the picture...
    assert np.abs(with_lora - draw(full)).mean() < 0.01  # ...as it does the full model's
    pipe.unload_lora_weights()
    assert np.array_equal(draw(pipe), image)


def test_check_refuses_with_the_reason():
    for quantize in ("8bit", "4bit"):
        reason = rf"{quantize} needs CUDA \(bitsandbytes\); this studio runs on cpu: use quantize: int8 instead"
        with pytest.raises(QuantizationError, match=reason):
            check(quantize, "cpu", "chat")
        with pytest.raises(QuantizationError, match="needs CUDA"):
            check(quantize, "mps", "image")
    with pytest.raises(QuantizationError, match="quantization is not supported for speech models"):
        check("int8", "cpu", "speech")
    with pytest.raises(QuantizationError, match="quantization is not supported for 3d models"):
        check("4bit", "cuda", "3d")
    with pytest.raises(QuantizationError, match="'int4' is not one of int8, 8bit, 4bit"):
        check("int4", "cpu", "chat")
    for modality in ("chat", "image"):
        check("int8", "cpu", modality)
        check(None, "cpu", modality)
    check(None, "cpu", "speech")


def test_bitsandbytes_configuration_for_cuda(tmp_path):
    assert quantization.from_pretrained_kwargs("int8", "cpu", "float32") == {}
    assert quantization.from_pretrained_kwargs(None, "cuda", "float16") == {}
    kwargs = quantization.from_pretrained_kwargs("4bit", "cuda", "bfloat16")
    config = kwargs["quantization_config"]
    assert kwargs["device_map"] == {"": "cuda"}
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization.from_pretrained_kwargs("8bit", "cuda", "float16")["quantization_config"].load_in_8bit

    pytest.importorskip("bitsandbytes")  # diffusers' 4-bit config reads the installed version
    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline", "transformer": ["diffusers", "X"]}')
    mapping = quantization.pipeline_kwargs("4bit", tmp_path, "bfloat16")["quantization_config"].quant_mapping
    assert list(mapping) == ["transformer"] and mapping["transformer"].load_in_4bit
    assert quantization.pipeline_kwargs("int8", tmp_path, "bfloat16") == {}


def test_size_estimate_quantizes_linear_weights_only():
    tensors = [("model.embed_tokens.weight", [1000, 64], "BF16"), ("model.norm.weight", [64], "BF16"),
               ("model.layers.0.mlp.up_proj.weight", [256, 64], "BF16"), ("lm_head.weight", [1000, 64], "BF16"),
               ("model.position_ids", [1, 64], "I64")]
    full = sizes.estimated_bytes(tensors, None, "bfloat16")
    assert full == 2 * (1000 * 64 + 64 + 256 * 64 + 1000 * 64) + 8 * 64
    # int8: a byte per linear weight and a scale per row, the output head included
    assert sizes.estimated_bytes(tensors, "int8", "bfloat16") == full - (256 + 1000) * 64 + 2 * (256 + 1000)
    # bitsandbytes keeps lm_head at the dtype
    assert sizes.estimated_bytes(tensors, "8bit", "bfloat16") == full - 256 * 64 + 4 * 256
    assert sizes.estimated_bytes(tensors, "4bit", "bfloat16") < full - 256 * 64 * 1.4


@pytest.mark.parametrize("quantize", ["8bit", "4bit"])
def test_bitsandbytes_bytes_are_measured_and_estimated(quantize):
    """bitsandbytes quantizes on the CPU too (the studio only serves it on CUDA): its scales live outside the
    weight's storage, and both the measurement and the estimate count them."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    weight = torch.randn(512, 256, dtype=torch.bfloat16)
    if quantize == "8bit":
        layer = bnb.nn.Linear8bitLt(256, 512, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(256, 512, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                  compress_statistics=True)
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True)
    layer = layer.to("cpu")  # quantizes
    assert sizes.state_bytes(layer.weight) > 0
    measured = module_bytes(layer)  # the cache's measurement counts the scales kept beside the weight
    assert measured == layer.weight.numel() * layer.weight.element_size() + sizes.state_bytes(layer.weight)
    assert sizes.estimated_bytes([("proj.weight", [512, 256], "BF16")], quantize, "bfloat16") == measured
    assert sizes.state_bytes(torch.zeros(3)) == 0
