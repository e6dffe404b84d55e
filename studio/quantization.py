"""Which quantizations exist, where they can run, and what they cost in bytes: what the catalog checks at start-up
and add time, and what the cache's size estimate and measurement count. Doing the quantization while loading is
`studio.backends.quantization`'s (its docstring says how each one works and what it measured).

A catalog entry's `quantize` is one of QUANTIZE_CHOICES: `int8` (weight-only, any device), `8bit` / `4bit`
(bitsandbytes LLM.int8() and NF4, CUDA only). Chat and image models only.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

QUANTIZE_CHOICES: tuple[str, ...] = ("int8", "8bit", "4bit")
BITSANDBYTES = ("8bit", "4bit")
MODALITIES = ("chat", "image")
# Diffusers pipelines: the component that carries most of the weights and is quantized.
DENOISERS = ("unet", "transformer")
# What bitsandbytes stores per quantized weight element: int8 (plus a float32 scale per row, counted apart), or
# NF4: half a byte, an 8-bit absmax per block of 64 and a float32 per 256 of those, plus two code tables per layer.
BNB_BYTES_PER_WEIGHT = {"8bit": 1.0, "4bit": 0.5 + 1 / 64 + 4 / (64 * 256)}
NF4_TABLES_BYTES = (16 + 256) * 4
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
EMBEDDING_NAMES = ("wte", "wpe", "shared")  # besides any module name containing "embed"
MAX_HEADER_BYTES = 100 * 2**20  # safetensors refuses larger headers too
INTEGER_BYTES = {"I64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}

Tensors = Iterable[tuple[str, Sequence[int], str]]  # (name, shape, safetensors dtype code) per stored tensor


class QuantizationError(ValueError):
    """This quantization cannot be used for this model on this device; the message says why."""


def check(quantize: str | None, device: str, modality: str) -> None:
    """Refuse an unsupported combination at start-up or add time, not at first use."""
    if quantize is None:
        return
    if quantize not in QUANTIZE_CHOICES:
        raise QuantizationError(f"quantize: {quantize!r} is not one of {', '.join(QUANTIZE_CHOICES)}")
    if modality not in MODALITIES:
        raise QuantizationError(f"quantization is not supported for {modality} models (only for "
                                f"{' and '.join(MODALITIES)} models)")
    if quantize in BITSANDBYTES:
        if device != "cuda":
            raise QuantizationError(f"{quantize} needs CUDA (bitsandbytes); this studio runs on {device}: "
                                    "use quantize: int8 instead")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise QuantizationError(f"{quantize} needs the bitsandbytes package: pip install bitsandbytes")


# ----- size --------------------------------------------------------------------------------------------------

def denoiser_name(components: Mapping[str, Any]) -> str:
    """The quantized component of a diffusers pipeline: its UNet or transformer (one that is present)."""
    for name in DENOISERS:
        if components.get(name) is not None:
            return name
    raise QuantizationError(f"this pipeline has no {' or '.join(DENOISERS)} to quantize")


def pipeline_components(index: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers pipeline's components from its model_index.json; an absent optional one is listed as
    [null, null]."""
    return {name: value for name, value in index.items() if isinstance(value, list) and value[0] is not None}


def estimated_bytes(tensors: Tensors, quantize: str | None, dtype: str) -> int:
    """Size once loaded, before loading: (name, shape, safetensors dtype code) per stored tensor.

    Mirrors what loading does: a 2-D float `*.weight` outside embeddings is a linear weight, stored as int8 plus
    a scale per row (int8, 8bit) or NF4 (4bit; bitsandbytes keeps `lm_head` at the dtype); every other float
    tensor takes the dtype's size; integer tensors keep theirs.
    """
    per_float = DTYPE_BYTES[dtype]
    total = 0.0
    for name, shape, code in tensors:
        numel = 1
        for dim in shape:
            numel *= dim
        if code not in FLOAT_CODES:
            total += numel * INTEGER_BYTES.get(code, 4)
        elif quantize and _is_linear_weight(name, shape) and not (quantize in BITSANDBYTES and "lm_head" in name):
            rows = shape[0]
            if quantize == "int8":
                total += numel + rows * per_float
            else:
                scales = rows * 4 if quantize == "8bit" else NF4_TABLES_BYTES
                total += numel * BNB_BYTES_PER_WEIGHT[quantize] + scales
        else:
            total += numel * per_float
    return int(total)


