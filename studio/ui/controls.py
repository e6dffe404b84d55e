"""Pieces every generation tab shares: the seed box, the per-session Stop flag and how input errors are shown."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import gradio as gr

from studio.cache import CacheError
from studio.registry import UnknownModelError

# What the user can act on: bad input, an unknown model, a model that cannot be loaded.
INPUT_ERRORS = (ValueError, UnknownModelError, CacheError)


@contextmanager
def shown_to_user() -> Iterator[None]:
    """Turn input errors into a visible Gradio error with their message (Gradio hides other exceptions' text)."""
    try:
        yield
    except INPUT_ERRORS as exc:
        raise gr.Error(str(exc)) from None


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
        raise gr.Error(f"seed: {text!r} is not a whole number; leave it empty for a random seed") from None


class StopFlags:
    """One cancel event per browser session; Stop sets the event of the request that session is running."""

    def __init__(self) -> None:
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def start(self, session: str) -> threading.Event:
        with self._lock:
            event = self._events[session] = threading.Event()
            return event

    def stop(self, session: str) -> bool:
        with self._lock:
            event = self._events.get(session)
        if event is not None:
            event.set()
        return event is not None

    @contextmanager
    def running(self, session: str) -> Iterator[threading.Event]:
        """The cancel event of one generation of this session, forgotten when the generation ends."""
        event = self.start(session)
        try:
            yield event
        finally:
            self.finish(session, event)

    def finish(self, session: str, event: threading.Event) -> None:
        with self._lock:
            if self._events.get(session) is event:
                del self._events[session]

