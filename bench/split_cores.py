"""Cores of its own for the engine: every engine thread on one set of CPUs, raylm's router, Ray and the
load generator on the others.

On a GPU node the engine's work is on the GPU, and raylm's router and Ray run on cores the engine
does not use. On this machine's 2 cores they take the engine's CPU instead (bench/cpu_shares.py), so
raylm's throughput against the engine alone measures that CPU share. With the cores split the same
way for both layers of a comparison, what is left between them is the hop itself.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator

import psutil
from cpu_shares import group_of

ALL_CPUS = os.sched_getaffinity(0)  # the CPUs the benchmark may use, read before it pins anything


def pin_threads(pid: int, cpus: set[int]) -> None:
    """Every thread of a process; threads and processes it starts later inherit their creator's CPUs."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, FileNotFoundError):
            continue  # a thread that ended meanwhile


def engine_cpus_option(text: str) -> set[int]:
    """`--engine-cpus`: a comma-separated list of CPUs, some but not all of the machine's."""
    try:
        cpus = {int(cpu) for cpu in text.split(",")}
    except ValueError:
        cpus = set()
    if not cpus or not cpus < ALL_CPUS:
        raise argparse.ArgumentTypeError(f"name some but not all of CPUs {sorted(ALL_CPUS)}, e.g. 0")
    return cpus


@contextlib.contextmanager
def cores_split(engine_cpus: set[int] | None) -> Iterator[None]:
    """While inside, the benchmark's engine processes on `engine_cpus`, and its router, Ray, itself and any
    other process it started on the other CPUs; on leaving, the benchmark back on every CPU, so that the next
    server it starts is not confined. `None`: nothing pinned.

    Only the benchmark and what it started (Ray's daemons and workers descend from the `ray start --block`
    that raylm runs): nothing else on the machine is touched."""
    if engine_cpus is None:
        yield
        return
    benchmark = psutil.Process()
    for process in [benchmark, *benchmark.children(recursive=True)]:
        try:
            pin_threads(process.pid, engine_cpus if group_of(process) == "engine" else ALL_CPUS - engine_cpus)
        except (psutil.Error, OSError):
            continue  # a process that ended meanwhile
    try:
        yield
    finally:
        pin_threads(benchmark.pid, ALL_CPUS)
