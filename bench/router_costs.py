"""What each production feature of the router costs per request, timed in this process.

    .venv/bin/python bench/router_costs.py [--requests 20000]

bench/endpoint.py loads whole routers side by side, and on 2 shared cores its CPU-per-chunk
figures move by +-20% between runs; this times the code each feature adds to a request, alone,
with the router's own functions: the access-log line (written to a file, as a user's would be),
the Prometheus counters and histograms, the request id, the API key check. For scale, it prints
the router's whole CPU per streamed request that bench/endpoint.py measures (--per-request-us).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from raylm.serving.admission import Admission
from raylm.serving.answers import Answers, access_log
from raylm.serving.keys import KeyFile
from raylm.serving.metrics import RouterMetrics
from raylm.serving.router import request_id
from raylm.serving.routes import RouteTable

HEADERS = [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"), (b"authorization", b"Bearer sk-1")]


def microseconds(function, requests: int) -> float:
    started = time.perf_counter()
    for _ in range(requests):
        function()
    return (time.perf_counter() - started) / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--per-request-us", type=float, help="the router's CPU per streamed request, for the ratio")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    handler = logging.FileHandler(folder / "access.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)
    access_log.propagate = False
    metrics = RouterMetrics(RouteTable(["tiny"]), Admission())
    (folder / "keys").write_text("sk-old\nsk-1\n")
    keys = KeyFile(str(folder / "keys"))

    # Off a loop, `Answers` records each answer as it is added: the cost of one, warm.
    answer = ("0123456789abcdef0123456789abcdef", "/v1/completions", "tiny", 200, 0.0123, 0.1234, 5678, "r-0")
    logged, counted = Answers(None, log=True), Answers(metrics, log=False)
    costs = {
        "access log line": microseconds(lambda: logged.add(*answer), args.requests),
        "metrics (count, 2 histograms)": microseconds(lambda: counted.add(*answer), args.requests),
        "request id (made; always on)": microseconds(lambda: request_id(HEADERS), args.requests),
        "API key check (2 keys)": microseconds(lambda: keys.allows(b"Bearer sk-1"), args.requests),
    }
    total = sum(costs.values())
    print(f"per request, the mean of {args.requests} calls:")
    for name, cost in costs.items():
        print(f"  {name:32}{cost:8.1f} us")
    print(f"  {'all of them':32}{total:8.1f} us")
    if args.per_request_us:
        print(f"  = {total / args.per_request_us:.1%} of the router's {args.per_request_us:g} us per streamed request")


if __name__ == "__main__":
    main()
