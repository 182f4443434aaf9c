"""Check vLLM engine arguments with vLLM's own parser; run in a child process by the engine.

Usage: python -m raylm_vllm.validate MODEL [VLLM ARGS...]
Prints one JSON line (device, GPUs per replica, vLLM version) and exits 0, or
prints vLLM's message and exits 2.
"""

from __future__ import annotations

import json
import sys


def _serve_parser():
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    try:  # vLLM >= 0.31
        from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    except ImportError:  # vLLM 0.30
        from vllm.entrypoints.openai.cli_args import make_arg_parser, validate_parsed_serve_args
    return make_arg_parser(FlexibleArgumentParser(prog="vllm serve")), validate_parsed_serve_args


def main(argv: list[str]) -> int:
    import vllm

    parser, validate_parsed_serve_args = _serve_parser()
    model, *engine_args = argv
    args = parser.parse_args(["--model", model, *engine_args])  # argparse prints its error and exits 2
    try:
        validate_parsed_serve_args(args)
    except (ValueError, TypeError) as exc:
        print(f"vllm serve: error: {exc}", file=sys.stderr)
        return 2
    from vllm.platforms import current_platform

    print(
        json.dumps(
            {
                "vllm": vllm.__version__,
                "device": current_platform.device_type,
                "gpus": args.tensor_parallel_size * args.pipeline_parallel_size,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
