"""What the router records of each answered model request: its Prometheus metrics and its access-log line.

Both are written in batches, not as each answer ends. Recorded between a stream's chunks, with the
engines taking the CPU's caches from the router, a request's metrics and log line cost ~190 us of CPU
(a fake engine, `--api-key-file` with and without `--no-access-log`/`--no-metrics`); recorded
together, they cost what they cost in a warm loop (tens of us, bench/router_costs.py). So an answer is
kept as a tuple and recorded at most `FLUSH_S` later, before every `/metrics` scrape, and when the
router stops: nothing is lost, and a scrape always counts every request answered before it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from raylm.serving.metrics import RouterMetrics

FLUSH_S = 0.1

# One line per model request: its id, route, model, status, time to first byte and in all, bytes, replica.
access_log = logging.getLogger("raylm.access")


class Answers:
    """The answers not yet recorded; `add` one, `flush` records them all."""

    def __init__(self, metrics: RouterMetrics | None, log: bool):
        self.metrics = metrics
        self.log = log
        self.loop: asyncio.AbstractEventLoop | None = None  # the router's, once it runs: flushes are timed on it
        self.pending: list[tuple] = []
        self.timer: asyncio.TimerHandle | None = None

    def add(
        self, request_id: str, route: str, model: str, status: int, first_byte_s: float | None, total_s: float,
        sent: int, replica: str,
    ) -> None:  # fmt: skip
        self.pending.append((request_id, route, model, status, first_byte_s, total_s, sent, replica))
        if self.loop is None:  # not running on a loop: nothing would time a flush
            self.flush()
        elif self.timer is None:
            self.timer = self.loop.call_later(FLUSH_S, self.flush)

    def flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        pending, self.pending = self.pending, []
        for request_id, route, model, status, first_byte_s, total_s, sent, replica in pending:
            if self.metrics is not None:
                self.metrics.answered(model, route, status, first_byte_s, total_s)
            if self.log:
                first_byte_ms = "-" if first_byte_s is None else f"{first_byte_s * 1000:.1f}"
                access_log.info(
                    "%s %s model=%s status=%d first_byte_ms=%s total_ms=%.1f bytes=%d replica=%s",
                    request_id, route, model, status, first_byte_ms, total_s * 1000, sent, replica or "-",
                )  # fmt: skip
