"""Cores of its own for the engine: every engine thread on one set of CPUs, raylm's router, Ray and the
load generator on the others.

On a GPU node the engine's work is on the GPU, and raylm's router and Ray run on cores the engine
does not use. On this machine's 2 cores they take the engine's CPU instead (bench/cpu_shares.py), so
raylm's throughput against the engine alone measures that CPU share. With the cores split the same
way for both layers of a comparison, what is left between them is the hop itself.
"""

from __future__ import annotations

import argparse
import os

import psutil
from cpu_shares import group_of


def pin_threads(pid: int, cpus: set[int]) -> None:
    """Every thread of a process; threads and processes it starts later inherit their creator's CPUs."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, FileNotFoundError):
            continue  # a thread that ended meanwhile


def engine_cpus_option(text: str) -> set[int]:
    """`--engine-cpus`: a comma-separated list of CPUs, some but not all of the machine's."""
    all_cpus = set(range(os.cpu_count()))
    try:
        cpus = {int(cpu) for cpu in text.split(",")}
    except ValueError:
        cpus = set()
    if not cpus or not cpus < all_cpus:
        raise argparse.ArgumentTypeError(f"name some but not all of CPUs 0-{len(all_cpus) - 1}, e.g. 0")
    return cpus


def split_cores(engine_cpus: set[int]) -> None:
    """Pin the benchmark's engine processes to `engine_cpus`, and its router, Ray, itself and any other process
    it started to the other CPUs.

    Only the benchmark and what it started (Ray's daemons and workers descend from the `ray start --block`
    that raylm runs): nothing else on the machine is touched."""
    others = set(range(os.cpu_count())) - engine_cpus
    benchmark = psutil.Process()
    for process in [benchmark, *benchmark.children(recursive=True)]:
        try:
            pin_threads(process.pid, engine_cpus if group_of(process) == "engine" else others)
        except (psutil.Error, OSError):
            continue  # a process that ended meanwhile


def unpin_self() -> None:
    """The benchmark back on every CPU, so that the next server it starts is not confined."""
    pin_threads(os.getpid(), set(range(os.cpu_count())))
