"""The Hugging Face Hub and its local cache: what a repo holds, its weights' sizes before a download, a download
with byte progress that can be cancelled, what is on disk, and freeing it.

Everything goes through `huggingface_hub` (so `HF_ENDPOINT`, `HF_HOME`, tokens and the cache layout are its own).
The loaders read a repo as `from_pretrained` does, so a download takes only what that reads (`wanted`): not other
frameworks' copies of the weights, not pickled twins of safetensors files.

Completeness: `snapshot_download` records a repo's file list per commit in the cache (its tree cache), and a
local look-up with the same file patterns refuses a snapshot that misses files. So a download that was cancelled
or failed halfway is never taken for a model on disk; the files it finished stay in the cache, and the next
download fetches only the rest (huggingface_hub deletes a file it did not finish).
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Files the studio never needs (other frameworks' copies of the same weights, original training checkpoints).
IGNORE = ["*.ckpt", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.tflite", "*.ot", "*.mlmodel", "*.pth",
          "*.gguf", "*.nemo", "flax_model*", "tf_model*", "rust_model*", "coreml/*", "onnx/*", "openvino/*"]
# What recognising a model reads: configs, tokenizer settings, chat templates (kilobytes, never weights).
CONFIG_PATTERNS = ["*.json", "*.jinja"]


class DownloadCancelled(Exception):
    """The download was cancelled; the files it finished stay in the cache, the unfinished one is gone."""


@dataclass(frozen=True)
class HubFile:
    path: str  # within the repo
    size: int


def offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub itself reads it."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def is_repo_id(text: str) -> bool:
    """"org/name", the form of a Hub model repo id."""
    return REPO_ID.fullmatch(text) is not None


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def repo_folder(repo: str) -> Path:
    """The repo's folder in the Hugging Face cache (blobs, snapshots, refs)."""
    from huggingface_hub.file_download import repo_folder_name

    return cache_dir() / repo_folder_name(repo_id=repo, repo_type="model")


# ---------------------------------------------------------------------------------------------- what a repo holds


def ignore_patterns(files: list[str]) -> list[str]:
    """What a from_pretrained load never reads: other formats, and copies of the same weights (pickled .bin
    twins of safetensors, fp16 / non-EMA variants, the single-file checkpoints at a diffusers repo's root)."""
    ignore = list(IGNORE)
    if any(f.endswith(".safetensors") for f in files):
        ignore += ["*.bin", "*.pt"]
    if "model_index.json" in files:  # a diffusers pipeline: its weights live in the component folders
        ignore += [f for f in files if "/" not in f and f.endswith(".safetensors")]
        ignore += ["*.fp16.*", "*non_ema*"]
    return ignore


def wanted(files: list[HubFile]) -> list[HubFile]:
    """The files of a repo that loading it reads."""
    ignore = ignore_patterns([f.path for f in files])
    return [f for f in files if not any(fnmatch.fnmatch(f.path, pattern) for pattern in ignore)]


def list_files(repo: str, revision: str) -> tuple[str, list[HubFile]]:
    """The commit `revision` points at, and every file of the repo there with its size (asks the Hub)."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi()
    commit = api.repo_info(repo, revision=revision).sha
    tree = api.list_repo_tree(repo, revision=commit, recursive=True)
    return commit, [HubFile(f.path, int(f.size or 0)) for f in tree if isinstance(f, RepoFile)]


def remote_tensors(repo: str, revision: str, paths: list[str]) -> dict[str, list[tuple[str, list[int], str]]]:
    """The tensors (name, shape, dtype code) of safetensors files in a repo, read from their headers on the Hub:
    a range request per file, no download (what `huggingface_hub.get_safetensors_metadata` does for a
    transformers repo, here for any layout: a diffusers pipeline's component folders too)."""
    from huggingface_hub import HfApi

    api = HfApi()
    found = {}
    for path in paths:
        meta = api.parse_safetensors_file_metadata(repo, path, revision=revision)
        found[path] = [(name, list(info.shape), info.dtype) for name, info in meta.tensors.items()]
    return found


# ---------------------------------------------------------------------------------------------- the local cache


def snapshot(repo: str, revision: str, skip: Sequence[str] = ()) -> Path | None:
    """The repo's complete snapshot in the local cache (what loading reads, less `skip`), or None; never asks the
    Hub."""
    from huggingface_hub import get_cached_repo_tree, snapshot_download
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        tree = [f.path for f in get_cached_repo_tree(repo, revision=revision)]
    except (CachedRepoTreeNotFoundError, OSError, ValueError):
        tree = None  # a cache written before tree listings existed: a snapshot folder is taken as complete
    try:
        return Path(snapshot_download(repo, revision=revision, local_files_only=True,
                                      ignore_patterns=[*ignore_patterns(tree), *skip] if tree is not None else None))
    except Exception:  # LocalEntryNotFoundError, IncompleteSnapshotError and friends: not (completely) cached
        return None


def fetch_configs(repo: str, revision: str) -> Path:
    """Download only the repo's small files that say what it is (configs, tokenizer settings, templates) and
    return the snapshot folder holding them. Raises huggingface_hub's errors (unknown repo, no network)."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo, revision=revision, allow_patterns=CONFIG_PATTERNS))


def download(repo: str, revision: str, paths: list[str], progress: Callable[[int], None],
             cancel: threading.Event) -> Path:
    """Download `paths` of the repo one after another into the cache; `progress(n)` hears every chunk's bytes.

    Setting `cancel` stops at the next chunk (DownloadCancelled). Returns the snapshot folder once every file is
    there, after recording the revision and the repo's file list (so the snapshot counts as complete)."""
    from huggingface_hub import hf_hub_download, snapshot_download

    class Bar:
        """The tqdm stand-in huggingface_hub reports to (one per file)."""

        def __init__(self, *args, **kwargs) -> None:
            pass

        def update(self, n: float | None = 1) -> None:
            if cancel.is_set():
                raise DownloadCancelled()
            progress(int(n or 0))

        def __enter__(self) -> "Bar":
            return self

        def __exit__(self, *exc) -> None:
            pass

        def close(self) -> None:
            pass

        def set_postfix_str(self, *args, **kwargs) -> None:
            pass

    for path in paths:
        if cancel.is_set():
            raise DownloadCancelled()
        hf_hub_download(repo, path, revision=revision, tqdm_class=Bar)
    return Path(snapshot_download(repo, revision=revision, allow_patterns=paths))


def folder_size(path: Path) -> int:
    """Bytes of a file, or of the files under a folder (links not followed, so the HF cache's snapshot links
    count nothing and its blobs once)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def delete(repo: str) -> int:
    """Remove the repo from the cache (every revision); returns the bytes freed."""
    folder = repo_folder(repo)
    if not folder.exists():
        return 0
    size = folder_size(folder)
    shutil.rmtree(folder)
    return size


def free_bytes(path: Path) -> int:
    """Free space on the disk that holds `path` (its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free
