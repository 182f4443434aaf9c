"""Run a FakeCML server until Ctrl-C: `python -m raylm_cai.testing --root DIR`."""

from __future__ import annotations

import contextlib
import os
import secrets
import threading

from raylm_cai.testing.fake import DEFAULT_RUNTIME, FakeCML


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Run a FakeCML server until Ctrl-C.")
    parser.add_argument("--root", required=True, help="folder for projects and workload logs")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default=os.environ.get("FAKECML_API_KEY") or secrets.token_urlsafe(24))
    args = parser.parse_args(argv)
    with FakeCML(args.root, port=args.port, api_keys=(args.api_key,)) as fake:
        print(f"FakeCML at {fake.url} (runtime {DEFAULT_RUNTIME})", flush=True)
        print(f"export RAYLM_CML_URL={fake.url} RAYLM_CML_API_KEY={args.api_key}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
