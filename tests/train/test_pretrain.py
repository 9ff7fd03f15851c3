"""Distributed pretraining on the shared local Ray: 2 CPU workers, DeepSpeed ZeRO 0-3, tiny model.

Each run is a few optimizer steps; what is checked is what a user relies on: the loss falls, the
checkpoint and metrics exist, the EMA target is the same under every stage, a killed worker or a
rerun resumes exactly, an export reproduces the trained encoder, bad configs fail before workers.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from loophooks import FixedBatches, KillWorker
from shardkit import raw_batch, raw_samples
from test_checkpoints import Payload

from jepa_ray.config import load_config
from jepa_ray.errors import ConfigError
from jepa_ray.stream.pipeline import collate, open_split
from jepa_ray.stream.transform import transform_batch
from jepa_ray.train.engine import STATE_FILE, TARGET_FILE, read_target
from jepa_ray.train.trainer import build_trainer, pretrain

SMALL = [
    "pipeline.image_size=32",
    "pipeline.patch_size=8",
    "pipeline.max_events=12",
    "pipeline.batch_size=4",
    "train.cpus_per_worker=0.5",  # two workers on a 2-CPU Ray, one CPU left for the data pipeline
    "train.lr=0.002",
    "train.warmup_steps=2",
    "train.log_every=2",
    "train.checkpoint_every=3",
    "train.val_batches=1",
]


# what every report of a run over the shards carries (with validation on)
REPORTED = {
    "loss",
    "loss_image_intra",
    "lr",
    "momentum",
    "samples_per_s",
    "data_wait",
    "val_loss",
    "val_rankme",
}


def _cfg(shards, tmp_path, *overrides: str):
    return load_config(
        overrides=[f"train.shards={shards}", f"train.storage_path={tmp_path / 'runs'}", *SMALL, *overrides]
    )


def _rows(run_url: str) -> list[dict]:
    with (Path(run_url) / "metrics" / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def _checkpoints(run_url: str) -> list[Path]:
    return sorted(p for p in Path(run_url).glob("checkpoint_*") if (p / STATE_FILE).exists())


@pytest.fixture(scope="module")
def fixed(small_shards):
    """Two ranks' worth of fixed batches (4 each), carrying the model input dims."""
    split = open_split(str(small_shards), "train")
    cfg = _cfg(small_shards, Path("/unused")).pipeline
    samples = {}
    for p in split.paths:
        samples.update(raw_samples(p))
    keys = sorted(samples)
    per_rank = []
    for rank in range(2):
        batches = []
        for i in range(4):
            chosen = keys[(rank * 4 + i) * 4 : (rank * 4 + i) * 4 + 4]
            raw = raw_batch({k: samples[k] for k in chosen})
            batches.append(collate(transform_batch(raw, split.spec, cfg, train=True, epoch=i)))
        per_rank.append(batches)
    return FixedBatches(per_rank, split.spec.model_dims(cfg))


