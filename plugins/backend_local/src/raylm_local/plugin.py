"""Hook implementations of raylm-local. Imports nothing heavy."""

import raylm


@raylm.hookimpl
def raylm_backends():
    from raylm_local.backend import LocalBackend

    yield raylm.BackendSpec(
        name="local",
        description="Ray head on this machine, or an existing Ray cluster with --address",
        backend_class=LocalBackend,
        options=(
            raylm.BackendOption("address", "address of an existing Ray cluster to use instead of starting one"),
            raylm.BackendOption(
                "num_cpus", "logical CPUs of the embedded Ray head (default: max(8, CPU count))", type=int
            ),
            raylm.BackendOption("num_gpus", "GPUs of the embedded Ray head (default: detected)", type=int),
        ),
    )


@raylm.hookimpl(trylast=True)
def raylm_default_backend(environ):
    return "local"
