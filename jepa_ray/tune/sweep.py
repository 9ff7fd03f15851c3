"""`jepa-ray tune`: a Ray Tune sweep whose trials are distributed `pretrain` runs.

    Tuner(trial)                       one Tune trial per point of the search space
      trial(params)                    the Train V2 pattern: a function trainable that
        TorchTrainer(...).fit()        builds and fits a pretraining run of its own,
          workers report every         reporting through TuneReportCallback, so that
          tune.eval_every steps        ASHA sees the objective while the run trains

Layout under `train.storage_path/<sweep name>/`: Tune's experiment state (what `--resume` reads),
`trials/<trial id>/` (each trial's pretraining run: checkpoints, metrics), and the outputs written
at the end: `results.csv`, `results.md`, `best.yaml`, `heatmap.png`, `sweep.json`.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from jepa_ray.config import VAL_LOSS_CONFOUNDED, VAL_LOSS_KINDS, Config
from jepa_ray.errors import ConfigError
from jepa_ray.tune.results import SweepInfo
from jepa_ray.tune.space import check_space, predictor_sweep_warning, trial_config, trials_planned, tune_space

log = logging.getLogger("jepa_ray.tune")

TRIALS_DIR = "trials"
DRIVER_CPU = 0.01  # each trial's own actor only drives its TorchTrainer (Tune needs a non-empty request)
_STATE_GLOB = "experiment_state-"


def _objective_settings(cfg: Config) -> dict[str, Any]:
    """What every trial measures: the objective, its label, how many validation batches, the
    reference masks of the label-free objectives and, with tune.measure_all, which of those to
    measure beside it. The validation split (every objective's data), the label and whether the
    objective can be measured for this config are checked now, before any trial."""
    from jepa_ray.stream.pipeline import open_split
    from jepa_ray.tune.objective import LABEL_FREE, pick_label

    tc = cfg.tune
    if cfg.train.shards is None:
        raise ConfigError(
            "train.shards: no shards given (a directory or s3:// URL written by `jepa-ray prepare`)"
        )
    split = open_split(cfg.train.shards, "val", cfg.train.storage)  # ShardError when there is none
    label = None
    if tc.objective not in LABEL_FREE:
        label = pick_label(_val_metas(cfg, split.manifest["splits"]["val"]["shards"]), tc.objective, tc.label)
    check_objective(cfg, tc.objective, split.samples, ranks=True)
    candidates = []
    for name in LABEL_FREE if tc.measure_all else ():
        try:
            check_objective(cfg, name, split.samples, ranks=False)
            candidates.append(name)
        except ConfigError as e:
            log.warning("tune.measure_all: %s is left out: %s", name, e)
    return {
        "kind": tc.objective,
        "label": label,
        "batches": tc.eval_batches,
        "mask": cfg.pipeline.mask.model_dump(mode="json"),
        "candidates": candidates,
    }


def check_objective(cfg: Config, objective: str, val_samples: int, ranks: bool = True) -> None:
    """ConfigError, naming the key to change, when `objective` cannot be measured for this sweep:
    LiDAR with too few validation samples on the first worker, an objective that runs the context
    encoder or predictor on one worker while ZeRO-3 shards them, a loss compared across settings
    that change what it measures (VAL_LOSS_KINDS; VAL_LOSS_CONFOUNDED too when the objective
    `ranks` the trials, not only measured beside the one that does)."""
    from jepa_ray.tune.labelfree import MIN_CLASSES
    from jepa_ray.tune.objective import STUDENT

    tc = cfg.tune
    if objective in ("lidar", "lidar_context"):
        have = min(tc.eval_batches * cfg.pipeline.batch_size, val_samples // cfg.train.max_workers)
        if have < MIN_CLASSES:
            raise ConfigError(
                f"tune.objective={objective}: LiDAR needs at least {MIN_CLASSES} validation samples on the "
                f"first worker, it would see {have} (tune.eval_batches={tc.eval_batches} x "
                f"pipeline.batch_size={cfg.pipeline.batch_size}, {val_samples} in the split over "
                f"{cfg.train.max_workers} worker(s)): raise tune.eval_batches or the validation split"
            )
    if objective in STUDENT and cfg.train.zero_stage == 3:
        raise ConfigError(
            f"tune.objective={objective} runs the context encoder on the first worker alone, which "
            "train.zero_stage=3 shards across workers: use train.zero_stage 1 or 2, or objective lidar or rankme"
        )
    refused = VAL_LOSS_KINDS | (VAL_LOSS_CONFOUNDED if ranks else {})
    varied = [k for k in refused if k in tc.space] if objective == "val_loss" else []
    if varied:
        raise ConfigError(
            f"tune.objective=val_loss: the sweep varies {varied[0]}, and {refused[varied[0]]}: "
            "use objective lidar_context, lidar or rankme"
        )


def _val_metas(cfg: Config, names: list[str]) -> list[dict[str, Any]]:
    """Metadata of every validation sample (labels, outcomes), read from its shards."""
    from jepa_ray.storage import Store
    from jepa_ray.stream.local import read_samples

    store = Store(cfg.train.shards, cfg.train.storage)
    metas = []
    for name in names:
        with store.open(name) as f:
            metas += [json.loads(s["meta"]) for s in read_samples(f, fields=("meta",)).values()]
    return metas


def concurrency(cfg: Config) -> int:
    """Trials at once: `tune.max_concurrent_trials`, else what the cluster holds with one whole CPU
    left for the data pipelines (Ray Data's tasks take one each), and one GPU per worker when
    trials use GPUs."""
    import ray

    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    have = ray.cluster_resources()
    tc = cfg.train
    n = int(max(have.get("CPU", 0.0) - 1, 0) // (tc.max_workers * tc.cpus_per_worker + DRIVER_CPU))
    if tc.use_gpu:
        n = min(n, int(have.get("GPU", 0.0) // tc.max_workers))
    return max(n, 1)


def search_algorithm(cfg: Config, at_once: int):
    """grid/random: Tune's variant generator; optuna: Optuna's TPE sampler (seeded), both limited
    to `at_once` running trials."""
    if cfg.tune.searcher == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=cfg.tune.seed), max_concurrent=at_once)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Tune ignores TuneConfig.max_concurrent_trials for a generator: it takes its own limit
    return BasicVariantGenerator(random_state=cfg.tune.seed, max_concurrent=at_once)


def run_trial(
    params: dict[str, Any], base: dict[str, Any], objective: dict[str, Any], verbose: bool = False
) -> None:
    """One trial (runs in a Tune trial actor): its config, then a pretraining run named after the
    trial, so that a resumed sweep resumes the same run from its last checkpoint. `verbose`: its
    Ray Data bars and Ray Train's per-report lines on the console (`build_trainer`)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from jepa_ray.train.trainer import build_trainer
    from jepa_ray.tune.hooks import ObjectiveHooks

    cfg = trial_config(base, params)
    trial_id = tune.get_context().get_trial_id()
    trainer = build_trainer(
        cfg,
        name=trial_id,
        hooks=ObjectiveHooks(objective),
        callbacks=[TuneReportCallback()],
        free_check=False,
        verbose=verbose,
    )
    trainer.fit()


def sweep_name(cfg: Config, name: str | None = None) -> str:
    """A sweep's name: `name`, else tune.name, else one made from the time (tune-YYYYmmdd-HHMMSS)."""
    from jepa_ray.train.trainer import plain_name

    return plain_name(name or cfg.tune.name, "tune.name", "tune")


def sweep(cfg: Config, *, name: str | None = None, resume: bool = False, verbose: bool = False) -> SweepInfo:
    """Run (or, with `resume`, continue) a sweep; write its results table, best.yaml and heat map.
    `verbose`: each trial's Ray Data bars and Ray Train's per-report lines on the console too."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from jepa_ray.train.trainer import FREE_WAIT_S, check_resources, run_url, storage_target

    check_space(cfg)
    if warning := predictor_sweep_warning(cfg):
        log.warning(warning)
    name = sweep_name(cfg, name)
    check_resources(cfg, beside=("each trial's actor", DRIVER_CPU), free_wait_s=FREE_WAIT_S)
    url = run_url(cfg, name)
    objective = _objective_settings(cfg)
    base = cfg.model_dump(mode="json")
    base["train"]["storage_path"] = f"{url}/{TRIALS_DIR}"
    base["train"]["log_every"] = cfg.tune.eval_every  # every report carries the objective
    base["train"]["name"] = None
    if cfg.train.tracker != "none" and not cfg.train.tracker_parent:  # trials: its child runs / group
        from jepa_ray.train.tracking import sweep_parent

        base["train"]["tracker_parent"] = sweep_parent(cfg, name, url)

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, objective=objective, verbose=verbose),
        {"CPU": DRIVER_CPU},  # the Train workers reserve their own resources
    )
    storage_path, filesystem = storage_target(url.rsplit("/", 1)[0], cfg.train.storage)
    exists = _exists(url, cfg)
    if resume:
        if not exists:
            raise ConfigError(f"--resume: no sweep at {url} (its experiment state is missing)")
        tuner = tune.Tuner.restore(
            url if filesystem is None else storage_path + "/" + name,
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=filesystem,
        )
    else:
        if exists:
            raise ConfigError(
                f"a sweep named {name!r} already exists at {url}: pass --resume, or another name"
            )
        tc = cfg.tune
        scheduler = (
            ASHAScheduler(
                time_attr="step",
                max_t=cfg.train.steps,
                grace_period=tc.asha.grace_period,
                reduction_factor=tc.asha.reduction_factor,
            )
            if tc.asha.enabled
            else FIFOScheduler()
        )
        tuner = tune.Tuner(
            trainable,
            param_space=tune_space(cfg),
            tune_config=tune.TuneConfig(
                metric="objective",
                mode="max",
                num_samples=tc.num_samples,
                scheduler=scheduler,
                search_alg=search_algorithm(cfg, concurrency(cfg)),
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage_path,
                storage_filesystem=filesystem,
                failure_config=tune.FailureConfig(max_failures=tc.max_failures),
                verbose=1,
            ),
        )
    log.info(
        "sweep %s: %d trials, objective %s%s, at most %d at once -> %s",
        name,
        trials_planned(cfg),
        objective["kind"],
        f" ({objective['label']})" if objective["label"] else "",
        concurrency(cfg),
        url,
    )
    grid = tuner.fit()
    from jepa_ray.tune.results import write_outputs

    info = write_outputs(cfg, name, url, grid, objective)
    parent = base["train"].get("tracker_parent")
    if cfg.train.tracker != "none" and parent:
        from jepa_ray.storage import Store
        from jepa_ray.train.tracking import finish_sweep

        store = Store(url, cfg.train.storage)
        with tempfile.TemporaryDirectory(prefix="jepa-sweep-") as staging:  # the tables, local or on S3
            tables = []
            for table in ("results.csv", "results.md", "heatmap.png"):
                if store.exists(table):
                    tables.append(Path(staging) / table)
                    tables[-1].write_bytes(store.read_bytes(table))
            finish_sweep(cfg, parent, url, f"{url}/{TRIALS_DIR}", info.rows, tables)
    return info


def _exists(url: str, cfg: Config) -> bool:
    from jepa_ray.storage import Store

    store = Store(url, cfg.train.storage)
    try:
        return any(n.startswith(_STATE_GLOB) for n in store.list())
    except (FileNotFoundError, OSError):
        return False
