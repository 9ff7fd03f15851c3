"""`prepare` on a three-node Ray cluster on this machine that loses a node while shards are written.

Run by tests/ingest/test_prepare.py in a process of its own (tests/clusterkit.py):
`python prepare_nodeloss.py RESULT.json OUT_URL INPUTS_JSON OVERRIDES_JSON`.

A head node with one CPU (the driver) and two worker nodes with two CPUs each; the output is on S3
(the moto server), so nothing assumes a shared disk for the shards. Every shard write is held for a
moment in the workers (a setup hook wraps the writer) so that writes are in flight when the node of
one of them is removed, its raylet, object store and worker processes killed together. If `prepare`
fails, it is run again, as a user would. What happened (the outcomes, the manifest, the shard objects)
is written to RESULT.json for the test to check.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WRITE_DELAY_S = 1.5


def _slow_writes() -> None:
    """Every shard write in this worker waits WRITE_DELAY_S first (a worker setup hook)."""
    import jepa_ray.ingest.tasks as tasks

    write = tasks.write_shard

    def slow(*args, **kwargs):
        time.sleep(WRITE_DELAY_S)
        return write(*args, **kwargs)

    tasks.write_shard = slow


def main(result_path: str, out: str, inputs_json: str, overrides_json: str) -> int:
    import ray
    import s3fs
    from clusterkit import start_cluster
    from ray.util.state import list_tasks

    from jepa_ray.config import load_config
    from jepa_ray.errors import PrepareError
    from jepa_ray.ingest.prepare import prepare
    from jepa_ray.ingest.write import PARTS_DIR

    cluster, workers = start_cluster(worker_nodes=2, worker_cpus=2)
    ray.init(
        address=cluster.address,
        logging_level="WARNING",
        runtime_env={"worker_process_setup_hook": _slow_writes},
    )
    cfg = load_config(overrides=json.loads(overrides_json)).prepare
    inputs = json.loads(inputs_json)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": cfg.storage.endpoint_url}, skip_instance_cache=True)
    root = out.split("://", 1)[1]
    events: dict = {"removed_at": None, "error": None}

    def chaos() -> None:
        """Remove the node of a running shard write, once one runs on a worker node."""
        try:
            ids = {n.node_id for n in workers}
            while True:
                running = list_tasks(filters=[("state", "=", "RUNNING")], limit=1000)
                hosts = [t.node_id for t in running if t.name.endswith("_write_from_chunks")]
                victim = next((n for n in workers if n.node_id in hosts and n.node_id in ids), None)
                if victim is not None:
                    break
                time.sleep(0.2)
            events["writes_running_there"] = hosts.count(victim.node_id)
            events["shards_done_before"] = len(fs.glob(f"{root}/{PARTS_DIR}/*.json"))
            events["removed_at"] = time.time()
            cluster.remove_node(victim, allow_graceful=False)
        except Exception as e:  # the test reports it
            events["error"] = repr(e)

    thread = threading.Thread(target=chaos, daemon=True)
    thread.start()
    outcomes = []
    for _attempt in range(2):
        t0 = time.time()
        try:
            r = prepare(out, cfg, **inputs)
            outcomes.append({"ok": r.ok, "written": r.written, "problems": r.problems, "s": time.time() - t0})
            break
        except PrepareError as e:  # as a user would: run it again
            outcomes.append({"error": str(e), "s": time.time() - t0})
    thread.join(timeout=60)
    fs.invalidate_cache()
    manifest = json.loads(fs.cat(f"{root}/manifest.json"))
    objects = sorted(p.rsplit("/", 1)[1] for p in fs.find(root))
    Path(result_path).write_text(
        json.dumps(
            {"outcomes": outcomes, "events": events, "manifest": manifest, "objects": objects}, indent=1
        )
    )
    ray.shutdown()
    cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
