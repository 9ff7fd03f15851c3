"""`train_loop_per_worker`: the JEPA step on each Ray Train worker, inside a DeepSpeed engine.

Per optimizer step: schedules (LR warm-up + cosine, cosine weight decay) -> `grad_accum`
micro-batches (target latents under no_grad, student loss, backward) -> DeepSpeed step (clipping,
ZeRO reduction) -> EMA update of the target. Every `log_every` steps the metrics (averaged over
ranks) are reported to Ray Train and written by rank 0; every `checkpoint_every` steps and at the
end, every rank writes its part of a checkpoint and reports it. In code: `set_up` builds a
`Worker` (the rank's model, engine, data and `Position`), `run` calls `train_step` and `report`
until the run ends; `Hooks` are what a sweep or a test adds.

Data position (what a resumed run guarantees): the data is one sequence over the epochs, dealt to
the ranks by position (`jepa_ray.stream.feed`); the checkpoint records the step and the cursor
after the last sample its steps took. A resumed run, at the same or another world size, ends at
exactly the configured number of optimizer steps and continues the sequence at that cursor: every
epoch delivers every training sample exactly once, across any number of interruptions.
"""

from __future__ import annotations

import itertools
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jepa_ray.config import Config
from jepa_ray.console import quiet_worker_logs
from jepa_ray.model.jepa import JEPA, POLICIES, embedding_stats, target_ema
from jepa_ray.model.optim import Schedule, param_groups
from jepa_ray.train.checkpoints import private_copy
from jepa_ray.train.engine import (
    apply_schedule,
    deepspeed_config,
    ema_update,
    load_checkpoint,
    load_deepspeed,
    save_checkpoint,
)
from jepa_ray.train.hooks import Hooks

log = logging.getLogger("jepa_ray.train")


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch's tensors on `device` (other values as they are)."""
    return {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}


def _hook_batches(w: Worker) -> Iterator[dict]:
    """The hooks' batches, epoch after epoch, from where the position stands (a resumed epoch
    skips the batches it had drawn)."""
    pos, skip = w.position, w.position.in_epoch
    while True:
        it = iter(w.hooks.batches(w.rank, w.world, pos.epoch))
        for _ in range(skip):
            next(it, None)
        skip, drawn = 0, False
        for batch in it:
            drawn = True
            yield batch
        if not drawn:
            raise ValueError(f"the hooks' batches for rank {w.rank}, epoch {pos.epoch} are empty")
        pos.epoch += 1
        pos.in_epoch = 0


def _val_batches(w: Worker, feed: Any, n: int) -> list[dict]:
    if n == 0:
        return []
    if feed is not None:
        from jepa_ray.stream.feed import val_batches

        return val_batches(feed, w.rank, w.world, n)
    return list(itertools.islice(w.hooks.batches(w.rank, w.world, -1), n))


