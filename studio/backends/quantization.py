"""Smaller footprints for chat and image models: int8 weights on any device, bitsandbytes 8/4-bit on CUDA.

A catalog entry's `quantize` is one of `studio.quantization.QUANTIZE_CHOICES` (which also checks where each runs and
sizes it):
- `int8`: weight-only int8 with one scale per output row, applied after loading by swapping the linear layers for
  `Int8Linear` (embeddings, norms, convolutions and biases keep the model's dtype; in a diffusers pipeline only
  the UNet or transformer is quantized). Activations are never quantized, so the logits stay close to the full
  model's: cosine 0.998 on the TinyLlama architecture, where quantizing activations too gave 0.94 (torch's
  `quantize_dynamic`), 0.985 (the same fbgemm kernel, per-row weights, full-range activations) and 0.9925
  (torchao's int8 x int8 with per-token activations). On the CPU, decoding (a few rows at a time) uses torch's
  `_weight_int8pack_mm` kernel on half the bytes of bfloat16: 1.3x faster per layer on one core, 1.3-1.7x per
  decoded token on this shared 2-core machine (fbgemm's int8 x int8 reaches 1.8x, with the cosines above). The
  prompt's pass (many rows) dequantizes each weight for a dtype matmul and takes 1.1-2.3x as long as in bfloat16
  (bench/quantization.py). On other devices every step dequantizes: the memory saving holds, the speed-up does
  not (use 8bit/4bit on CUDA). Stable Diffusion 1.5's UNet keeps 84% of its bytes (convolutions dominate) and
  denoises about 1.25x slower on the CPU; LoRA adapters load on top as usual (Int8Linear is an nn.Linear to peft).
  torchao's Int8WeightOnlyConfig gives the same logits but, without torch.compile (105 s to compile one layer
  here, and slower), decoded 2.6x slower than bfloat16, and its tensor subclasses hide their bytes from
  `devices.module_bytes`.
- `8bit` / `4bit`: bitsandbytes LLM.int8() and NF4 with double quantization, CUDA only, applied by
  `from_pretrained` through its `quantization_config`. A chat model's output head (`lm_head`) keeps the dtype,
  as transformers does by default.
Speech and 3D models are refused: Piper runs in onnxruntime, VITS and the 3D models are small and mostly
convolutions, and Bark's GPT stages have not been tried with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from studio.quantization import BITSANDBYTES, denoiser_name, pipeline_components

# Up to this many rows the CPU kernel beats dequantize + matmul (measured on TinyLlama's 2048 x 5632 layer).
DECODE_ROWS = 8
# torch 2.13's bfloat16 `_weight_int8pack_mm` reads past a row whose length is not a multiple of 16 (garbage
# output or a crash); such layers dequantize instead.
KERNEL_ALIGN = 16


# ----- loading -----------------------------------------------------------------------------------------------

def from_pretrained_kwargs(quantize: str | None, device: str, dtype: str) -> dict[str, Any]:
    """Extra `from_pretrained` arguments for a transformers model; bitsandbytes quantizes while loading, onto
    `device` (such a model refuses `.to()` afterwards). Call `check` first."""
    if quantize not in BITSANDBYTES:
        return {}
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(**_bnb_options(quantize, dtype)), "device_map": {"": device}}


def pipeline_kwargs(quantize: str | None, folder: Path, dtype: str) -> dict[str, Any]:
    """Extra `DiffusionPipeline.from_pretrained` arguments: bitsandbytes for the pipeline's UNet or transformer
    (read from its model_index.json); the pipeline's `.to(device)` then places it."""
    if quantize not in BITSANDBYTES:
        return {}
    from diffusers import BitsAndBytesConfig, PipelineQuantizationConfig

    component = denoiser_name(pipeline_components(json.loads((Path(folder) / "model_index.json").read_text())))
    return {"quantization_config": PipelineQuantizationConfig(
        quant_mapping={component: BitsAndBytesConfig(**_bnb_options(quantize, dtype))})}


def _bnb_options(quantize: str, dtype: str) -> dict[str, Any]:
    if quantize == "8bit":
        return {"load_in_8bit": True}
    return {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": getattr(torch, dtype)}


def apply(model: Any, quantize: str | None, device: str) -> Any:
    """After `from_pretrained`: quantize `int8` on the CPU, then put the model on `device`.

    `model` is a torch module or a diffusers pipeline (its UNet or transformer is quantized). A transformers
    model loaded with bitsandbytes is on the device already and refuses `.to()`; a pipeline's `.to()` moves its
    other components and leaves a bitsandbytes component in place. Returns the model, for use in one expression.
    """
    pipeline = hasattr(model, "components")
    if quantize == "int8":
        quantize_int8(getattr(model, denoiser_name(model.components)) if pipeline else model)
    if pipeline or quantize not in BITSANDBYTES:
        model = model.to(device)
    return model


# ----- int8 weight-only --------------------------------------------------------------------------------------

class Int8Linear(torch.nn.Linear):
    """A linear layer holding an int8 weight and one scale per output row (symmetric, weight-only).

    A `torch.nn.Linear` subclass so that peft (LoRA adapters) wraps it like any linear layer; `weight` gives the
    dequantized weight, for code that reads its dtype, device or shape (it costs a dequantization).
    """

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        torch.nn.Module.__init__(self)  # nn.Linear's own __init__ would allocate a float weight
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
        """Quantize a (out, in) float weight; the scales keep the weight's dtype (the kernel wants them so)."""
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        qweight = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(qweight, scale.to(weight.dtype), None if bias is None else bias.detach())

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if (x.device.type == "cpu" and rows.shape[0] <= DECODE_ROWS and self.in_features % KERNEL_ALIGN == 0
                and x.dtype == self.scale.dtype):
            y = torch.ops.aten._weight_int8pack_mm(rows.contiguous(), self.qweight, self.scale)
        else:
            y = F.linear(rows, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def quantize_int8(model: torch.nn.Module) -> int:
    """Swap the model's linear layers for Int8Linear in place; returns how many were swapped.

    A layer whose weight another module shares (an output head tied to the input embeddings) is left as it is:
    quantizing it would add an int8 copy instead of saving bytes. transformers' Conv1D (GPT-2 style, the weight
    stored transposed) counts as a linear layer.
    """
    from transformers.pytorch_utils import Conv1D

    linear_types = (torch.nn.Linear, Conv1D)
    shared = {id(p) for m in model.modules() if not isinstance(m, linear_types) for p in m.parameters(recurse=False)}
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, linear_types) and not isinstance(child, Int8Linear)
             and child.weight.is_floating_point() and id(child.weight) not in shared]
    for parent, name, child in swaps:
        weight = child.weight.t() if isinstance(child, Conv1D) else child.weight
        setattr(parent, name, Int8Linear.from_weight(weight, child.bias))
    return len(swaps)


