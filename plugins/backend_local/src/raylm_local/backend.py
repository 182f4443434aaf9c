"""A Ray head started and owned by raylm on this machine, or an existing cluster."""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import time
from pathlib import Path

from raylm import Backend, ClusterStatus
from raylm.toolkit import (
    ClusterError,
    Progress,
    Records,
    address_answers,
    end_processes,
    free_ports_in,
    marked_processes,
    ray_start_command,
    raylm_home,
    serving_node_environment,
    wait_until,
)

CLUSTERS = Records("clusters/local")
# In the environment of every process of an embedded head (inherited by Ray's workers and what they
# start), so `down` finds them all: its value is the cluster's Ray folder, unique on this machine.
CLUSTER_MARKER = "RAYLM_LOCAL_CLUSTER"
START_TIMEOUT_S = 120
STOP_GRACE_S = 15
# Said, not left to Ray: with RAY_AUTH_MODE unset, `ray start` turns token auth on whenever some earlier
# `ray.init()` left ~/.ray/auth_token, and refuses raylm's driver (unset too). The head listens on
# 127.0.0.1 only; a RAY_AUTH_MODE in the user's environment wins, for the head and the driver alike.
AUTH_ENVIRONMENT = {"RAY_AUTH_MODE": "disabled"}


# Ray binds these ports some time after we pick them: below the ephemeral range, apart from Ray's defaults.
RAY_PORT_RANGE = range(20000, 25000)


def ray_temp_dir(home: Path, cluster: str) -> Path:
    """Ray's folder for a cluster: short (Unix socket paths stop at ~107 bytes) and apart per RAYLM_HOME."""
    home_key = hashlib.sha1(str(home.resolve()).encode()).hexdigest()[:8]
    return Path("/tmp") / f"raylm-{home_key}" / cluster


