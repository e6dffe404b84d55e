"""Running as a Hugging Face Space: persistent storage under /data, and ZeroGPU hardware.

`configure()` must run first thing in app.py, before huggingface_hub or torch is imported: huggingface_hub reads
HF_HOME once, at import, and on ZeroGPU the `spaces` package must be imported before anything touches CUDA.

Persistent storage: when /data is a writable mount, the Hugging Face cache defaults to /data/.huggingface (so
models are not downloaded again after every restart) and the request logs to /data/logs (studio.config).
Models listed in README's `preload_from_hub` are baked into the image's default cache at build time; with /data
mounted the studio reads /data instead, so those models are downloaded once more, into /data, on first use.

ZeroGPU: a GPU exists only inside a call to a function decorated with `spaces.GPU`, and that call runs in a
forked worker process that receives its arguments pickled. So:
- an in-VRAM cache is useless there: on ZeroGPU the studio's device defaults to the CPU (STUDIO_DEVICE=cpu) and
  the cache keeps models in RAM. `gpu()` marks the call as running on CUDA (studio.devices.run_on); the cache
  moves each model the call uses to the GPU when it is pinned and back to the CPU when its last user is done.
  Models load at the CPU's dtype (float32), as on any CPU device.
- the UI's generation handlers and the `gr.api` endpoints (chat, image, speech, 3D: the client and MCP tools)
  are decorated; the HTTP routes (/generate/*, /v1/*) are not, and compute on the CPU there.
- decorate functions whose arguments pickle (plain values, dataclasses, gr.Request, gr.Progress), never
  functions taking the Studio or Gradio components: the studio reaches the worker through the fork. Models
  loaded inside the worker stay in the worker's copy of the cache (reused while that worker lives); the
  request log is a file, so its rows are kept. Stop presses reach the main process, not the worker: on ZeroGPU
  a generation runs to the end of its reserved time.
- decorate at import time: ZeroGPU checks at launch that at least one function is decorated.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import math
import os
from pathlib import Path
from typing import Callable, Iterable, MutableMapping, TypeVar

from studio.config import SPACES_DATA
from studio.hub import ignore_patterns

F = TypeVar("F", bound=Callable)

MAX_GPU_SECONDS = 120  # ZeroGPU refuses or queues long reservations; a request is capped here
BASE_SECONDS = 10  # per call: moving weights to the GPU, CUDA warm-up


def _truthy(value: str | None) -> bool:
    return str(value or "").lower() in ("1", "true", "yes", "on")


def on_spaces(env: MutableMapping[str, str] | None = None) -> bool:
    """Running inside a Hugging Face Space (which sets SPACE_ID)."""
    return bool((os.environ if env is None else env).get("SPACE_ID"))


def zero_gpu(env: MutableMapping[str, str] | None = None) -> bool:
    """On ZeroGPU hardware (SPACES_ZERO_GPU) with the `spaces` package installed."""
    env = os.environ if env is None else env
    return _truthy(env.get("SPACES_ZERO_GPU")) and importlib.util.find_spec("spaces") is not None


def configure(env: MutableMapping[str, str] | None = None, data: Path = SPACES_DATA) -> None:
    """Spaces defaults, as environment variables that an explicit setting still overrides."""
    env = os.environ if env is None else env
    if data.is_dir() and os.access(data, os.W_OK):
        env.setdefault("HF_HOME", str(data / ".huggingface"))
    if zero_gpu(env):
        import spaces  # noqa: F401  (patches torch; must come before CUDA is initialised)

        env.setdefault("STUDIO_DEVICE", "cpu")


def gpu(duration: Callable[..., float]) -> Callable[[F], F]:
    """Decorator: on ZeroGPU run the function under `spaces.GPU`, reserving `duration(*args, **kwargs)` seconds.

    Elsewhere it returns the function unchanged. `duration` gets the same arguments as the decorated function
    (see `studio.ui.controls.Runner`, which builds it from the modality's estimate and `reserve`).
    """
    if not zero_gpu():
        return lambda fn: fn
    import spaces

    from studio import devices  # not at the top: configure() runs before torch may be imported

    return lambda fn: spaces.GPU(duration=duration)(devices.run_on("cuda", fn))


def reserve(work: float) -> int:
    """Seconds to reserve for a call that does `work` seconds of GPU work (each modality estimates its own:
    `Modality.gpu_seconds`): the fixed cost of a call on top, capped at what ZeroGPU grants."""
    return int(min(MAX_GPU_SECONDS, math.ceil(BASE_SECONDS + max(work, 0.0))))


# Files of a repository no loader opens: its card, licence, samples and the original code's configs.
NOT_LOADED = ["*.md", ".gitattributes", "LICENSE*", "*.png", "*.jpg", "*.jpeg", "*.gif", "*.webp", "*.mp4", "*.yaml"]


def _matches(path: str, patterns: Iterable[str]) -> bool:
    """A Hub glob pattern: "folder/" is the whole folder."""
    return any(path.startswith(p) if p.endswith("/") else fnmatch.fnmatch(path, p) for p in patterns)


def preload_entries(specs: Iterable, listing: Callable[[str, str], list[str]]) -> list[str]:
    """README's `preload_from_hub`: "repo file1,file2,..." for each repository the models load from, naming exactly
    the files their loaders read (as a download does: `studio.hub.ignore_patterns` and each source's `skip`), so a
    Space build fetches no other format's copy, no fp16 or EMA twin and no root single-file checkpoint.

    `listing(repo, revision)` gives a repository's files (`studio.hub.list_files` asks the Hub; tests pass a fake)."""
    files: dict[str, set[str]] = {}
    for spec in specs:
        for source in spec.sources().values():
            tree = listing(source.repo, source.revision)
            ignore = [*ignore_patterns(tree), *source.skip, *NOT_LOADED]
            files.setdefault(source.repo, set()).update(f for f in tree if not _matches(f, ignore))
    return [f"{repo} {','.join(sorted(names))}" for repo, names in files.items()]


if __name__ == "__main__":  # python -m studio.spaces: the preload_from_hub lines for README (asks the Hub)
    from studio.catalog import DEFAULT_MODELS
    from studio.hub import list_files

    for entry in preload_entries(DEFAULT_MODELS, lambda repo, rev: [f.path for f in list_files(repo, rev)[1]]):
        print(f"  - {entry}")
