"""`jepa-ray bench`: what this cluster does with a config, before a week of it is paid for.

- `bench_train`: short pretraining runs of the config at each number of workers asked for, on the
  connected Ray cluster. Per size: samples/s (all workers, and per worker), scaling efficiency
  against the smallest size (per-worker samples/s over the smallest size's), the fraction of step
  time spent waiting for data, time per optimizer step in each phase (data, forward, backward,
  DeepSpeed step: clipping, ZeRO communication, optimizer), peak memory per rank (accelerator
  memory on GPUs, resident memory on CPUs) and, on GPUs, MFU (model FLOPs per second over the
  GPUs' peak). Medians over the logging intervals after the first (which holds start-up). Beside
  each size, the compute ceiling: as many processes as workers, each with a worker's resources,
  training the same model on one fixed batch all at once, with no data pipeline and no
  communication. Its scaling is what the cluster's compute allows (two workers on two shared cores
  cannot reach 2x); `of ceiling` says how much of it the run gets.
- `bench_stream`: the input pipeline alone (the training sequence, `jepa_ray.stream.feed`, read
  and transformed by Ray Data as a run reads it), in samples/s and per CPU, against the decode
  limit: one process decoding, augmenting and masking the same samples with nothing else to do.

Both write a table (printed), JSON and a PNG into the output directory.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from jepa_ray.config import Config
from jepa_ray.errors import ConfigError

log = logging.getLogger("jepa_ray.bench")

PHASES = ("ms_data", "ms_forward", "ms_backward", "ms_step")
# dense bf16 peak per GPU (TFLOP/s) by device name; MFU is left out for a GPU not listed
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def parse_workers(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; ConfigError naming --workers otherwise."""
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"--workers {text!r}: give worker counts >= 1, comma-separated, e.g. 1,2,4")
    return sorted(set(sizes))


def _median(rows: list[dict], key: str) -> float | None:
    values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    return statistics.median(values) if values else None


def _run_rows(cfg: Config, name: str) -> list[dict]:
    """The metrics.csv rows of a run (local or S3 run storage)."""
    from jepa_ray.storage import Store
    from jepa_ray.train.trainer import run_url

    text = Store(run_url(cfg, name), cfg.train.storage).read_bytes("metrics/metrics.csv").decode()
    return list(csv.DictReader(io.StringIO(text)))


def _gpu_peak_tflops() -> float | None:
    import ray

    for node in ray.nodes():
        if node.get("Alive") and node.get("Resources", {}).get("GPU"):
            for label in node.get("Resources", {}):
                if label.startswith("accelerator_type:"):
                    kind = label.split(":", 1)[1]
                    return next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)
    return None


