"""What a model's deployment asks of the serving runtime: its limits (backpressure) and how its replicas
scale. Plain, validated settings: the plan (`raylm.config`, `raylm.engine`) holds them, and the runtime
(`raylm.serving`) reads them; nothing here depends on the runtime.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from raylm.errors import ConfigError

# How long an engine may send nothing while it has a request before the router gives the request up
# (504): a non-streamed answer is sent whole at its end, so this bounds the longest non-streamed
# generation (10 minutes: thousands of tokens on a slow device).
DEFAULT_READ_TIMEOUT_S = 600.0
# The engines batch requests themselves (vLLM: up to --max-num-seqs, 256 or more on a GPU), so the
# defaults leave batching to them and only bound what a burst can pile up.
DEFAULT_MAX_ONGOING_REQUESTS = 256
DEFAULT_MAX_QUEUED_REQUESTS = 1024


@dataclass(frozen=True)
class Limits:
    """One model's limits: requests in flight per replica, and requests waiting for the whole model."""

    max_ongoing_requests: int = DEFAULT_MAX_ONGOING_REQUESTS
    max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS

    def __post_init__(self) -> None:
        if not isinstance(self.max_ongoing_requests, int) or self.max_ongoing_requests < 1:
            raise ConfigError(f"max_ongoing_requests must be a whole number >= 1, got {self.max_ongoing_requests!r}")
        if not isinstance(self.max_queued_requests, int) or self.max_queued_requests < 0:
            raise ConfigError(f"max_queued_requests must be a whole number >= 0, got {self.max_queued_requests!r}")


# What each replica reports of its load, and Serve's policy that reads it (in the runtime, named by path).
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


ROUTING_POLICIES = ("least-in-flight", "approximate", "precise")


@dataclass(frozen=True)
class Routing:
    """How the router picks a model's replica (`raylm.serving.policy` has what each policy does): the
    policy, and for the prefix-aware ones how much the prefix a replica holds counts against its load."""

    policy: str | None = None  # None: the best the model's engine supports (`for_engine`)
    prefix_weight: float = 3.0
    load_weight: float = 2.0

    def __post_init__(self) -> None:
        if self.policy is not None and self.policy not in ROUTING_POLICIES:
            raise ConfigError(f"unknown routing policy {self.policy!r}; choose one of {', '.join(ROUTING_POLICIES)}")
        for name in ("prefix_weight", "load_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
                raise ConfigError(f"routing: {name} must be a number from 0 to 100, got {value!r}")

    @property
    def needs_engine_events(self) -> bool:
        return self.policy == "precise"

    def for_engine(self, publishes_events: bool) -> Routing:
        """These settings with the default policy made the best an engine supports: `precise` where it
        publishes its KV-cache events, else `approximate`."""
        if self.policy is not None:
            return self
        return dataclasses.replace(self, policy="precise" if publishes_events else "approximate")
