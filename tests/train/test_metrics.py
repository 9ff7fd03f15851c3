"""The metrics log of a run on S3: rows uploaded, resumed without repeated steps, nothing left behind."""

from __future__ import annotations

from jepa_ray.config import StorageConfig
from jepa_ray.train.metrics import MetricsLog


def test_a_remote_runs_metrics_are_uploaded_resumed_and_leave_no_local_copy(s3_bucket):
    import s3fs

    endpoint, bucket = s3_bucket
    storage = StorageConfig(endpoint_url=endpoint)
    run = f"s3://{bucket}/runs/a"
    log = MetricsLog(run, storage, resume_step=0)
    staging = log.dir
    for step in (1, 2, 3):
        log.log(step, {"loss": 1.0 / step})
    log.plot()
    log.close()
    assert not staging.exists()  # the staging directory went with the run, not left in /tmp
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    assert fs.cat(f"{bucket}/runs/a/metrics/metrics.csv").decode().splitlines()[1:] == [
        "1,1.0",
        "2,0.5",
        "3,0.3333333333333333",
    ]
    assert fs.exists(f"{bucket}/runs/a/metrics/loss.png")

    resumed = MetricsLog(run, storage, resume_step=2)  # restarted from the step-2 checkpoint
    resumed.log(3, {"loss": 0.25})
    resumed.close()
    rows = fs.cat(f"{bucket}/runs/a/metrics/metrics.csv").decode().splitlines()[1:]
    assert rows == ["1,1.0", "2,0.5", "3,0.25"]
