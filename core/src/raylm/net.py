"""Ports and probes: picking ports to listen on, and asking whether something answers."""

from __future__ import annotations

import random
import socket
import urllib.error
import urllib.request

from raylm.errors import ClusterError


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, from the kernel's ephemeral range (bind it soon)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


# Engine servers' ports: above Ray's worker ports (10002-19999) and raylm-local's head (20000-24999),
# below the kernel's ephemeral range, picked at random. Two replicas that start at once on one node
# pick independently; asking the kernel (bind to port 0) gave two engines the same just-released
# port, and since engines listen with SO_REUSEPORT (vLLM does), both bound it and the kernel split
# the connections between them.
ENGINE_SERVER_PORTS = range(25000, 30000)
# Where engines publish their KV-cache events (the precise routing policy follows them): the next range,
# still below the ephemeral one.
KV_EVENTS_PORTS = range(30000, 32700)


def other_listeners(host: str, port: int, ours: set[int]) -> set[int]:
    """Processes not among `ours` (pids) that listen on TCP `host:port` too (or on `port` of every address)."""
    import psutil

    wildcard = {"0.0.0.0", "::"}
    return {
        c.pid
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
        and c.laddr
        and c.laddr.port == port
        and (c.laddr.ip == host or c.laddr.ip in wildcard or host in wildcard)
        and c.pid not in ours
    }


def free_ports_in(ports: range, count: int = 1, host: str = "127.0.0.1") -> list[int]:
    """`count` different ports of `ports` nothing listens on now, tried in random order.

    For ports bound some time after they are picked: a range below the kernel's ephemeral one
    (32768-60999 on Linux) cannot be taken meanwhile by an outgoing connection. Ports for one
    program are picked in one call: picked one by one, two could be the same.
    """
    found: list[int] = []
    for port in random.sample(ports, min(50 + count, len(ports))):
        if port_is_free(host, port):
            found.append(port)
            if len(found) == count:
                return found
    raise ClusterError(f"fewer than {count} free ports between {ports.start} and {ports.stop - 1} on {host}")


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now (connections in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True


def address_answers(address: str, timeout_s: float = 2.0) -> bool:
    """Whether something accepts TCP connections at HOST:PORT (False for a malformed address)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return False
    with socket.socket() as probe:
        probe.settimeout(timeout_s)
        return probe.connect_ex((host, int(port))) == 0


def http_ok(url: str, timeout_s: float) -> bool:
    """Whether a GET of `url` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False
