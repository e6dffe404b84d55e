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

Each adapter also has a card, as in AUTOMATIC1111's LoRA tab: the base family it was trained for, its trigger
words and training tags (read from the kohya `ss_*` and `modelspec.*` safetensors metadata), and what the user
set: a preferred weight, a note and a preview image. The user's part is stored next to the adapter, in A1111's
files: `<name>.json` ("activation text", "preferred weight", "notes") and `<name>.preview.png`, so cards made in
either tool show in both.

The base family comes from the metadata where the trainer wrote it (`ss_base_model_version`,
`modelspec.architecture`), otherwise from the keys (SD3 and FLUX transformer blocks, SDXL's second text encoder)
and the cross-attention width (768: SD 1.x, 1024: SD 2.x, 2048: SDXL). An adapter whose base is known is offered
only with models of that base, and refused with both names otherwise, before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
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
MAX_TAGS = 30  # training tags shown on a card
MAX_NOTE_CHARS = 2000
PREVIEW_SIDE = 512  # a card's preview is kept at most this wide and high


class LoraError(InputError):
    """An adapter cannot be used (the field is "adapters", or "prompt" for a bad `<lora:>` tag)."""


@dataclass(frozen=True)
class LoraCard:
    """What an adapter card shows: read from the file's metadata, and what the user set (A1111's `<name>.json`
    and `<name>.preview.png` beside it)."""

    title: str | None = None  # modelspec.title, or the kohya output name
    description: str = ""
    trigger_words: tuple[str, ...] = ()  # the user's "activation text", or the trainer's trigger phrase
    tags: tuple[tuple[str, int], ...] = ()  # training tags with their counts, most frequent first
    preferred_weight: float = 1.0
    note: str = ""
    preview: Path | None = None


@dataclass(frozen=True)
class LoraInfo:
    name: str  # what users pick or type: the path inside its folder, without ".safetensors"
    path: Path
    format: str  # "diffusers", "kohya", or "invalid" (then `error` says why)
    file: str  # the file as shown in messages: its folder's name and its path inside it
    error: str | None = None
    base: str | None = None  # the image family it was trained for ("sd15", "sdxl", ...); None: unknown
    card: LoraCard = field(default_factory=LoraCard)


def lora_dirs(settings: Settings) -> list[Path]:
    """The folders scanned: --lora-dir first (it wins a name clash), then the bundled one."""
    folders: list[Path] = []
    for folder in (Path(settings.lora_dir).resolve(), BUNDLED_DIR):
        if folder not in folders:
            folders.append(folder)
    return folders


@dataclass(frozen=True)
class _Header:
    """What the safetensors header of a LoRA file says (read without loading any tensor)."""

    keys: tuple[str, ...]
    metadata: dict[str, str]
    cross_attention: int | None  # the input width of a cross-attention key/value adapter


def _header(path: Path) -> _Header:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        keys = tuple(fh.keys())
        width = None
        for key in keys:
            if "attn2" in key and "to_k" in key and key.endswith(("lora_down.weight", "lora_A.weight")):
                width = fh.get_slice(key).get_shape()[-1]
                break
        return _Header(keys, dict(fh.metadata() or {}), width)


def inspect_file(path: Path) -> tuple[str, str | None, _Header | None]:
    """(format, error, header) from the safetensors header alone: cheap even for large files."""
    try:
        header = _header(path)
    except Exception as exc:  # safetensors raises its own error type for every kind of damage
        return "invalid", f"cannot be read as safetensors (corrupt or incomplete file: {type(exc).__name__})", None
    if any(key.startswith(KOHYA_PREFIXES) for key in header.keys):
        return "kohya", None, header
    if any("lora" in key for key in header.keys):  # diffusers' own test for a LoRA state dict
        return "diffusers", None, header
    return "invalid", "is not a LoRA adapter (it holds no LoRA weights)", header


# What trainers write as the base model: kohya's ss_base_model_version and the modelspec architecture prefixes.
KOHYA_BASES = {"sd_v1": "sd15", "sd_v2": "sd2", "sd_v2_768_v": "sd2", "sdxl_base_v0-9": "sdxl",
               "sdxl_base_v1-0": "sdxl", "sd3": "sd3", "sd3m": "sd3", "flux1": "flux"}
MODELSPEC_BASES = (("stable-diffusion-xl", "sdxl"), ("stable-diffusion-v1", "sd15"), ("stable-diffusion-v2", "sd2"),
                   ("stable-diffusion-v3", "sd3"), ("stable-diffusion-3", "sd3"), ("flux", "flux"))
CROSS_ATTENTION_BASES = {768: "sd15", 1024: "sd2", 2048: "sdxl"}


def base_of(header: _Header) -> str | None:
    """The family an adapter was trained for: from its metadata, else its keys, else None (unknown)."""
    meta = header.metadata
    version = meta.get("ss_base_model_version", "")
    if version in KOHYA_BASES:
        return KOHYA_BASES[version]
    architecture = meta.get("modelspec.architecture", "")
    for prefix, base in MODELSPEC_BASES:
        if architecture.startswith(prefix):
            return base
    if meta.get("ss_v2") == "True":
        return "sd2"
    keys = header.keys
    if any("single_transformer_blocks" in k or k.startswith("lora_unet_single_blocks") for k in keys):
        return "flux"
    if any(k.startswith(("transformer.transformer_blocks", "lora_unet_joint_blocks")) for k in keys):
        return "sd3"
    if any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in keys):
        return "sdxl"
    return CROSS_ATTENTION_BASES.get(header.cross_attention)


