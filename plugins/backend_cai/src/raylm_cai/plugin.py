"""Hook implementations of raylm-cai. Imports nothing heavy."""

import raylm


@raylm.hookimpl
def raylm_backends():
    from raylm_cai.backend import CAIBackend

    yield raylm.BackendSpec(
        name="cai",
        description="Ray head and workers as Cloudera ML applications",
        backend_class=CAIBackend,
        unavailable_reason="not implemented yet",
    )


@raylm.hookimpl
def raylm_default_backend(environ):
    # Inside a CML workload (session, job or application) CML sets the project id.
    return "cai" if environ.get("CDSW_PROJECT_ID") else None
