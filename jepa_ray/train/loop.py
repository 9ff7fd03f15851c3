"""`train_loop_per_worker`: the JEPA step on each Ray Train worker, inside a DeepSpeed engine.

Per optimizer step: schedules (LR warm-up + cosine, cosine weight decay) -> `grad_accum`
micro-batches (target latents under no_grad, student loss, backward) -> DeepSpeed step (clipping,
ZeRO reduction) -> EMA update of the target. Every `log_every` steps the metrics (averaged over
ranks) are reported to Ray Train and written by rank 0; every `checkpoint_every` steps and at the
end, every rank writes its part of a checkpoint and reports it.

Data position (what a resumed run guarantees): the checkpoint records the step, the epoch and the
number of batches that epoch had delivered. A resumed run ends at exactly the configured number of
optimizer steps; it never repeats a finished epoch; the interrupted epoch goes on for the batches
it had left, drawn from a freshly shuffled pass over that epoch's shards (Ray Data cannot restart
an iterator mid-stream), so within that one epoch some samples may come twice and others not at
all.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from jepa_ray.config import Config
from jepa_ray.model.jepa import JEPA, POLICIES, embedding_stats, target_ema
from jepa_ray.model.optim import Schedule, param_groups
from jepa_ray.train.engine import (
    apply_schedule,
    deepspeed_config,
    ema_update,
    load_checkpoint,
    save_checkpoint,
)

log = logging.getLogger("jepa_ray.train")

BatchSource = Callable[[int, int, int], Iterable[dict]]  # (rank, world, epoch) -> batches


class FixedBatches:
    """A BatchSource over in-memory batches, the same every epoch: per_rank[rank] is rank's list
    (the validation batches are its first ones). Replaces Ray Data where the exact data of every
    step must be known, e.g. to compare ZeRO stages step for step."""

    def __init__(self, per_rank: list[list[dict]]) -> None:
        self.per_rank = per_rank

    def __call__(self, rank: int, world: int, epoch: int) -> Iterable[dict]:
        if len(self.per_rank) != world:
            raise ValueError(
                f"FixedBatches holds batches for {len(self.per_rank)} ranks, the run has {world}"
            )
        return iter(self.per_rank[rank])


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}


def _ray_batches(cfg: Config) -> BatchSource:
    import ray.train

    from jepa_ray.stream.pipeline import iter_training_batches

    shard = ray.train.get_dataset_shard("train")

    def batches(rank: int, world: int, epoch: int) -> Iterable[dict]:
        return iter_training_batches(shard, cfg.pipeline, train=True)

    return batches


def _val_batches(cfg: Config, source: BatchSource | None, rank: int, world: int, n: int) -> list[dict]:
    if n == 0:
        return []
    if source is not None:
        it = iter(source(rank, world, -1))
    else:
        import ray.train

        from jepa_ray.stream.pipeline import iter_training_batches

        shard = ray.train.get_dataset_shard("val")
        if shard is None:
            return []
        it = iter(iter_training_batches(shard, cfg.pipeline, train=False))
    out = []
    for batch in it:
        out.append(batch)
        if len(out) == n:
            break
    return out


def _all_reduce(values: list[float] | torch.Tensor, device: torch.device, op: str = "sum") -> list[float]:
    """Sum (or min) a few numbers over the ranks in one collective; as they are on one process."""
    import torch.distributed as dist

    t = torch.as_tensor(values, dtype=torch.float64).to(device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.SUM)
    return t.tolist()


# parts of the loss averaged over the micro-batches that have them: per masking policy, and the
# prediction term and SIGReg when model.sigreg is on
_WINDOW_PARTS = (*(f"loss_{n}" for n in POLICIES.values()), "prediction_loss", "sigreg")


class _Window:
    """Sums over one logging interval (per rank), averaged across ranks when reported."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        # [loss, micro-batches, samples, per-part loss sums, per-part counts], kept on the device
        # and read once per report: no step waits for the accelerator to hand back a number
        self.sums: torch.Tensor | None = None
        self.wait = self.busy = 0.0
        self.t0 = time.perf_counter()

    def add(self, out: dict, samples: int, wait: float, busy: float) -> None:
        loss = out["loss"].detach().double()
        zero = loss.new_zeros(())
        names = _WINDOW_PARTS
        row = [loss, zero + 1, zero + samples]
        row += [out[n].detach().double() if n in out else zero for n in names]
        row += [zero + (n in out) for n in names]
        self.sums = torch.stack(row) if self.sums is None else self.sums + torch.stack(row)
        self.wait += wait
        self.busy += busy

    def report(self, device: torch.device) -> dict[str, float]:
        """Rank-averaged loss and data-wait fraction, summed samples/s, per-policy means (one collective)."""
        elapsed = time.perf_counter() - self.t0
        k = len(_WINDOW_PARTS)
        local = self.sums.cpu().tolist() if self.sums is not None else [0.0] * (3 + 2 * k)
        mean_loss = local[0] / max(local[1], 1)
        wait = self.wait / max(self.wait + self.busy, 1e-9)
        sums = _all_reduce([*local, mean_loss, wait, 1.0], device)
        world = sums[-1]
        out = {
            "loss": sums[-3] / world,
            "samples_per_s": sums[2] / max(elapsed, 1e-9),
            "data_wait": sums[-2] / world,
        }
        for i, name in enumerate(_WINDOW_PARTS):
            if sums[3 + k + i]:
                out[name] = sums[3 + i] / sums[3 + k + i]
        return out


