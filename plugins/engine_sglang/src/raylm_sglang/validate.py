"""Check SGLang engine arguments with SGLang's own ServerArgs parser; run in a child process.

Usage: python -m raylm_sglang.validate MODEL [SGLANG ARGS...]
Prints one JSON line (SGLang version, device, GPUs per replica) and exits 0, or SGLang's message
and exits 2, or `raylm: error: ...` and exits 3 for an SGLang outside the version raylm-sglang
declares (see `raylm.engine_check`).
"""

from __future__ import annotations

import argparse
import sys

from raylm.toolkit import check_engine_version, check_server_module, explained_import_failures, report
from raylm_sglang.engine import SGLangEngine


def main(argv: list[str]) -> int:
    version = check_engine_version("raylm-sglang", ("sglang",), "SGLang", "pip install 'raylm-sglang[sglang]' there")
    with explained_import_failures("SGLang"):
        from sglang.srt.server_args import ServerArgs, compute_world_size

    check_server_module(SGLangEngine.server_module, "SGLang", version)
    model, *engine_args = argv
    parser = argparse.ArgumentParser(prog="sglang serve")
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(["--model-path", model, *engine_args])  # argparse prints its error and exits 2
    try:
        server_args = ServerArgs.from_cli_args(args)
    except (ValueError, TypeError, AssertionError) as exc:
        print(f"sglang serve: error: {exc}", file=sys.stderr)
        return 2
    # SGLang's own count of the GPUs a launch needs, made for Ray drivers.
    gpus = compute_world_size(dp_size=server_args.dp_size, tp_size=server_args.tp_size, pp_size=server_args.pp_size)
    report(sglang=version, device=server_args.device or "cuda", gpus=gpus)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
