"""Hook implementations of raylm-cai. Imports nothing heavy."""

import raylm
from raylm_cai.options import CLUSTER_OPTIONS, CONNECTION_OPTIONS


@raylm.hookimpl
def raylm_backends():
    from raylm_cai.backend import CAIBackend

    yield raylm.BackendSpec(
        name="cai",
        description="Ray head and workers as Cloudera ML applications",
        backend_class=CAIBackend,
        options=CONNECTION_OPTIONS + CLUSTER_OPTIONS,
    )


@raylm.hookimpl
def raylm_default_backend(environ):
    # Inside a CML workload (session, job or application) CML sets the project id.
    return "cai" if environ.get("CDSW_PROJECT_ID") else None


@raylm.hookimpl
def raylm_cli(cli):
    from raylm_cai.commands import cai_group

    cli.add_command(cai_group)