@torch.no_grad()
def _validate(model: JEPA, student: Any, batches: list[dict], device: torch.device, rank: int) -> dict:
    """Validation loss (all ranks take part: under ZeRO-3 a forward gathers parameters collectively)
    and collapse monitors of the target encoder's pooled embeddings of rank 0's first batch."""
    n = int(_all_reduce([len(batches)], device, op="min")[0])
    if n == 0:
        return {}
    student.eval()
    losses = []
    for batch in batches[:n]:
        b = _to(batch, device)
        losses.append(float(student(b, *model.targets(b))["loss"]))
    student.train()
    total, world = _all_reduce([sum(losses) / n, 1.0], device)
    out = {"val_loss": total / world}
    if rank == 0:
        stats = embedding_stats(model.encode(_to(batches[0], device), "both")["pooled"])
        out.update(val_std=stats["std"], val_rankme=stats["rankme"])
    return out


@torch.no_grad()
def _save_probe(model: JEPA, student: Any, batch: dict, device: torch.device, rank: int, path: str) -> None:
    """Rank 0 saves a batch, both encoders' outputs and the loss on it (every rank runs the student:
    under ZeRO-3 its forward gathers parameters collectively). Lets a test compare an export."""
    b = _to(batch, device)
    student.eval()
    with torch.no_grad():
        context = student.context(b)["tokens"].float().cpu()
        loss = float(student(b, *model.targets(b))["loss"])
    if rank == 0:
        torch.save(
            {"batch": batch, "context": context, "target": model.target(b)["tokens"].cpu(), "loss": loss},
            path,
        )


def _older_checkpoints(ckpt: Any) -> list:
    """The run's other checkpoints older than `ckpt`, newest first (names sort by time)."""
    import pyarrow.fs as pafs
    import ray.train

    parent, name = ckpt.path.rstrip("/").rsplit("/", 1)
    infos = ckpt.filesystem.get_file_info(pafs.FileSelector(parent))
    older = sorted(
        (i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")
         and i.base_name < name),
        reverse=True,
    )  # fmt: skip
    return [ray.train.Checkpoint(p, filesystem=ckpt.filesystem) for p in older]


