"""The cai backend's options: declared by its plugin, also taken by `raylm cai deploy`. Imports nothing heavy."""

from raylm import BackendOption

# Where to reach CML: shared by the backend and `raylm cai deploy`.
CONNECTION_OPTIONS = (
    BackendOption("cml_url", "CML workbench URL, e.g. https://ml-xxxx.cloudera.site (or RAYLM_CML_URL)"),
    BackendOption("project", "CML project id or name (or RAYLM_CML_PROJECT; inside CML: this project)"),
    BackendOption("cml_api_key_file", "file of a CML API v2 key (or RAYLM_CML_API_KEY; in CML: CDSW_APIV2_KEY)"),
    BackendOption("runtime_identifier", "ML Runtime image of the applications, as `GET /api/v2/runtimes` lists it"),
)
CLUSTER_OPTIONS = (
    BackendOption(
        "workers", "Ray worker nodes, each a CML application (default: 0, or as many as the cluster has)", type=int
    ),
    BackendOption(
        "min_workers", "autoscale: the fewest worker applications (default 0; needs --max-workers)", type=int
    ),
    BackendOption("max_workers", "autoscale: the most worker applications Ray's autoscaler may create", type=int),
    BackendOption(
        "idle_timeout", "autoscale: seconds a worker may idle before it is deleted (default 300)", type=float
    ),
    BackendOption("head_cpu", "CPUs of the head application", default=2.0, type=float),
    BackendOption("head_memory", "memory of the head application, GB", default=8.0, type=float),
    BackendOption("head_gpu", "NVIDIA GPUs of the head application", default=0, type=int),
    BackendOption("worker_cpu", "CPUs of each worker application", default=4.0, type=float),
    BackendOption("worker_memory", "memory of each worker application, GB", default=16.0, type=float),
    BackendOption("worker_gpu", "NVIDIA GPUs of each worker application", default=0, type=int),
    BackendOption("start_timeout", "seconds to wait for the applications to run", default=900, type=int),
    BackendOption("keep_on_failure", "keep the applications a failed `up` created, to debug them", type=bool),
    BackendOption("bypass_authentication", "let anyone reach the applications' URLs without logging in", type=bool),
)
