"""What every generation tab shares: the seed box, how errors are shown, the `Runner` that calls a service, and the
hand-offs between tabs.

A tab builds its typed request from the form and hands it to its modality's Runner, which gives the call a fresh
request id (the tab shows it with the result, as the log row has it), a per-session Stop, the progress bar, the
errors as Gradio errors, and on ZeroGPU the GPU reservation estimated by the modality (`Modality.gpu_seconds`).
The tabs' client/MCP endpoints use the same Runner. `wire_generation` connects a tab's Generate: the button is
off and Stop on while it runs (Enter in a text box meanwhile is refused with a notice), and an error is a toast
and a line in the status, with the results left in view.

A hand-off sends a result of one tab to another tab's input and opens that tab ("Make 3D" on an image): the
receiving tab `accept`s under a name, the sending one `send`s to the name, and the app wires both once every tab
is built (`Handoffs.wire`), so neither tab imports the other.
"""

from __future__ import annotations

import atexit
import contextvars
import functools
import logging
import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, TypeVar

import gradio as gr

from studio import modalities, spaces
from studio.cache import CacheError
from studio.contract import InputError
from studio.runtime import Call, Studio

R = TypeVar("R")  # a modality's request
T = TypeVar("T")  # its result

logger = logging.getLogger("studio.ui")


@contextmanager
def shown_to_user(request_id: str | None = None) -> Iterator[None]:
    """Errors as Gradio errors with a message: the user's own (bad input, an unknown model, a model that cannot be
    loaded now) as they are, without a traceback in the terminal; an internal error as its request id, with the
    traceback in the server log."""
    try:
        yield
    except (InputError, CacheError) as exc:
        logger.info("input error: %s", exc)
        raise gr.Error(str(exc), print_exception=False) from None
    except gr.Error:
        raise
    except Exception:
        request_id = request_id or os.urandom(8).hex()
        logger.exception("internal error (request %s)", request_id)
        raise gr.Error(f"Internal error; the server log has the details under request id {request_id}.",
                       print_exception=False) from None


def new_request_id() -> str:
    """A generation's own id, as its request-log row has it: every generation gets one (a page's requests would
    otherwise share the id of the connection's first request)."""
    return os.urandom(16).hex()


def traced(text: str, request_id: str) -> str:
    """A result's status line with the generation's request id, for the user to quote."""
    return f"{text} · request `{request_id}`"


def kept_on_error(fn: Callable, outputs: list, status: Any) -> Callable:
    """`fn` whose errors leave the results in view: the message as a toast and in the `status` output (replacing
    a stale "Seed used"), every other output unchanged, no "Error" badge over them."""
    index = outputs.index(status)

    @functools.wraps(fn)  # Gradio reads the signature (gr.Request, gr.Progress) through the wrapper
    def keeping(*args: Any, **kwargs: Any) -> list:
        try:
            return fn(*args, **kwargs)
        except gr.Error as exc:
            gr.Warning(exc.message)
            kept: list = [gr.update() for _ in outputs]
            kept[index] = f"⚠️ {exc.message}"
            return kept

    return keeping


BUSY = "A generation is running: wait for it to end, or press Stop."


def busy(running: bool, buttons: int = 1) -> tuple[dict, ...]:
    """Generate off and Stop on while a generation runs; the other way round when it ended."""
    return *[gr.update(interactive=not running)] * buttons, gr.update(interactive=running)


def wire_generation(triggers: list, fn: Callable, inputs: Any, outputs: list, *, status: Any, go: Any, stop: Any,
                    running: Any = None, **kwargs: Any) -> Any:
    """A tab's generation event: Generate is off (and Stop on) until it ends, however it ends, and an error is
    shown without hiding earlier results (`kept_on_error`; `status` None: `fn` shows its own errors, as the chat's
    streaming turn does). The progress shows on the first output only. Returns the generation's event.

    `go` is a button or a list of them (all off while running). A trigger that fires while the generation runs (Enter
    in a text box: the buttons are off) is refused with a notice and starts nothing. `running` is the session's
    flag for that (a gr.State(False)); events that must not overlap share one, as Chat's Send and Retry do."""
    running = gr.State(False) if running is None else running
    buttons = go if isinstance(go, list) else [go]

    def start(already: bool) -> tuple:
        if already:
            raise gr.Error(BUSY, duration=5, print_exception=False)
        return True, *busy(True, len(buttons))

    # Queued, because Gradio shows an error of an unqueued event as no more than a console line; one start at a
    # time, so two quick triggers cannot both find the flag down.
    started = gr.on(triggers, start, running, [running, *buttons, stop], api_visibility="private",
                    show_progress="hidden", concurrency_id="start", concurrency_limit=1)
    ran = started.success(fn if status is None else kept_on_error(fn, outputs, status), inputs, outputs,
                          api_visibility="private", show_progress_on=outputs[0], **kwargs)
    ran.then(lambda: (False, *busy(False, len(buttons))), None, [running, *buttons, stop], queue=False,
             api_visibility="private", show_progress="hidden")
    return ran


