"""LoRA adapters: found on disk, named safely, loaded once per base pipeline and switched without a reload.

The studio scans the bundled `lora_adapters/` folder and `--lora-dir` (subfolders included) for `.safetensors`
files in the diffusers format (`unet.….lora_A.weight`) or the kohya / AUTOMATIC1111 format
(`lora_unet_….lora_down.weight` + `.alpha`). An adapter's name is its path inside its folder without the
extension ("styles/ink"). Requests may only name adapters a scan found, so no request reaches a path of its
own making ("../../x" is simply an unknown name).

Switching is the diffusers/PEFT way: every adapter is loaded once into the pipeline under its own
`adapter_name`, then `set_adapters` / `disable_lora` choose what is active. Base weights are never touched (no
fusing), so a selection always gives the same image whatever was selected before it (A1111 #13178), and
changing an adapter or its weight never reloads the model (ComfyUI #5714).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio import devices
from studio.config import Settings
from studio.contract import InputError

BUNDLED_DIR = Path(__file__).resolve().parents[2] / "lora_adapters"
MAX_WEIGHT = 2.0  # |weight| above this over-saturates any adapter; A1111's sliders stop there too
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_TAG = re.compile(r"<lora:([^:<>]+)(?::([^<>]*))?>")
_RESERVED = re.compile(r"[<>:]")  # would break the <lora:name:weight> syntax


class LoraError(InputError):
    """An adapter cannot be used (the field is "adapters", or "prompt" for a bad `<lora:>` tag)."""


@dataclass(frozen=True)
class LoraInfo:
    name: str  # what users pick or type: the path inside its folder, without ".safetensors"
    path: Path
    format: str  # "diffusers", "kohya", or "invalid" (then `error` says why)
    file: str  # the file as shown in messages: its folder's name and its path inside it
    error: str | None = None


def lora_dirs(settings: Settings) -> list[Path]:
    """The folders scanned: --lora-dir first (it wins a name clash), then the bundled one."""
    folders: list[Path] = []
    for folder in (Path(settings.lora_dir).resolve(), BUNDLED_DIR):
        if folder not in folders:
            folders.append(folder)
    return folders


def inspect_file(path: Path) -> tuple[str, str | None]:
    """(format, error) from the safetensors header alone: cheap even for large files."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
    except Exception as exc:  # safetensors raises its own error type for every kind of damage
        return "invalid", f"cannot be read as safetensors (corrupt or incomplete file: {type(exc).__name__})"
    if any(key.startswith(KOHYA_PREFIXES) for key in keys):
        return "kohya", None
    if any("lora" in key for key in keys):  # diffusers' own test for a LoRA state dict
        return "diffusers", None
    return "invalid", "is not a LoRA adapter (it holds no LoRA weights)"


def scan(folders: list[Path]) -> dict[str, LoraInfo]:
    """Every `.safetensors` file under the folders, by name; unusable files stay listed with their error."""
    found: dict[str, LoraInfo] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*.safetensors")):
            relative = path.relative_to(folder)
            if any(part.startswith(".") for part in relative.parts):  # hidden files and unfinished downloads
                continue
            name, file = relative.with_suffix("").as_posix(), f"{folder.name}/{relative.as_posix()}"
            if name in found:
                error = f"has the same name as {found[name].file}; rename one of them"
                found[name] = LoraInfo(name, found[name].path, "invalid", found[name].file, error)
                continue
            fmt, error = inspect_file(path)
            if _RESERVED.search(name):
                fmt, error = "invalid", "has a name with ':', '<' or '>'; rename it"
            found[name] = LoraInfo(name, path, fmt, file, error)
    return found


_scans: dict[tuple[Path, ...], dict[str, LoraInfo]] = {}
_scans_lock = threading.Lock()


def library(settings: Settings, refresh: bool = False) -> dict[str, LoraInfo]:
    """The last scan of these folders (scanning on first use, or again when `refresh`)."""
    key = tuple(lora_dirs(settings))
    with _scans_lock:
        if refresh or key not in _scans:
            _scans[key] = scan(list(key))
        return _scans[key]


def find(settings: Settings, name: str) -> LoraInfo:
    """The usable adapter of that name; a miss scans again once, for files added since the last scan."""
    known = library(settings)
    if name not in known:
        known = library(settings, refresh=True)
    info = known.get(name)
    if info is None:
        names = sorted(n for n, i in known.items() if not i.error)
        listed = ", ".join(names[:20]) + (" …" if len(names) > 20 else "") if names else "none found"
        raise LoraError("adapters", f"unknown adapter {name!r}; available: {listed}")
    if info.error:
        raise LoraError("adapters", f"{info.file} {info.error}")
    return info


def chosen(settings: Settings, requested: dict[str, float], tagged: dict[str, float]) -> dict[LoraInfo, float]:
    """The adapters a request picks (a `<lora:>` tag in the prompt wins over the request's field), each found on
    disk and its weight checked."""
    adapters: dict[LoraInfo, float] = {}
    for name, weight in {**requested, **tagged}.items():
        if not (isinstance(weight, (int, float)) and not isinstance(weight, bool) and abs(weight) <= MAX_WEIGHT):
            raise LoraError("adapters", f"the weight of {name!r} must be from -{MAX_WEIGHT:g} to {MAX_WEIGHT:g}")
        adapters[find(settings, name)] = float(weight)
    return adapters


