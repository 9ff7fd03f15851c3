"""`train.tracker=mlflow` against a real MLflow tracking server (sqlite backend, artifacts served),
started on 127.0.0.1 for the session (conftest's `mlflow_server`): the run, its parameters, metrics and artifacts are read back
through MLflow's own client; export adds the encoder. A resumed run logs into the same tracked run:
MLflow in test_pretrain.py's S3 resume test, W&B in test_sweep.py's resumed sweep."""

from __future__ import annotations

import csv
from pathlib import Path

from typer.testing import CliRunner

from jepa_ray.cli import app
from jepa_ray.config import load_config
from jepa_ray.train.trainer import pretrain

SMALL = [
    "pipeline.image_size=32",
    "pipeline.patch_size=8",
    "pipeline.max_events=12",
    "pipeline.batch_size=4",
    "train.num_workers=1",  # what is tested is the tracker: one worker starts in less time than two
    "train.cpus_per_worker=0.5",
    "train.warmup_steps=1",
    "train.log_every=2",
    "train.checkpoint_every=2",
    "train.val_batches=1",
]


def test_a_run_logs_its_config_metrics_and_artifacts_to_mlflow_and_export_adds_the_encoder(
    mlflow_server, small_shards, tmp_path, ray_session
):
    from mlflow import MlflowClient

    cfg = load_config(
        overrides=[
            f"train.shards={small_shards}",
            f"train.storage_path={tmp_path / 'runs'}",
            *SMALL,
            "train.steps=4",
            "train.tracker=mlflow",
            f"train.tracking_uri={mlflow_server}",
            "train.experiment=jepa-ray-tests",
        ]
    )
    info = pretrain(cfg, name="tracked")
    mlflow = MlflowClient(tracking_uri=mlflow_server)
    experiment = mlflow.get_experiment_by_name("jepa-ray-tests")
    [run] = mlflow.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.steps"] == "4" and params["pipeline.image_size"] == "32"
    assert params["model.preset"] == "tiny" and params["train.tracker"] == "mlflow"
    with (Path(info.run_url) / "metrics" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    history = mlflow.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, round(m.value, 5)) for m in history] == [
        (int(r["step"]), round(float(r["loss"]), 5)) for r in rows
    ]
    assert [m.step for m in history] == [2, 4]
    assert {"val_loss", "lr", "samples_per_s"} <= set(run.data.metrics)
    artifacts = {a.path for a in mlflow.list_artifacts(run.info.run_id)}
    assert {"metrics.csv", "loss.png"} <= artifacts, artifacts

    # export adds the encoder to the same MLflow run
    r = CliRunner().invoke(app, ["export", info.run_url, "--out", str(tmp_path / "encoder.safetensors")])
    assert r.exit_code == 0, r.output
    assert run.info.run_id in r.output
    # what export says is its own: not DeepSpeed's checkpoint reader's steps and progress bar
    assert "zero checkpoint" not in r.output and "Loading checkpoint shards" not in r.output, r.output
    encoder = {a.path for a in mlflow.list_artifacts(run.info.run_id, "encoder")}
    assert encoder == {"encoder/encoder.safetensors", "encoder/encoder.json"}


def test_a_run_logs_to_wandb_offline_and_export_joins_the_same_wandb_run(
    small_shards, tmp_path, ray_session, monkeypatch
):
    """train.tracker=wandb (offline): the run's files under <run>/wandb/, read back with wandb's
    own record definitions: the config, every report's metrics at its step, the loss plot and CSV
    as an artifact, exit code 0; export's encoder joins the same W&B run."""
    import json

    from wandbkit import offline_runs

    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "not-here"))  # the run's directory wins

    cfg = load_config(
        overrides=[
            f"train.shards={small_shards}",
            f"train.storage_path={tmp_path / 'runs'}",
            *SMALL,
            "train.steps=4",
            "train.tracker=wandb",
            "train.experiment=jepa-ray-tests",
        ]
    )
    info = pretrain(cfg, name="wb-tracked")
    run_dir = Path(info.run_url)
    recorded = json.loads((run_dir / "tracker.json").read_text())
    assert recorded["tracker"] == "wandb" and recorded["mode"] == "offline"
    [run] = offline_runs(None, str(run_dir))
    assert (run.run_id, run.project, run.name) == (recorded["run_id"], "jepa-ray-tests", "wb-tracked")
    assert run.job_type == "pretrain" and run.group == ""
    assert run.config["train"]["steps"] == 4 and run.config["pipeline"]["image_size"] == 32
    assert run.config["train"]["tracker"] == "wandb"
    with (run_dir / "metrics" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(h["_step"], round(h["loss"], 5)) for h in run.history] == [
        (int(r["step"]), round(float(r["loss"]), 5)) for r in rows
    ]
    assert [h["_step"] for h in run.history] == [2, 4]
    assert {"val_loss", "lr", "samples_per_s"} <= set(run.history[-1])
    assert run.artifacts == [
        {"name": "wb-tracked-metrics", "type": "metrics", "files": ["loss.png", "metrics.csv"]}
    ]
    assert {"loss.png", "metrics.csv"} <= set(run.files)  # also run files, inside the run's folder
    [folder] = (run_dir / "wandb").glob("offline-run-*")
    kept = folder / "files" / "metrics.csv"
    assert not kept.is_symlink() and kept.read_bytes() == (run_dir / "metrics" / "metrics.csv").read_bytes()
    assert run.exit_code == 0
    assert not (tmp_path / "not-here").exists()

    # export adds the encoder to the same W&B run
    r = CliRunner().invoke(app, ["export", info.run_url, "--out", str(tmp_path / "encoder.safetensors")])
    assert r.exit_code == 0, r.output
    assert run.run_id in r.output
    _, exported = offline_runs(None, str(run_dir))
    assert exported.run_id == run.run_id and exported.exit_code == 0
    assert exported.artifacts == [
        {"name": "wb-tracked-encoder", "type": "model", "files": ["encoder.json", "encoder.safetensors"]}
    ]


