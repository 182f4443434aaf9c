"""Replica autoscaling per model, decided by Ray Serve's own autoscaler.

Requests reach the engines through raylm's router, not Serve's handles, so Serve does not see the
load by itself. Each model replica reports what the router counts for it (its requests in flight
plus its share of the model's queue) as a custom autoscaling metric (`record_autoscaling_stats`),
and the deployment's policy, `follow_the_router`, asks for as many replicas as that load needs at
`target_ongoing_requests` each. Serve applies the rest of the configuration around it: the bounds,
the upscale and downscale delays, the smoothing.

With `min_replicas: 0` a model idle past `downscale_delay_s` has no replica at all. A request for
it then waits in the router's queue while the router asks Serve for a replica the way Serve's own
proxy would: a call through a deployment handle, which waits at the handle until a replica runs;
Serve counts it as a queued request and starts one at once (its scale-from-zero path). Past
`scale_from_zero_timeout_s` the request gets 503 with Retry-After.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from raylm.errors import ConfigError

LOAD_METRIC = "raylm_ongoing_requests"
POLICY = "raylm.serving.autoscaling:follow_the_router"
# How often replicas report, and over how long Serve averages: quicker than Serve's defaults (10 s,
# 30 s), since an LLM replica takes minutes to start and a burst should start one soon.
METRICS_INTERVAL_S = 2.0
LOOK_BACK_PERIOD_S = 10.0
# An engine's cold start takes minutes on a GPU node (loading weights, compiling graphs).
DEFAULT_SCALE_FROM_ZERO_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Autoscaling:
    """A model's replica bounds and the load one replica should carry; the delays are Serve's defaults."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 16
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    # With min_replicas 0: how long a request waits for the model's first replica to start.
    scale_from_zero_timeout_s: float = DEFAULT_SCALE_FROM_ZERO_TIMEOUT_S

    def __post_init__(self) -> None:
        if not isinstance(self.min_replicas, int) or self.min_replicas < 0:
            raise ConfigError(f"autoscaling: min_replicas must be a whole number >= 0, got {self.min_replicas!r}")
        if not isinstance(self.max_replicas, int) or self.max_replicas < max(1, self.min_replicas):
            raise ConfigError(
                f"autoscaling: max_replicas must be a whole number >= min_replicas and >= 1, got {self.max_replicas!r}"
            )
        if not isinstance(self.target_ongoing_requests, (int, float)) or self.target_ongoing_requests <= 0:
            raise ConfigError(f"autoscaling: target_ongoing_requests must be > 0, got {self.target_ongoing_requests!r}")
        for name in ("upscale_delay_s", "downscale_delay_s", "scale_from_zero_timeout_s"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) < 0:
                raise ConfigError(f"autoscaling: {name} must be >= 0 seconds, got {getattr(self, name)!r}")

    @property
    def scales_to_zero(self) -> bool:
        return self.min_replicas == 0

    def serve_config(self) -> dict[str, Any]:
        """Serve's `autoscaling_config` for the model's deployment."""
        return {
            "min_replicas": self.min_replicas,
            "initial_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "metrics_interval_s": METRICS_INTERVAL_S,
            "look_back_period_s": LOOK_BACK_PERIOD_S,
            "policy": {"policy_function": POLICY},
        }


def follow_the_router(ctx: Any) -> tuple[int, dict]:
    """Serve's autoscaling policy for a model: the replicas its load needs, by what the router counts.
    (`ctx` is Serve's `AutoscalingContext`; Serve bounds the answer and applies the delays.)"""
    load = sum((ctx.aggregated_metrics or {}).get(LOAD_METRIC, {}).values())
    return math.ceil(load / ctx.config.target_ongoing_requests), {}
