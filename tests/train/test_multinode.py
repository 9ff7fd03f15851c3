"""Several Ray nodes on this machine (`nodeloss.py`, in a process of its own): an elastic ZeRO-2 run
loses a worker's node mid-run, goes on with one worker, and grows back to two when a node joins;
shards and run storage on S3. (nodeloss.py also runs ZeRO-3; here ZeRO-3's change of size is
tested by test_pretrain.py, which compares its weights with a run that never resized.)"""

from __future__ import annotations

import json
import math
from itertools import groupby
from pathlib import Path

from clusterkit import run_script
from test_pretrain import _cursor_after


def test_an_elastic_run_survives_losing_a_node_and_grows_back_when_one_joins(
    small_shards, s3_bucket, tmp_path
):
    import boto3

    stage = 2
    endpoint, bucket = s3_bucket
    s3 = boto3.client("s3", endpoint_url=endpoint)
    for p in sorted(small_shards.rglob("*")):
        if p.is_file():
            s3.upload_file(str(p), bucket, f"shards/{p.relative_to(small_shards)}")
    result = tmp_path / "result.json"
    args = [str(result), f"s3://{bucket}/shards", f"s3://{bucket}/runs/zero{stage}", endpoint, str(stage)]
    done = run_script(Path(__file__).with_name("nodeloss.py"), args)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    r = json.loads(result.read_text())
    events, states = r["events"], r["states"]
    assert events["error"] is None and events["removed_at"] and events["added_at"]

    summary = [(s["step"], s["world_size"], (s["resumed_from"] or {}).get("step")) for s in states]
    # the run ended at exactly train.steps, checkpointed by 2, then 1, then 2 workers
    assert r["metrics"]["step"] == r["steps"] and states[-1]["step"] == r["steps"], summary
    assert [size for size, _ in groupby(s["world_size"] for s in states)] == [2, 1, 2], summary
    # every restart (the node loss, the growth) resumed from a checkpoint at most checkpoint_every
    # steps behind the newest one written before it
    for i, s in enumerate(states[1:], 1):
        resumed = (s["resumed_from"] or {}).get("step", 0)
        if resumed != (states[i - 1]["resumed_from"] or {}).get("step", 0):
            assert resumed >= max(p["step"] for p in states[:i]) - r["checkpoint_every"], summary
    assert events["removed_step"] >= r["checkpoint_every"]
    # the global batch held at every size (1 worker accumulates 2 micro-batches), and the data
    # sequence is exactly where an uninterrupted run's would be
    assert all(s["samples"] == s["step"] * 8 for s in states), summary
    assert states[-1]["cursor"] == _cursor_after(small_shards, r["steps"] * 8)
    # one loss curve: logged steps never repeat in the metrics, and the loss is finite throughout
    rows = [line.split(",") for line in r["metrics_csv"][1:]]
    steps = [int(row[0]) for row in rows]
    assert steps == sorted(set(steps)) and steps[-1] == r["steps"]
    assert all(math.isfinite(float(row[3])) for row in rows)
    print(
        f"ZeRO-{stage} node loss: first checkpoint of the shrunken group {events['first_checkpoint_after_loss_s']:.1f} s after it"
    )
