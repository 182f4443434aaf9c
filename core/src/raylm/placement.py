"""Whether a model's replica can be placed on any node of a cluster, before Ray is asked to.

Ray Serve waits forever for a replica that no node can hold (a replica asking for 2 GPUs where
Ray sees none); raylm refuses it at once instead, naming what was asked and what there is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from raylm.engine import ReplicaResources

Resources = Mapping[str, float]


def node_need(resources: ReplicaResources) -> dict[str, float]:
    """What one node must have free for one replica: its actor's CPUs and GPUs, or with placement-group
    bundles, all of them together (STRICT_PACK) or the largest (other strategies may spread them)."""
    if not resources.bundles:
        return {"CPU": resources.num_cpus, "GPU": resources.num_gpus}
    need: dict[str, float] = {}
    for bundle in resources.bundles:
        for key, amount in bundle.items():
            if resources.strategy == "STRICT_PACK":
                need[key] = need.get(key, 0.0) + amount
            else:
                need[key] = max(need.get(key, 0.0), amount)
    return need


def fits(need: Resources, node: Resources) -> bool:
    return all(node.get(key, 0.0) >= amount for key, amount in need.items() if amount > 0)


def describe(amounts: Resources, zeros: bool = False) -> str:
    """`{"CPU": 1, "GPU": 2}` -> "1 CPU and 2 GPUs" (amounts of 0 left out unless `zeros`)."""
    parts = [f"{amount:g} {key}{'' if amount == 1 else 's'}" for key, amount in amounts.items() if zeros or amount > 0]
    return " and ".join(parts) or "nothing"


def unplaceable(models: Mapping[str, ReplicaResources], nodes: Sequence[Resources]) -> str | None:
    """Why some model's replica fits no node (one line), or None when every model's does."""
    for name, resources in models.items():
        need = node_need(resources)
        if not any(fits(need, node) for node in nodes):
            have = "; ".join(describe({key: node.get(key, 0.0) for key in need}, zeros=True) for node in nodes)
            return (
                f"model {name!r} needs {describe(need)} on one node per replica, but the cluster's "
                f"{len(nodes)} node(s) have {have or 'nothing'}: add such a node, or ask for less"
            )
    return None