def parse_prompt(prompt: str) -> tuple[str, dict[str, float]]:
    """Take AUTOMATIC1111-style `<lora:name:weight>` tags (weight 1 when left out) out of the prompt."""
    adapters: dict[str, float] = {}
    for match in _TAG.finditer(prompt):
        weight = (match.group(2) or "").strip()
        try:
            adapters[match.group(1).strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise LoraError("prompt", f"{match.group(0)} has a weight that is not a number") from None
    return " ".join(_TAG.sub(" ", prompt).split()), adapters


def _stamp(info: LoraInfo) -> tuple[int, int]:
    try:
        stat = info.path.stat()
    except OSError:
        raise LoraError("adapters", f"{info.file} is gone from the disk; refresh the adapter list") from None
    return stat.st_mtime_ns, stat.st_size


def _adapter_name(info: LoraInfo, stamp: tuple[int, int]) -> str:
    """A PEFT adapter name: module-dict safe (no dots) and unlikely to be a substring of a layer name."""
    digest = hashlib.sha1(f"{info.path}|{stamp}".encode()).hexdigest()[:10]
    return f"studio_lora_{re.sub(r'[^0-9A-Za-z]+', '_', info.name)}_{digest}"


def _explain(info: LoraInfo, model_id: str, adapter_name: str, exc: Exception) -> str:
    text = str(exc).replace(f".{adapter_name}", "")  # the internal adapter name means nothing to the user
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [type(exc).__name__]
    mismatch = next((line for line in lines if "size mismatch" in line), None)
    if mismatch or "not found in the base model" in lines[0]:
        why = f"it was made for another base model ({(mismatch or lines[0])[:240]})"
    else:
        why = lines[0][:240]
    return f"{info.file} cannot be loaded into {model_id}: {why}"


@contextmanager
def _quiet():
    """Silence two false alarms while loading: PEFT warns that a model holds several adapters (the point here),
    and transformers may print a text-encoder "load report" listing correctly loaded LoRA weights as missing."""
    report = logging.getLogger("transformers.integrations.peft")
    level = report.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        report.setLevel(logging.ERROR)
        try:
            yield
        finally:
            report.setLevel(level)


@dataclass
class PipelineLoras:
    """The adapters loaded into one pipeline and the selection active in it.

    `active` is a canonical tuple of (adapter_name, weight), () when adapters are off, and None when unknown
    (after a load, which activates the new adapter): the next `activate` then sets everything again.
    """

    loaded: dict[str, tuple[str, tuple[int, int]]] = field(default_factory=dict)  # name -> (adapter_name, stamp)
    active: tuple[tuple[str, float], ...] | None = ()

    def activate(self, pipe: Any, model_id: str, chosen: dict[LoraInfo, float],
                 grown: Callable[[int], None]) -> None:
        """Make exactly `chosen` active (sorted by name, so the order of a request does not change the image),
        loading adapters on first use; `grown(bytes)` is told how much memory each load added."""
        for info in sorted(chosen, key=lambda i: i.name):
            self._ensure_loaded(pipe, model_id, info, grown)
        wanted = tuple((self.loaded[i.name][0], float(w)) for i, w in sorted(chosen.items(), key=lambda kv: kv[0].name)
                       if w != 0)
        if wanted == self.active:
            return
        if not wanted:
            if self.loaded:  # with none loaded there is nothing to switch off (diffusers would raise)
                pipe.disable_lora()
        else:
            if not self.active:  # adapters were off or the state is unknown: set_adapters alone does not enable
                pipe.enable_lora()
            pipe.set_adapters([name for name, _ in wanted], adapter_weights=[w for _, w in wanted])
        self.active = wanted

    def _ensure_loaded(self, pipe: Any, model_id: str, info: LoraInfo, grown: Callable[[int], None]) -> None:
        stamp = _stamp(info)
        current = self.loaded.get(info.name)
        if current is not None and current[1] == stamp:
            return
        before = devices.module_bytes(pipe)
        if current is not None:  # the file changed on disk since it was loaded: drop the old weights
            self._forget(pipe, current[0])
            del self.loaded[info.name]
        adapter_name = _adapter_name(info, stamp)
        self.active = None
        try:
            with devices.loading, _quiet():  # peft patches torch process-wide while it loads: see devices.loading
                pipe.load_lora_weights(str(info.path), adapter_name=adapter_name)
            if not any(adapter_name in names for names in pipe.get_list_adapters().values()):
                raise ValueError("it matches no layer of this model")
        except Exception as exc:
            self._forget(pipe, adapter_name)  # leave the pipeline as it was: other adapters keep working
            grown(devices.module_bytes(pipe) - before)
            raise LoraError("adapters", _explain(info, model_id, adapter_name, exc)) from exc
        self.loaded[info.name] = (adapter_name, stamp)
        grown(devices.module_bytes(pipe) - before)

    @staticmethod
    def _forget(pipe: Any, adapter_name: str) -> None:
        if any(adapter_name in names for names in pipe.get_list_adapters().values()):
            with devices.loading:
                pipe.delete_adapters(adapter_name)
