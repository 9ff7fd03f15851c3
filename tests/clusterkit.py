"""Several Ray nodes on this machine: `ray.cluster_utils.Cluster` with a head node and worker nodes,
each with its own raylet, object store and worker processes, so a node can be removed (all of them
killed together) and added mid-run.

A process joins one Ray cluster and the tests' shared one is another, so a test runs its
multi-node script in a process of its own (`run_script`) with its own RAY_TMPDIR: Ray's default
one holds the address `ray.init()` connects to, which must stay the shared cluster's (or none).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(worker_nodes: int, worker_cpus: int, resources: dict | None = None):
    """(cluster, worker nodes): a head node with one CPU (the driver and what it starts) and
    `worker_nodes` nodes of `worker_cpus` CPUs and `resources` each; a killed node is declared dead
    after about 3 s instead of Ray's default 15-30 s."""
    from ray.cluster_utils import Cluster

    # Right after a node is lost, Ray Train's elastic policy may still count it and try the old
    # size once, until the group's placement group times out (60 s by default; it times the
    # placement group's wait only, which here is at once whenever the resources are there); the
    # nodes' processes read this at start-up (a cluster's: from its `ray start` environment)
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "6"
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": True,  # Ray Train frees a stopped group's resources through it
            "dashboard_host": "127.0.0.1",
            "dashboard_port": _free_port(),
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
        },
    )
    nodes = [cluster.add_node(num_cpus=worker_cpus, resources=resources or {}) for _ in range(worker_nodes)]
    return cluster, nodes


def run_script(script: Path, args: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    """`python script *args` in a process of its own, with a Ray temp dir of its own (short: Ray's
    socket paths live under it), removed after."""
    ray_tmp = tempfile.mkdtemp(prefix="jrmn", dir="/tmp")
    try:
        return subprocess.run(
            [sys.executable, str(script), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "RAY_TMPDIR": ray_tmp},
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