def test_a_zero3_run_interrupted_on_two_workers_and_resumed_on_one_trains_as_if_never_resized(
    small_shards, tmp_path, ray_session
):
    """A ZeRO-2 run over the shards on 2 workers throughout, with a fixed global batch of 8 (it
    trains, checkpoints, reports, and its skip ledger stops with it); a ZeRO-3 run of the same
    config killed after its step-3 checkpoint on 2 workers and resumed on 1 (its partitions
    converted to DeepSpeed's universal checkpoint, accumulation 1 -> 2). The stages partition the
    same arithmetic, and the data sequence, the samples of every step and their SIGReg directions are
    the same, so the resized run must end with the fixed run's student, EMA target and data cursor.
    ZeRO-3's universal load restores the weights exactly (the first loss after it is the fixed
    run's) but its Adam state not quite: a step later the weights are within 3e-4 (the step moved
    them 2e-3). (ZeRO-0 and ZeRO-3 also run in the EMA test below, ZeRO-1 in the S3 resume test;
    ZeRO-2 changes size, a worker's node lost and one joining, within one run in
    test_multinode.py: every stage trains, checkpoints and reports.)"""
    import ray.train

    from jepa_ray.train.export import student_state_dict

    common = ("train.steps=5", "train.global_batch=8", "train.max_failures=0")
    ledgers = _live_ledgers()
    fixed = pretrain(_cfg(small_shards, tmp_path, "train.zero_stage=2", *common), name="fixed")
    assert fixed.metrics["step"] == 5 and set(fixed.metrics) >= REPORTED
    rows = _rows(fixed.run_url)
    assert [int(r["step"]) for r in rows] == [2, 3, 4, 5]  # log_every 2, checkpoint_every 3, the end
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    ckpts = _checkpoints(fixed.run_url)
    states = [json.loads((c / STATE_FILE).read_text()) for c in ckpts]
    state = states[-1]
    assert [s["step"] for s in states] == [3, 5]
    assert state["zero_stage"] == 2 and state["world_size"] == 2
    assert state["samples"] == 40 and state["cursor"] == _cursor_after(small_shards, 40)
    assert (ckpts[-1] / TARGET_FILE).exists() and any((ckpts[-1] / "engine").iterdir())
    assert (Path(fixed.run_url) / "metrics" / "loss.png").stat().st_size > 1000
    assert any((Path(fixed.run_url) / "metrics" / "tensorboard").iterdir())
    assert _live_ledgers(at_most=ledgers) <= ledgers  # the run's skip ledger stops with it
    reference = student_state_dict(ckpts[-1]), read_target(ckpts[-1])
    moved = max(float((reference[0]["context." + n] - t).abs().max()) for n, t in reference[1].items())
    assert moved > 1e-3  # the runs trained: what matches below is not the initial weights
    fixed_losses = {int(r["step"]): float(r["loss"]) for r in rows}

    run = ("train.zero_stage=3", *common)
    with pytest.raises(ray.train.TrainingFailedError):
        pretrain(_cfg(small_shards, tmp_path, *run), name="resized", hooks=KillWorker(4))
    assert _live_ledgers(at_most=ledgers) <= ledgers  # and with a run that failed
    first = _checkpoints(str(tmp_path / "runs" / "resized"))
    assert [json.loads((c / STATE_FILE).read_text())["world_size"] for c in first] == [2]
    info = pretrain(_cfg(small_shards, tmp_path, *run, "train.num_workers=1"), name="resized")
    assert info.metrics["step"] == 5 and np.isfinite(info.metrics["loss"])
    end = _checkpoints(info.run_url)[-1]
    state = json.loads((end / STATE_FILE).read_text())
    assert state["world_size"] == 1 and state["resumed_from"]["step"] == 3 and state["zero_stage"] == 3
    assert state["samples"] == 5 * 8 and state["cursor"] == _cursor_after(small_shards, 40)

    student, target = student_state_dict(end), read_target(end)
    for name, w in reference[0].items():
        torch.testing.assert_close(student[name], w, rtol=1e-4, atol=3e-4, msg=name)
    for name, t in reference[1].items():
        torch.testing.assert_close(target[name], t, rtol=1e-4, atol=3e-4, msg=name)
    # the same loss curve where both logged: step 4 (the first after the resume: the restored
    # weights) exactly, step 5 to the tolerance of the restored Adam state
    losses = {int(r["step"]): float(r["loss"]) for r in _rows(info.run_url)}
    assert losses[4] == pytest.approx(fixed_losses[4], rel=1e-5)
    assert losses[5] == pytest.approx(fixed_losses[5], rel=2e-3)


