"""The deployments a cai cluster serves, kept on the project filesystem so its head serves them again.

A head application that restarts comes back in a new pod: a new IP, an empty Ray, no Serve
applications. `raylm serve` on the cluster keeps its plan as a deployment file,
`.raylm/cai/NAME/plans/DEPLOYMENT.yaml` (readable by the project's user only: replicas'
environments may hold secrets); `raylm stop` removes it; the head, once its Ray node runs,
runs `raylm serve -f` for each file left (`raylm_cai.node`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from raylm import ServePlan
from raylm.toolkit import DEPLOYMENTS, plan_document, write_atomically


def plans_folder(cluster_folder: Path) -> Path:
    return cluster_folder / "plans"


def keep(cluster_folder: Path, plan: ServePlan) -> Path:
    import yaml

    folder = plans_folder(cluster_folder)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / f"{plan.name}.yaml"
    write_atomically(path, yaml.safe_dump(plan_document(plan), sort_keys=False), mode=0o600)
    return path


def forget(cluster_folder: Path, name: str) -> None:
    (plans_folder(cluster_folder) / f"{name}.yaml").unlink(missing_ok=True)


def forget_all(cluster_folder: Path) -> None:
    for path in kept(cluster_folder):
        path.unlink(missing_ok=True)


def kept(cluster_folder: Path) -> list[Path]:
    folder = plans_folder(cluster_folder)
    return sorted(folder.glob("*.yaml")) if folder.is_dir() else []


def serve_again(cluster_folder: Path, head_address: str) -> list[subprocess.Popen]:
    """Start `raylm serve -f PLAN --detach` for every kept plan, each writing to this process's output
    (the application's log). Each runs on its own: one that fails leaves the others serving.

    Called by a head that just started at `head_address`: what a deployment's record says ran on an earlier
    head ended with it, so the record is dropped (else `raylm serve` would ask for a `raylm stop` first)."""
    started = []
    for path in kept(cluster_folder):
        record = DEPLOYMENTS.load(path.stem)
        if record is not None and record.address != head_address:
            DEPLOYMENTS.delete(path.stem)
        print(f"raylm: serving {path.stem} again, as kept in {path}", flush=True)
        command = [sys.executable, "-m", "raylm", "serve", "-f", str(path), "--detach"]
        started.append(subprocess.Popen(command, stdin=subprocess.DEVNULL))
    return started
