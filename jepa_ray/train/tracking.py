"""Experiment tracking: a run's parameters, metrics and artifacts in MLflow (`train.tracker=mlflow`)
or Weights & Biases (`train.tracker=wandb`).

Rank 0 logs through the tracker's own client (`mlflow.MlflowClient`, `wandb.init`), beside the CSV
and TensorBoard files it always writes:

- one tracked run per jepa-ray run (named after it, in the MLflow experiment or W&B project
  `train.experiment`), with the resolved config as its parameters (MLflow: flattened,
  `model.width`, `train.lr`, ...; W&B: the nested config) at its start;
- every report's metrics at their optimizer step (the loss and its parts, lr, momentum,
  samples/s, data wait, validation loss and RankMe, step phases, memory);
- at the end the loss plot and metrics.csv as artifacts, and the run ended (MLflow FINISHED or
  FAILED; W&B exit code 0 or 1);
- `jepa-ray export` adds the exported encoder (safetensors + JSON) to the run's artifacts.

The tracked run's id is kept in the run directory (`tracker.json`), so a resumed jepa-ray run
(another attempt, a restarted worker group, a rerun with the same name) goes on logging into the
same tracked run. A Ray Tune sweep makes one parent: an MLflow run whose children are the trials'
runs (`mlflow.parentRunId`), or a W&B group named after the sweep holding the trials' runs and a
`sweep` run with the results table.

MLflow's server is `train.tracking_uri`, else $MLFLOW_TRACKING_URI; every worker must reach it.
W&B runs offline by default (`train.wandb_mode`): the run's files are written under
`<run>/wandb/` (on S3 too: staged on rank 0, uploaded at every checkpoint and at the end), for
`wandb sync` from a machine that reaches the W&B server; `online` sends them as they come
($WANDB_API_KEY).
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jepa_ray.errors import ConfigError
from jepa_ray.storage import Store, is_remote

log = logging.getLogger("jepa_ray.train")

TRACKER_FILE = "tracker.json"
PARAM_BATCH = 100  # MLflow takes at most 100 parameters per call
PARAM_MAX = 6000  # characters of a parameter value


def flatten(doc: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"model.width": "96", ...}: a nested config as MLflow parameters (values as text)."""
    out = {}
    for k, v in doc.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            text = json.dumps(v) if not isinstance(v, str) else v
            out[key] = text[:PARAM_MAX]
    return out


def tracking_uri(cfg) -> str:
    uri = cfg.train.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ConfigError(
            "train.tracker=mlflow needs a tracking server: set train.tracking_uri (e.g. http://head:5000) "
            "or $MLFLOW_TRACKING_URI"
        )
    return uri


def client(uri: str):
    try:
        from mlflow import MlflowClient
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise ConfigError("train.tracker=mlflow needs mlflow (pip install mlflow)") from e
    return MlflowClient(tracking_uri=uri)


def experiment_id(mlflow, name: str) -> str:
    found = mlflow.get_experiment_by_name(name)
    return found.experiment_id if found is not None else mlflow.create_experiment(name)


def parent_run(cfg, name: str) -> str:
    """A sweep's parent MLflow run (its trials' runs are children): the id."""
    mlflow = client(tracking_uri(cfg))
    run = mlflow.create_run(
        experiment_id(mlflow, cfg.train.experiment), run_name=name, tags={"jepa_ray.kind": "sweep"}
    )
    _params(mlflow, run.info.run_id, flatten(cfg.model_dump(mode="json")))
    return run.info.run_id


def recorded_run(store: Store) -> dict[str, Any] | None:
    """The tracked run a directory (a run's, a sweep's) recorded, or None: {tracker: mlflow,
    tracking_uri, run_id} or {tracker: wandb, project, mode, run_id (a sweep's: the group)}."""
    if not store.exists(TRACKER_FILE):
        return None
    known = json.loads(store.read_bytes(TRACKER_FILE))
    known.setdefault("tracker", "mlflow")
    return known


def record_run(store: Store, known: dict[str, Any]) -> None:
    store.write_bytes(TRACKER_FILE, json.dumps(known).encode())


def check(cfg) -> None:
    """What every worker would fail on, raised in the driver: no MLflow server set, or no client."""
    if cfg.train.tracker == "mlflow":
        client(tracking_uri(cfg))
    elif cfg.train.tracker == "wandb":
        _wandb()