def _cursor_after(shards, rows: int) -> list[int]:
    """(epoch, unit, row) of the training sequence after its first `rows` (> 0) samples, none
    damaged: as a checkpoint records it, just after its last sample (row = the unit's size when
    that sample ends its unit)."""
    from jepa_ray.stream.feed import Order

    split = open_split(str(shards), "train")
    order = Order(split, seed=0, shuffle_buffer=0, train=True)
    counts = dict(zip(order.names, order.counts, strict=True))
    epoch = 0
    while True:
        for unit, names in enumerate(order.units(epoch)):
            size = sum(counts[n] for n in names)
            if rows <= size:
                return [epoch, unit, rows]
            rows -= size
        epoch += 1


def _live_ledgers(at_most: int | None = None, wait_s: float = 10.0) -> int:
    """SkipLedger actors alive in the cluster; with `at_most`, waits up to `wait_s` for the count
    to fall to it (a killed actor's state is updated asynchronously)."""
    from ray.util.state import list_actors

    deadline = time.monotonic() + wait_s
    while True:
        alive = list_actors(
            filters=[("class_name", "=", "SkipLedger"), ("state", "=", "ALIVE")],
            raise_on_missing_output=False,
        )
        if at_most is None or len(alive) <= at_most or time.monotonic() > deadline:
            return len(alive)
        time.sleep(0.5)


