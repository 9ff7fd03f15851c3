"""`pretrain`: a Ray Train `TorchTrainer` over the shards, running `train_loop_per_worker`.

Everything that can be wrong with a config is checked here, on the driver, before any worker
starts: shards present with train (and val) splits, enough CPUs/GPUs in the cluster for the
workers plus the data pipeline, a run name that is a plain name.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jepa_ray.config import Config
from jepa_ray.console import train_log_level
from jepa_ray.errors import ConfigError

if TYPE_CHECKING:
    from jepa_ray.train.hooks import Hooks

log = logging.getLogger("jepa_ray.train")

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass
class RunInfo:
    """Where a run lives and how it ended."""

    name: str
    run_url: str
    checkpoint: str | None
    metrics: dict[str, Any]


def run_url(cfg: Config, name: str) -> str:
    base = cfg.train.storage_path
    if "://" not in base:
        base = str(Path(base).expanduser().resolve())
    return base.rstrip("/") + "/" + name


def plain_name(name: str | None, setting: str, prefix: str) -> str:
    """`name`, else one made from the time (<prefix>-YYYYmmdd-HHMMSS); ConfigError naming the
    `setting` it came from unless it is a plain name (it names a directory)."""
    name = name or time.strftime(f"{prefix}-%Y%m%d-%H%M%S")
    if not RUN_NAME.match(name):
        raise ConfigError(f"{setting} {name!r}: use letters, digits, '.', '_' and '-' only")
    return name


def run_name(cfg: Config, name: str | None = None) -> str:
    """A run's name: `name`, else train.name, else one made from the time (jepa-YYYYmmdd-HHMMSS)."""
    return plain_name(name or cfg.train.name, "train.name", "jepa")


FREE_WAIT_S = 30.0  # how long a run waits for CPUs that something else holds before refusing


def check_resources(
    cfg: Config, beside: tuple[str, float] | None = None, free_wait_s: float | None = None
) -> None:
    """ConfigError when the connected Ray cluster cannot hold the workers and the data pipeline
    (Ray Data's read tasks take one whole CPU each). `beside`: (what, CPUs) reserved next to the
    workers, e.g. a Tune trial's own actor. With `free_wait_s` (the entry points: a run or a sweep
    about to start), also that many CPUs must be *free*, waiting up to that long for them: CPUs held
    by another run, or by a placement group that a stopped run never released, would otherwise
    leave the workers scheduled and their data task waiting forever."""
    import ray

    tc = cfg.train
    have = ray.cluster_resources()
    cpus, gpus = have.get("CPU", 0.0), have.get("GPU", 0.0)
    need = tc.min_workers * tc.cpus_per_worker + (beside[1] if beside else 0.0)
    what = f"train.num_workers={tc.min_workers} x train.cpus_per_worker={tc.cpus_per_worker}"
    if beside:
        what += f" + {beside[1]:g} for {beside[0]}"
    if need > cpus:
        raise ConfigError(f"{what} needs {need:g} CPUs; the Ray cluster has {cpus:g}")
    if cfg.train.shards is not None and need + 1 > cpus:
        raise ConfigError(
            f"{what} takes {need:g} of the Ray cluster's {cpus:g} CPUs and leaves less than the one "
            "whole CPU a data pipeline task needs, so training would wait for data forever: lower "
            "train.cpus_per_worker (fractions are fine) or add CPUs"
        )
    for resource, amount in tc.worker_resources.items():
        if tc.min_workers * amount > have.get(resource, 0.0):
            raise ConfigError(
                f"train.worker_resources: {tc.min_workers} workers x {amount:g} {resource!r} needs "
                f"{tc.min_workers * amount:g}; the Ray cluster has {have.get(resource, 0.0):g}"
            )
    if tc.use_gpu and tc.min_workers > gpus:
        raise ConfigError(
            f"train.num_workers={tc.min_workers} with use_gpu needs as many GPUs; the cluster has {gpus:g}"
        )
    if free_wait_s is not None and cfg.train.shards is not None:
        _wait_for_free_cpus(need + 1, what, free_wait_s)