def model_picker(studio: Studio, modality: str, **kwargs: Any) -> gr.Dropdown:
    """A tab's model picker: each model's label, size and whether it is loaded. The list is read again when the
    page loads and whenever the picker gets focus, so a model added in the Models tab (or found by its Refresh)
    shows up without a restart."""
    choices = studio.manager.choices(modality)
    picker = gr.Dropdown(choices, value=choices[0][1] if choices else None, label="Model", **kwargs)

    def refresh(current: str | None) -> dict:
        choices = studio.manager.choices(modality)
        ids = [model_id for _text, model_id in choices]
        # The value is left alone while it is still offered: setting it would fire the picker's change event.
        return gr.update(choices=choices) if current in ids else gr.update(choices=choices,
                                                                             value=ids[0] if ids else None)

    gr.on([picker.focus], refresh, picker, picker, queue=False, api_visibility="private", show_progress="hidden")
    gr.on(None, refresh, picker, picker, queue=False, api_visibility="private", show_progress="hidden")  # page load
    return picker


def seed_box(info: str = "Empty: random. The seed used is shown with the result.", **kwargs) -> gr.Textbox:
    """A text box, not gr.Number: a Number shows and sends 0 when left empty, which would fix every seed at 0."""
    return gr.Textbox(label="Seed", placeholder="random", max_lines=1, info=info, **kwargs)


def parse_seed(text: str | float | None) -> int | None:
    """The seed box's text: empty for a random seed, else a whole number (its range is checked with the rest)."""
    text = str(text if text is not None else "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise gr.Error(f"seed: {text!r} is not a whole number; leave it empty for a random seed",
                       print_exception=False) from None


class StopFlags:
    """One cancel event per browser session; Stop sets the event of the generation that session is running."""

    def __init__(self) -> None:
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    @contextmanager
    def running(self, session: str) -> Iterator[threading.Event]:
        """The cancel event of one generation of this session, forgotten when the generation ends."""
        event = threading.Event()
        with self._lock:
            self._events[session] = event
        try:
            yield event
        finally:
            with self._lock:
                if self._events.get(session) is event:
                    del self._events[session]

    def stop(self, session: str) -> bool:
        """Stop the session's generation; False when it runs none."""
        with self._lock:
            event = self._events.get(session)
        if event is not None:
            event.set()
        return event is not None