def _all_reduce(values: list[float] | torch.Tensor, device: torch.device, op: str = "sum") -> list[float]:
    """Sum (or min, or max) a few numbers over the ranks in one collective; as they are on one process."""
    import torch.distributed as dist

    t = torch.as_tensor(values, dtype=torch.float64).to(device)
    if dist.is_initialized():
        ops = {"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}
        dist.all_reduce(t, op=ops[op])
    return t.tolist()


def _peak_memory_mb(device: torch.device) -> float:
    """This rank's peak memory so far: accelerator memory allocated on a GPU, else the process's
    peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


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
        self.phases = [0.0, 0.0, 0.0]  # forward (targets + student), backward, DeepSpeed step
        self.steps = 0
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
        """Rank-averaged loss, data-wait fraction and time per optimizer step in each phase (data,
        forward, backward, step), summed samples/s, per-policy means (one collective)."""
        elapsed = time.perf_counter() - self.t0
        k = len(_WINDOW_PARTS)
        local = self.sums.cpu().tolist() if self.sums is not None else [0.0] * (3 + 2 * k)
        mean_loss = local[0] / max(local[1], 1)
        wait = self.wait / max(self.wait + self.busy, 1e-9)
        per_step = [t / max(self.steps, 1) for t in (self.wait, *self.phases)]
        sums = _all_reduce([*local, *per_step, mean_loss, wait, 1.0], device)
        world = sums[-1]
        out = {
            "loss": sums[-3] / world,
            "samples_per_s": sums[2] / max(elapsed, 1e-9),
            "data_wait": sums[-2] / world,
        }
        for name, total in zip(("ms_data", "ms_forward", "ms_backward", "ms_step"), sums[-7:-3], strict=True):
            out[name] = 1000 * total / world
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
        b = to_device(batch, device)
        losses.append(float(student(b, *model.targets(b))["loss"]))
    student.train()
    total, world = _all_reduce([sum(losses) / n, 1.0], device)
    out = {"val_loss": total / world}
    if rank == 0:
        stats = embedding_stats(model.encode(to_device(batches[0], device), "both")["pooled"])
        out.update(val_std=stats["std"], val_rankme=stats["rankme"])
    return out


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


def _restore(
    engine: Any, target: torch.nn.Module, restored: Any, world: int, device: torch.device
) -> tuple[dict, dict]:
    """Load the newest checkpoint that every rank can load: the one Ray Train restored, else the
    run's older ones, newest first, each skipped with a warning naming its bad file. The ranks
    agree on each candidate in one collective, so they never resume from different checkpoints;
    a rank's failure is retried once (a fresh download) before the candidate is given up. Each
    rank reads its own copy (checkpoints.private_copy). Returns its state and {"checkpoint", "step", "skipped"} (recorded in later
    checkpoints' state as resumed_from)."""
    from jepa_ray.errors import CheckpointError

    problems, skipped = [], []
    for ckpt in [restored, *_older_checkpoints(restored)]:
        state, problem = None, None
        for _attempt in range(2):
            try:
                with private_copy(ckpt) as d:
                    state = load_checkpoint(engine, target, d, world)
                break
            except CheckpointError as e:
                problem = str(e)
        name = ckpt.path.rstrip("/").rsplit("/", 1)[-1]
        if _all_reduce([state is not None], device, op="min")[0] == 1:
            if ckpt is not restored:
                log.warning(
                    "resumed from the older checkpoint %s (the newer ones failed: see above)", ckpt.path
                )
            return state, {"checkpoint": name, "step": state["step"], "skipped": skipped}
        why = problem or "another rank cannot load it"
        log.warning("checkpoint %s cannot be used, trying an older one: %s", ckpt.path, why)
        problems.append(why)
        skipped.append(name)
    raise CheckpointError("no checkpoint of this run can be loaded: " + "; ".join(problems))


@dataclass
class Position:
    """Where a run stands: what a checkpoint records and a resumed run starts from."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch of the last sample drawn
    in_epoch: int = 0  # batches this rank has drawn in the current epoch (of the hooks' batches)
    samples: int = 0  # samples seen, all ranks together
    cursor: tuple[int, int, int] | None = (
        None  # the sequence's (epoch, unit, row) after this rank's last sample
    )


@dataclass
class Worker:
    """One rank's run: what `set_up` built, and where the run stands."""

    cfg: Config
    dims: dict
    run_url: str
    rank: int
    world: int
    device: torch.device
    model: JEPA  # model.target is the EMA target encoder, whole on every rank
    engine: Any  # the DeepSpeed engine around model.student
    schedule: Schedule
    hooks: Hooks
    position: Position = field(default_factory=Position)
    batches: Iterator[dict] | None = None  # this rank's micro-batches from the position on
    val: list[dict] = field(default_factory=list)  # train.val_batches, more when the hooks read more
    resumed_from: dict | None = None  # the checkpoint this rank started from, if any
    metrics_log: Any = None  # rank 0's MetricsLog
    window: _Window = field(default_factory=_Window)
    last: dict = field(default_factory=dict)  # the last report's metrics

    @property
    def resumed(self) -> bool:
        return self.resumed_from is not None


def _skip_cpu_shm_op() -> None:
    """On CPU, DeepSpeed compiles a C++ shared-memory all-reduce when its process group starts (g++
    for about a minute, once per environment, and a compiler the machine may not have), which only
    its inference all-reduce uses: training's collectives go through torch.distributed (gloo).
    Marking the op unavailable in DeepSpeed's table of compatible ops skips the build."""
    import deepspeed.ops

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False


def initial_model(cfg: Config, dims: dict) -> JEPA:
    """The model a run starts from, the same on every rank and in every restart: drawn from
    pipeline.seed (which seeds torch's global generator), then a public ViT's (or an export's)
    weights with model.init_from."""
    torch.manual_seed(cfg.pipeline.seed)
    model = JEPA(dims, cfg.model)
    if cfg.model.init_from:
        from jepa_ray.model.interop import init_from

        pc = cfg.pipeline
        init_from(model, cfg.model.init_from, pc.normalize, cfg.train.storage, cfg.model.init_normalize)
    return model


def set_up(loop_config: dict[str, Any]) -> Worker:
    """The model inside its DeepSpeed engine, the schedules, the data, and the position restored
    from the newest checkpoint that loads (when Ray Train restored one)."""
    import ray.train

    from jepa_ray.train.metrics import MetricsLog

    deepspeed = load_deepspeed()

    cfg = Config.model_validate(loop_config["config"])
    tc, pc = cfg.train, cfg.pipeline
    hooks: Hooks = loop_config.get("hooks") or Hooks()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if tc.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    bf16 = tc.precision == "bf16" or (tc.precision == "auto" and tc.use_gpu)

    model = initial_model(cfg, loop_config["dims"])  # a resumed run's checkpoint replaces it below
    student = model.student
    accum = tc.accumulation(pc.batch_size, world)
    if not tc.use_gpu:
        _skip_cpu_shm_op()
    engine, _, _, _ = deepspeed.initialize(
        model=student,
        model_parameters=param_groups(student),
        config=deepspeed_config(
            tc, pc.batch_size, bf16, sum(p.numel() for p in student.parameters()), model.width, accum
        ),
    )
    model.target.to(device)
    schedule = Schedule(
        total_steps=tc.steps,
        lr=tc.lr,
        warmup_steps=tc.warmup_steps,
        final_lr=tc.final_lr,
        weight_decay=tc.weight_decay,
        ema=target_ema(cfg.model),
    )
    w = Worker(
        cfg=cfg,
        dims=loop_config["dims"],
        run_url=loop_config["run_url"],
        rank=rank,
        world=world,
        device=device,
        model=model,
        engine=engine,
        schedule=schedule,
        hooks=hooks,
    )
    restored = ray.train.get_checkpoint()
    if restored is not None:
        state, w.resumed_from = _restore(engine, model.target, restored, world, device)
        w.position = _resumed_position(state, cfg)
        p = w.position
        log.info("rank %d: resumed at step %d (epoch %d, sequence at %s)", rank, p.step, p.epoch, p.cursor)
    feed = loop_config.get("feed")
    w.batches = _hook_batches(w) if hooks.batches is not None else _feed_batches(w, feed)
    w.val = _val_batches(w, feed, max(tc.val_batches, hooks.val_batches))
    if rank == 0:
        from jepa_ray.train.tracking import open_tracker

        tracker = open_tracker(cfg, w.run_url)
        w.metrics_log = MetricsLog(w.run_url, tc.storage, w.position.step, tracker)
    w.window.reset()  # the first interval's throughput starts here
    return w


def _resumed_position(state: dict, cfg: Config) -> Position:
    """Where a checkpoint's run stood. A checkpoint without a cursor (written before the data
    was one sequence) resumes at the start of its interrupted epoch."""
    cursor = state.get("cursor")
    order = state.get("data_order")
    if cursor is None:
        cursor = (state["epoch"], 0, 0)
        log.warning(
            "the checkpoint records no data cursor: the run resumes at the start of epoch %d", cursor[0]
        )
    elif order is not None and order != _data_order(cfg):
        log.warning(
            "the data order changed since the checkpoint (%s, now %s): the resumed run goes on from "
            "the same place in a different order, so within this epoch samples may repeat or be missed",
            order,
            _data_order(cfg),
        )
    return Position(
        state["step"], state["epoch"], state.get("batches_in_epoch", 0), state["samples"], tuple(cursor)
    )


def _data_order(cfg: Config) -> dict:
    """What the data sequence depends on, besides the shards (recorded in checkpoints)."""
    return {"seed": cfg.pipeline.seed, "shuffle_buffer": cfg.pipeline.shuffle_buffer}


def _feed_batches(w: Worker, feed: Any) -> Iterator[dict]:
    """This rank's micro-batches from the run's `Feed`, restarted (by rank 0) at the position's
    cursor for this world size; every rank learns the generation in one collective."""
    import ray

    from jepa_ray.stream.feed import FeedStream, lookahead_rows

    tc, pc, pos = w.cfg.train, w.cfg.pipeline, w.position
    gen = 0
    if w.rank == 0:
        rows = tc.rows(tc.steps - pos.step, pc.batch_size, w.world)
        start = pos.cursor or (0, 0, 0)
        gen = ray.get(feed.start.remote(start, w.world, rows, lookahead_rows(pc, w.world)))
    gen = int(_all_reduce([gen], w.device)[0])
    return FeedStream(feed, gen, w.rank, pc.prefetch_batches)


class _PhaseClock:
    """Seconds between laps; with a CUDA `device`, each lap waits for the device first (what
    train.time_phases asks for: true phase times, at the cost of the overlap a queue gives)."""

    def __init__(self, device: torch.device | None) -> None:
        self.sync = device is not None and device.type == "cuda"
        self.t = time.perf_counter()

    def lap(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        elapsed, self.t = now - self.t, now
        return elapsed


def train_step(w: Worker, batch: dict) -> tuple[dict, bool]:
    """One micro-batch: schedules (at an accumulation boundary), target latents, student loss,
    backward, DeepSpeed step, and at a boundary the EMA update. Returns the model's outputs and
    whether an optimizer step was taken."""
    pos, engine = w.position, w.engine
    if engine.is_gradient_accumulation_boundary():
        apply_schedule(engine.optimizer, w.schedule.lr_at(pos.step), w.schedule.weight_decay_at(pos.step))
    clock = _PhaseClock(w.device if w.cfg.train.time_phases else None)
    # this micro-batch's place in the data sequence (the same at any world size) seeds its noise
    micro = pos.samples // max(len(batch["key"]), 1) + w.rank
    engine.module.noise_seed = int(np.random.SeedSequence([w.cfg.pipeline.seed, micro]).generate_state(1)[0])
    batch = to_device(batch, w.device)
    out = engine(batch, *w.model.targets(batch))
    forward = clock.lap()
    engine.backward(out["loss"])
    backward = clock.lap()
    boundary = engine.is_gradient_accumulation_boundary()
    engine.step()
    phases = w.window.phases
    phases[0] += forward
    phases[1] += backward
    phases[2] += clock.lap()
    w.window.steps += boundary
    pos.in_epoch += 1
    pos.samples += len(batch["key"]) * w.world
    if boundary:
        zero3 = w.cfg.train.zero_stage == 3
        ema_update(w.model.target, engine.module.context, w.schedule.momentum_at(pos.step), zero3)
        pos.step += 1
    return out, boundary


def run(w: Worker) -> None:
    """Steps through the rank's batches until the run ends, reporting every log_every and
    checkpointing every checkpoint_every steps."""
    from jepa_ray.stream.feed import CURSOR

    tc, pos = w.cfg.train, w.position
    while pos.step < tc.steps:
        t0 = time.perf_counter()
        batch = next(w.batches)
        t1 = time.perf_counter()
        cursor = batch.pop(CURSOR, None)
        if cursor is not None:
            pos.cursor, pos.epoch = cursor, cursor[0]
        out, boundary = train_step(w, batch)
        w.window.add(out, len(batch["key"]), t1 - t0, time.perf_counter() - t1)
        if not boundary:
            continue
        w.hooks.after_step(w)
        checkpoint = pos.step % tc.checkpoint_every == 0 or pos.step == tc.steps
        if checkpoint or pos.step % tc.log_every == 0:
            report(w, checkpoint)


def report(w: Worker, with_checkpoint: bool) -> None:
    """The interval's metrics (averaged over ranks), validation and the hooks' additions: logged by
    rank 0 and reported to Ray Train, with every rank's part of a checkpoint when asked."""
    import ray.train

    pos, tc, s = w.position, w.cfg.train, w.schedule
    metrics = {"step": pos.step, "epoch": pos.epoch, "samples": pos.samples, **w.window.report(w.device)}
    metrics["peak_mem_mb"] = _all_reduce([_peak_memory_mb(w.device)], w.device, op="max")[0]
    metrics.update(lr=s.lr_at(pos.step - 1), weight_decay=s.weight_decay_at(pos.step - 1))
    metrics.update(momentum=s.momentum_at(pos.step - 1))
    metrics.update(_validate(w.model, w.engine.module, w.val[: tc.val_batches], w.device, w.rank))
    w.hooks.on_report(w, metrics)
    w.last = metrics
    if w.metrics_log is not None:
        w.metrics_log.log(pos.step, metrics)
        log.info(
            "step %d/%d  loss %.4f  val %.4f  %.1f samples/s  data wait %.0f%%",
            pos.step,
            tc.steps,
            metrics["loss"],
            metrics.get("val_loss", float("nan")),
            metrics["samples_per_s"],
            100 * metrics["data_wait"],
        )
    if not with_checkpoint:
        ray.train.report(metrics)
        w.window.reset()
        return
    cursor = None
    if pos.cursor is not None:  # the last rank's: the sequence goes on after its last sample
        last = w.rank == w.world - 1
        cursor = [int(c) for c in _all_reduce(list(pos.cursor) if last else [0, 0, 0], w.device)]
    state = {
        "step": pos.step,
        "epoch": pos.epoch,
        "batches_in_epoch": pos.in_epoch,
        "cursor": cursor,
        "data_order": _data_order(w.cfg),
        "samples": pos.samples,
        "world_size": w.world,
        "zero_stage": tc.zero_stage,
        "dims": w.dims,
        "config": w.cfg.model_dump(mode="json"),
        "resumed_from": w.resumed_from,
    }
    with tempfile.TemporaryDirectory(prefix="jepa-ckpt-") as d:
        save_checkpoint(w.engine, w.model.target, state, Path(d), w.rank)
        if w.metrics_log is not None:
            w.metrics_log.sync()
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    w.window.reset()  # the next interval's throughput excludes validation and checkpointing


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point. loop_config: config (a Config as a dict), dims (model input dims),
    run_url (the run directory), feed (the run's `jepa_ray.stream.feed.Feed`, unless the hooks give
    the batches), hooks (a `Hooks`, optional), verbose (whether this run's INFO lines reach the
    driver's console)."""
    quiet_worker_logs(loop_config.get("verbose", False))
    w = set_up(loop_config)
    w.engine.train()
    try:
        run(w)
    except BaseException:
        if w.metrics_log is not None and w.metrics_log.tracker is not None:
            w.metrics_log.tracker.finish([], failed=True)  # a restarted group sets it running again
        raise
    finally:
        if hasattr(w.batches, "close"):
            w.batches.close()
    w.hooks.at_end(w)
    if w.metrics_log is not None:
        w.metrics_log.plot()
        w.metrics_log.close()
    log.info("rank %d: finished at step %d; last metrics %s", w.rank, w.position.step, w.last)
