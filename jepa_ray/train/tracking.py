"""Experiment tracking: a run's parameters, metrics and artifacts in MLflow (`train.tracker=mlflow`).

Rank 0 logs through MLflow's own client (`mlflow.MlflowClient`), beside the CSV and TensorBoard
files it always writes:

- one MLflow run per jepa-ray run (named after it, in the experiment `train.experiment`), with the
  resolved config flattened into parameters (`model.width`, `train.lr`, ...) at its start;
- every report's metrics at their optimizer step (the loss and its parts, lr, momentum,
  samples/s, data wait, validation loss and RankMe, step phases, memory);
- at the end the loss plot and metrics.csv as artifacts, and the run marked FINISHED (FAILED when
  the loop raised);
- `jepa-ray export` adds the exported encoder (safetensors + JSON) to the run's artifacts.

The MLflow run's id is kept in the run directory (`tracker.json`), so a resumed jepa-ray run
(another attempt, a restarted worker group, a rerun with the same name) goes on logging into the
same MLflow run. A Ray Tune sweep makes one parent run; each trial's run is its child
(`mlflow.parentRunId`). The tracking server is `train.tracking_uri`, else $MLFLOW_TRACKING_URI;
every worker must reach it (a server on the head node, or a shared sqlite/file store).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from jepa_ray.errors import ConfigError
from jepa_ray.storage import Store

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


def recorded_run(store: Store) -> dict[str, str] | None:
    """The MLflow run a directory (a run's, a sweep's) recorded: {tracking_uri, run_id}, or None."""
    return json.loads(store.read_bytes(TRACKER_FILE)) if store.exists(TRACKER_FILE) else None


def record_run(store: Store, uri: str, run_id: str) -> None:
    store.write_bytes(
        TRACKER_FILE, json.dumps({"tracker": "mlflow", "tracking_uri": uri, "run_id": run_id}).encode()
    )


def _params(mlflow, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in sorted(params.items())]
    for i in range(0, len(items), PARAM_BATCH):
        mlflow.log_batch(run_id, params=items[i : i + PARAM_BATCH])


class Tracker:
    """Rank 0's MLflow run for one jepa-ray run (resumed when the run directory records one)."""

    def __init__(self, cfg, run_url: str) -> None:
        self.uri = tracking_uri(cfg)
        self.mlflow = client(self.uri)
        self.store = Store(run_url, cfg.train.storage)
        name = run_url.rstrip("/").rsplit("/", 1)[-1]
        known = recorded_run(self.store)
        if known is not None and known.get("tracking_uri") == self.uri:
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
        record_run(self.store, self.uri, self.run_id)
        log.info("mlflow: run %s in %s", self.run_id, self.uri)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        import math

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if k != "step" and isinstance(v, int | float) and math.isfinite(v)
        ]
        if items:
            self.mlflow.log_batch(self.run_id, metrics=items)

    def finish(self, artifacts: list[Path], failed: bool = False) -> None:
        for path in artifacts:
            if path.exists():
                self.mlflow.log_artifact(self.run_id, str(path))
        self.mlflow.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def log_export(run_url: str, storage, files: list[Path]) -> str | None:
    """Add an export's files to the run's MLflow run, when the run was tracked; its run id."""
    known = recorded_run(Store(run_url, storage))
    if known is None:
        return None
    mlflow = client(known["tracking_uri"])
    for path in files:
        mlflow.log_artifact(known["run_id"], str(path), artifact_path="encoder")
    return known["run_id"]


def finish_sweep(cfg, parent: str, artifacts: list[Path]) -> None:
    """A sweep's end: its tables as the parent run's artifacts, the parent FINISHED, and each child
    run still RUNNING (a trial the scheduler stopped early: its workers were stopped, not ended)
    KILLED."""
    mlflow = client(tracking_uri(cfg))
    run = mlflow.get_run(parent)
    children = mlflow.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=10_000
    )
    for child in children:
        if child.info.status == "RUNNING":
            mlflow.set_terminated(child.info.run_id, "KILLED")
    for path in artifacts:
        if path.exists():
            mlflow.log_artifact(parent, str(path))
    mlflow.set_terminated(parent, "FINISHED")