def open_tracker(cfg, run_url: str):
    """Rank 0's tracked run for `train.tracker`, or None."""
    if cfg.train.tracker == "mlflow":
        return MlflowTracker(cfg, run_url)
    if cfg.train.tracker == "wandb":
        return WandbTracker(cfg, run_url)
    return None


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if k != "step" and isinstance(v, int | float) and math.isfinite(v)
    }


def _params(mlflow, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in sorted(params.items())]
    for i in range(0, len(items), PARAM_BATCH):
        mlflow.log_batch(run_id, params=items[i : i + PARAM_BATCH])


class MlflowTracker:
    """Rank 0's MLflow run for one jepa-ray run (resumed when the run directory records one)."""

    def __init__(self, cfg, run_url: str) -> None:
        self.uri = tracking_uri(cfg)
        self.mlflow = client(self.uri)
        self.store = Store(run_url, cfg.train.storage)
        name = run_url.rstrip("/").rsplit("/", 1)[-1]
        known = recorded_run(self.store)
        if known is not None and known["tracker"] == "mlflow" and known.get("tracking_uri") == self.uri:
            self.run_id = known["run_id"]
            self.mlflow.update_run(self.run_id, status="RUNNING")
            log.info("mlflow: resuming run %s", self.run_id)
            return
        tags = {"jepa_ray.run_url": run_url}
        if cfg.train.tracker_parent:
            tags["mlflow.parentRunId"] = cfg.train.tracker_parent
        run = self.mlflow.create_run(
            experiment_id(self.mlflow, cfg.train.experiment), run_name=name, tags=tags
        )
        self.run_id = run.info.run_id
        _params(self.mlflow, self.run_id, flatten(cfg.model_dump(mode="json")))
        record_run(self.store, {"tracker": "mlflow", "tracking_uri": self.uri, "run_id": self.run_id})
        log.info("mlflow: run %s in %s", self.run_id, self.uri)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in _finite(metrics).items()]
        if items:
            self.mlflow.log_batch(self.run_id, metrics=items)

    def sync(self) -> None:
        """Nothing to upload: MLflow has every metric already."""

    def finish(self, artifacts: list[Path], failed: bool = False) -> None:
        for path in artifacts:
            if path.exists():
                self.mlflow.log_artifact(self.run_id, str(path))
        self.mlflow.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def _wandb():
    try:
        import wandb
    except ImportError as e:
        raise ConfigError("train.tracker=wandb needs wandb (pip install 'jepa-ray[wandb]')") from e
    return wandb


def _wandb_run(known: dict[str, Any], where: Path, **init):
    """A W&B run (new, or resumed by `known["run_id"]`) writing its files under `where`/wandb."""
    wandb = _wandb()
    settings = wandb.Settings(
        console="off", silent=True, save_code=False, disable_git=True, x_disable_stats=True
    )
    for key in ("name", "group", "job_type"):  # an offline resume does not carry them over
        init.setdefault(key, known.get(key))
    return wandb.init(
        project=known["project"],
        id=known["run_id"],
        resume="allow",
        mode=known["mode"],
        dir=str(where),
        settings=settings,
        reinit="create_new",
        **init,
    )


def _wandb_artifact(run, name: str, kind: str, files: list[Path], copy: bool) -> None:
    """An artifact of `files`. copy: W&B copies them into its staging area now (small files that
    may be removed before a sync); else it refers to them where they are (an export's encoder)."""
    wandb = _wandb()
    artifact = wandb.Artifact(name, type=kind)
    for path in files:
        if path.exists():
            artifact.add_file(str(path), policy="mutable" if copy else "immutable")
    run.log_artifact(artifact)


def _wandb_save(run, path: Path) -> None:
    """`path` as a run file, copied into the run's own folder (`wandb.save` links it), so that it
    travels with an offline run wherever the folder goes."""
    run.save(str(path), base_path=str(path.parent), policy="now")
    kept = Path(run.dir) / path.name
    if kept.is_symlink():
        kept.unlink()
        shutil.copy2(path, kept)