def _restore(engine: Any, target: torch.nn.Module, restored: Any) -> tuple[dict, dict]:
    """Load the newest checkpoint that verifies: the one Ray Train restored, else the run's older
    ones, newest first, each skipped with a warning naming its bad file. Returns its state and
    {"checkpoint", "step", "skipped"} (recorded in later checkpoints' state as resumed_from)."""
    from jepa_ray.errors import CheckpointError

    problems, skipped = [], []
    for ckpt in [restored, *_older_checkpoints(restored)]:
        try:
            with ckpt.as_directory() as d:
                state = load_checkpoint(engine, target, Path(d))
        except CheckpointError as e:
            log.warning("checkpoint %s cannot be used, trying an older one: %s", ckpt.path, e)
            problems.append(str(e))
            skipped.append(ckpt.path.rstrip("/").rsplit("/", 1)[-1])
            continue
        if ckpt is not restored:
            log.warning("resumed from the older checkpoint %s (the newer ones failed: see above)", ckpt.path)
        name = ckpt.path.rstrip("/").rsplit("/", 1)[-1]
        return state, {"checkpoint": name, "step": state["step"], "skipped": skipped}
    raise CheckpointError("no checkpoint of this run can be loaded: " + "; ".join(problems))


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point. loop_config: config (a Config as a dict), dims (model input dims),
    run_url (the run directory), epoch_batches (batches per rank per epoch, or None); a sweep adds
    objective (kind, label, batches, mask, candidates: measured on rank 0's validation batches at
    every report, see `jepa_ray.tune.objective`); tests may add batches (a BatchSource replacing
    Ray Data), kill_at_step (rank 1 kills its own process there, unless resumed, to exercise fault tolerance)
    and probe_path (see `_save_probe`)."""
    import deepspeed
    import ray.train

    from jepa_ray.train.metrics import MetricsLog

    cfg = Config.model_validate(loop_config["config"])
    tc, pc = cfg.train, cfg.pipeline
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if tc.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    bf16 = tc.precision == "bf16" or (tc.precision == "auto" and tc.use_gpu)

    torch.manual_seed(pc.seed)  # the same initial weights on every rank
    model = JEPA(loop_config["dims"], cfg.model)
    student = model.student
    engine, _, _, _ = deepspeed.initialize(
        model=student,
        model_parameters=param_groups(student),
        config=deepspeed_config(
            tc, pc.batch_size, bf16, sum(p.numel() for p in student.parameters()), model.width
        ),
    )
    target = model.target.to(device)
    schedule = Schedule(
        total_steps=tc.steps,
        lr=tc.lr,
        warmup_steps=tc.warmup_steps,
        final_lr=tc.final_lr,
        weight_decay=tc.weight_decay,
        ema=target_ema(cfg.model),
    )
    zero3 = tc.zero_stage == 3

    step, epoch, in_epoch, seen = 0, 0, 0, 0
    restored, resumed_from = ray.train.get_checkpoint(), None
    if restored is not None:
        state, resumed_from = _restore(engine, target, restored)
        step, epoch, in_epoch, seen = (
            state["step"],
            state["epoch"],
            state["batches_in_epoch"],
            state["samples"],
        )
        log.info("rank %d: resumed at step %d (epoch %d, batch %d of it)", rank, step, epoch, in_epoch)

    source: BatchSource = loop_config.get("batches") or _ray_batches(cfg)
    objective = loop_config.get("objective")
    n_val = max(tc.val_batches, objective["batches"] if objective else 0)
    val_all = _val_batches(cfg, loop_config.get("batches"), rank, world, n_val)
    val = val_all[: tc.val_batches]
    metrics_log = MetricsLog(loop_config["run_url"], tc.storage, step) if rank == 0 else None
    epoch_len = loop_config.get("epoch_batches")  # batches per rank per epoch, when known
    window = _Window()
    kill_at = loop_config.get("kill_at_step")
    last: dict[str, float] = {}

    def finish_report(with_checkpoint: bool) -> None:
        nonlocal last
        metrics = {"step": step, "epoch": epoch, "samples": seen, **window.report(device)}
        metrics.update(lr=schedule.lr_at(step - 1), weight_decay=schedule.weight_decay_at(step - 1))
        metrics.update(momentum=schedule.momentum_at(step - 1))
        metrics.update(_validate(model, engine.module, val, device, rank))
        if objective and rank == 0:  # the target encoder is whole on every rank, even under ZeRO-3
            from jepa_ray.tune.objective import measure

            batches = [_to(b, device) for b in val_all[: objective["batches"]]]
            kind, label = objective["kind"], objective["label"]
            extra = {"mask": objective.get("mask"), "candidates": objective.get("candidates", ())}
            metrics.update(measure(model, batches, kind, label, **extra))
        last = metrics
        if metrics_log is not None:
            metrics_log.log(step, metrics)
            log.info(
                "step %d/%d  loss %.4f  val %.4f  %.1f samples/s  data wait %.0f%%",
                step,
                tc.steps,
                metrics["loss"],
                metrics.get("val_loss", float("nan")),
                metrics["samples_per_s"],
                100 * metrics["data_wait"],
            )
        if not with_checkpoint:
            ray.train.report(metrics)
            window.reset()
            return
        state = {
            "step": step,
            "epoch": epoch,
            "batches_in_epoch": in_epoch,
            "samples": seen,
            "world_size": world,
            "zero_stage": tc.zero_stage,
            "dims": loop_config["dims"],
            "config": cfg.model_dump(mode="json"),
            "resumed_from": resumed_from,
        }
        with tempfile.TemporaryDirectory(prefix="jepa-ckpt-") as d:
            save_checkpoint(engine, target, state, Path(d), rank)
            if metrics_log is not None:
                metrics_log.sync()
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        window.reset()  # the next interval's throughput excludes validation and checkpointing

    engine.train()
    while step < tc.steps:
        batches = iter(source(rank, world, epoch))
        remaining = None if epoch_len is None else max(epoch_len - in_epoch, 0)
        while step < tc.steps and remaining != 0:
            t0 = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                break
            t1 = time.perf_counter()
            if engine.is_gradient_accumulation_boundary():
                apply_schedule(engine.optimizer, schedule.lr_at(step), schedule.weight_decay_at(step))
            batch = _to(batch, device)
            z_img, z_ehr = model.targets(batch)
            out = engine(batch, z_img, z_ehr)
            engine.backward(out["loss"])
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            in_epoch += 1
            remaining = None if remaining is None else remaining - 1
            seen += len(batch["key"]) * world
            if boundary:
                ema_update(target, engine.module.context, schedule.momentum_at(step), zero3)
                step += 1
            window.add(out, len(batch["key"]), t1 - t0, time.perf_counter() - t1)
            if not boundary:
                continue
            if kill_at is not None and step == kill_at and rank == 1 and restored is None:
                # Ray Train's controller collects reported checkpoints when it polls the workers
                # (every 2 s): let it see the last one, as it would in any run with real step times.
                time.sleep(5)
                os.kill(os.getpid(), signal.SIGKILL)
            ckpt = step % tc.checkpoint_every == 0 or step == tc.steps
            if ckpt or step % tc.log_every == 0:
                finish_report(ckpt)
        if step < tc.steps:
            epoch += 1
            in_epoch = 0
    if loop_config.get("probe_path") and val:
        _save_probe(model, engine.module, val[0], device, rank, loop_config["probe_path"])
    if metrics_log is not None:
        metrics_log.plot()
        metrics_log.close()
    log.info("rank %d: finished at step %d; last metrics %s", rank, step, last)
