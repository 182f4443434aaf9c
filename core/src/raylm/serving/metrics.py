"""The router's Prometheus metrics, and the engines' own, behind one scrape target (`GET /metrics`).

Counters and histograms are updated once per request, never per streamed chunk; what the route
table already knows (requests in flight, replicas) is read at scrape time. The engines' metrics
(vLLM's `vllm:num_requests_running`, `vllm:time_to_first_token_seconds`, ...; SGLang's) are
fetched from every replica when scraped and passed on with `model` and `replica` labels added.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from raylm.serving.admission import Admission
from raylm.serving.policy import Choice
from raylm.serving.routes import RouteTable, Upstream

logger = logging.getLogger("raylm.router")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds; a first token after 2.5 ms or 2 min both land in a bucket of their own.
LATENCY_BUCKETS = (0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ENGINE_SCRAPE_TIMEOUT_S = 5.0


class RouterMetrics:
    """What the router counts, in a registry of its own."""

    def __init__(self, table: RouteTable, admission: Admission):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "raylm_requests", "Requests answered, by model, route and HTTP status", ["model", "route", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.first_byte = Histogram(
            "raylm_time_to_first_byte_seconds", "Time from a request's arrival to the first byte of its answer",
            ["model", "route"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.duration = Histogram(
            "raylm_request_duration_seconds", "Time from a request's arrival to the end of its answer",
            ["model", "route"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.connect_failures = Counter(
            "raylm_upstream_connect_failures", "Engine servers that could not be reached", ["model"],
            registry=self.registry,
        )  # fmt: skip
        self.resends = Counter(
            "raylm_upstream_resends", "Requests resent because an engine closed an idle connection as they crossed it",
            ["model"], registry=self.registry,
        )  # fmt: skip
        self.unauthorized = Counter(
            "raylm_unauthorized_requests", "Requests refused for a missing or wrong API key (401)",
            registry=self.registry,
        )  # fmt: skip
        self.rejected = Counter(
            "raylm_rejected_requests", "Requests refused because the model was at capacity (429)", ["model"],
            registry=self.registry,
        )  # fmt: skip
        self.decisions = Counter(
            "raylm_routing_decisions", "Replicas chosen, by model, routing policy and reason (prefix, spilled, load)",
            ["model", "policy", "reason"], registry=self.registry,
        )  # fmt: skip
        self.prompt_blocks = Counter(
            "raylm_routing_prompt_blocks", "Blocks of the prompts routed to each replica (prefix-aware policies)",
            ["model", "replica"], registry=self.registry,
        )  # fmt: skip
        self.held_blocks = Counter(
            "raylm_routing_held_blocks",
            "Of those, the blocks of the prompt's prefix the replica held when chosen, as the router believed",
            ["model", "replica"], registry=self.registry,
        )  # fmt: skip
        self.registry.register(_InFlight(table, admission))

    def routed(self, model: str, policy: str, choice: Choice) -> None:
        self.decisions.labels(model, policy, choice.reason).inc()
        if choice.blocks:
            replica = choice.upstream.replica_id
            self.prompt_blocks.labels(model, replica).inc(choice.blocks)
            self.held_blocks.labels(model, replica).inc(choice.held)

    def answered(self, model: str, route: str, status: int, first_byte_s: float | None, total_s: float) -> None:
        self.requests.labels(model, route, str(status)).inc()
        if status < 400:
            if first_byte_s is not None:
                self.first_byte.labels(model, route).observe(first_byte_s)
            self.duration.labels(model, route).observe(total_s)

    def render(self, engines: Iterable[Metric] = ()) -> bytes:
        engine_registry = CollectorRegistry()
        engine_registry.register(_Fixed(list(engines)))
        return generate_latest(self.registry) + generate_latest(engine_registry)


class _InFlight:
    """Requests in flight per model and per replica, replicas routed to and requests waiting, read from the
    route table and the queues at scrape time."""

    def __init__(self, table: RouteTable, admission: Admission):
        self.table, self.admission = table, admission

    def collect(self) -> Iterator[Metric]:
        per_model = GaugeMetricFamily("raylm_requests_in_flight", "Requests in flight, by model", labels=["model"])
        per_replica = GaugeMetricFamily(
            "raylm_replica_requests_in_flight", "Requests in flight, by replica", labels=["model", "replica"]
        )
        replicas = GaugeMetricFamily("raylm_replicas", "Replicas routed to, by model", labels=["model"])
        queued = GaugeMetricFamily(
            "raylm_queued_requests", "Requests waiting for a replica with room, by model", labels=["model"]
        )
        for model in self.table.model_names():
            upstreams = self.table.upstreams.get(model) or []  # retiring ones too: their requests still run
            per_model.add_metric([model], sum(u.in_flight for u in upstreams))
            replicas.add_metric([model], len(self.table.replicas(model)))
            queued.add_metric([model], self.admission.depth(model))
            for upstream in upstreams:
                per_replica.add_metric([model, upstream.replica_id], upstream.in_flight)
        yield from (per_model, per_replica, replicas, queued)


class _Fixed:
    def __init__(self, metrics: list[Metric]):
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self.metrics)


async def engine_metrics(upstreams: Iterable[Upstream]) -> list[Metric]:
    """Every replica's own metrics, each sample labelled with its model and replica; a replica that does
    not answer in time is left out (and logged)."""
    upstreams = list(upstreams)
    texts = await asyncio.gather(*(_fetch(u) for u in upstreams), return_exceptions=True)
    merged: dict[str, Metric] = {}
    for upstream, text in zip(upstreams, texts):
        if isinstance(text, BaseException):
            logger.info("metrics of replica %s unreadable: %s", upstream.replica_id, text)
            continue
        for family in text_string_to_metric_families(text):
            into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type, family.unit))
            for sample in family.samples:
                labels = {**sample.labels, "model": upstream.model, "replica": upstream.replica_id}
                into.add_sample(sample.name, labels, sample.value, sample.timestamp, sample.exemplar)
    return list(merged.values())


async def _fetch(upstream: Upstream) -> str:
    async def get() -> str:
        reader, writer = await asyncio.open_connection(upstream.host, upstream.port)
        try:
            key = f"authorization: Bearer {upstream.api_key}\r\n" if upstream.api_key else ""
            writer.write(f"GET /metrics HTTP/1.0\r\nhost: {upstream.host}\r\n{key}\r\n".encode())
            answer = await reader.read()
        finally:
            writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
            raise OSError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
        return body.decode()

    return await asyncio.wait_for(get(), ENGINE_SCRAPE_TIMEOUT_S)