class _WandbFiles:
    """Where a W&B run writes: the jepa-ray directory itself, or (on S3) a local staging directory
    whose `wandb/` is uploaded into it when the run ends."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.remote = is_remote(store.url)
        self.dir = Path(tempfile.mkdtemp(prefix="jepa-wandb-")) if self.remote else Path(store.root)
        self.sent: dict[Path, tuple[int, int]] = {}  # (size, mtime) of each file as last uploaded

    def upload(self) -> None:
        """Copy the files changed since the last upload (on S3; a no-op for a local directory). A
        run file caught while being appended ends in a partial record, which W&B's reader stops at."""
        if not self.remote:
            return
        for path in sorted((self.dir / "wandb").rglob("*")):
            if not path.is_file() or path.is_symlink():
                continue
            st = path.stat()
            if self.sent.get(path) != (st.st_size, st.st_mtime_ns):
                self.store.fs.put_file(str(path), self.store.path(str(path.relative_to(self.dir))))
                self.sent[path] = (st.st_size, st.st_mtime_ns)

    def close(self) -> None:
        self.upload()
        if self.remote:
            shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def _wandb_session(store: Store, known: dict[str, Any], exit_code: int | None = 0, **init):
    """A W&B run reopened (or made) for `store`'s directory, its files staged there (uploaded when
    it is on S3); ended when the block ends, with `exit_code` (None: W&B's default), or 1 when the
    block raised."""
    files = _WandbFiles(store)
    run = _wandb_run(known, files.dir, **init)
    try:
        yield run
    except BaseException:
        run.finish(exit_code=1)
        raise
    else:
        run.finish(exit_code=exit_code)
    finally:
        files.close()


class WandbTracker:
    """Rank 0's W&B run for one jepa-ray run (resumed when the run directory records one)."""

    def __init__(self, cfg, run_url: str) -> None:
        self.store = Store(run_url, cfg.train.storage)
        self.name = run_url.rstrip("/").rsplit("/", 1)[-1]
        known = recorded_run(self.store)
        project, mode = cfg.train.experiment, cfg.train.wandb_mode
        if not (known and known["tracker"] == "wandb" and known["project"] == project):
            known = {"tracker": "wandb", "project": project, "run_id": secrets.token_hex(6)}
        known |= {
            "mode": mode,
            "name": self.name,
            "group": cfg.train.tracker_parent,
            "job_type": "trial" if cfg.train.tracker_parent else "pretrain",
            "ended": False,
        }
        self.files = _WandbFiles(self.store)
        self.run = _wandb_run(known, self.files.dir, config=cfg.model_dump(mode="json"))
        if cfg.train.tracker_parent:  # a trial resumed after an interrupted sweep marked it stopped
            self.run.summary["stopped_early"] = False
        record_run(self.store, known)
        self.known = known
        self.ended = False
        log.info("wandb: run %s (%s) in project %s", known["run_id"], mode, project)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        values = _finite(metrics)
        if values:
            self.run.log(values, step=step)

    def sync(self) -> None:
        """At each checkpoint: a run on S3 gets its W&B files so far (a trial the scheduler stops,
        or a run that is killed, keeps what it logged up to its last checkpoint)."""
        self.files.upload()

    def finish(self, artifacts: list[Path], failed: bool = False) -> None:
        if self.ended:
            return
        self.ended = True
        present = [p for p in artifacts if p.exists()]
        for path in present:
            _wandb_save(self.run, path)
        if present:
            _wandb_artifact(self.run, f"{self.name}-metrics", "metrics", present, copy=True)
        self.run.finish(exit_code=1 if failed else 0)
        self.files.close()
        record_run(self.store, {**self.known, "ended": not failed})


def log_export(run_url: str, storage, files: list[Path]) -> str | None:
    """Add an export's files to the run's tracked run, when the run was tracked; its run id."""
    store = Store(run_url, storage)
    known = recorded_run(store)
    if known is None:
        return None
    if known["tracker"] == "wandb":
        with _wandb_session(store, known, exit_code=None) as run:  # the run's own exit code stays
            name = f"{run_url.rstrip('/').rsplit('/', 1)[-1]}-encoder"
            _wandb_artifact(run, name, "model", files, copy=False)
        return known["run_id"]
    mlflow = client(known["tracking_uri"])
    for path in files:
        mlflow.log_artifact(known["run_id"], str(path), artifact_path="encoder")
    return known["run_id"]