def _is_linear_weight(name: str, shape: Sequence[int]) -> bool:
    parts = name.split(".")
    owner = parts[-2] if len(parts) > 1 else ""
    return (len(shape) == 2 and parts[-1] == "weight" and "embed" not in owner.lower()
            and owner not in EMBEDDING_NAMES)


def state_bytes(tensor: torch.Tensor) -> int:
    """Bytes a parameter holds besides its own storage, which `numel() * element_size()` does not see:
    bitsandbytes keeps the 4-bit block scales (`quant_state`) and the 8-bit row scales (`SCB`) as attributes of
    the weight. Zero for any other tensor (Int8Linear's int8 weight and scales are ordinary buffers)."""
    extra = [getattr(tensor, "SCB", None)]
    quant_state = getattr(tensor, "quant_state", None)
    if quant_state is not None:
        extra += list(quant_state.as_dict(packed=False).values())
    return sum(t.numel() * t.element_size() for t in extra if isinstance(t, torch.Tensor))


def model_bytes(files: Mapping[str, Tensors], quantize: str | None, dtype: str,
                index: Mapping[str, Any] | None = None) -> int:
    """`estimated_bytes` of a whole model from its safetensors files, by path within the model (what a folder
    holds, or what the Hub's metadata lists before a download).

    In a diffusers pipeline (`index`: its model_index.json) only the UNet or transformer is quantized; the other
    components count at the dtype, and single-file checkpoints at its root do not count. Variant copies (fp16, non-EMA) are left out: loading reads the plain files.
    """
    denoiser = denoiser_name(pipeline_components(index)) if quantize and index is not None else None
    total = 0
    for path, tensors in files.items():
        if is_variant(path):
            continue
        component = path.rpartition("/")[0]
        if index is not None and not component:
            continue  # a single-file copy of the pipeline at its root: loading reads the component folders
        total += estimated_bytes(tensors, quantize if denoiser in (None, component) else None, dtype)
    return total


def is_variant(path: str) -> bool:
    """A variant copy of weights that also exist plain (`*.fp16.safetensors`, `*.non_ema.*`)."""
    name = path.rpartition("/")[2]
    return ".fp16." in name or ".non_ema." in name


def folder_bytes(folder: Path, quantize: str | None, dtype: str) -> int:
    """`model_bytes` of a model folder, from its safetensors headers only (milliseconds for gigabytes)."""
    folder = Path(folder)
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else None
    files = {f.relative_to(folder).as_posix(): header(f) for f in sorted(folder.rglob("*.safetensors"))
             if not is_variant(f.name)}
    return model_bytes(files, quantize, dtype, index)


def header(file: Path) -> list[tuple[str, list[int], str]]:
    """The tensors of a safetensors file as (name, shape, dtype code), read from its JSON header; a file that is not
    one (damaged, cut short) is a ValueError naming it."""
    try:
        with open(file, "rb") as fh:
            size = struct.unpack("<Q", fh.read(8))[0]
            if size > min(MAX_HEADER_BYTES, file.stat().st_size):
                raise ValueError(f"its header would be {size:,} bytes")
            data = json.loads(fh.read(size))
        if not isinstance(data, dict):
            raise ValueError("its header is not a JSON object")
        return [(name, list(info["shape"]), info["dtype"]) for name, info in data.items() if name != "__metadata__"]
    except (struct.error, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{file.name} is not a readable safetensors file (damaged or incomplete: {exc})") from None