def _check_export(info, probe: Path, objective: str, steps: int, tmp_path: Path) -> None:
    """The export of a run reproduces its encoders and predictor on the batch the run saved."""
    from jepa_ray.model.io import load_jepa
    from jepa_ray.train.export import export

    weights, meta = export(info.run_url, tmp_path / f"encoder-{objective}")
    assert weights.suffix == ".safetensors" and json.loads(meta.read_text())["step"] == steps
    assert json.loads(meta.read_text())["init_seed"] == 0  # pipeline.seed: evaluate's random init
    model = load_jepa(weights)
    saved = torch.load(probe, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(model.context(saved["batch"])["tokens"], saved["context"])
        torch.testing.assert_close(model.target(saved["batch"])["tokens"], saved["target"])
        # the predictor came along too: the same loss on the same batch
        assert float(model(saved["batch"])["loss"]) == pytest.approx(saved["loss"], rel=1e-5)
    assert model.reconstructs == (objective == "mae")
    if objective == "mae":  # no EMA: the target encoder an MAE exports is its context encoder
        for t, c in zip(model.target.parameters(), model.context.parameters(), strict=True):
            torch.testing.assert_close(t, c)
    momentum = float(_rows(info.run_url)[-1]["momentum"])
    assert momentum == 0.0 if objective == "mae" else momentum > 0.9


def test_ema_target_is_the_same_under_zero3_as_under_zero0_and_exports(
    fixed, small_shards, tmp_path, ray_session
):
    """The same fixed batches under ZeRO-0 and ZeRO-3: the same EMA target; the ZeRO-3 run's
    export (gathered from the partitions) reproduces what it trained."""
    from jepa_ray.train.export import student_state_dict

    targets, contexts = {}, {}
    probe = tmp_path / "probe.pt"
    for stage in (0, 3):
        cfg = _cfg(
            small_shards, tmp_path, f"train.zero_stage={stage}", "train.steps=4", "model.ema=[0.9,0.95]"
        )
        hooks = fixed.with_probe(str(probe)) if stage == 3 else fixed
        info = pretrain(cfg, name=f"ema{stage}", hooks=hooks)
        assert info.metrics["step"] == 4 and np.isfinite(info.metrics["loss"])
        assert {"lr", "momentum", "samples_per_s", "data_wait", "val_loss"} <= set(info.metrics)
        assert [int(r["step"]) for r in _rows(info.run_url)] == [2, 3, 4]  # log_every 2, checkpoint_every 3
        stages = [json.loads((c / STATE_FILE).read_text())["zero_stage"] for c in _checkpoints(info.run_url)]
        assert stages == [stage, stage]  # steps 3 and 4
        ckpt = _checkpoints(info.run_url)[-1]
        targets[stage] = read_target(ckpt)
        contexts[stage] = {k: v for k, v in student_state_dict(ckpt).items() if k.startswith("context.")}
    moved = 0.0
    for name, t0 in targets[0].items():
        torch.testing.assert_close(targets[3][name], t0, rtol=1e-4, atol=1e-5)
        moved = max(moved, float((contexts[0]["context." + name] - t0).abs().max()))
    assert moved > 0  # the target is not trivially equal to the context (the EMA really lags)
    _check_export(info, probe, "jepa", 4, tmp_path)


def test_export_reproduces_the_trained_mae(fixed, small_shards, tmp_path, ray_session):
    probe = tmp_path / "probe.pt"
    cfg = _cfg(small_shards, tmp_path, "train.zero_stage=3", "train.steps=3", "model.objective=mae")
    info = pretrain(cfg, name="export3", hooks=fixed.with_probe(str(probe)))
    _check_export(info, probe, "mae", 3, tmp_path)

    # someone with write access to run storage swaps a ZeRO shard for a crafted pickle (and, to get
    # past the digests, rewrites them): export refuses it, naming it, and runs nothing
    import shutil

    from jepa_ray.errors import CheckpointError
    from jepa_ray.train.checkpoints import DIGEST_PREFIX
    from jepa_ray.train.export import export

    ckpt = _checkpoints(info.run_url)[-1]
    marker = tmp_path / "pwned"
    for rewrite_digests in (True, False):
        bad = tmp_path / f"tampered-{rewrite_digests}"
        shutil.copytree(ckpt, bad)
        shard = bad / "engine" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
        content = torch.load(shard, weights_only=False)
        torch.save({**content, "payload": Payload(marker)}, shard)
        if rewrite_digests:
            for d in bad.glob(f"{DIGEST_PREFIX}*.json"):
                d.unlink()
            from jepa_ray.train.checkpoints import write_digests

            write_digests(bad, 0)
            match = r"zero_pp_rank_0_mp_rank_00_model_states.pt|engine: cannot be loaded as tensors only"
        else:
            match = r"zero_pp_rank_0_mp_rank_00_model_states.pt: changed since it was written"
        with pytest.raises(CheckpointError, match=match):
            export(bad, tmp_path / "bad-export")
        assert not marker.exists() and not (tmp_path / "bad-export.safetensors").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.zero_stage=4"], "train.zero_stage"),
        (["train.batch=3"], "train.batch: unknown key"),
        (["train.num_workers=5"], "needs 2.5 CPUs; the Ray cluster has 2"),
        (
            ["train.cpus_per_worker=1"],
            "takes 2 of the Ray cluster.s 2 CPUs and leaves less than the one whole CPU",
        ),
        (["train.offload_params=true"], "offload_params needs zero_stage 3"),
        (["train.worker_resources={trainer: 1}"], r"2 workers x 1 'trainer' needs 2; the Ray cluster has 0"),
        (["pipeline.batch_size=64"], "less than one batch"),
        (["train.tracker=mlflow"], "train.tracker=mlflow needs a tracking server"),
    ],
)
def test_bad_configs_fail_before_any_worker_starts(overrides, message, small_shards, tmp_path, ray_session):
    with pytest.raises(ConfigError, match=message):
        build_trainer(_cfg(small_shards, tmp_path, *overrides), name="bad")
    assert not (tmp_path / "runs" / "bad").exists()


def test_cpus_held_by_something_else_are_refused_not_waited_on_forever(
    small_shards, tmp_path, ray_session, monkeypatch
):
    """A placement group a stopped run never released (here: made by hand) holds 1.5 of the 2 CPUs:
    the workers would start and their data task would wait forever, so the run is refused."""
    from ray.util.placement_group import placement_group, remove_placement_group

    import jepa_ray.train.trainer as trainer

    monkeypatch.setattr(trainer, "FREE_WAIT_S", 2.0)
    group = placement_group([{"CPU": 1.5}])
    ray_session.get(group.ready(), timeout=30)
    try:
        with pytest.raises(ConfigError, match=r"need 2 free CPUs, but only 0.5 .* 1 placement group"):
            build_trainer(_cfg(small_shards, tmp_path), name="held")
    finally:
        remove_placement_group(group)
    assert not (tmp_path / "runs" / "held").exists()
    build_trainer(_cfg(small_shards, tmp_path), name="freed")  # free again: accepted