def train_flops_per_sample(cfg: Config, dims: dict) -> float:
    """Model FLOPs of one training sample: 3x (forward + backward) the student's forward, plus the
    target encoder's forward, each 2 FLOPs per parameter per token it sees, counted with every
    token visible (an upper bound of masked work, the usual convention)."""
    from jepa_ray.model.jepa import JEPA

    model = JEPA(dims, cfg.model)
    tokens = max(1, (cfg.pipeline.image_size // cfg.pipeline.patch_size) ** 2) + cfg.pipeline.max_events
    student = sum(p.numel() for p in model.student.parameters())
    target = sum(p.numel() for p in model.target.parameters())
    return 2.0 * tokens * (3 * student + target)


def bench_train(cfg: Config, workers: list[int], steps: int, out: Path, verbose: bool = False) -> dict:
    """Short runs of `cfg` at each size in `workers` (Ray connected); the table as a dict, written
    with its PNG to `out`."""
    from jepa_ray.stream.pipeline import open_split
    from jepa_ray.train.trainer import check_resources, pretrain

    if cfg.train.shards is None:
        raise ConfigError("train.shards: bench train runs the config's pretraining on its shards; none given")
    if steps < 3:
        raise ConfigError(f"--steps {steps}: need at least 3 (the first interval is start-up)")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = []
    for size in workers:
        c = cfg.model_copy(deep=True)
        c.train = type(cfg.train).model_validate(
            {
                **cfg.train.model_dump(),
                "num_workers": size,
                "steps": steps,
                "global_batch": None,
                "warmup_steps": min(cfg.train.warmup_steps, steps // 2),
                "log_every": max(1, steps // 6),
                "checkpoint_every": steps,
                "val_batches": 0,
                "max_failures": 0,
                "time_phases": True,
            }
        )
        check_resources(c)  # before any run: a size the cluster cannot hold is named, not waited on
        runs.append((size, c, f"bench-{stamp}-w{size}"))
    dims = open_split(cfg.train.shards, "train", cfg.train.storage).spec.model_dims(cfg.pipeline)
    flops = train_flops_per_sample(cfg, dims)
    peak = _gpu_peak_tflops() if cfg.train.use_gpu else None
    rows = []
    batch = _one_batch(cfg)
    for size, c, name in runs:
        log.info("bench train: %d worker(s), %d steps (run %s)", size, steps, name)
        t0 = time.perf_counter()
        pretrain(c, name=name, verbose=verbose)
        logged = _run_rows(c, name)
        intervals = logged[1:] or logged
        sps = _median(intervals, "samples_per_s") or 0.0
        row: dict[str, Any] = {
            "workers": size,
            "run": name,
            "wall_s": time.perf_counter() - t0,
            "samples_per_s": sps,
            "samples_per_s_per_worker": sps / size,
            "data_wait": _median(intervals, "data_wait"),
            **{k: _median(intervals, k) for k in PHASES},
            "peak_mem_mb_per_rank": max(float(r["peak_mem_mb"]) for r in intervals if r.get("peak_mem_mb")),
            "mfu": sps * flops / (size * peak * 1e12) if peak else None,
            "ceiling_samples_per_s": compute_ceiling(cfg, dims, batch, size, steps),
        }
        rows.append(row)
    base, ceiling = rows[0]["samples_per_s_per_worker"], rows[0]["ceiling_samples_per_s"]
    for row in rows:
        row["scaling_efficiency"] = row["samples_per_s_per_worker"] / base if base else None
        # per-process ceiling throughput over the smallest size's: what the compute lets scaling reach
        row["ceiling_scaling"] = (
            row["ceiling_samples_per_s"] / row["workers"] / (ceiling / rows[0]["workers"])
        )
        row["of_ceiling"] = row["scaling_efficiency"] / row["ceiling_scaling"]
    doc = {
        "command": "bench train",
        "config": {
            "model": cfg.model.model_dump(mode="json"),
            "image_size": cfg.pipeline.image_size,
            "batch_size_per_worker": cfg.pipeline.batch_size,
            "zero_stage": cfg.train.zero_stage,
            "use_gpu": cfg.train.use_gpu,
            "steps": steps,
        },
        "flops_per_sample": flops,
        "gpu_peak_tflops": peak,
        "rows": rows,
    }
    _write(out, "bench-train", doc, _train_table(rows), _plot_train)
    return doc


def _one_batch(cfg: Config) -> dict:
    """One training micro-batch of the config (its first samples, augmented, masked and collated)."""
    from jepa_ray.stream.pipeline import collate, open_split
    from jepa_ray.stream.reader import raw_block
    from jepa_ray.stream.transform import transform_batch

    split = open_split(cfg.train.shards, "train", cfg.train.storage)
    rows = _first_rows(split, cfg.pipeline.batch_size)
    block = _numpy_columns(raw_block(rows))
    return collate(transform_batch(block, split.spec, cfg.pipeline, train=True, epoch=0))


class _Compute:
    """A process training the config's model on one fixed batch: forward, backward, AdamW, EMA."""

    def __init__(self, cfg: Config, dims: dict, batch: dict) -> None:
        import torch

        from jepa_ray.model.jepa import JEPA
        from jepa_ray.model.optim import Schedule, make_optimizer
        from jepa_ray.train.loop import to_device

        torch.manual_seed(0)
        self.device = torch.device("cuda" if cfg.train.use_gpu else "cpu")
        self.model = JEPA(dims, cfg.model).to(self.device)
        self.schedule = Schedule(total_steps=10**6, warmup_steps=1)
        self.optimizer = make_optimizer(self.model, self.schedule)
        self.batch = to_device(batch, self.device)
        bf16 = cfg.train.use_gpu and cfg.train.precision in ("auto", "bf16")
        self.autocast = (self.device.type, torch.bfloat16) if bf16 else None

    def run(self, steps: int) -> float:
        """Seconds for `steps` training steps."""
        import contextlib

        import torch

        from jepa_ray.model.optim import train_step

        ctx = torch.autocast(*self.autocast) if self.autocast else contextlib.nullcontext()
        t0 = time.perf_counter()
        with ctx:
            for step in range(steps):
                train_step(self.model, self.optimizer, self.batch, step, self.schedule)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def compute_ceiling(cfg: Config, dims: dict, batch: dict, size: int, steps: int) -> float:
    """Samples/s of `size` _Compute processes together, each with a training worker's resources and
    placed as Ray Train places workers (one placement group, packed), all stepping at once."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    tc = cfg.train
    bundle = {"CPU": tc.cpus_per_worker, **({"GPU": 1} if tc.use_gpu else {}), **tc.worker_resources}
    pg = placement_group([bundle] * size, strategy="PACK")
    ray.get(pg.ready())
    try:
        actor = ray.remote(_Compute)
        procs = [
            actor.options(
                num_cpus=tc.cpus_per_worker,
                num_gpus=1 if tc.use_gpu else 0,
                resources=tc.worker_resources,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
            ).remote(cfg, dims, batch)
            for i in range(size)
        ]
        ray.get([p.run.remote(3) for p in procs])  # built and warm, every one of them
        timed = max(10, steps)
        seconds = ray.get([p.run.remote(timed) for p in procs])
        for p in procs:
            ray.kill(p)
    finally:
        remove_placement_group(pg)
    return sum(timed * len(batch["key"]) / s for s in seconds)


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _train_table(rows: list[dict]) -> str:
    head = (
        f"{'workers':>7} {'samples/s':>10} {'/worker':>8} {'scaling':>8} {'ceiling':>8} {'of ceiling':>10} "
        f"{'data wait':>9} {'data ms':>8} {'fwd ms':>7} {'bwd ms':>7} {'step ms':>8} {'peak MB/rank':>12} "
        f"{'MFU':>6}"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['workers']:>7} {r['samples_per_s']:>10.1f} {r['samples_per_s_per_worker']:>8.1f} "
            f"{_fmt(r['scaling_efficiency'], '>8.2f')} {_fmt(r['ceiling_scaling'], '>8.2f')} "
            f"{_fmt(r['of_ceiling'], '>10.0%')} {_fmt(r['data_wait'], '>9.1%')} "
            f"{_fmt(r['ms_data'], '>8.1f')} {_fmt(r['ms_forward'], '>7.1f')} {_fmt(r['ms_backward'], '>7.1f')} "
            f"{_fmt(r['ms_step'], '>8.1f')} {r['peak_mem_mb_per_rank']:>12.0f} {_fmt(r['mfu'], '>6.1%')}"
        )
    return "\n".join(lines)


def _plot_train(ax_pair, rows: list[dict]) -> None:
    left, right = ax_pair
    sizes = [r["workers"] for r in rows]
    left.plot(sizes, [r["samples_per_s"] for r in rows], "o-", label="measured")
    base = rows[0]["samples_per_s_per_worker"]
    left.plot(sizes, [base * s for s in sizes], "--", color="grey", label="linear")
    left.plot(
        sizes,
        [base * r["ceiling_scaling"] * r["workers"] for r in rows],
        ":",
        color="black",
        label="compute ceiling",
    )
    left.set_xlabel("workers")
    left.set_ylabel("samples/s")
    left.legend(fontsize=8)
    bottom = [0.0] * len(rows)
    for key in PHASES:
        values = [r[key] or 0.0 for r in rows]
        right.bar([str(s) for s in sizes], values, bottom=bottom, label=key.removeprefix("ms_"))
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    right.set_xlabel("workers")
    right.set_ylabel("ms per optimizer step")
    right.legend(fontsize=8)


def bench_stream(cfg: Config, samples: int, out: Path, verbose: bool = False) -> dict:
    """The training input pipeline alone on the connected cluster against the decode limit."""
    import ray

    from jepa_ray.stream.feed import Cursor, Order, sequence_dataset
    from jepa_ray.stream.pipeline import new_ledger, open_split

    if cfg.train.shards is None:
        raise ConfigError("train.shards: bench stream reads the config's shards; none given")
    split = open_split(cfg.train.shards, "train", cfg.train.storage)
    pc = cfg.pipeline
    limit = _decode_limit(split, cfg)
    cpus = ray.cluster_resources().get("CPU", 1.0)
    ledger = new_ledger(pc.max_bad_samples)
    try:
        epochs = Order(split, pc.seed, pc.shuffle_buffer, True).epochs_for(samples)
        ds = sequence_dataset(
            split, pc, train=True, start=Cursor(), epochs=epochs, ledger=ledger, cpus=cpus, verbose=verbose
        )
        seen, t0, first = 0, time.perf_counter(), None
        for batch in ds.iter_batches(batch_size=pc.batch_size, batch_format="numpy"):
            if first is None:  # from the first batch on: start-up is not throughput
                first, t0 = len(batch["key"]), time.perf_counter()
                continue
            seen += len(batch["key"])
            if seen >= samples:
                break
        elapsed = time.perf_counter() - t0
    finally:
        ray.kill(ledger)
    sps = seen / max(elapsed, 1e-9)
    row = {
        "samples": seen,
        "seconds": elapsed,
        "samples_per_s": sps,
        "cpus": cpus,
        "samples_per_s_per_cpu": sps / cpus,
        "decode_limit_per_cpu": limit,
        "of_decode_limit": sps / cpus / limit if limit else None,
    }
    doc = {
        "command": "bench stream",
        "config": {"image_size": pc.image_size, "batch_size": pc.batch_size, "dims": pc.dims},
        "rows": [row],
    }
    table = (
        f"{'samples/s':>10} {'CPUs':>5} {'/CPU':>8} {'decode limit /CPU':>18} {'of limit':>9}\n"
        f"{sps:>10.1f} {cpus:>5g} {sps / cpus:>8.1f} {limit:>18.1f} {_fmt(row['of_decode_limit'], '>9.0%')}"
    )
    _write(out, "bench-stream", doc, table, _plot_stream)
    return doc


def _decode_limit(split, cfg: Config, most: int = 256) -> float:
    """Samples/s of one process decoding, augmenting and masking the split's first samples."""
    from jepa_ray.stream.reader import raw_block
    from jepa_ray.stream.transform import transform_batch

    rows = _first_rows(split, most)
    blocks = [_numpy_columns(raw_block(rows[i : i + 32])) for i in range(0, len(rows), 32)]
    # the first call pays one-off set-up (about a second: imports, caches), which a pipeline's
    # long-lived workers pay once too: warm up, then time
    transform_batch(blocks[0], split.spec, cfg.pipeline, train=True, epoch=0)
    t0 = time.perf_counter()
    for block in blocks:
        transform_batch(block, split.spec, cfg.pipeline, train=True, epoch=0)
    return len(rows) / max(time.perf_counter() - t0, 1e-9)


def _numpy_columns(table) -> dict:
    """A block as Ray Data hands it to a numpy-format map_batches (the transform's input)."""
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}


def _first_rows(split, most: int) -> list[dict]:
    """The split's first `most` raw samples, read as the stream reads them."""
    from jepa_ray.storage import Store
    from jepa_ray.stream.reader import tar_samples

    store = Store(split.url, split.storage)
    rows: list[dict] = []
    for path in split.paths:
        name = path.rsplit("/", 1)[-1]
        with store.open(name) as f:
            rows.extend(tar_samples(f, name, None, lambda *a: None))
        if len(rows) >= most:
            break
    return rows[:most]


def _plot_stream(ax_pair, rows: list[dict]) -> None:
    left, right = ax_pair
    r = rows[0]
    left.bar(["pipeline", "decode limit"], [r["samples_per_s_per_cpu"], r["decode_limit_per_cpu"]])
    left.set_ylabel("samples/s per CPU")
    right.bar(["pipeline"], [r["samples_per_s"]])
    right.set_ylabel(f"samples/s ({r['cpus']:g} CPUs)")


def _write(out: Path, stem: str, doc: dict, table: str, plot) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    doc["table"] = table
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / f"{stem}.txt").write_text(table + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    plot(axes, doc["rows"])
    fig.suptitle(doc["command"])
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png")
    plt.close(fig)
