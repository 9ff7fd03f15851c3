"""`jepa-ray tune` end to end on the shared local Ray: trials are real pretraining runs (one Ray
Train worker each, ZeRO-2, tiny model, a few steps), ASHA stops some early, the outputs are
written, and an interrupted sweep kept on S3 resumes without rerunning its finished trials."""

from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jepa_ray.config import load_config
from jepa_ray.errors import ConfigError
from jepa_ray.tune.sweep import TRIALS_DIR, sweep

TRIAL = [
    "pipeline.image_size=32",
    "pipeline.patch_size=8",
    "pipeline.max_events=12",
    "pipeline.batch_size=4",
    "train.num_workers=1",
    "train.cpus_per_worker=0.45",  # two trials at once, one whole CPU left for the data pipelines
    "train.zero_stage=2",
    "train.lr=0.002",
    "train.warmup_steps=2",
    "train.val_batches=1",
    "train.max_failures=0",
    "tune.eval_batches=8",
]


@pytest.fixture(scope="module")
def tune_shards(small_cohort, cohort_inputs, tmp_path_factory, ray_session):
    """The small cohort with half its subjects in the validation split (the objective's data)."""
    from jepa_ray.ingest.prepare import prepare

    out = tmp_path_factory.mktemp("tune-shards")
    cfg = load_config(
        overrides=["prepare.image.size=64", "prepare.shards.max_samples=8", "prepare.split.val=0.5"]
    ).prepare
    prepare(str(out), cfg, **cohort_inputs(small_cohort))
    return out


def _cfg(shards, root: Path, *overrides: str):
    return load_config(overrides=[f"train.shards={shards}", f"train.storage_path={root}", *TRIAL, *overrides])


EVERY = 4  # a report, with the objective measured, every 4 steps
STEPS = 12  # ASHA's rungs at 4 and 8 steps (grace period 4, reduction factor 2): two chances to stop
GOOD_LR, MID_LR, IDLE_LR = 0.002, 0.001, 1e-5  # a trial at 1e-5 barely moves from its start: a worse val_loss
LEARNING = (GOOD_LR, MID_LR)