def test_an_elastic_runs_data_leaves_the_cpus_of_its_largest_group(small_shards, tmp_path, ray_session):
    """train.num_workers=[1, 2] at 0.5 CPU a worker on 2 CPUs: the data pipeline's budget is the
    one CPU that 2 workers leave, not the 1.5 that 1 leaves; with 1.5 its tasks could hold a CPU
    the full group needs, and the group's placement group would wait past Ray Train's start
    timeout (on a three-node cluster: 15 s lost at every start, tests/train/nodeloss.py)."""
    import ray

    for workers, budget in (("[1, 2]", 1.0), ("1", 1.5)):
        cfg = _cfg(small_shards, tmp_path, f"train.num_workers={workers}", "train.global_batch=8")
        trainer = build_trainer(cfg, name=f"budget-{len(workers)}", free_check=False)
        feed = trainer.train_loop_config["feed"]
        assert ray.get(feed.__ray_call__.remote(lambda self: self.cpus)) == budget, workers
        ray.kill(feed)


def test_resuming_a_checkpoint_of_another_model_is_refused_naming_what_differs(
    small_shards, tmp_path, ray_session
):
    """A run checkpointed before model.event_values existed (its config has no such field: one
    value embedding shared by every code, no per-code table) and resumed under today's default is
    refused before any worker starts, naming the setting and the value it was trained with (else
    the workers fail on DeepSpeed's missing-key error); resumed with that value it is accepted."""
    import json

    import ray

    cfg = _cfg(small_shards, tmp_path)
    dims = open_split(str(small_shards), "train").spec.model_dims(cfg.pipeline)
    old = cfg.model_dump(mode="json")
    del old["model"]["event_values"]
    ckpt = tmp_path / "runs" / "old" / "checkpoint_2026-01-01_00-00-00.000000"
    ckpt.mkdir(parents=True)
    (ckpt / STATE_FILE).write_text(json.dumps({"step": 3, "dims": dims, "config": old}))
    with pytest.raises(
        ConfigError, match=r"runs/old: .*trained with model.event_values='shared' \(now 'per_code'\)\."
    ):
        build_trainer(cfg, name="old")
    # a setting that changes no weight (the loss) changed beside it is not named
    with pytest.raises(
        ConfigError, match=r"trained with model.event_values='shared' \(now 'per_code'\)\. Resume"
    ):
        build_trainer(_cfg(small_shards, tmp_path, "model.loss=smooth_l1"), name="old")
    # other data (more events a sample) too: named beside the setting
    with pytest.raises(
        ConfigError, match=r"'per_code'\); the data's max_events 12 \(now 16\)\. Resume it with"
    ):
        build_trainer(_cfg(small_shards, tmp_path, "pipeline.max_events=16"), name="old")
    trainer = build_trainer(_cfg(small_shards, tmp_path, "model.event_values=shared"), name="old")
    ray.kill(trainer.train_loop_config["feed"])
    # a setting that changes no weight (the loss) resumes as it is
    trainer = build_trainer(
        _cfg(small_shards, tmp_path, "model.event_values=shared", "model.loss=smooth_l1"), name="old"
    )
    ray.kill(trainer.train_loop_config["feed"])


@pytest.mark.parametrize(
    "path",
    sorted(
        p
        for d in ("jobs/configs", "jepa_ray/configs")
        for p in Path(__file__).parents[2].joinpath(d).glob("*.yaml")
    ),
)
def test_every_shipped_job_config_is_valid(path):
    cfg = load_config(path)
    assert cfg.train.zero_stage in (0, 1, 2, 3)