def _wait_for_free_cpus(need: float, what: str, wait_s: float) -> None:
    import ray

    deadline = time.monotonic() + wait_s
    while True:
        free = ray.available_resources().get("CPU", 0.0)
        if free >= need - 1e-6:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    try:
        groups = [
            g for g in ray.util.placement_group_table().values() if g.get("state") not in ("REMOVED", None)
        ]
    except Exception:  # the table is a diagnostic only
        groups = []
    held = f"; {len(groups)} placement group(s) hold resources" if groups else ""
    raise ConfigError(
        f"{what} and a data task need {need:g} free CPUs, but only {free:g} of the Ray cluster's "
        f"{ray.cluster_resources().get('CPU', 0.0):g} have been free for {wait_s:g} s{held}: another "
        "run is using them, or a stopped one left its placement group behind (`ray status`, "
        "`ray list placement-groups`). Wait for it, stop it, or restart the local Ray (`ray stop`)"
    )


def _preflight(cfg: Config, dims: dict) -> None:
    """What would fail in every worker after the start, said here, before any actor exists: an
    experiment tracker without a server or client; a model.init_from checkpoint that does not fit
    (the error names the key)."""
    from jepa_ray.train.tracking import check

    check(cfg)
    if cfg.model.init_from:
        from jepa_ray.model.interop import init_from
        from jepa_ray.model.jepa import JEPA

        init_from(
            JEPA(dims, cfg.model),
            cfg.model.init_from,
            cfg.pipeline.normalize,
            cfg.train.storage,
            cfg.model.init_normalize,
        )


def _feed(cfg: Config, url: str, ledger: Any = None, verbose: bool = False) -> tuple[Any, dict, bool]:
    """The run's `Feed` actor over the train (and val, when present) split, the model input dims,
    and whether the run at `url` resumes (its checkpoints checked to fit the model first). Both
    splits count their skipped samples in `ledger` (a new `SkipLedger` actor when None). The
    feed's Ray Data execution may use the CPUs the largest worker group leaves."""
    import ray

    from jepa_ray.errors import ShardError
    from jepa_ray.stream.feed import new_feed
    from jepa_ray.stream.pipeline import new_ledger, open_split

    tc = cfg.train
    train = open_split(tc.shards, "train", tc.storage)
    val = None
    if tc.val_batches:
        try:
            val = open_split(tc.shards, "val", tc.storage)
        except ShardError as e:
            log.warning("no validation split (%s): validation metrics are off", e)
    if train.samples < cfg.pipeline.batch_size * tc.max_workers:
        raise ConfigError(
            f"{tc.shards}: {train.samples} training samples over {tc.max_workers} workers is less than one "
            f"batch of pipeline.batch_size={cfg.pipeline.batch_size} per worker"
        )
    dims = train.spec.model_dims(cfg.pipeline)
    _preflight(cfg, dims)
    resumes = _has_checkpoints(url, tc.storage)
    if resumes:
        _check_resume(url, cfg, dims)
    ledger = ledger if ledger is not None else new_ledger(cfg.pipeline.max_bad_samples)
    # the CPUs the largest group leaves: an elastic run's data must never hold the CPUs its group
    # needs to start at full size or to grow back (its placement group would wait for the data's
    # tasks, past Ray Train's start timeout)
    cpus = max(ray.cluster_resources().get("CPU", 1.0) - tc.max_workers * tc.cpus_per_worker, 1.0)
    feed = new_feed(train, val, cfg.pipeline, ledger, cpus, verbose, tc.max_workers)
    return feed, dims, resumes


def _has_checkpoints(url: str, storage) -> bool:
    """Whether the run at `url` has a checkpoint (it resumes from one); True when that cannot be
    read, so that nothing is primed for a cursor that may not be the run's."""
    from jepa_ray.storage import Store

    store = Store(url, storage)
    try:
        return bool(store.fs.glob(store.path("checkpoint_*")))
    except (FileNotFoundError, OSError):
        return True