class LocalBackend(Backend):
    """`up` runs `ray start --head --block` in a process group of its own; `down` stops it and every process
    that carries the cluster's marker."""

    @property
    def head_is_local(self) -> bool:  # type: ignore[override]
        return not self.options.get("address")

    @property
    def may_add_nodes(self) -> bool:  # type: ignore[override]
        # The embedded head is all there is; a cluster given by address may have an autoscaler.
        return bool(self.options.get("address"))

    def up(self, progress: Progress) -> ClusterStatus:
        address = self.options.get("address")
        if address:
            if address.startswith("ray://") or not address_answers(address):
                raise ClusterError(
                    f"no Ray cluster answers at {address}: give the GCS address (HOST:PORT) of a "
                    "running cluster, as `ray status` shows it"
                )
            return self._status(address)
        current = self.status()
        if current is not None:
            progress(f"using the running local Ray cluster {self.cluster_name!r} at {current.address}")
            return current
        return self._start(progress)

    def _start(self, progress: Progress) -> ClusterStatus:
        num_cpus = self.options.get("num_cpus") or max(8, os.cpu_count() or 1)
        gcs_port, dashboard_port, client_server_port, agent_port = free_ports_in(RAY_PORT_RANGE, 4)
        temp_dir = self.ray_temp_dir
        log_path = raylm_home() / "logs" / f"ray-{self.cluster_name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [
            *ray_start_command(),
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(gcs_port),
            f"--num-cpus={num_cpus}",
            "--temp-dir",
            str(temp_dir),
            "--include-dashboard",
            "false",
            # Fixed default ports would collide with any other Ray on this machine.
            f"--dashboard-port={dashboard_port}",
            f"--ray-client-server-port={client_server_port}",
            f"--dashboard-agent-listen-port={agent_port}",
        ]
        if self.options.get("num_gpus") is not None:
            command.append(f"--num-gpus={self.options['num_gpus']}")
        progress(f"starting a local Ray head ({num_cpus} logical CPUs); log: {log_path}")
        with open(log_path, "wb") as log:
            # A process group of its own: Ctrl-C in the user's terminal does not reach Ray, `down` does.
            # The session stays the caller's, the scheduling group of what it starts (raylm.ray_nodes).
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                process_group=0,
                env={
                    **serving_node_environment({**AUTH_ENVIRONMENT, **os.environ}, head=True),
                    CLUSTER_MARKER: str(temp_dir),
                },
            )
        address = f"127.0.0.1:{gcs_port}"
        CLUSTERS.save(
            self.cluster_name,
            {
                "pid": process.pid,
                "address": address,
                "temp_dir": str(temp_dir),
                "log": str(log_path),
                "num_cpus": num_cpus,
            },
        )

        def not_started() -> ClusterError:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            return ClusterError("the local Ray head did not start: " + " | ".join(tail))

        def started() -> bool:
            if process.poll() is not None:
                raise not_started()
            return b"Ray runtime started" in log_path.read_bytes()

        try:
            wait_until(started, timeout_s=START_TIMEOUT_S, poll_s=0.2, on_timeout=not_started)
            # `ray start --block` stops every process if one of them fails just after start.
            time.sleep(1.0)
            self.check_alive()
        except ClusterError:
            self.down(lambda _: None)
            raise
        progress(f"local Ray head running at {address}")
        return self._status(address)

    @property
    def ray_temp_dir(self) -> Path:
        return ray_temp_dir(raylm_home(), self.cluster_name)

    def check_alive(self) -> None:
        """Raise if the head raylm started has exited (e.g. one of Ray's processes failed after start)."""
        record = CLUSTERS.load(self.cluster_name)
        if record is not None and not _is_our_ray_head(record["pid"]):
            tail = Path(record["log"]).read_text(errors="replace").strip().splitlines()[-3:]
            raise ClusterError(
                f"the local Ray head {self.cluster_name!r} has stopped; its log ({record['log']}) "
                "ends: " + " | ".join(tail)
            )

    def _status(self, address: str) -> ClusterStatus:
        return ClusterStatus(backend="local", name=self.cluster_name, address=address, nodes_alive=1, nodes_expected=1)

    def _running_record(self) -> dict | None:
        record = CLUSTERS.load(self.cluster_name)
        if record is None:
            return None
        if not _is_our_ray_head(record["pid"]):
            CLUSTERS.delete(self.cluster_name)  # the head died or the machine restarted: forget it
            return None
        return record

    def status(self) -> ClusterStatus | None:
        address = self.options.get("address")
        if address:
            return self._status(address) if address_answers(address) else None
        record = self._running_record()
        return self._status(record["address"]) if record else None

    def down(self, progress: Progress) -> None:
        if self.options.get("address"):
            progress(f"leaving the Ray cluster at {self.options['address']} running: raylm did not start it")
            return
        record = CLUSTERS.load(self.cluster_name)
        # Every process of the cluster carries its marker: Ray's, its workers' and what they started. They
        # are looked for even without a record: a head that died (and was forgotten) can leave the rest.
        find_members = functools.partial(marked_processes, CLUSTER_MARKER, str(self.ray_temp_dir))
        members = find_members()
        if record is None and not members:
            return
        head = next((p for p in members if record and p.pid == record["pid"] and _is_our_ray_head(p.pid)), None)
        what = "the local Ray head" if head else "what is left of the local cluster"
        progress(f"stopping {what} {self.cluster_name!r} ({len(members)} processes)")
        # `ray start --block` stops every Ray process it started when it gets SIGTERM; what starts while
        # it stops (a raylet starting workers) is found again and killed.
        killed = end_processes(members, STOP_GRACE_S, leader=head, find=find_members)
        if killed:
            progress(f"{len(killed)} processes of the cluster did not stop within {STOP_GRACE_S}s; killed them")
        CLUSTERS.delete(self.cluster_name)


def _is_our_ray_head(pid: int) -> bool:
    """Whether `pid` still is the `ray start` raylm launched (pids get reused after it exits)."""
    import psutil

    try:
        process = psutil.Process(pid)
        # raylm.ray_nodes runs Ray's CLI; heads started by raylm before it ran ray.scripts.scripts directly
        started_by = {"raylm.ray_nodes", "ray.scripts.scripts"} & set(process.cmdline())
        return process.status() != psutil.STATUS_ZOMBIE and bool(started_by)
    except psutil.NoSuchProcess:
        return False
