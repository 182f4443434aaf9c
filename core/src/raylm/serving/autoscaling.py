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
from typing import Any

from raylm.model_settings import LOAD_METRIC


def follow_the_router(ctx: Any) -> tuple[int, dict]:
    """Serve's autoscaling policy for a model: the replicas its load needs, by what the router counts.
    (`ctx` is Serve's `AutoscalingContext`; Serve bounds the answer and applies the delays.)"""
    load = sum((ctx.aggregated_metrics or {}).get(LOAD_METRIC, {}).values())
    return math.ceil(load / ctx.config.target_ongoing_requests), {}