def test_export_names_what_is_not_a_run(tmp_path):
    from jepa_ray.train.export import export

    with pytest.raises(ConfigError, match=f"{tmp_path}: no checkpoint in this run directory"):
        export(tmp_path, tmp_path / "encoder.safetensors")
    with pytest.raises(ConfigError, match="not a run or checkpoint directory"):
        export(tmp_path / "missing", tmp_path / "encoder.safetensors")


def test_a_run_on_s3_resumes_from_its_newest_good_checkpoint_and_exports_there(
    small_shards, s3_bucket, tmp_path, ray_session, mlflow_server
):
    """storage_path=s3://...: checkpoints and metrics land in the bucket, nothing on the local disk;
    a rerun of the same name resumes from the bucket, from the newest checkpoint that verifies (the
    newest was damaged there), under ZeRO-1 (whose optimizer state needs DeepSpeed's
    fragment_address through the restricted unpickler), and logs into the MLflow run the
    interrupted run started; export reads the bucket's checkpoint."""
    import ray.train
    import s3fs
    from mlflow import MlflowClient

    from jepa_ray.model.io import load_jepa
    from jepa_ray.train.export import export

    endpoint, bucket = s3_bucket
    cfg = _cfg(
        small_shards,
        tmp_path,
        f"train.storage_path=s3://{bucket}/runs",
        f"train.storage.endpoint_url={endpoint}",
        "train.zero_stage=1",
        "train.steps=6",
        "train.max_failures=0",
        "train.checkpoint_every=2",
        "train.tracker=mlflow",
        f"train.tracking_uri={mlflow_server}",
        "train.experiment=s3-resume",
    )
    with pytest.raises(ray.train.TrainingFailedError):
        pretrain(cfg, name="on-s3", hooks=KillWorker(5))
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    run = f"{bucket}/runs/on-s3"
    ckpts = sorted(p.rsplit("/", 1)[0] for p in fs.glob(f"{run}/checkpoint_*/{STATE_FILE}"))
    assert [json.loads(fs.cat(f"{c}/{STATE_FILE}"))["step"] for c in ckpts] == [2, 4]
    assert not (tmp_path / "runs").exists()  # nothing of the run went to the local disk
    # the newest checkpoint is damaged in the bucket: the rerun falls back to the one before it
    damaged = fs.glob(f"{ckpts[-1]}/engine/*optim_states.pt")[0]
    data = bytearray(fs.cat(damaged))
    data[len(data) // 2] ^= 0xFF
    fs.pipe(damaged, bytes(data))

    info = pretrain(cfg, name="on-s3")
    assert info.run_url == f"s3://{run}" and info.metrics["step"] == 6
    assert set(info.metrics) >= REPORTED and np.isfinite(info.metrics["loss"])
    newest = sorted(fs.glob(f"{run}/checkpoint_*/{STATE_FILE}"))[-1]
    state = json.loads(fs.cat(newest))
    assert state["step"] == 6 and state["samples"] == 6 * 4 * 2
    resumed = state["resumed_from"]
    assert resumed["checkpoint"] == ckpts[0].rsplit("/", 1)[1] and resumed["step"] == 2
    assert resumed["skipped"] == [ckpts[-1].rsplit("/", 1)[1]]
    rows = list(csv.DictReader(fs.cat(f"{run}/metrics/metrics.csv").decode().splitlines()))
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] == 6
    assert fs.size(f"{run}/metrics/loss.png") > 1000 and fs.glob(f"{run}/metrics/tensorboard/*")
    # one MLflow run across the interruption, finished by the rerun, its history continued
    mlflow = MlflowClient(tracking_uri=mlflow_server)
    [tracked] = mlflow.search_runs([mlflow.get_experiment_by_name("s3-resume").experiment_id])
    assert tracked.info.run_name == "on-s3" and tracked.info.status == "FINISHED"
    assert json.loads(fs.cat(f"{run}/tracker.json"))["run_id"] == tracked.info.run_id
    # steps 2 and 4 before the interruption, 4 again after the resume from step 2 (MLflow keeps both)
    assert [m.step for m in mlflow.get_metric_history(tracked.info.run_id, "loss")] == [2, 4, 4, 6]

    weights, meta = export(info.run_url, tmp_path / "encoder", cfg.train.storage)
    assert json.loads(meta.read_text())["checkpoint"].startswith(f"s3://{run}/checkpoint_")
    assert json.loads(meta.read_text())["step"] == 6
    model = load_jepa(weights)
    assert sum(p.numel() for p in model.context.parameters()) > 0
    with pytest.raises(ConfigError, match=f"s3://{bucket}/runs/missing: no checkpoint"):
        export(f"s3://{bucket}/runs/missing", tmp_path / "x", cfg.train.storage)


