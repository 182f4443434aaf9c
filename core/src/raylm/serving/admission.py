"""Backpressure: how many requests a model's replicas take at once, and how many may wait for them.

A replica takes at most `max_ongoing_requests` at a time; when every replica of a model is that
busy, a request waits in the model's queue, in order of arrival, until a replica finishes one;
past `max_queued_requests` waiting, it is refused at once (429 with Retry-After) instead of
piling up in front of engines that cannot keep up. Touched only on the router's loop.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from raylm.model_settings import Limits

if TYPE_CHECKING:
    from raylm.serving.routes import Upstream


class Admission:
    """The queue of each model, and which of its replicas have room."""

    def __init__(self, limits: Mapping[str, Limits] | None = None):
        self.limits = dict(limits or {})
        self.queues: dict[str, deque[Callable[[], None]]] = {}

    def limits_of(self, model: str) -> Limits:
        return self.limits.get(model) or Limits()

    def with_room(self, model: str, replicas: list[Upstream]) -> list[Upstream]:
        """The replicas that may take one more request now."""
        limit = self.limits_of(model).max_ongoing_requests
        return [upstream for upstream in replicas if upstream.in_flight < limit]

    def wait(self, model: str, resume: Callable[[], None], first: bool = False) -> bool:
        """Queue `resume` to be called when a replica of `model` has room; False when the queue is full.
        `first`: a request that was woken but lost its place again goes back to the front."""
        queue = self.queues.setdefault(model, deque())
        if first:
            queue.appendleft(resume)
            return True
        if len(queue) >= self.limits_of(model).max_queued_requests:
            return False
        queue.append(resume)
        return True

    def leave(self, model: str, resume: Callable[[], None]) -> None:
        """A waiting request's client hung up: it leaves the queue."""
        queue = self.queues.get(model)
        if queue and resume in queue:
            queue.remove(resume)

    def released(self, model: str, count: int = 1) -> None:
        """A replica of `model` finished a request (or `count` places opened): the first waiting ones go,
        in order (soon, not within the release: a woken request whose client left passes its turn on,
        and so on, without recursion)."""
        queue = self.queues.get(model)
        if not queue:  # the common case, on every answered request: nothing to wake
            return
        loop = asyncio.get_running_loop()  # (a getpid system call each time: not on the common path)
        for _ in range(min(count, len(queue))):
            loop.call_soon(queue.popleft())

    def replicas_changed(self, model: str, replicas: list[Upstream]) -> None:
        """Replicas came or went: as many waiting requests go as there are places now (all of them when no
        replica is left, to be told so)."""
        limit = self.limits_of(model).max_ongoing_requests
        places = sum(max(0, limit - upstream.in_flight) for upstream in replicas)
        self.released(model, places if replicas else self.depth(model))

    def depth(self, model: str) -> int:
        return len(self.queues.get(model) or ())