def sweep_parent(cfg, name: str, url: str) -> str:
    """What a sweep's trials belong to, made once and kept in the sweep directory (a resumed
    sweep's trials join the same one): MLflow, a parent run's id; W&B, the group (the sweep's name)."""
    store = Store(url, cfg.train.storage)
    known = recorded_run(store)
    if cfg.train.tracker == "wandb":
        if known is not None and known["tracker"] == "wandb":
            return known["run_id"]
        store.makedirs()
        record_run(
            store,
            {
                "tracker": "wandb",
                "project": cfg.train.experiment,
                "mode": cfg.train.wandb_mode,
                "run_id": name,
            },
        )
        return name
    uri = tracking_uri(cfg)
    if known is not None and known["tracker"] == "mlflow" and known.get("tracking_uri") == uri:
        return known["run_id"]
    run_id = parent_run(cfg, name)
    store.makedirs()
    record_run(store, {"tracker": "mlflow", "tracking_uri": uri, "run_id": run_id})
    return run_id


def finish_sweep(cfg, parent: str, url: str, trials: str, rows: list[dict], artifacts: list[Path]) -> None:
    """A sweep's end. MLflow: its tables as the parent run's artifacts, the parent FINISHED, and each
    child run still RUNNING (a trial the scheduler stopped early: its workers were stopped, not
    ended) KILLED, or FINISHED when the trial ran all its steps (ASHA stops a trial at its last
    report too, which can come before its run ended). W&B: each trial whose run did not end itself
    ended (exit code 0, summary `stopped_early`), and a
    `sweep` run in the group with the results as a table and the tables as artifacts. `trials`:
    where the trials' run directories are (each row's `trial` names one)."""
    if cfg.train.tracker == "wandb":
        _finish_wandb_sweep(cfg, parent, url, trials, rows, artifacts)
        return
    mlflow = client(tracking_uri(cfg))
    run = mlflow.get_run(parent)
    children = mlflow.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=10_000
    )
    # a trial that ran all its steps can be stopped at its last report (ASHA stops at max_t); one
    # stopped early, or cut short by the sweep's interruption, was killed
    finished = {r["trial"]: r.get("status") == "TERMINATED" and not r.get("stopped_early") for r in rows}
    for child in children:
        if child.info.status == "RUNNING":  # its workers were stopped before they ended it
            trial = child.data.tags.get("jepa_ray.run_url", "").rstrip("/").rsplit("/", 1)[-1]
            mlflow.set_terminated(child.info.run_id, "FINISHED" if finished.get(trial) else "KILLED")
    for path in artifacts:
        if path.exists():
            mlflow.log_artifact(parent, str(path))
    mlflow.set_terminated(parent, "FINISHED")


def _finish_wandb_sweep(
    cfg, group: str, url: str, trials: str, rows: list[dict], artifacts: list[Path]
) -> None:
    wandb = _wandb()
    sweep = Store(url, cfg.train.storage)
    for row in rows:  # trials whose workers were stopped before they ended their runs
        trial = Store(f"{trials.rstrip('/')}/{row['trial']}", cfg.train.storage)
        known = recorded_run(trial)
        if known is None or known["tracker"] != "wandb" or known.get("ended"):
            continue
        with _wandb_session(trial, known) as run:
            run.summary["stopped_early"] = bool(row.get("stopped_early"))
            run.summary["stopped_at_step"] = row.get("steps")
        record_run(trial, {**known, "ended": True})
    group_known = recorded_run(sweep) or {}
    run_id = group_known.get("sweep_run") or secrets.token_hex(6)  # a resumed sweep: the same run
    if group_known.get("tracker") == "wandb":
        record_run(sweep, {**group_known, "sweep_run": run_id})
    known = {"project": cfg.train.experiment, "mode": cfg.train.wandb_mode, "run_id": run_id}
    known |= {"name": group, "group": group, "job_type": "sweep"}
    with _wandb_session(sweep, known, config=cfg.model_dump(mode="json")) as run:
        columns = sorted({k for r in rows for k in r})
        table = wandb.Table(columns=columns, data=[[_cell(r.get(c)) for c in columns] for r in rows])
        run.log({"results": table})
        for path in artifacts:
            _wandb_save(run, path)
        _wandb_artifact(run, f"{group}-results", "sweep-results", artifacts, copy=True)


def _cell(value):
    return value if value is None or isinstance(value, bool | int | float | str) else json.dumps(value)
