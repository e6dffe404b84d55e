"""Server-Sent Events from a service's event stream: one relay for `/generate/text` and `/v1/chat/completions`.

The service is a blocking iterator (the model runs in a worker thread); the relay steps it in the thread pool,
writes each event as SSE frames, and always closes it in the end, also when the client disconnects, so the model
stops within a step and the request's log row is written. The first event is awaited before the response starts
(`first_event`), so bad input or a failed load is still a proper HTTP error.
"""

from __future__ import annotations

import json
from typing import AsyncIterator, Callable, Iterable, Iterator, TypeVar

import anyio
from starlette.concurrency import run_in_threadpool

from studio.runtime import Call

T = TypeVar("T")
DONE = "data: [DONE]\n\n"


def frame(data: dict) -> str:
    """One SSE frame holding `data` as JSON."""
    return f"data: {json.dumps(data)}\n\n"


async def first_event(events: Iterator[T]) -> T:
    """The stream's first event: validation and the model's load happen before it, so their errors propagate."""
    return await run_in_threadpool(next, events)


async def relay(events: Iterator[T], first: T, frames: Callable[[T], Iterable[str]], is_last: Callable[[T], bool],
                failure: Callable[[Exception], dict], call: Call) -> AsyncIterator[str]:
    """Frames for `first` and every later event up to the last one, then `[DONE]`.

    A failure after the headers went out can no longer change the status: it is sent as one frame of
    `failure(exc)`, and the stream ends. A client that goes away cancels the relay: its call is marked
    disconnected, so the request log says "cancelled"."""
    event = first
    try:
        while True:
            for text in frames(event):
                yield text
            if is_last(event):
                break
            event = await run_in_threadpool(next, events)
        yield DONE
    except Exception as exc:
        yield frame(failure(exc))
    except (anyio.get_cancelled_exc_class(), GeneratorExit):
        call.disconnected = True
        raise
    finally:  # also on disconnect: closing the stream stops the model and writes the request's log row
        with anyio.CancelScope(shield=True):
            await run_in_threadpool(events.close)
