"""A pretraining run on a three-node Ray cluster on this machine that loses a node and gets one back.

Run by tests/train/test_multinode.py in a process of its own (tests/clusterkit.py): `python nodeloss.py RESULT.json SHARDS_URL STORAGE_URL ENDPOINT ZERO_STAGE`.

The cluster (`ray.cluster_utils.Cluster`): a head node with one CPU (the driver, the run's data
feed and skip ledger, Ray Data's tasks) and two worker nodes with two CPUs (a training worker's and
one for Ray Data) and one `trainer` resource each (train.worker_resources: a group that restarts
after losing a node must not take the CPUs its data runs on), every node with its own raylet,
object store and worker processes. Shards and run storage are on S3, so nothing
assumes a shared disk. The run is elastic (train.num_workers=[1, 2], a fixed global batch) under
ZeRO-2 or ZeRO-3: it starts on 2 workers; once a checkpoint is written the node of one worker is removed
(its raylet, object store and worker processes killed together), and the run must go on with 1
worker from the last checkpoint; once that group has checkpointed a new node joins and the run must
grow back to 2 workers. What happened is written to RESULT.json for the test to check.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

# Ray Train's default poll of the workers: at 0.5 s (what conftest.py sets for the suite's short
# runs) the group, shrunk to one worker, never grew back when the node joined (twice in two runs);
# at the default it does
os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "2"
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STEPS = 20
CHECKPOINT_EVERY = 2


def _states(fs, run: str) -> list[dict]:
    """The state.json of every checkpoint of the run so far, oldest first."""
    out = []
    for path in sorted(fs.glob(f"{run}/checkpoint_*/state.json")):
        try:
            out.append(json.loads(fs.cat(path)))
        except FileNotFoundError:  # being written or deleted
            continue
    return out


def main(result_path: str, shards: str, storage: str, endpoint: str, stage: str) -> int:
    import ray
    import s3fs
    from clusterkit import start_cluster
    from loophooks import SlowSteps
    from ray.util.state import list_actors

    from jepa_ray.config import load_config
    from jepa_ray.train.trainer import pretrain

    cluster, workers = start_cluster(worker_nodes=2, worker_cpus=2, resources={"trainer": 1})
    ray.init(address=cluster.address, logging_level="WARNING")
    cfg = load_config(
        overrides=[
            f"train.shards={shards}",
            f"train.storage_path={storage}",
            f"train.storage.endpoint_url={endpoint}",
            "pipeline.image_size=32",
            "pipeline.patch_size=8",
            "pipeline.max_events=12",
            "pipeline.batch_size=4",
            "train.num_workers=[1, 2]",
            "train.global_batch=8",  # 2 workers x 4, or 1 worker x 4 x 2 micro-batches
            "train.cpus_per_worker=1",
            "train.worker_resources={trainer: 1}",
            f"train.zero_stage={stage}",
            f"train.steps={STEPS}",
            "train.warmup_steps=2",
            "train.log_every=1",
            f"train.checkpoint_every={CHECKPOINT_EVERY}",
            "train.keep_checkpoints=100",
            "train.max_failures=3",
            "train.resize_check_s=3",
            "train.val_batches=0",
        ]
    )
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    run = storage.split("://", 1)[1] + "/elastic"
    events: dict = {"removed_at": None, "added_at": None, "error": None}

    def chaos() -> None:
        """Remove a worker's node after the first checkpoint; add a node once the shrunken group
        has checkpointed. (Here, in the main thread: a node's processes are started with signal
        handlers, which only the main thread may install.)"""
        try:
            while not any(s["world_size"] == 2 for s in _states(fs, run)):
                time.sleep(0.5)
            # Ray Train's controller takes a checkpoint as the run's latest when it next polls the
            # workers (every 2 s; 0.5 s under the tests): a loss before that resumes from the one before it
            time.sleep(5)
            alive = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            hosts = {a.node_id for a in alive}
            victim = next(n for n in workers if n.node_id in hosts)
            events["removed_step"] = max(s["step"] for s in _states(fs, run))
            events["removed_at"] = time.time()
            cluster.remove_node(victim, allow_graceful=False)
            while not any(s["world_size"] == 1 for s in _states(fs, run)):
                time.sleep(0.5)
            events["first_checkpoint_after_loss_s"] = time.time() - events["removed_at"]
            events["added_at"] = time.time()
            cluster.add_node(num_cpus=2, resources={"trainer": 1})
        except Exception as e:  # the test reports it
            events["error"] = repr(e)

    outcome: dict = {}

    def train() -> None:
        try:
            outcome["info"] = pretrain(cfg, name="elastic", hooks=SlowSteps(0.3))
        except BaseException as e:
            outcome["error"] = e

    t0 = time.time()
    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    chaos()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    info = outcome["info"]
    rows = fs.cat(f"{run}/metrics/metrics.csv").decode().splitlines()
    result = {
        "metrics": info.metrics,
        "states": _states(fs, run),
        "metrics_csv": rows,
        "events": events,
        "started_at": t0,
        "steps": STEPS,
        "checkpoint_every": CHECKPOINT_EVERY,
    }
    Path(result_path).write_text(json.dumps(result, indent=1, default=str))
    ray.shutdown()
    cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:6]))
