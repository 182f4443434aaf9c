"""Waiting until something holds, and saying how it goes: the one way raylm waits.

    address = wait_until(read_address, timeout_s=60, poll_s=0.5,
                         on_timeout=lambda: ClusterError("the head published no address"))

A condition returns a true value when it holds (`wait_until` returns that value), or raises to
end the wait early (a process that exited will never answer).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T], *, timeout_s: float, poll_s: float, on_timeout: Callable[[], BaseException]
) -> T:
    """Call `condition` every `poll_s` seconds until it returns a true value; raise `on_timeout()` after
    `timeout_s` seconds."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise on_timeout()
        time.sleep(poll_s)
    return value


async def wait_until_async(
    condition: Callable[[], Awaitable[T]], *, timeout_s: float, poll_s: float, on_timeout: Callable[[], BaseException]
) -> T:
    """`wait_until` for an event loop: the condition is awaited, and so is the pause between tries."""
    deadline = time.monotonic() + timeout_s
    while not (value := await condition()):
        if time.monotonic() > deadline:
            raise on_timeout()
        await asyncio.sleep(poll_s)
    return value


async def count_down(count: Callable[[], Awaitable[int]], timeout_s: float, poll_s: float = 0.2) -> int:
    """Await `count()` every `poll_s` seconds until it is 0 or `timeout_s` passed; what it last said (the
    one way raylm waits for requests to finish: a drain)."""
    deadline = time.monotonic() + timeout_s
    while (left := await count()) and time.monotonic() < deadline:
        await asyncio.sleep(poll_s)
    return left


class StateChanges:
    """Says each thing's state when it changes, with the seconds since the wait began:
    `router: running (1 running) [2s]`."""

    def __init__(self, progress: Callable[[str], None]):
        self.progress = progress
        self.started = time.monotonic()
        self.shown: dict[str, str] = {}

    def show(self, name: str, state: str) -> None:
        if self.shown.get(name) != state:
            self.shown[name] = state
            self.progress(f"{name}: {state} [{time.monotonic() - self.started:.0f}s]")
