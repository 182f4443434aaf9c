"""An example third-party raylm backend: use the Ray cluster named by RAY_ADDRESS."""

import os

import raylm
from raylm.toolkit import ClusterError, address_answers


class EnvBackend(raylm.Backend):
    """Connects to the cluster at $RAY_ADDRESS (HOST:PORT); never starts or stops one."""

    def status(self):
        address = os.environ.get("RAY_ADDRESS", "")
        if not address_answers(address):
            return None
        return raylm.ClusterStatus("env", self.cluster_name, address, nodes_alive=1, nodes_expected=1)

    def up(self, progress):
        status = self.status()
        if status is None:
            raise ClusterError("no Ray cluster answers at $RAY_ADDRESS: set it to a running cluster's HOST:PORT")
        progress(f"using the Ray cluster at {status.address}")
        return status

    def down(self, progress):
        progress("leaving the cluster running: the env backend never starts one")


@raylm.hookimpl
def raylm_backends():
    yield raylm.BackendSpec(name="env", description="the Ray cluster at $RAY_ADDRESS", backend_class=EnvBackend)
