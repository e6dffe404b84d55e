"""Getting a model's weights onto the local disk, and sizing them before they are loaded.

Real models come from the Hugging Face cache; the Hub is contacted only when the files are not cached yet
(then the download shows tqdm progress, which the UI mirrors). Tiny-profile models are built on first use.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

from studio.modalities import resolve
from studio.registry import ModelSpec, tiny_root

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "float64": 8}
# Files the studio never needs (other frameworks' copies of the same weights, original training checkpoints).
IGNORE = ["*.ckpt", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.tflite", "*.ot", "*.mlmodel", "*.pth",
          "*.gguf", "*.nemo", "flax_model*", "tf_model*", "rust_model*", "coreml/*", "onnx/*", "openvino/*"]
BUILD_MARK = ".complete"


class WeightsUnavailable(RuntimeError):
    """The model's files are not on disk and cannot be fetched."""


def is_cached(spec: ModelSpec) -> bool:
    from huggingface_hub import snapshot_download

    if not spec.repo:
        return True
    try:
        snapshot_download(spec.repo, revision=spec.revision, local_files_only=True)
        return True
    except Exception:  # LocalEntryNotFoundError and friends: simply not cached
        return False


def ensure_local(spec: ModelSpec) -> Path | None:
    """The folder holding the model's files, downloading or building them if needed (None: bundled model)."""
    if spec.build:
        return _build_tiny(spec)
    if not spec.repo:
        return None
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec.repo, revision=spec.revision, local_files_only=True))
    except Exception:
        pass  # not cached yet: download below
    try:
        return Path(snapshot_download(spec.repo, revision=spec.revision, ignore_patterns=_ignore(spec)))
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        why = "HF_HUB_OFFLINE is set and the files are not cached" if offline else f"{type(exc).__name__}: {exc}"
        raise WeightsUnavailable(f"cannot fetch {spec.repo} (revision {spec.revision}): {why}") from exc


def _ignore(spec: ModelSpec) -> list[str]:
    """Skip what a from_pretrained load never reads: other formats, and copies of the same weights (pickled .bin
    twins of safetensors, fp16 / non-EMA variants, the single-file checkpoints at a diffusers repo's root)."""
    from huggingface_hub import HfApi

    files = [s.rfilename for s in HfApi().model_info(spec.repo, revision=spec.revision).siblings or []]
    ignore = list(IGNORE)
    if any(f.endswith(".safetensors") for f in files):
        ignore += ["*.bin", "*.pt"]
    if "model_index.json" in files:  # a diffusers pipeline: its weights live in the component folders
        ignore += [f for f in files if "/" not in f and f.endswith(".safetensors")]
        ignore += ["*.fp16.*", "*non_ema*"]
    return ignore


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
    """Build once into a temporary folder, then rename: concurrent builders never see a half-written model."""
    folder = tiny_folder(spec)
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


def safetensors_bytes(folder: Path, dtype: str) -> int:
    """Size of every floating-point tensor in the folder's safetensors files at the target dtype.

    Reads only the JSON headers, so it costs milliseconds even for gigabytes of weights. Where a folder
    holds both full and fp16 variants, only the ones without a variant suffix count.
    """
    files = [f for f in folder.rglob("*.safetensors") if ".fp16." not in f.name and ".non_ema." not in f.name]
    total = 0
    for file in files:
        with open(file, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            numel = 1
            for dim in info["shape"]:
                numel *= dim
            is_float = info["dtype"] in ("F64", "F32", "F16", "BF16")
            total += numel * (DTYPE_BYTES[dtype] if is_float else _stored_size(info["dtype"]))
    return total


def _stored_size(code: str) -> int:
    return {"I64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}.get(code, 4)


def estimate_bytes(spec: ModelSpec, dtype: str) -> int:
    """Before loading: the safetensors headers when the files are local, else the registry's parameter count."""
    folder: Path | None = None
    if spec.build and (tiny_folder(spec) / BUILD_MARK).exists():
        folder = tiny_folder(spec)
    elif spec.repo and is_cached(spec):
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(spec.repo, revision=spec.revision, local_files_only=True))
    if folder is not None:
        measured = safetensors_bytes(folder, dtype)
        if measured:
            return measured
    return spec.params * DTYPE_BYTES.get(dtype, 4)
