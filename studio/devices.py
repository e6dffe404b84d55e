"""Which device models run on, how much memory the cache may use there, and how big a loaded model is."""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import gc
import inspect
import threading
from typing import Any, Callable, TypeVar

import psutil
import torch

from studio.quantization import state_bytes

F = TypeVar("F", bound=Callable)

# Loading weights patches torch process-wide while it runs: peft's low-memory adapter loading swaps
# `nn.Module.register_parameter` (peft/utils/integrations.py), accelerate's `init_empty_weights` and the meta-device
# loading of transformers and diffusers do the same. A load on another thread meanwhile sees the swapped function
# and fails ("unexpected keyword argument '_is_hf_initialized'", "Cannot copy out of meta tensor"), and when two
# such patches overlap, the second one "restores" the first one's patch and leaves the process broken for good.
# So every load in the studio holds this one process-wide lock: the cache's model loads and LoRA adapter loads.
loading = threading.RLock()

CUDA_RESERVE = 1_536 * 2**20  # working memory for activations, kept out of the budget (ComfyUI reserves ~1.2 GB)
CPU_FRACTION = 0.5  # share of the machine's RAM given to resident models by default
# A diffusion generation's working memory beyond its weights, per output pixel (width x height x images or
# frames) in half precision: the VAE decoder's activations at full resolution dominate (the denoiser works at 1/8
# of the side). Not measured here (the development machine has no GPU): taken from diffusers' published peaks
# without slicing or tiling, about 1 GiB over the fp16 weights for SD 1.5 at 512x512 and about 4 GiB for SDXL at
# 1024x1024, i.e. ~4 KiB per pixel. Rounded up on purpose: a refused request is better than an out-of-memory crash.
ACTIVATION_BYTES_PER_PIXEL = 4096


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


def working_memory(device: str, pixels: int, dtype: str) -> int:
    """Bytes a diffusion generation of `pixels` output pixels needs beside its weights on `device`, for the budget.

    Counted on CUDA only, where the budget is the GPU's memory and running out crashes the generation; on a CPU
    (and MPS) the budget is a share of the RAM, which the rest of the machine's memory backs."""
    if not device.startswith("cuda"):
        return 0
    return pixels * ACTIVATION_BYTES_PER_PIXEL * (2 if dtype == "float32" else 1)


def allocated_bytes(device: str) -> int | None:
    """Bytes the device allocator holds now, where the device can tell (CUDA); None elsewhere."""
    if device == "cuda":
        return torch.cuda.memory_allocated()
    return None


def module_bytes(obj: object) -> int:
    """Parameter and buffer bytes of every torch module reachable from a loaded model.

    Looks into torch modules, diffusers pipelines (their `components`), dataclasses and dicts; tensors
    shared between modules (tied weights) count once; bitsandbytes' scales, kept beside a weight's storage, count
    too (`quantization.state_bytes`).
    """
    seen: set[int] = set()
    total = 0
    for module in torch_modules(obj):
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size() + state_bytes(tensor)
    return total


def torch_modules(obj: object) -> list[torch.nn.Module]:
    """Every torch module of a loaded model (see `module_bytes` for what is looked into), each once."""
    return list(_modules(obj, set()))


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


def move(obj: object, device: str) -> None:
    """Move every torch module of a loaded model (see `module_bytes` for what is looked into) to `device`."""
    for module in torch_modules(obj):
        module.to(device)


# The device a call was given for its duration. On ZeroGPU a GPU exists only inside a `spaces.GPU` call, so
# the cache keeps models on the CPU and moves the ones a call uses to this device (studio.spaces, studio.cache).
_call_device: contextvars.ContextVar[str | None] = contextvars.ContextVar("call_device", default=None)


def call_device() -> str | None:
    """The device the current call runs its models on; None means the cache's own device."""
    return _call_device.get()


def run_on(device: str, fn: F) -> F:
    """Wrap a function (plain or generator) so the models it uses run on `device` during the call.

    Each call gets its own context, and a generator runs every step in it: Gradio may call `next` from a
    different thread each time, and a context variable set in one step would be gone in the next.
    """

    def context() -> contextvars.Context:
        ctx = contextvars.copy_context()
        ctx.run(_call_device.set, device)
        return ctx

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args: Any, **kwargs: Any):
            ctx = context()
            steps = ctx.run(fn, *args, **kwargs)
            try:
                while True:
                    try:
                        item = ctx.run(next, steps)
                    except StopIteration:
                        return
                    yield item
            finally:
                ctx.run(steps.close)

        return stream  # type: ignore[return-value]

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any):
        return context().run(fn, *args, **kwargs)

    return call  # type: ignore[return-value]

