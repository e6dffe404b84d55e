"""The one place a kind of model is registered: everything else in the studio picks it up from here.

A modality is a backend module (typed request, result and options, one `validate`, the service, the loaders), a
tiny-profile builder, a tab module and an API module, plus its entries in the catalog (`studio.registry`).
Registering it is all the rest of the studio needs: the registry accepts models of it, the HTTP API mounts its
routes, the UI adds its tab, ZeroGPU reserves time by its estimate, the request log gets its columns and the
Analytics tab its totals.

The references are "module:name" strings, resolved on first use, so this module imports nothing of the studio
and stays at the bottom of the import graph while it names code in the layers above (a test or a plug-in may pass
the objects themselves).

To add a modality: write `studio/backends/<module>.py`, `studio/tiny/<module>.py`, `studio/ui/<module>_tab.py` and
`studio/api/<module>.py` (the existing ones are the templates), add one `register(built_in(...))` below, and its
models to the catalogs in `studio/catalog.py`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

Ref = str | Callable[..., Any] | type  # "package.module:name", or the object itself


def resolve(ref: Ref) -> Any:
    """Import 'package.module:name' lazily; an object is returned as it is."""
    if not isinstance(ref, str):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Total:
    """A figure the Analytics tab totals over a modality's successful requests."""

    label: str  # "images", "audio (s)"
    column: str | None = None  # the request-log column summed; None counts the requests
    per: str | None = None  # another column: the total is sum(column) / sum(per), e.g. milliseconds per frame


@dataclass(frozen=True)
class Modality:
    """A kind of model and the pieces that serve it."""

    name: str  # the one name: registry entries, request-log rows, analytics, endpoint labels, /v1/models
    title: str  # the UI tab it shows in; modalities with the same title share that tab, one sub-tab each
    options: Ref  # its `studio.contract.ModelOptions` subclass: a family's defaults and caps
    tab: Ref | None = None  # build(studio): the tab's content, inside a `with gr.Tab(...)`
    routes: Ref | None = None  # router(studio) -> fastapi.APIRouter: its REST and OpenAI-compatible routes
    connect: Ref | None = None  # the loader of a model served by an external provider; None: not offered
    gpu_seconds: Ref | None = None  # gpu_seconds(request) -> float: GPU work of one request (ZeroGPU)
    detect: Ref | None = None  # detect(path) -> studio.contract.Family | None: which of its families a folder or
    # file holds (the user catalog, the drop-in folders and the Add box ask every modality)
    columns: tuple[str, ...] = ()  # request-log columns (numbers) its generations fill
    totals: tuple[Total, ...] = ()
    subtitle: str | None = None  # the sub-tab's label when it shares its tab

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").isalnum() or self.name != self.name.lower():
            raise ValueError(f"modality name {self.name!r}: use lower-case letters, digits and '-'")


_registered: dict[str, Modality] = {}


def register(modality: Modality) -> Modality:
    """Add a modality; its name must be new."""
    if modality.name in _registered:
        raise ValueError(f"modality {modality.name!r} is registered twice")
    _registered[modality.name] = modality
    return modality


def unregister(name: str) -> None:
    """Remove a modality (tests that register a throw-away one clean up with this)."""
    _registered.pop(name, None)


def get(name: str) -> Modality:
    try:
        return _registered[name]
    except KeyError:
        raise KeyError(f"modality {name!r} is not registered; known: {', '.join(_registered)}") from None


def registered() -> list[Modality]:
    """Every modality, in registration order (the order of the UI's tabs)."""
    return list(_registered.values())


def names() -> tuple[str, ...]:
    return tuple(_registered)


def log_columns() -> tuple[str, ...]:
    """The request-log columns the registered modalities add, in registration order, each once."""
    return tuple(dict.fromkeys(column for m in _registered.values() for column in m.columns))


def built_in(name: str, module: str, title: str, options: str, *, external: bool = True, **fields: Any) -> Modality:
    """A modality laid out the studio's way: its service in studio/backends/<module>.py (with `options`, `connect`
    for external providers when `external`, and `gpu_seconds`), its tab in studio/ui/<module>_tab.py (`build`)
    and its routes in studio/api/<module>.py (`router`)."""
    backend = f"studio.backends.{module}"
    return Modality(name=name, title=title, options=f"{backend}:{options}", tab=f"studio.ui.{module}_tab:build",
                    routes=f"studio.api.{module}:router", connect=f"{backend}:connect" if external else None,
                    gpu_seconds=f"{backend}:gpu_seconds", **fields)


register(built_in("chat", "chat", "Chat", "ChatOptions", subtitle="Text chat",
                  detect="studio.backends.chat:detect",
                  columns=("prompt_tokens", "completion_tokens"),
                  totals=(Total("replies"), Total("tokens in", "prompt_tokens"),
                          Total("tokens out", "completion_tokens"))))
register(built_in("text-to-speech", "speech", "Speech", "SpeechOptions", subtitle="Text to speech",
                  detect="studio.backends.speech:detect", columns=("audio_seconds", "pieces", "rtf"),
                  totals=(Total("clips"), Total("audio seconds", "audio_seconds"))))
register(built_in("speech-to-text", "transcription", "Speech", "TranscriptionOptions", subtitle="Speech to text",
                  columns=("audio_in_seconds", "characters", "rtf"),
                  totals=(Total("transcripts"), Total("audio seconds heard", "audio_in_seconds"),
                          Total("characters transcribed", "characters"))))
register(built_in("image", "image", "Image", "ImageOptions", columns=("images", "output_pixels"),
                  totals=(Total("images", "images"),), detect="studio.backends.image_families:detect"))
register(built_in("3d", "shape", "3D", "ShapeOptions", external=False, columns=("faces",),
                  totals=(Total("3D meshes"),)))
register(built_in("video", "video", "Video", "VideoOptions", external=False,
                  columns=("frames", "video_seconds", "fps"),
                  totals=(Total("videos"), Total("video seconds", "video_seconds"), Total("frames", "frames"),
                          Total("ms per frame", "latency_ms", per="frames"))))
