"""One producer, many pages: the live snapshot built once per tick and handed to every open stream.

The producer task exists only while a stream is open, and the step feed is subscribed only as long: with no
page open the dashboard costs nothing but its routes. Each stream has a queue of at most QUEUE_SIZE snapshots;
a page that reads slower than the ticks loses the oldest (it only ever needs the newest). A stream's ASGI call
owns its subscription in a try/finally, so however the client leaves (closed tab, reset, server shutdown)
the queue and its watcher task go with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from pipeserve.executor.step_feed import StepFeed

logger = logging.getLogger(__name__)

TICK_S = 0.3  # a snapshot about three times a second
QUEUE_SIZE = 2


class SnapshotHub:
    """Subscribers (one queue per open stream) and the producer task that fills them."""

    def __init__(self, build: Callable[[], dict[str, Any]], feed: StepFeed | None, tick_s: float = TICK_S):
        self._build, self._feed, self.tick_s = build, feed, tick_s
        self.subscribers: set[asyncio.Queue] = set()
        self._task: asyncio.Task | None = None

    def subscribe(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(QUEUE_SIZE)
        self.subscribers.add(queue)
        if self._task is None:
            if self._feed is not None:
                self._feed.subscribe()
            self._task = asyncio.get_running_loop().create_task(self._produce(), name="pipeserve-dashboard")
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self.subscribers.discard(queue)
        if not self.subscribers and self._task is not None:
            self._task.cancel()
            self._task = None
            if self._feed is not None:
                self._feed.unsubscribe()

    async def _produce(self) -> None:
        while True:
            try:
                data = json.dumps(self._build(), separators=(",", ":"))
            except Exception:  # noqa: BLE001 - a page must never take the server down; say what broke
                logger.exception("the dashboard snapshot failed")
                data = json.dumps({"error": "the snapshot failed: see the server's log"})
            message = f"data: {data}\n\n".encode()
            for queue in list(self.subscribers):
                if queue.full():
                    queue.get_nowait()
                queue.put_nowait(message)
            await asyncio.sleep(self.tick_s)


class EventStream(Response):
    """The ASGI response of one `/dashboard/stream`: server-sent events until the client goes away."""

    def __init__(self, hub: SnapshotHub):
        super().__init__()
        self.hub = hub

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        queue = self.hub.subscribe()
        watcher = asyncio.get_running_loop().create_task(self._wait_disconnect(receive, queue))
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-store"),
                                    (b"x-accel-buffering", b"no")]})
            await send({"type": "http.response.body", "body": b"retry: 1000\n\n", "more_body": True})
            while True:
                message = await queue.get()
                if message is None:
                    break  # the client went away
                await send({"type": "http.response.body", "body": message, "more_body": True})
        except OSError:
            pass  # the connection broke while sending
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            self.hub.unsubscribe(queue)
        with contextlib.suppress(OSError, RuntimeError):  # ends the response if the client is still there
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _wait_disconnect(self, receive: Receive, queue: asyncio.Queue) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.hub.unsubscribe(queue)  # first: the producer no longer touches the queue, so the None stays
        if queue.full():
            queue.get_nowait()
        queue.put_nowait(None)
