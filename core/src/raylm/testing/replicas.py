"""What a raylm endpoint says of its replicas: those registered per model (`/v1/models`), and those with
requests in flight now (the router's `/metrics`), for tests and benchmarks that watch it scale."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def replicas_registered(url: str, model: str) -> int:
    return next(card["replicas"] for card in httpx.get(f"{url}/v1/models").json()["data"] if card["id"] == model)


def replicas_serving(url: str, model: str) -> set[str]:
    return {
        sample.labels["replica"]
        for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
        for sample in family.samples
        if sample.name == "raylm_replica_requests_in_flight" and sample.labels["model"] == model and sample.value > 0
    }
