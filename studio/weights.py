"""Getting a model's weights onto the local disk, sizing them before they are loaded, and what they take on disk.

Weights come from the Hugging Face cache (studio.hub: the Hub is contacted only when the files are not cached
yet, and then the download shows tqdm progress, which the UI mirrors), a local folder or file (a user's model),
a tiny-profile build (made on first use) or a Python package (the bundled Piper voice).
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import tempfile
import threading
from fnmatch import fnmatch
from pathlib import Path
from typing import Callable

from studio import hub
from studio.modalities import resolve
from studio.quantization import estimated_bytes, folder_bytes, header, model_bytes
from studio.registry import ModelSpec, Source, tiny_root

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "float64": 8}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".gguf")
BUILD_MARK = ".complete"

_remote: dict[tuple, int | None] = {}  # Hub estimates by (repo, revision, quantize, dtype): asked once
_remote_lock = threading.Lock()


class DamagedWeights(ValueError):
    """A weights file of a model cannot be read."""


class WeightsUnavailable(RuntimeError):
    """The model's files are not on disk and cannot be fetched."""


def local_files(spec: ModelSpec) -> Path | None:
    """Where the model's files are on this disk, complete; None when they are not (or it has none: bundled or
    external). A model made of several repositories (`ModelSpec.parts`) gets one folder of links to their
    snapshots, laid out as its loader reads it."""
    if spec.build:
        folder = tiny_folder(spec)
        return folder if (folder / BUILD_MARK).exists() else None
    if spec.path:
        return Path(spec.path) if Path(spec.path).exists() else None
    sources = spec.sources()
    folders = {sub: _cached(source) for sub, source in sources.items()}
    if not folders or None in folders.values():
        return None
    return _joined(spec, folders)


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
    sources = spec.sources()
    if not sources:
        return None
    return _joined(spec, {sub: _snapshot(source) for sub, source in sources.items()})


def _joined(spec: ModelSpec, folders: dict[str, Path]) -> Path:
    return folders[""] if len(folders) == 1 else _assemble(spec, folders)


def _cached(source: Source) -> Path | None:
    """The source's snapshot when it is cached with every pipeline component the model reads, else None."""
    folder = hub.snapshot(source.repo, source.revision, source.skip)
    return folder if folder is not None and _complete(folder, source.skip) else None


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
    """Download what the model reads of the source (other formats, variant copies and its skips left out)."""
    from huggingface_hub import snapshot_download

    folder = _cached(source)
    if folder is not None:
        return folder
    try:
        _commit, files = hub.list_files(source.repo, source.revision)
        ignore = [*hub.ignore_patterns([f.path for f in files]), *source.skip]
        return Path(snapshot_download(source.repo, revision=source.revision, ignore_patterns=ignore))
    except Exception as exc:
        why = "HF_HUB_OFFLINE is set and the files are not cached" if hub.offline() else f"{type(exc).__name__}: {exc}"
        raise WeightsUnavailable(f"cannot fetch {source.repo} (revision {source.revision}): {why}") from exc


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


def tiny_folder(spec: ModelSpec) -> Path:
    """Where a tiny-profile model is built: its id and a fingerprint of the builders' code, so that a changed
    builder builds afresh, beside the old build (which a studio running the old code may still be reading)."""
    return tiny_root() / f"{spec.id}-{_builders_fingerprint()}"


@functools.cache
def _builders_fingerprint() -> str:
    digest = hashlib.sha1()
    for source in sorted((Path(__file__).parent / "tiny").glob("*.py")):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:10]


def _build_tiny(spec: ModelSpec) -> Path:
    folder = tiny_folder(spec)
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


def remove_build(spec: ModelSpec) -> None:
    """Delete a tiny-profile build; the next use builds it again."""
    shutil.rmtree(tiny_folder(spec), ignore_errors=True)


# ---------------------------------------------------------------------------------------------- size in memory


def safetensors_bytes(folder: Path, dtype: str) -> int:
    """Size of the folder's safetensors weights at the target dtype (headers only; variant copies left out)."""
    return folder_bytes(folder, None, dtype)


def local_bytes(path: Path, quantize: str | None, dtype: str) -> int:
    """Size once loaded of a model folder or single file on this disk: from the safetensors headers, or the weight
    files' own size where there are none (pickled .bin weights, an ONNX voice). A damaged safetensors file is a
    `DamagedWeights` naming it: loading it would fail too, later and less clearly."""
    path = Path(path)
    try:
        if path.is_file():
            return estimated_bytes(header(path), None, dtype) if path.suffix == ".safetensors" else path.stat().st_size
        measured = folder_bytes(path, quantize, dtype)
    except ValueError as exc:
        raise DamagedWeights(str(exc)) from None
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
