"""Getting a model's weights onto the local disk, and sizing them before they are loaded.

Real models come from the Hugging Face cache; the Hub is contacted only when the files are not cached yet
(then the download shows tqdm progress, which the UI mirrors). Tiny-profile models are built on first use.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from fnmatch import fnmatch
from pathlib import Path
from typing import Callable

from studio.modalities import resolve
from studio.registry import ModelSpec, Source, tiny_root

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "float64": 8}
# Files the studio never needs (other frameworks' copies of the same weights, original training checkpoints).
IGNORE = ["*.ckpt", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.tflite", "*.ot", "*.mlmodel", "*.pth",
          "*.gguf", "*.nemo", "flax_model*", "tf_model*", "rust_model*", "coreml/*", "onnx/*", "openvino/*"]
BUILD_MARK = ".complete"


class DamagedWeights(ValueError):
    """A weights file of a model cannot be read."""


class WeightsUnavailable(RuntimeError):
    """The model's files are not on disk and cannot be fetched."""


def is_cached(spec: ModelSpec) -> bool:
    """Every repository of the model is in the Hugging Face cache with the files it reads (no network)."""
    return all(_cached(source) is not None for source in spec.sources().values())


def ensure_local(spec: ModelSpec) -> Path | None:
    """The folder holding the model's files, downloading or building them if needed (None: bundled model).

    A model made of several repositories (`ModelSpec.parts`) gets one folder of links to their snapshots, laid
    out as its loader reads it."""
    if spec.build:
        return _build_tiny(spec)
    sources = spec.sources()
    if not sources:
        return None
    folders = {sub: _snapshot(source) for sub, source in sources.items()}
    return folders[""] if len(folders) == 1 else _assemble(spec, folders)


def _cached(source: Source) -> Path | None:
    """The source's snapshot when it is cached with every pipeline component the model reads, else None."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(source.repo, revision=source.revision, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError and friends: simply not cached
        return None
    return folder if _complete(folder, source.skip) else None


def _complete(folder: Path, skip: tuple[str, ...]) -> bool:
    """A diffusers pipeline snapshot has a folder for each component it names that is not skipped. Another
    model of the same repository may have fetched it without some (AnimateDiff skips SD 1.5's safety checker,
    which the image model reads): then the rest is fetched."""
    index = folder / "model_index.json"
    if not index.is_file():
        return True
    named = [name for name, value in json.loads(index.read_text()).items()
             if isinstance(value, list) and value and value[0] is not None]
    return all((folder / name).is_dir() for name in named if not skipped(f"{name}/", skip))


def skipped(path: str, skip: tuple[str, ...]) -> bool:
    """Whether a file (or, ending in "/", a folder) of a repository matches its skip patterns, read as the Hub
    reads them: a pattern that ends in "/" means everything in that folder."""
    return any(fnmatch(path, pattern + "*" if pattern.endswith("/") else pattern) for pattern in skip)


def _snapshot(source: Source) -> Path:
    from huggingface_hub import snapshot_download

    folder = _cached(source)
    if folder is not None:
        return folder
    try:
        return Path(snapshot_download(source.repo, revision=source.revision, ignore_patterns=_ignore(source)))
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        why = "HF_HUB_OFFLINE is set and the files are not cached" if offline else f"{type(exc).__name__}: {exc}"
        raise WeightsUnavailable(f"cannot fetch {source.repo} (revision {source.revision}): {why}") from exc


def _ignore(source: Source) -> list[str]:
    """Skip what a from_pretrained load never reads: other formats, and copies of the same weights (pickled .bin
    twins of safetensors, fp16 / non-EMA variants, the single-file checkpoints at a diffusers repo's root), and
    what the catalog entry says its model does not read."""
    from huggingface_hub import HfApi

    files = [s.rfilename for s in HfApi().model_info(source.repo, revision=source.revision).siblings or []]
    ignore = [*IGNORE, *source.skip]
    if any(f.endswith(".safetensors") for f in files):
        ignore += ["*.bin", "*.pt"]
    if "model_index.json" in files:  # a diffusers pipeline: its weights live in the component folders
        ignore += [f for f in files if "/" not in f and f.endswith(".safetensors")]
        ignore += ["*.fp16.*", "*non_ema*"]
    return ignore


def _assemble(spec: ModelSpec, folders: dict[str, Path]) -> Path:
    """One folder for a model of several repositories: links to each snapshot's files under its subfolder,
    without the files the entry skips. Named after the snapshots, so a new revision gets a new folder; built
    aside and renamed into place, like a tiny model."""
    digest = hashlib.sha1("|".join(f"{sub}={folder}" for sub, folder in sorted(folders.items())).encode())
    target = assembled_root() / f"{spec.id}-{digest.hexdigest()[:12]}"
    if (target / BUILD_MARK).exists():
        return target
    return _build_once(target, spec, lambda tmp, _spec: _link(tmp, spec, folders))


def _link(into: Path, spec: ModelSpec, folders: dict[str, Path]) -> None:
    sources = spec.sources()
    for sub, folder in folders.items():
        for file in sorted(folder.rglob("*")):
            relative = file.relative_to(folder).as_posix()
            if file.is_dir() or skipped(relative, sources[sub].skip):
                continue
            link = into / sub / relative
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(file.resolve())


def assembled_root() -> Path:
    """Where models of several repositories get their folder of links (beside the tiny models)."""
    return tiny_root().parent / "assembled"


def _build_tiny(spec: ModelSpec) -> Path:
    folder = tiny_root() / spec.id
    if (folder / BUILD_MARK).exists():
        return folder
    return _build_once(folder, spec, resolve(spec.build))


def _build_once(folder: Path, spec: ModelSpec, build: Callable[[Path, ModelSpec], None]) -> Path:
    """Build into a temporary folder, then rename: concurrent builders never see a half-written model."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.id}-", dir=folder.parent))
    try:
        build(tmp, spec)
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


