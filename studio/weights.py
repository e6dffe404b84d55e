"""Getting a model's weights onto the local disk, sizing them before they are loaded, and what they take on disk.

Weights come from the Hugging Face cache (studio.hub: the Hub is contacted only when the files are not cached
yet, and then the download shows tqdm progress, which the UI mirrors), a local folder or file (a user's model),
a tiny-profile build (made on first use) or a Python package (the bundled Piper voice).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from pathlib import Path

from studio import hub
from studio.modalities import resolve
from studio.quantization import estimated_bytes, folder_bytes, header, model_bytes
from studio.registry import ModelSpec, tiny_root

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "float64": 8}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".gguf")
BUILD_MARK = ".complete"

_remote: dict[tuple, int | None] = {}  # Hub estimates by (repo, revision, quantize, dtype): asked once
_remote_lock = threading.Lock()


class WeightsUnavailable(RuntimeError):
    """The model's files are not on disk and cannot be fetched."""


def local_files(spec: ModelSpec) -> Path | None:
    """Where the model's files are on this disk, complete; None when they are not (or it has none: bundled or
    external)."""
    if spec.build:
        folder = tiny_root() / spec.id
        return folder if (folder / BUILD_MARK).exists() else None
    if spec.path:
        return Path(spec.path) if Path(spec.path).exists() else None
    if spec.repo:
        return hub.snapshot(spec.repo, spec.revision)
    return None


def is_cached(spec: ModelSpec) -> bool:
    """Whether loading the model needs no download (bundled and external models have nothing to fetch)."""
    return not (spec.build or spec.path or spec.repo) or local_files(spec) is not None


def ensure_local(spec: ModelSpec) -> Path | None:
    """The folder (or file) holding the model's files, downloading or building them if needed (None: bundled)."""
    if spec.build:
        return _build_tiny(spec)
    found = local_files(spec)
    if found is not None:
        return found
    if spec.path:
        raise WeightsUnavailable(f"{spec.path} is gone (it was there when the model was added)")
    if not spec.repo:
        return None
    from huggingface_hub import snapshot_download

    try:
        _commit, files = hub.list_files(spec.repo, spec.revision)
        ignore = hub.ignore_patterns([f.path for f in files])
        return Path(snapshot_download(spec.repo, revision=spec.revision, ignore_patterns=ignore))
    except Exception as exc:
        why = "HF_HUB_OFFLINE is set and the files are not cached" if hub.offline() else f"{type(exc).__name__}: {exc}"
        raise WeightsUnavailable(f"cannot fetch {spec.source}: {why}") from exc


def _build_tiny(spec: ModelSpec) -> Path:
    """Build once into a temporary folder, then rename: concurrent builders never see a half-written model."""
    folder = tiny_root() / spec.id
    if (folder / BUILD_MARK).exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.id}-", dir=folder.parent))
    try:
        resolve(spec.build)(tmp, spec)
        (tmp / BUILD_MARK).write_text("ok")
        try:
            tmp.rename(folder)
        except OSError:  # another process finished first, or a stale incomplete folder is in the way
            if not (folder / BUILD_MARK).exists():
                shutil.rmtree(folder, ignore_errors=True)
                tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def remove_build(spec: ModelSpec) -> None:
    """Delete a tiny-profile build; the next use builds it again."""
    shutil.rmtree(tiny_root() / spec.id, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- size in memory


def safetensors_bytes(folder: Path, dtype: str) -> int:
    """Size of the folder's safetensors weights at the target dtype (headers only; variant copies left out)."""
    return folder_bytes(folder, None, dtype)


def local_bytes(path: Path, quantize: str | None, dtype: str) -> int:
    """Size once loaded of a model folder or single file on this disk: from the safetensors headers, or the weight
    files' own size where there are none (pickled .bin weights, an ONNX voice)."""
    path = Path(path)
    try:
        if path.is_file():
            return estimated_bytes(header(path), None, dtype) if path.suffix == ".safetensors" else path.stat().st_size
        measured = folder_bytes(path, quantize, dtype)
    except (OSError, ValueError, KeyError):  # not a readable safetensors file: its size on disk is the best guess
        return hub.folder_size(path)
    return measured or sum(f.stat().st_size for f in path.rglob("*") if f.suffix in WEIGHT_SUFFIXES)


def remote_bytes(repo: str, revision: str, quantize: str | None, dtype: str) -> int | None:
    """Size once loaded of a Hub model that is not downloaded, from its safetensors headers on the Hub (a few
    kilobytes per file); None when the Hub cannot tell (no safetensors, not reachable). Asked once per process."""
    key = (repo, revision, quantize, dtype)
    with _remote_lock:
        if key in _remote:
            return _remote[key]
    try:
        _commit, files = hub.list_files(repo, revision)
        paths = [f.path for f in hub.wanted(files) if f.path.endswith(".safetensors")]
        index = None
        if any(f.path == "model_index.json" for f in files):
            index = json.loads(hub.fetch_configs(repo, revision).joinpath("model_index.json").read_text())
        found = model_bytes(hub.remote_tensors(repo, revision, paths), quantize, dtype, index) or None
    except Exception:  # no network, an unknown repo, no safetensors: the caller falls back
        found = None
    with _remote_lock:
        _remote[key] = found
    return found


def estimate_bytes(spec: ModelSpec, dtype: str) -> int:
    """Before loading, at `dtype` and with the entry's quantization: the local safetensors headers, else the
    Hub's (without downloading the weights), else the registry's parameter count."""
    found = local_files(spec)
    if found is not None:
        measured = local_bytes(found, spec.quantize, dtype)
        if measured:
            return measured
    elif spec.repo and not hub.offline():
        remote = remote_bytes(spec.repo, spec.revision, spec.quantize, dtype)
        if remote:
            return remote
    return spec.params * DTYPE_BYTES.get(dtype, 4)


# ---------------------------------------------------------------------------------------------- size on disk


def disk_bytes(spec: ModelSpec) -> int:
    """What the model's files take on disk now (a Hub repo: its whole folder in the HF cache, finished files of
    an interrupted download included)."""
    if spec.repo:
        folder = hub.repo_folder(spec.repo)
        return hub.folder_size(folder) if folder.exists() else 0
    found = local_files(spec) if (spec.build or spec.path) else None
    return hub.folder_size(found) if found is not None else 0
