"""Shared fixtures: one local Ray for the whole session, a moto S3 server on 127.0.0.1, a cohort."""

from __future__ import annotations

import os
import socket

import pytest

# Set before Ray starts so that its worker processes inherit them.
os.environ.setdefault("JEPA_RAY_SALT", "test-salt-not-secret-0123456789abcdef")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray Train's watcher for cloud spot-instance preemption: one more actor process per run (3-4 s of
# this machine's two cores), and nothing here is ever preempted
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Ray Train's controller polls its workers every 2 s by default; each start, checkpoint and end of
# a run waits for a poll. Every 0.5 s: 6-9 s less per short run on this machine (the public-ViT run
# test, 33 s -> 24-28 s).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster shared by every test that needs it."""
    import ray

    if not ray.is_initialized():
        # the dashboard's state API lets Ray Train release a stopped sweep trial's resources
        ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _no_placement_group_outlives_its_test(request):
    """Tests share one Ray: a placement group left by a stopped run would hold its CPUs for every
    later test (a run then refuses to start). Ray Train releases them asynchronously; one still there
    20 s after the test is removed, with a warning naming the test that left it."""
    yield
    import sys
    import time
    import warnings

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    def live() -> list[str]:
        return [k for k, v in ray.util.placement_group_table().items() if v["state"] != "REMOVED"]

    deadline = time.monotonic() + 20
    while live() and time.monotonic() < deadline:
        time.sleep(0.2)
    for pg_id in live():
        warnings.warn(f"{request.node.nodeid} left placement group {pg_id} behind: removed", stacklevel=1)
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
    deadline = time.monotonic() + 10
    while live() and time.monotonic() < deadline:  # removal is asynchronous too
        time.sleep(0.5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server (moto, server mode) on 127.0.0.1; stopped after the session."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh bucket on the moto server; returns (endpoint, bucket name)."""
    import boto3

    name = "jepa-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return s3_endpoint, name


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory):
    """A small synthetic cohort written once per session (tests must not modify it)."""
    from jepa_ray.config import SynthConfig
    from jepa_ray.synth.cohort import write_cohort

    out = tmp_path_factory.mktemp("cohort")
    write_cohort(out, SynthConfig(subjects=40, seed=7, min_size=96, max_size=160))
    return out


@pytest.fixture(scope="session")
def cohort_inputs():
    """A function: cohort directory → the keyword arguments `prepare` takes for it."""
    from jepa_ray.synth.cohort import cohort_inputs

    return cohort_inputs


@pytest.fixture(scope="session")
def small_shards(small_cohort, tmp_path_factory, ray_session):
    """The small cohort prepared once: 64 px images, 8 samples per shard (tests must not modify it)."""
    from jepa_ray.config import load_config
    from jepa_ray.ingest.prepare import prepare
    from jepa_ray.synth.cohort import cohort_inputs

    out = tmp_path_factory.mktemp("shards")
    cfg = load_config(overrides=["prepare.image.size=64", "prepare.shards.max_samples=8"]).prepare
    prepare(str(out), cfg, **cohort_inputs(small_cohort))
    return out


CT_VOLUME = [
    "prepare.volume.enabled=true",
    "prepare.volume.size=[16,40,40]",
    "prepare.volume.spacing=[20,9,9]",
]


@pytest.fixture(scope="session")
def ct_cohort(tmp_path_factory):
    """A small cohort in which 60% of the studies are chest-CT series (14 slices of 40x40)."""
    from jepa_ray.config import SynthConfig
    from jepa_ray.synth.cohort import write_cohort

    root = tmp_path_factory.mktemp("ct") / "cohort"
    cfg = SynthConfig(
        subjects=24, seed=5, ct_fraction=0.6, ct_size=40, ct_slices=14, min_size=96, max_size=128
    )
    return root, write_cohort(root, cfg)


@pytest.fixture(scope="session")
def ct_shards(ct_cohort, tmp_path_factory, ray_session):
    """The CT cohort prepared with volumes (16x40x40, lung and mediastinum windows) and 64 px radiographs."""
    from jepa_ray.config import load_config
    from jepa_ray.ingest.prepare import prepare
    from jepa_ray.synth.cohort import cohort_inputs

    out = tmp_path_factory.mktemp("ct-shards")
    # 24 subjects: a quarter for validation, so that each of 2 workers gets a validation batch
    cfg = load_config(overrides=[*CT_VOLUME, "prepare.image.size=64", "prepare.split.val=0.25"]).prepare
    assert prepare(str(out), cfg, **cohort_inputs(ct_cohort[0])).ok
    return out


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1 (sqlite backend, artifacts served): its URI."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=(root / "server.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "the MLflow server did not start: " + (root / "server.log").read_text()[-2000:]
                )
            time.sleep(0.5)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
