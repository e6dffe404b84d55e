"""The architecture as rules anyone can run: the layers of `studio/` import only downwards, with no circles; and one
registration is all a new kind of model needs (a throw-away "echo" modality, defined here, shows up everywhere)."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pytest
from fastapi import APIRouter
from pydantic import BaseModel

from conftest import call, routes
from studio import modalities
from studio.contract import ModelOptions, check_text, require
from studio.registry import ModelSpec
from studio.runtime import Call, Studio

STUDIO = Path(__file__).resolve().parents[1] / "studio"
# Bottom to top: a module may import from its own layer and the layers below, never from one above.
LAYERS = [
    ("foundation", ("studio.config", "studio.contract", "studio.modalities", "studio.registry", "studio.devices",
                    "studio.spaces", "studio.quantization", "studio.hub", "studio.weights", "studio.catalog",
                    "studio.entries", "studio.providers", "studio.usermodels")),
    ("cache", ("studio.cache",)),
    ("model manager", ("studio.manager",)),
    ("telemetry", ("studio.telemetry",)),
    ("runtime", ("studio.runtime",)),
    ("backends", ("studio.backends", "studio.tiny")),
    ("api and ui", ("studio.api", "studio.ui")),
    ("server", ("studio.server",)),
]


def _module(path: Path) -> str:
    return ".".join(path.relative_to(STUDIO.parent).with_suffix("").parts).removesuffix(".__init__")


def imports() -> dict[str, set[str]]:
    """Every studio module and the studio modules it imports, anywhere in its code (inside functions too)."""
    found: dict[str, set[str]] = {}
    for path in STUDIO.rglob("*.py"):
        name, targets = _module(path), set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        found[name] = {t for t in targets if t.startswith("studio")}
    modules = set(found)
    for name, targets in found.items():  # "studio.api.errors.public" -> the module studio.api.errors
        resolved = set()
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                resolved.add(target)
        found[name] = resolved
    return found


def layer(module: str) -> int:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def test_every_module_imports_only_from_its_layer_and_below():
    upward = [f"{m} ({LAYERS[layer(m)][0]}) imports {t} ({LAYERS[layer(t)][0]})"
              for m, targets in imports().items() for t in targets if layer(t) > layer(m)]
    assert not upward, "\n".join(upward)
    assert not [(m, t) for m, targets in imports().items() if m.startswith("studio.api") for t in targets
                if t.startswith("studio.ui")], "the API must not import the UI"
    assert not [(m, t) for m, targets in imports().items() if m.startswith("studio.ui") for t in targets
                if t.startswith("studio.api")], "the UI must not import the API"


def test_there_are_no_import_circles():
    graph = imports()

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    circles = sorted({tuple(sorted((a, b))) for a in graph for b in reach(a) if a != b and a in reach(b)})
    assert not circles, circles


# ---------------------------------------------------------------------------------------------- a new modality


@dataclass(frozen=True)
class EchoOptions(ModelOptions):
    times: int | None = 2
    max_times: int | None = 5


@dataclass
class EchoRequest:
    text: str
    model: str | None = None
    times: int | None = None


def echo(studio: Studio, req: EchoRequest, call: Call) -> str:
    """The whole contract in a few lines: validate, then generate inside `Studio.generation`."""
    spec = studio.model(req.model, "echo")
    opts = EchoOptions.of(spec)
    text = check_text("text", req.text, max_chars=100)
    times = opts.times if req.times is None else req.times
    require(1 <= times <= opts.max_times, "times", f"must be from 1 to {opts.max_times} for {spec.id}")
    with studio.generation(spec, call) as (lease, rec):
        out = lease.model(text, times)
        rec.set(echoes=times)
    return out


def load_echo(spec: ModelSpec, path, device: str, dtype: str):
    return lambda text, times: " ".join([text] * times)


class EchoBody(BaseModel):
    text: str
    times: int | None = None


def echo_routes(studio: Studio) -> APIRouter:
    api = APIRouter()

    @api.post("/generate/echo")
    def generate_echo(body: EchoBody) -> dict:
        return {"text": echo(studio, EchoRequest(body.text, times=body.times), Call("rest", "/generate/echo"))}

    return api


def echo_tab(studio: Studio) -> None:
    gr.Textbox(label="Echo text", elem_id="echo-text")


@pytest.fixture
def echo_modality():
    modalities.register(modalities.Modality(
        name="echo", title="Echo", options=EchoOptions, tab=echo_tab, routes=echo_routes,
        gpu_seconds=lambda req: 0.0, columns=("echoes",), totals=(modalities.Total("echoes", "echoes"),)))
    yield
    modalities.unregister("echo")


def test_one_registration_adds_a_modality_everywhere(echo_modality, make_studio):
    from studio.telemetry.analytics import report
    from studio.telemetry.logreader import LogReader
    from studio.ui import build_ui

    studio = make_studio()
    studio.registry.add(ModelSpec(id="echo-1", modality="echo", label="Echo", loader=load_echo, params=0,
                                  options={"max_times": 3}))
    assert studio.models("echo") == ["echo-1"]  # the registry takes models of it

    rows = []
    studio.log.add_listener(rows.append)
    with routes(studio) as http:  # the REST route, through the studio's own error handling
        assert http.post("/generate/echo", json={"text": "hi", "times": 3}).json() == {"text": "hi hi hi"}
        refused = http.post("/generate/echo", json={"text": "hi", "times": 4})
        assert refused.status_code == 422 and refused.json() == {"detail": "times: must be from 1 to 3 for echo-1",
                                                                 "field": "times"}
        listed = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
        assert listed["echo-1"]["modality"] == "echo" and listed["echo-1"]["options"] == {"times": 2, "max_times": 3}
    assert echo(studio, EchoRequest("yo"), call("ui", "echo")) == "yo yo"

    assert [(r["modality"], r["model"], r["echoes"], r["endpoint"]) for r in rows] == [
        ("echo", "echo-1", 3, "rest:/generate/echo"), ("echo", "echo-1", 2, "ui:echo")]  # its own log column

    demo = build_ui(studio)  # its tab, between the built-in ones and Analytics
    tabs = [block.label for block in demo.blocks.values() if isinstance(block, gr.Tab)]
    assert tabs.index("Echo") == tabs.index("Analytics") - 1
    assert any(getattr(block, "elem_id", None) == "echo-text" for block in demo.blocks.values())

    totals = report(LogReader(studio.log.folder).read()).totals  # its analytics figure
    assert totals["echoes"] == 5 and totals["requests"] == 2
