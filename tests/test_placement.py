"""Whether a replica fits any node: the check that refuses, before Serve waits forever."""

from raylm import ReplicaResources
from raylm.placement import describe, node_need, unplaceable

HEAD = {"CPU": 8.0, "memory": 1e10, "node:__internal_head__": 1.0}
GPU_WORKER = {"CPU": 4.0, "GPU": 2.0}


def test_a_replica_needs_its_actors_resources_or_its_bundles():
    assert node_need(ReplicaResources(num_cpus=1, num_gpus=2)) == {"CPU": 1, "GPU": 2}
    packed = ReplicaResources(bundles=({"CPU": 1, "GPU": 1}, {"GPU": 1}), strategy="STRICT_PACK")
    assert node_need(packed) == {"CPU": 1, "GPU": 2}
    spread = ReplicaResources(bundles=({"CPU": 1, "GPU": 1}, {"GPU": 1}), strategy="PACK")
    assert node_need(spread) == {"CPU": 1, "GPU": 1}


def test_a_replica_that_fits_one_node_is_accepted():
    models = {"small": ReplicaResources(num_cpus=1), "gpu": ReplicaResources(num_cpus=1, num_gpus=2)}
    assert unplaceable(models, [HEAD, GPU_WORKER]) is None


def test_a_replica_that_fits_no_node_is_named_with_what_the_nodes_have():
    problem = unplaceable({"big": ReplicaResources(num_cpus=1, num_gpus=4)}, [HEAD, GPU_WORKER])
    assert problem == (
        "model 'big' needs 1 CPU and 4 GPUs on one node per replica, but the cluster's 2 node(s) have "
        "8 CPUs and 0 GPUs; 4 CPUs and 2 GPUs: add such a node, or ask for less"
    )


def test_resources_read_as_words():
    assert describe({"CPU": 1, "GPU": 0}) == "1 CPU"
    assert describe({"CPU": 0.5, "GPU": 2}, zeros=True) == "0.5 CPUs and 2 GPUs"