def test_sweep_stops_trials_early_and_writes_a_runnable_best(tune_shards, tmp_path, mlflow_server):
    """Two trials at a time, in grid order: the idle trial, third, starts once one of the first two
    (both learning) has ended, so it reaches ASHA's first rung after both are recorded there, and
    its val_loss, worse than their median, gets it stopped; the trial that reaches a rung first
    always goes on. (A probe on the 32 validation samples ties trials this short, and with ties
    ASHA rightly stops none.)"""
    cfg = _cfg(
        tune_shards,
        tmp_path,
        f"train.steps={STEPS}",
        f"train.checkpoint_every={STEPS}",
        "tune.space={pipeline.mask.mask_ratio: {values: [0.5]}, "
        f"train.lr: {{values: [{GOOD_LR}, {MID_LR}, {IDLE_LR}]}}}}",
        "tune.objective=val_loss",
        f"tune.eval_every={EVERY}",
        f"tune.asha.grace_period={EVERY}",
        "tune.asha.reduction_factor=2",
        "tune.measure_all=true",
        "train.tracker=mlflow",
        f"train.tracking_uri={mlflow_server}",
        "train.experiment=sweep-tests",
    )
    info = sweep(cfg, name="grid")
    rows = info.rows
    grid = {(0.5, GOOD_LR), (0.5, MID_LR), (0.5, IDLE_LR)}
    assert len(rows) == 3 and {(r["pipeline.mask.mask_ratio"], r["train.lr"]) for r in rows} == grid
    assert all(r["status"] == "TERMINATED" for r in rows), rows
    idle = [r for r in rows if r["train.lr"] == IDLE_LR]
    assert any(r["stopped_early"] and r["steps"] == EVERY for r in idle), rows  # ASHA's first rung
    assert any(r["steps"] == STEPS and not r["stopped_early"] for r in rows if r["train.lr"] in LEARNING)
    for r in rows:
        assert r["objective"] == r["lf_val_loss"] < 0 and r["rankme"] > 1.0
        assert "objective_samples" not in r  # a label-free objective counts no labelled samples
        assert 0.0 < r["objective_se"] < 0.5  # every trial reports its uncertainty
        for name in ("rankme", "lidar", "lidar_context", "val_loss"):  # tune.measure_all
            assert r[f"lf_{name}"] is not None and r[f"lf_{name}_se"] > 0, (name, r)
        assert r["lf_rankme"] == r["rankme"] and r["collapsed"] is False
        run_csv = tmp_path / "grid" / TRIALS_DIR / r["trial"] / "metrics" / "metrics.csv"
        with run_csv.open() as f:
            steps = [int(float(x["step"])) for x in csv.DictReader(f)]
        assert steps == list(range(EVERY, steps[-1] + 1, EVERY))  # each report measured it
        # a stopped run may log one more report before its workers are gone
        assert r["steps"] <= steps[-1] <= r["steps"] + EVERY
    assert max(r["objective"] for r in idle) < min(r["objective"] for r in rows if r["train.lr"] in LEARNING)
    sweep_dir = tmp_path / "grid"
    with (sweep_dir / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [t["trial"] for t in table] == [r["trial"] for r in rows]
    assert "stopped_early" in table[0] and "pipeline.mask.mask_ratio" in table[0]
    assert (sweep_dir / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (sweep_dir / "results.md").read_text()
    assert "objective_se" in md and "Best beyond noise: " in md and "Stopped early by ASHA: " in md
    assert "Spearman correlation of RankMe with the objective" in md
    sp = info.spearman
    assert sp is None or (-1.0 <= sp["rho"] <= 1.0 and sp["step"] >= EVERY and sp["trials"] == 3)
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    # a label-free objective is not compared with the others (that needs a labelled one)
    assert info.candidates == {} == summary["spearman_label_free_objective"]
    gap = summary["best_vs_runner_up"]
    finished = [r for r in rows if r["steps"] == STEPS]
    if len(finished) == 1:  # ASHA let one trial run to the end: no runner-up that ran as long
        assert gap is None and "no runner-up that ran as long" in md
    else:
        assert gap["runner_up"] in {r["trial"] for r in finished} and gap["gap"] >= 0
        assert gap["beyond_noise"] == (gap["gap"] > 2 * gap["se"])

    best = load_config(sweep_dir / "best.yaml")  # runs as is: `jepa-ray pretrain --config best.yaml`
    assert best.train.shards == str(tune_shards) and best.train.storage_path == str(tmp_path)
    b = info.best
    assert b["steps"] == STEPS and b["objective"] == max(r["objective"] for r in rows if r["steps"] == STEPS)
    assert best.pipeline.mask.mask_ratio == b["pipeline.mask.mask_ratio"] and best.train.lr == b["train.lr"]
    assert best.tune.space == {}

    with pytest.raises(ConfigError, match=r"a sweep named 'grid' already exists.*--resume"):
        sweep(cfg, name="grid")

    # MLflow: one parent run for the sweep, each trial a child run with its own point of the space
    from mlflow import MlflowClient

    mlflow = MlflowClient(tracking_uri=mlflow_server)
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("sweep-tests").experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("jepa_ray.kind") == "sweep"]
    parent = mlflow.get_run(parent.info.run_id)
    assert parent.info.run_name == "grid"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 3 == len(runs) - 1
    status = {
        (float(c.data.params["pipeline.mask.mask_ratio"]), float(c.data.params["train.lr"])): c.info.status
        for c in children
    }
    assert set(status) == grid
    for r in rows:  # a trial ASHA stopped early was killed; one that ran its steps finished
        point = (r["pipeline.mask.mask_ratio"], r["train.lr"])
        assert status[point] == ("KILLED" if r["stopped_early"] else "FINISHED"), (r, status)
    assert all("loss" in c.data.metrics for c in children)
    assert parent.info.status == "FINISHED"
    assert "results.csv" in {a.path for a in mlflow.list_artifacts(parent.info.run_id)}


def test_an_interrupted_sweep_on_s3_resumes_without_rerunning_finished_trials(
    tune_shards, s3_bucket, tmp_path, ray_session
):
    """storage_path=s3://...: Tune's state, the trials' runs and the outputs land in the bucket,
    nothing on the local disk; a sweep interrupted (SIGINT) after its first trial resumes from the
    bucket without rerunning that trial, and resuming a finished sweep runs nothing."""
    import s3fs
    from wandbkit import offline_runs

    endpoint, bucket = s3_bucket
    overrides = [
        f"train.storage_path=s3://{bucket}/sweeps",
        f"train.storage.endpoint_url={endpoint}",
        "train.steps=6",
        "train.checkpoint_every=3",
        "tune.space={pipeline.mask.mask_ratio: {values: [0.3, 0.7]}}",
        "tune.eval_every=3",
        "tune.asha.enabled=false",
        "tune.max_concurrent_trials=1",
        "train.tracker=wandb",  # offline: the runs' W&B files go to the bucket too
        "train.experiment=sweep-tests",
    ]
    cfg = _cfg(tune_shards, tmp_path, *overrides)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    root = f"{bucket}/sweeps/resumable"
    address = ray_session.get_runtime_context().gcs_address
    cmd = [sys.executable, "-c", "from jepa_ray.cli import app; app()", "tune", "--name", "resumable"]
    cmd += [f"train.shards={tune_shards}", *TRIAL, *overrides]
    proc = subprocess.Popen(
        [*cmd, f"ray_address={address}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path
    )

    def finished() -> list[str]:
        """The run folders of the trials Tune's saved experiment state records as TERMINATED."""
        fs.invalidate_cache()
        done = []
        for state in fs.glob(f"{root}/experiment_state-*.json"):
            try:
                trial_data = json.loads(fs.cat(state))["trial_data"]
            except (ValueError, KeyError, FileNotFoundError):  # being rewritten
                continue
            for blob, _ in trial_data:
                trial = json.loads(blob)
                if trial.get("status") == "TERMINATED":
                    done.append(f"{root}/{TRIALS_DIR}/{trial['trial_id']}")
        return done

    deadline = time.monotonic() + 600  # a hang guard: a host under steal runs the first trial in 150+ s
    while not finished() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(1)
    assert finished(), (proc.poll(), proc.stdout.read().decode()[-3000:] if proc.poll() is not None else "")
    proc.send_signal(signal.SIGINT)  # Tune saves its experiment state and stops
    out, _ = proc.communicate(timeout=120)
    done = finished()
    assert len(done) == 1, out.decode()[-3000:]
    # its outputs so far: the trial the interrupt cut short is unfinished, not stopped by ASHA
    assert re.search(r"_00001 +0\.7 .* unfinished", out.decode()), out.decode()[-3000:]
    fs.invalidate_cache()
    # a rerun would rewrite the run's metrics and start a new TensorBoard event file
    before = {d: (fs.cat(f"{d}/metrics/metrics.csv"), fs.glob(f"{d}/metrics/tensorboard/*")) for d in done}

    info = sweep(cfg, name="resumable", resume=True)
    assert info.url == f"s3://{root}"
    statuses = [(r["trial"], r["status"], r["steps"]) for r in info.rows]
    assert len(info.rows) == 2 and all(r["status"] == "TERMINATED" and r["steps"] == 6 for r in info.rows), (
        statuses
    )
    assert all(r["objective_se"] > 0 for r in info.rows)  # the default objective, with its SE
    # val_loss by default, guarded against collapse by the starting encoder (rebuilt on resume)
    assert cfg.tune.objective == "val_loss" and all(r["objective"] < 0 for r in info.rows)
    assert all(r["collapsed"] is False and r["spread"] > 0.05 for r in info.rows)
    fs.invalidate_cache()
    for d, (csv_bytes, events) in before.items():
        assert fs.cat(f"{d}/metrics/metrics.csv") == csv_bytes
        assert fs.glob(f"{d}/metrics/tensorboard/*") == events
    assert len(fs.ls(f"{root}/{TRIALS_DIR}")) == 2
    for name in ("results.csv", "results.md", "best.yaml", "heatmap.png", "sweep.json"):
        assert fs.exists(f"{root}/{name}"), name
    for r in info.rows:
        assert fs.glob(f"{root}/{TRIALS_DIR}/{r['trial']}/checkpoint_*/")
    assert not list(tmp_path.iterdir())  # nothing of the sweep went to the local disk

    # W&B: each trial a run of the group "resumable" (the interrupted one resumed into the same
    # run), and a `sweep` run with the results table
    recorded = json.loads(fs.cat(f"{root}/tracker.json"))
    assert recorded["tracker"] == "wandb" and recorded["run_id"] == "resumable"
    for r in info.rows:
        # an attempt killed by the interrupt keeps the file as its last checkpoint uploaded it,
        # possibly before W&B flushed a record
        runs = [w for w in offline_runs(fs, f"{root}/{TRIALS_DIR}/{r['trial']}") if w.run_id]
        trial_run = json.loads(fs.cat(f"{root}/{TRIALS_DIR}/{r['trial']}/tracker.json"))["run_id"]
        assert runs and {w.run_id for w in runs} == {trial_run}
        assert {(w.group, w.job_type) for w in runs} == {("resumable", "trial")}, runs
        configs = [w.config["pipeline"] for w in runs if "pipeline" in w.config]  # a resume sends none
        assert configs and all(c["mask"]["mask_ratio"] == r["pipeline.mask.mask_ratio"] for c in configs)
        assert runs[-1].exit_code == 0 and runs[-1].history[-1]["_step"] == 6
        assert runs[-1].history[-1]["objective"] == pytest.approx(r["objective"])
        assert runs[-1].summary["stopped_early"] is False
        assert {"loss.png", "metrics.csv"} <= set(runs[-1].files)  # in the folder uploaded to S3:
        assert fs.glob(f"{root}/{TRIALS_DIR}/{r['trial']}/wandb/offline-run-*/files/metrics.csv")
    *earlier, sweep_run = offline_runs(fs, root)  # an interrupted sweep writes its outputs so far too
    assert {w.run_id for w in earlier} <= {sweep_run.run_id}
    assert (sweep_run.run_id, sweep_run.name) == (recorded["sweep_run"], "resumable")
    assert (sweep_run.group, sweep_run.job_type, sweep_run.exit_code) == ("resumable", "sweep", 0)
    table = sweep_run.history[0]
    assert (table["results/_type"], table["results/nrows"]) == ("table-file", 2)
    assert table["results/ncols"] == len(info.rows[0])
    assert {"results.csv", "results.md", "heatmap.png"} <= set(sweep_run.files)
    assert sweep_run.artifacts[-1:] == [  # after the table's own artifact
        {
            "name": "resumable-results",
            "type": "sweep-results",
            "files": ["heatmap.png", "results.csv", "results.md"],
        }
    ]

    again = sweep(cfg, name="resumable", resume=True)  # everything finished: nothing to run
    assert [(r["trial"], r["steps"]) for r in again.rows] == [(r["trial"], r["steps"]) for r in info.rows]
    assert {w.run_id for w in offline_runs(fs, root)} == {recorded["sweep_run"]}
    with pytest.raises(ConfigError, match="--resume: no sweep at"):
        sweep(cfg, name="never-started", resume=True)


def test_missing_validation_split_or_label_fails_before_any_trial(
    small_cohort, cohort_inputs, tune_shards, tmp_path, ray_session
):
    from jepa_ray.errors import ShardError
    from jepa_ray.ingest.prepare import prepare

    space = "tune.space={pipeline.mask.mask_ratio: {values: [0.4]}}", "tune.asha.grace_period=5"
    no_val = tmp_path / "no-val"
    pc = load_config(overrides=["prepare.image.size=32", "prepare.split.val=0"]).prepare
    prepare(str(no_val), pc, **cohort_inputs(small_cohort))
    with pytest.raises(ShardError, match=r"no split 'val'"):
        sweep(_cfg(no_val, tmp_path, "train.steps=20", *space), name="no-val")
    with pytest.raises(ConfigError, match=r"tune.label='pneumonia'.*it has: abnormal_lung, cardiomegaly"):
        sweep(
            _cfg(
                tune_shards,
                tmp_path,
                "train.steps=20",
                *space,
                "tune.objective=probe_auroc",
                "tune.label=pneumonia",
            )
        )
    # label-free objectives that cannot be measured for this config, named before any trial
    for bad, message in (
        (("tune.objective=lidar", "tune.eval_batches=2"), r"tune.objective=lidar: LiDAR needs at least 16"),
        (("tune.objective=val_loss", "train.zero_stage=3"), r"which train.zero_stage=3 shards"),
        (
            ("tune.objective=val_loss", "tune.space={model.objective: {values: [jepa, mae]}}"),
            r"tune.objective=val_loss: the sweep varies model.objective",
        ),
    ):
        with pytest.raises(ConfigError, match=message):
            sweep(_cfg(tune_shards, tmp_path, "train.steps=20", *space, *bad), name="bad-objective")
    assert not (tmp_path / "bad-objective").exists()
    # 2 x 0.5 CPUs of workers + the trial's own actor leave 0.99 of 2 CPUs: a read task (1 CPU)
    # could never start, and the trial would wait for its data forever
    with pytest.raises(ConfigError, match=r"\+ 0.01 for each trial's actor takes 1.01 of .* 2 CPUs"):
        sweep(
            _cfg(
                tune_shards,
                tmp_path,
                "train.steps=20",
                *space,
                "train.num_workers=2",
                "train.cpus_per_worker=0.5",
            ),
            name="full",
        )
    assert not (tmp_path / "no-val").joinpath("trials").exists() and not list(tmp_path.glob("tune-*"))
    assert not (tmp_path / "full").exists()
