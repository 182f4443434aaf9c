"""Check SGLang engine arguments with SGLang's own ServerArgs parser; run in a child process.

Usage: python -m raylm_sglang.validate MODEL [SGLANG ARGS...]
Prints one JSON line (device, GPUs per replica, SGLang version) and exits 0, or
prints SGLang's message and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str]) -> int:
    import sglang
    from sglang.srt.server_args import ServerArgs

    model, *engine_args = argv
    parser = argparse.ArgumentParser(prog="sglang serve")
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(["--model-path", model, *engine_args])  # argparse prints its error and exits 2
    try:
        server_args = ServerArgs.from_cli_args(args)
    except (ValueError, TypeError, AssertionError) as exc:
        print(f"sglang serve: error: {exc}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {
                "sglang": sglang.__version__,
                "device": server_args.device or "cuda",
                "gpus": server_args.tp_size * getattr(server_args, "pp_size", 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