def test_wandb_files_on_s3_are_uploaded_again_only_when_they_changed(tmp_path, monkeypatch):
    """At every checkpoint a run on S3 uploads its staged W&B files: the ones it sent before and that
    have not changed since are not sent again (a long run's media and config would be, each time)."""
    import os
    from types import SimpleNamespace

    from jepa_ray.train import tracking

    sent: list[str] = []
    store = SimpleNamespace(
        url="s3://bucket/runs/r1",
        fs=SimpleNamespace(put_file=lambda src, dst: sent.append(dst)),
        path=lambda rel: f"bucket/runs/r1/{rel}",
    )
    monkeypatch.setattr(tracking.tempfile, "mkdtemp", lambda prefix: str(tmp_path / "stage"))
    files = tracking._WandbFiles(store)
    run = tmp_path / "stage" / "wandb" / "offline-run-1"
    (run / "files").mkdir(parents=True)
    (run / "run-1.wandb").write_bytes(b"a" * 10)
    (run / "files" / "config.yaml").write_text("x: 1\n")
    (run / "files" / "link").symlink_to(run / "run-1.wandb")  # a link is never sent
    files.upload()
    assert sorted(sent) == [
        "bucket/runs/r1/wandb/offline-run-1/files/config.yaml",
        "bucket/runs/r1/wandb/offline-run-1/run-1.wandb",
    ]
    sent.clear()
    files.upload()
    assert sent == []  # nothing changed
    with (run / "run-1.wandb").open("ab") as f:  # the log grows; the config stays
        f.write(b"b")
    (run / "files" / "metrics.csv").write_text("step,loss\n")
    files.upload()
    assert sorted(sent) == [
        "bucket/runs/r1/wandb/offline-run-1/files/metrics.csv",
        "bucket/runs/r1/wandb/offline-run-1/run-1.wandb",
    ]
    sent.clear()
    st = (run / "files" / "metrics.csv").stat()
    os.utime(
        run / "files" / "metrics.csv", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000)
    )  # rewritten, same size
    files.close()
    assert sent == ["bucket/runs/r1/wandb/offline-run-1/files/metrics.csv"]
    assert not (tmp_path / "stage").exists()  # the staging directory goes with the run


def test_an_interrupted_sweeps_cut_short_trial_is_killed_in_mlflow_not_finished(tmp_path, mlflow_server):
    """The end of a sweep (also an interrupted one's) closes the trials' MLflow runs its workers
    left RUNNING: FINISHED for a trial that ran all its steps, KILLED for one ASHA stopped early
    and for one the interruption cut short (a resume reopens it)."""
    from mlflow import MlflowClient

    from jepa_ray.train.tracking import finish_sweep, sweep_parent

    cfg = load_config(
        overrides=[
            "train.tracker=mlflow",
            f"train.tracking_uri={mlflow_server}",
            "train.experiment=interrupted-sweep",
            f"train.storage_path={tmp_path}",
        ]
    )
    url = str(tmp_path / "sweep")
    parent = sweep_parent(cfg, "sweep", url)
    mlflow = MlflowClient(tracking_uri=mlflow_server)
    experiment = mlflow.get_run(parent).info.experiment_id
    children = {}
    for trial in ("done", "early", "cut"):
        tags = {"mlflow.parentRunId": parent, "jepa_ray.run_url": f"{url}/trials/{trial}"}
        children[trial] = mlflow.create_run(experiment, tags=tags).info.run_id
    rows = [
        {"trial": "done", "status": "TERMINATED", "stopped_early": False, "steps": 100},
        {"trial": "early", "status": "TERMINATED", "stopped_early": True, "steps": 40},
        {"trial": "cut", "status": "UNFINISHED", "stopped_early": False, "steps": 60},
    ]
    finish_sweep(cfg, parent, url, f"{url}/trials", rows, [])
    status = {trial: mlflow.get_run(run_id).info.status for trial, run_id in children.items()}
    assert status == {"done": "FINISHED", "early": "KILLED", "cut": "KILLED"}
    assert mlflow.get_run(parent).info.status == "FINISHED"
