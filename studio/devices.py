"""Which device models run on, how much memory the cache may use there, and how big a loaded model is."""

from __future__ import annotations

import dataclasses
import gc

import psutil
import torch

CUDA_RESERVE = 1_536 * 2**20  # working memory for activations, kept out of the budget (ComfyUI reserves ~1.2 GB)
CPU_FRACTION = 0.5  # share of the machine's RAM given to resident models by default


def resolve_device(name: str) -> str:
    """'auto' picks CUDA, then Apple's MPS, then the CPU; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda was asked for but torch sees no CUDA device")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device: mps was asked for but torch sees no MPS device")
    return name


def default_budget(device: str) -> int:
    """Free VRAM minus a reserve on CUDA; a fraction of the RAM elsewhere (MPS shares the RAM)."""
    if device == "cuda":
        free, _total = torch.cuda.mem_get_info()
        return max(free - CUDA_RESERVE, 256 * 2**20)
    return int(psutil.virtual_memory().total * CPU_FRACTION)


def allocated_bytes(device: str) -> int | None:
    """Bytes the device allocator holds now, where the device can tell (CUDA); None elsewhere."""
    if device == "cuda":
        return torch.cuda.memory_allocated()
    return None


def module_bytes(obj: object) -> int:
    """Parameter and buffer bytes of every torch module reachable from a loaded model.

    Looks into torch modules, diffusers pipelines (their `components`), dataclasses and dicts; tensors
    shared between modules (tied weights) count once.
    """
    seen: set[int] = set()
    total = 0
    for module in _modules(obj, set()):
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
    return total


def _modules(obj: object, visited: set[int]):
    if id(obj) in visited:
        return
    visited.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _modules(value, visited)
    elif hasattr(obj, "components") and isinstance(getattr(obj, "components"), dict):  # diffusers pipeline
        yield from _modules(obj.components, visited)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _modules(getattr(obj, f.name), visited)


def release_memory(device: str) -> None:
    """Give freed memory back after the last reference to a model is dropped."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    elif device == "mps":
        torch.mps.empty_cache()


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss
