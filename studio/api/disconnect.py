"""A client that goes away ends its generation: the REST routes of every modality watch their connection.

A generation answered in one piece (an image, a clip, a mesh, a WAV, a transcript) runs in a worker thread while
the request's connection stays open; the `watched(client, entry)` dependency hands the route its `Call`, with a
`cancel` event that a watcher on the event loop sets when the client disconnects. The service then ends within a
step (as for the UI's Stop), the model is unpinned, and the request log says "cancelled". Nobody is left to read
an answer, so whatever the route does afterwards (even failing on a partial result) becomes a quiet `ClientGone`.
Streamed chat needs none of this: its relay stops when the client stops reading (studio.api.streaming).

Declare it after the body's parameters: the watcher reads the connection's next ASGI message, which must be the
disconnect, not a piece of the body.
"""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator

from fastapi import Depends, Request
from fastapi.params import Depends as DependsParam
from fastapi.responses import Response

from studio.runtime import Call

GONE_STATUS = 499  # nginx's "client closed request": written to nobody, seen only in the server's access log


class ClientGone(Exception):
    """The client disconnected during its generation; there is no one to answer."""


async def _watch(request: Request, call: Call) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    call.disconnected = True
    call.cancel.set()


def watched(client: str, entry: str) -> DependsParam:
    """`call: Call = watched("rest", "/generate/image")`: the route's Call, cancelled if its client disconnects."""

    async def dependency(request: Request) -> AsyncIterator[Call]:
        call = Call(client, entry, cancel=threading.Event())
        watcher = asyncio.get_running_loop().create_task(_watch(request, call))
        try:
            yield call
        except Exception:
            if call.disconnected:
                raise ClientGone() from None
            raise
        finally:
            watcher.cancel()

    return Depends(dependency, scope="function")


async def client_gone(_request: Request, _exc: ClientGone) -> Response:
    return Response(status_code=GONE_STATUS)