def _check_resume(url: str, cfg: Config, dims: dict) -> None:
    """ConfigError, before any worker starts, when the run at `url` resumes from a checkpoint whose
    model has other weights (names or shapes) than this config's: it names the model settings and
    the data's dimensions that differ (the values the checkpoint was trained with, then this
    config's). Without it the workers fail on DeepSpeed's missing-key error, naming no setting. A
    checkpoint that predates a setting was trained with its former value (`model.io`)."""
    import json

    from jepa_ray.storage import Store
    from jepa_ray.train.engine import STATE_FILE

    store = Store(url, cfg.train.storage)
    try:
        found = sorted(store.fs.glob(store.path(f"checkpoint_*/{STATE_FILE}")))
        state = json.loads(store.fs.cat(found[-1])) if found else None
    except (FileNotFoundError, OSError, ValueError):
        return  # unreadable here: the workers' restore names what is wrong with it
    if not state or "dims" not in state or "model" not in state.get("config", {}):
        return
    from jepa_ray.model.io import export_model_config
    from jepa_ray.model.tokenizers import InputDims

    dims = json.loads(json.dumps(dims))  # as the checkpoint recorded them (lists, not tuples)
    was, now = export_model_config(state["config"]["model"]), cfg.model
    shapes = _weight_shapes(dims, now)
    if _weight_shapes(state["dims"], was) == shapes:
        return
    differ = [k for k in type(now).model_fields if getattr(was, k) != getattr(now, k)]
    # the settings that change the weights on their own (not the loss or a schedule changed beside
    # them); all that differ when none does alone
    shaping = [
        k for k in differ if _weight_shapes(dims, now.model_copy(update={k: getattr(was, k)})) != shapes
    ]
    settings = [f"model.{k}={getattr(was, k)!r} (now {getattr(now, k)!r})" for k in shaping or differ]
    sizes = [
        f"{k} {state['dims'].get(k)!r} (now {dims.get(k)!r})"
        for k in InputDims.__dataclass_fields__  # not what follows from them (ehr_tokens)
        if state["dims"].get(k) != dims.get(k)
    ]
    raise ConfigError(
        f"{url}: this run's checkpoints hold a model of other weights than this config builds; "
        f"it was trained with "
        + "; ".join(settings + [f"the data's {s}" for s in sizes])
        + ". Resume it with the settings it was trained with, or start a new run under another name"
    )