def _trained_card(header: _Header) -> LoraCard:
    """The card's part that comes from the file: title, description, trigger phrase and training tags."""
    meta = header.metadata
    counts: dict[str, int] = {}
    triggers: list[str] = []
    try:
        frequency = json.loads(meta.get("ss_tag_frequency") or "{}")
    except ValueError:
        frequency = {}
    for folder, tags in (frequency.items() if isinstance(frequency, dict) else ()):
        words = re.fullmatch(r"\d+_(.+)", str(folder))  # kohya's dataset folders: "<repeats>_<trigger words>"
        if words and words.group(1).strip() not in triggers:
            triggers.append(words.group(1).strip())
        for tag, count in (tags.items() if isinstance(tags, dict) else ()):
            if isinstance(count, int) and str(tag).strip():
                counts[str(tag).strip()] = counts.get(str(tag).strip(), 0) + count
    phrase = meta.get("modelspec.trigger_phrase", "").strip()
    if phrase:
        triggers = [phrase]
    tags = tuple(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_TAGS])
    return LoraCard(title=meta.get("modelspec.title") or meta.get("ss_output_name") or None,
                    description=meta.get("modelspec.description", ""), trigger_words=tuple(triggers), tags=tags)


def _card_files(path: Path) -> tuple[Path, Path]:
    """A1111's files beside an adapter: its user metadata and its preview."""
    stem = path.with_suffix("")
    return stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".preview.png")


def _user_card(path: Path, card: LoraCard) -> LoraCard:
    """The card with what the user set over what the file says."""
    user_file, preview = _card_files(path)
    try:
        user = json.loads(user_file.read_text()) if user_file.is_file() else {}
    except (OSError, ValueError):
        user = {}
    user = user if isinstance(user, dict) else {}
    words = tuple(w.strip() for w in str(user.get("activation text") or "").split(",") if w.strip())
    weight = user.get("preferred weight")
    return replace(card, trigger_words=words or card.trigger_words,
                   preferred_weight=float(weight) if isinstance(weight, (int, float)) and weight else 1.0,
                   note=str(user.get("notes") or ""), preview=preview if preview.is_file() else None)


def read_info(name: str, path: Path, file: str) -> LoraInfo:
    fmt, error, header = inspect_file(path)
    if _RESERVED.search(name):
        fmt, error = "invalid", "has a name with ':', '<' or '>'; rename it"
    if header is None:
        return LoraInfo(name, path, fmt, file, error)
    return LoraInfo(name, path, fmt, file, error, base_of(header), _user_card(path, _trained_card(header)))


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
                found[name] = replace(found[name], format="invalid", error=error)
                continue
            found[name] = read_info(name, path, file)
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


def fits(info: LoraInfo, base: str | None) -> bool:
    """Whether an adapter may be offered with a model that takes adapters of `base` (an unknown base may: the
    load then tells)."""
    return base is not None and info.base in (None, base)


def check_base(info: LoraInfo, base: str | None, model: str, model_family: str) -> None:
    """Refuse, naming both families, an adapter made for another family than the model's, before any load."""
    if base is None:
        raise LoraError("adapters", f"{model} ({model_family}) takes no LoRA adapters")
    if info.base is not None and info.base != base:
        raise LoraError("adapters", f"{info.file} was made for {base_label(info.base)}, {model} is {model_family}")


def base_label(base: str) -> str:
    from studio.backends.image_families import FAMILIES

    return FAMILIES[base].label if base in FAMILIES else base


def save_card(settings: Settings, name: str, *, preferred_weight: float | None = None, note: str | None = None,
              trigger_words: list[str] | None = None, preview: Any = None) -> LoraInfo:
    """Store what the user set on an adapter's card beside the adapter (A1111's files), keeping what is not
    given; `preview` is a PIL image, kept as a thumbnail. Returns the adapter with its new card."""
    info = find(settings, name)
    user_file, preview_file = _card_files(info.path)
    if preferred_weight is not None and not (isinstance(preferred_weight, (int, float))
                                             and -MAX_WEIGHT <= preferred_weight <= MAX_WEIGHT):
        raise LoraError("preferred_weight", f"must be from -{MAX_WEIGHT:g} to {MAX_WEIGHT:g}")
    if note is not None and len(note) > MAX_NOTE_CHARS:
        raise LoraError("note", f"has {len(note):,} characters; the limit is {MAX_NOTE_CHARS:,}")
    try:
        user = json.loads(user_file.read_text()) if user_file.is_file() else {}
    except (OSError, ValueError):
        user = {}
    user = user if isinstance(user, dict) else {}
    if preferred_weight is not None:
        user["preferred weight"] = float(preferred_weight)
    if note is not None:
        user["notes"] = note
    if trigger_words is not None:
        user["activation text"] = ", ".join(w.strip() for w in trigger_words if w.strip())
    try:
        if preview is not None:
            thumbnail = preview.convert("RGB")
            thumbnail.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
            thumbnail.save(preview_file, format="PNG")
        partial = user_file.with_name(f".{user_file.name}.partial")
        partial.write_text(json.dumps(user, indent=2, ensure_ascii=False))
        partial.replace(user_file)
    except OSError as exc:
        raise LoraError("adapters", f"cannot save the card of {info.file}: {exc.strerror or exc}") from None
    updated = read_info(info.name, info.path, info.file)
    with _scans_lock:
        for found in _scans.values():
            if found.get(name) is not None and found[name].path == info.path:
                found[name] = updated
    return updated


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
    mismatch = any("size mismatch" in line for line in lines)
    if mismatch or "not found in the base model" in lines[0]:  # the tensor dump means nothing to the user
        # Its family is unknown here (a known other family is refused before any load, by check_base).
        why = (f"it was made for another base model (its layer {'sizes' if mismatch else 'names'} do not match "
               f"{model_id}'s); pick an adapter made for this model's family")
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