def safetensors_bytes(folder: Path, dtype: str) -> int:
    """Size of every floating-point tensor in the folder's safetensors files at the target dtype.

    Reads only the JSON headers, so it costs milliseconds even for gigabytes of weights. Where a folder
    holds both full and fp16 variants, only the ones without a variant suffix count; in a diffusers pipeline
    folder the single-file checkpoints at its root do not count either (its components are in subfolders).
    """
    pipeline = (folder / "model_index.json").is_file()
    files = [f for f in folder.rglob("*.safetensors") if ".fp16." not in f.name and ".non_ema." not in f.name
             and not (pipeline and f.parent == folder)]
    total = 0
    for file in files:
        for name, info in _header(file, folder).items():
            if name == "__metadata__":
                continue
            numel = 1
            for dim in info["shape"]:
                numel *= dim
            is_float = info["dtype"] in ("F64", "F32", "F16", "BF16")
            total += numel * (DTYPE_BYTES[dtype] if is_float else _stored_size(info["dtype"]))
    return total


def _header(file: Path, folder: Path) -> dict:
    """A safetensors file's JSON header (8 bytes of length, then the JSON); a damaged file is named in the error
    by its place inside the model, not by this machine's path."""
    try:
        with open(file, "rb") as fh:
            length = struct.unpack("<Q", fh.read(8))[0]
            if length > min(file.stat().st_size, 2**30):
                raise ValueError("the header is longer than the file")
            header = json.loads(fh.read(length))
        if not isinstance(header, dict) or not all(isinstance(v, dict) and "shape" in v and "dtype" in v
                                                   for k, v in header.items() if k != "__metadata__"):
            raise ValueError("the header does not describe tensors")
        return header
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as exc:
        raise DamagedWeights(f"{file.relative_to(folder)} is not a readable safetensors file (damaged or "
                             f"incomplete: {exc})") from None


def _stored_size(code: str) -> int:
    return {"I64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}.get(code, 4)


def estimate_bytes(spec: ModelSpec, dtype: str) -> int:
    """Before loading: the safetensors headers when the files are local, else the registry's parameter count."""
    folder: Path | None = None
    if spec.build and (tiny_root() / spec.id / BUILD_MARK).exists():
        folder = tiny_root() / spec.id
    elif spec.repo and is_cached(spec):
        folder = ensure_local(spec)  # cached: no network
    if folder is not None:
        measured = safetensors_bytes(folder, dtype)
        if measured:
            return measured
    return spec.params * DTYPE_BYTES.get(dtype, 4)