def test_a_run_starts_from_a_public_vit_and_exports_back_to_it(small_shards, tmp_path, ray_session):
    """A transformers ViT (random weights, saved to a file) initialises both encoders of a ZeRO-2 run;
    three steps at a negligible learning rate later, the run's export loads in transformers and gives
    that ViT's features on the same image. A checkpoint of another width fails before any worker."""
    from safetensors.torch import save_file
    from transformers import ViTConfig, ViTModel
    from typer.testing import CliRunner

    from jepa_ray.cli import app

    vit = ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        image_size=32,
        patch_size=8,
        num_channels=1,
        layer_norm_eps=1e-6,
    )
    torch.manual_seed(11)
    source = ViTModel(vit, add_pooling_layer=False).eval()
    with torch.no_grad():
        source.embeddings.position_embeddings.normal_(0, 0.5)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    init = [f"model.init_from={tmp_path / 'vit.safetensors'}", "model.norm_eps=1e-6"]
    # one worker: what is tested is the initialisation and the export, not the partitions
    one = ("train.num_workers=1", "train.steps=3", "train.lr=1e-9", "train.zero_stage=2")
    info = pretrain(_cfg(small_shards, tmp_path, *init, *one), name="from-vit")
    r = CliRunner().invoke(app, ["export", info.run_url, "--out", str(tmp_path / "hf"), "--format", "hf"])
    assert r.exit_code == 0, r.output
    back = ViTModel.from_pretrained(str(tmp_path / "hf"), add_pooling_layer=False)
    image = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            back.eval()(pixel_values=image).last_hidden_state,
            source(pixel_values=image).last_hidden_state,
            atol=1e-4,
            rtol=1e-4,
        )

    # --format timm: timm's layout, run by transformers' ViT (the same computation; interopkit)
    from interopkit import timm_to_transformers
    from safetensors.torch import load_file

    r = CliRunner().invoke(app, ["export", info.run_url, "--out", str(tmp_path / "timm"), "--format", "timm"])
    assert r.exit_code == 0, r.output
    assert "local-dir:" in r.output
    as_timm = ViTModel(vit, add_pooling_layer=False).eval()
    as_timm.load_state_dict(timm_to_transformers(load_file(str(tmp_path / "timm" / "model.safetensors")), 2))
    with torch.no_grad():
        torch.testing.assert_close(
            as_timm(pixel_values=image).last_hidden_state,
            source(pixel_values=image).last_hidden_state,
            atol=1e-4,
            rtol=1e-4,
        )

    wide = ViTModel(ViTConfig(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, num_channels=1))
    save_file({k: v.contiguous() for k, v in wide.state_dict().items()}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ConfigError, match=r"patch embedding weight has shape \(96, 1, 16, 16\)"):
        build_trainer(
            _cfg(small_shards, tmp_path, f"model.init_from={tmp_path / 'wide.safetensors'}"), name="wide"
        )
    assert not (tmp_path / "runs" / "wide").exists()
