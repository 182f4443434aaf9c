"""Does an idle raylm deployment slow down vLLM's own server beside it?

    .venv/bin/python bench/beside_ray.py [--repeats 3]

Starts vLLM's own server, measures it alone, then starts the same model
through raylm (Ray head, Serve controller, router, a replica with its own idle
engine) and measures vLLM's own server again while raylm sits idle, then
raylm itself, then vLLM's own server alone once more. If the own server
beside an idle raylm is as slow as raylm, the cost comes from Ray's processes
sharing the CPUs, not from raylm's data path.

vLLM only: SGLang's scheduler keeps a core busy even while idle, so two SGLang
servers on one small machine measure each other (1.6 req/s at c=16 on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import median, run_load  # noqa: E402
from servers import ENGINES, MAX_TOKENS, MODEL_NAME, REPO, REQUESTS, first_token, free_port, start, stop  # noqa: E402

from raylm.testing.models import build_tiny_llama  # noqa: E402


async def measure(port: int, repeats: int) -> dict[str, float]:
    url = f"http://127.0.0.1:{port}"
    await run_load(url, MODEL_NAME, concurrency=4, requests=20, max_tokens=MAX_TOKENS)  # warm-up
    ttfts, rates = [], []
    for _ in range(repeats):
        one = await run_load(url, MODEL_NAME, concurrency=1, requests=REQUESTS[1], max_tokens=MAX_TOKENS)
        many = await run_load(url, MODEL_NAME, concurrency=16, requests=REQUESTS[16], max_tokens=MAX_TOKENS)
        ttfts.append(one.ttft_ms(0.5))
        rates.append(many.requests_per_second)
    return {"c=1 TTFT p50 (ms)": median(ttfts), "c=16 req/s": median(rates)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    setup = ENGINES["vllm"]
    model = build_tiny_llama(REPO / ".cache" / "models" / "tiny-llama")
    logs = Path(tempfile.gettempdir())
    rows: list[tuple[str, dict[str, float]]] = []
    own_port, raylm_port = free_port(), free_port()
    with open(logs / "raylm-beside-own.log", "wb") as own_log, open(logs / "raylm-beside-raylm.log", "wb") as log:
        own = start(setup.own_server(model, own_port), own_log, setup.env)
        try:
            await first_token(own_port)
            rows.append(("own server alone", await measure(own_port, args.repeats)))
            raylm = start(setup.through_raylm("vllm", model, raylm_port), log, setup.env)
            try:
                await first_token(raylm_port)
                rows.append(("own server, idle raylm beside", await measure(own_port, args.repeats)))
                rows.append(("raylm, own server idle beside", await measure(raylm_port, args.repeats)))
            finally:
                stop(raylm, signal.SIGINT)
            rows.append(("own server alone again", await measure(own_port, args.repeats)))
        finally:
            stop(own, signal.SIGTERM)
    print(f"{'':34}{'c=1 TTFT p50 (ms)':>20}{'c=16 req/s':>14}")
    for label, values in rows:
        print(f"{label:34}{values['c=1 TTFT p50 (ms)']:>20.1f}{values['c=16 req/s']:>14.1f}")


if __name__ == "__main__":
    asyncio.run(main())