def _weight_shapes(dims: dict, model) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every weight of the JEPA `dims` and `model` build (on the meta device: no
    memory, no initialisation)."""
    import torch

    from jepa_ray.model.jepa import JEPA

    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return {k: tuple(v.shape) for k, v in JEPA(dims, model).state_dict().items()}


def _prime(feed: Any, cfg: Config) -> None:
    """Start a new run's data stream at its beginning while the worker group starts (`Feed.prime`):
    the group's start (processes, imports, the process group) and the stream's (the execution, its
    tasks' processes, the first shards read and decoded) overlap instead of adding up."""
    from jepa_ray.stream.feed import lookahead_rows

    tc, pc = cfg.train, cfg.pipeline
    world = tc.max_workers
    rows = tc.rows(tc.steps, pc.batch_size, world)
    feed.prime.remote((0, 0, 0), rows, lookahead_rows(pc, world))


def storage_target(base: str, storage) -> tuple[str, Any]:
    """(path, pyarrow filesystem or None) for Ray's storage_path/storage_filesystem: a local
    directory as is, an s3:// URL as bucket/prefix on a filesystem built from `storage`."""
    if "://" not in base:
        return base, None
    from jepa_ray.storage import pyarrow_filesystem

    return base.split("://", 1)[1], pyarrow_filesystem(base, storage)


def build_trainer(
    cfg: Config,
    *,
    name: str | None = None,
    hooks: Hooks | None = None,
    callbacks: list | None = None,
    free_check: bool = True,
    verbose: bool = False,
    ledger: Any = None,
):
    """The TorchTrainer of a run (not started); `free_check=False` inside a sweep's trial, whose
    neighbours legitimately hold the CPUs the sweep was checked for. `hooks` go to every worker's
    loop (the objective a sweep measures; tests' fixed batches); `callbacks` into its RunConfig (a
    sweep's TuneReportCallback, a progress display's ForwardReports). `verbose`: Ray Data's
    progress bars and Ray Train's per-report lines on the console too (`jepa_ray.console`); off,
    they are in Ray's log files only. `ledger`: the `SkipLedger` actor the datasets count skipped
    samples in; a new one, owned by this process, when None. The run's data `Feed` actor is owned
    by this process too (the loop config's "feed"): it outlives worker groups, so a restarted group
    goes on with the same data sequence."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from jepa_ray.train.loop import train_loop_per_worker

    tc = cfg.train
    name = run_name(cfg, name)
    check_resources(cfg, free_wait_s=FREE_WAIT_S if free_check else None)
    if hooks is not None and hooks.batches is not None:
        if hooks.dims is None:
            raise ValueError("hooks that replace the shards' batches must give the model input dims")
        _preflight(cfg, hooks.dims)
        feed, dims = None, hooks.dims
        _check_resume(run_url(cfg, name), cfg, dims)
    else:
        if tc.shards is None:
            raise ConfigError(
                "train.shards: no shards given (a directory or s3:// URL written by `jepa-ray prepare`)"
            )
        feed, dims, resumes = _feed(cfg, run_url(cfg, name), ledger, verbose)
        if not resumes:
            _prime(feed, cfg)
    loop_config = {
        "config": cfg.model_dump(mode="json"),
        "dims": dims,
        "run_url": run_url(cfg, name),
        "feed": feed,
        "hooks": hooks,
        "verbose": verbose,
    }
    storage_path, storage_filesystem = storage_target(run_url(cfg, name).rsplit("/", 1)[0], tc.storage)
    resources = {"CPU": tc.cpus_per_worker, **tc.worker_resources}
    if tc.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=tuple(tc.num_workers) if tc.elastic else tc.num_workers,
            use_gpu=tc.use_gpu,
            resources_per_worker=resources,
            **({"elastic_resize_monitor_interval_s": tc.resize_check_s} if tc.elastic else {}),
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.keep_checkpoints),
            callbacks=callbacks,
            logging_config=ray.train.LoggingConfig(log_level=train_log_level(verbose)),
        ),
    )


def pretrain(
    cfg: Config,
    *,
    name: str | None = None,
    hooks: Hooks | None = None,
    callbacks: list | None = None,
    verbose: bool = False,
) -> RunInfo:
    """Run (or resume, when `name` already has checkpoints under storage_path) a pretraining run;
    `callbacks` and `verbose` as in `build_trainer` (a progress display: `jepa_ray.console`).
    The run's skip ledger is stopped when it ends: an actor lives as long as the process that made
    it, and a process may run many (a notebook, a benchmark)."""
    import ray

    from jepa_ray.stream.pipeline import new_ledger

    ledger, feed = new_ledger(cfg.pipeline.max_bad_samples), None
    try:
        trainer = build_trainer(
            cfg, name=name, hooks=hooks, callbacks=callbacks, verbose=verbose, ledger=ledger
        )
        feed = trainer.train_loop_config["feed"]
        result = trainer.fit()
    finally:
        for actor in (ledger, feed):
            if actor is not None:
                ray.kill(actor)
    ckpt = result.checkpoint
    return RunInfo(
        name=trainer.run_config.name,
        run_url=run_url(cfg, trainer.run_config.name),
        checkpoint=ckpt.path if ckpt is not None else None,
        metrics=dict(result.metrics or {}),
    )