class Runner(Generic[R, T]):
    """Runs one modality's service for its tab (`session` given: Stop works) and for its Gradio client / MCP
    endpoint (`entry`: the endpoint's api_name, for the request log).

    A service that combines modalities (voice chat) names itself instead of a modality and brings its own
    `gpu_seconds` estimate; its name labels the request log's endpoint ("ui:voice-chat")."""

    def __init__(self, studio: Studio, modality: str, service: Callable[[Studio, R, Call], T],
                 gpu_seconds: Callable[[R], float] | None = None):
        self.studio = studio
        self.modality = modality
        self.service = service
        self.flags = StopFlags()
        if gpu_seconds is None:
            estimate = modalities.get(modality).gpu_seconds
            gpu_seconds = modalities.resolve(estimate) if estimate else (lambda _req: 0.0)
        # On ZeroGPU the GPU exists only inside these calls; their arguments must pickle (a request, plain values).
        duration = lambda req, *_, **__: spaces.reserve(gpu_seconds(req))  # noqa: E731
        self.run: Callable[..., T] = spaces.gpu(duration)(self._run)
        self.stream: Callable[..., Iterator[Any]] = spaces.gpu(duration)(self._stream)

    @contextmanager
    def _call(self, session: str | None, progress: Any, entry: str | None,
              request_id: str | None) -> Iterator[Call]:
        report = None if progress is None else (lambda fraction, text: progress(fraction, desc=text))
        request_id = request_id or new_request_id()
        if session is None:
            yield Call("gradio", entry or self.modality, progress=report, request_id=request_id)
            return
        with self.flags.running(session) as cancel:
            yield Call("ui", self.modality, session, cancel, report, request_id)

    def _run(self, req: R, session: str | None = None, progress: Any = None, entry: str | None = None,
             request_id: str | None = None) -> T:
        """`request_id`: the id of the generation's log row (the tab made it, to show it); default: a new one."""
        with self._call(session, progress, entry, request_id) as call, shown_to_user(call.request_id):
            return self.service(self.studio, req, call)

    def _stream(self, req: R, session: str | None = None, progress: Any = None, entry: str | None = None,
                request_id: str | None = None) -> Iterator[Any]:
        """A streaming service (chat): its events as it yields them."""
        with self._call(session, progress, entry, request_id) as call, shown_to_user(call.request_id):
            yield from self.service(self.studio, req, call)

    def stop(self, session: str) -> bool:
        """Stop the session's generation; False when it runs none."""
        return self.flags.stop(session)


@dataclass
class Handoffs:
    """The hand-offs of one app being built: inputs that accept a value, and the events that send one."""

    tabs: Any = None  # the app's gr.Tabs
    tab: str | None = None  # the id of the tab being built
    inputs: dict[str, tuple[Any, str]] = field(default_factory=dict)  # name -> (component, its tab's id)
    sends: list[tuple[str, Any, Callable, Any]] = field(default_factory=list)  # (name, trigger, fn, inputs)

    def wire(self) -> None:
        """Connect every send to its input: the value goes in, the input's tab opens. A send without an input
        (the receiving tab was not built) is left unwired."""
        for name, trigger, fn, inputs in self.sends:
            if name not in self.inputs:
                continue
            target, tab = self.inputs[name]
            trigger(lambda *values, _fn=fn, _tab=tab: (_fn(*values), gr.Tabs(selected=_tab)), inputs,
                    [target, self.tabs], api_visibility="private")


_handoffs: contextvars.ContextVar[Handoffs | None] = contextvars.ContextVar("handoffs", default=None)


@contextmanager
def handing_off(tabs: Any) -> Iterator[Handoffs]:
    """While an app's tabs are built: collect their hand-offs; wire them at the end."""
    handoffs = Handoffs(tabs)
    token = _handoffs.set(handoffs)
    try:
        yield handoffs
    finally:
        _handoffs.reset(token)
    handoffs.wire()


def accept(name: str, component: Any) -> None:
    """This tab's `component` takes values sent under `name` (outside an app being built: nothing)."""
    handoffs = _handoffs.get()
    if handoffs is not None:
        handoffs.inputs[name] = (component, handoffs.tab)


def send(name: str, trigger: Callable, fn: Callable, inputs: Any) -> None:
    """When `trigger` fires (e.g. `button.click`), send `fn(*inputs)` to the input accepting `name`."""
    handoffs = _handoffs.get()
    if handoffs is not None:
        handoffs.sends.append((name, trigger, fn, inputs))


# ---------------------------------------------------------------------------------------------- files handed to Gradio

OUTPUTS_KEPT_S = 3600  # how long a file handed to Gradio stays (Gradio copies it into its own cache at once)


@functools.cache
def _outputs_root() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="studio-outputs-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def output_folder(kind: str) -> Path:
    """A fresh folder for the files of one result (an image, a clip, a mesh's formats...), inside one folder of
    this process's that is removed at exit; results older than `OUTPUTS_KEPT_S` are deleted as new ones come. So
    the system's temp folder does not fill up with a file per call (Gradio's own copies go with `delete_cache`)."""
    root = _outputs_root()
    cutoff = time.time() - OUTPUTS_KEPT_S
    for old in root.iterdir():
        try:
            if old.stat().st_mtime < cutoff:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:  # another thread removed it first
            pass
    return Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=root))
