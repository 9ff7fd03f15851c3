"""Distributed pretraining under DeepSpeed ZeRO 0-3: throughput, data wait, model-state memory.

Two measurements per ZeRO stage, each with 2 Ray Train CPU workers on one local Ray:

1. Memory. Every rank builds the student exactly as `jepa-ray pretrain` does (same model, same
   DeepSpeed config) and runs two optimizer steps of two accumulation micro-batches each. After
   every backward and every step it counts the bytes of every live tensor storage in the process
   that the engine added (parameters, gradients, fp32 master copy, Adam moments, communication
   buckets), leaving out the EMA target, the batch and its outputs. The peak of that count is
   compared with the ZeRO paper's formulas (Rajbhandari et al., 2020) for N ranks and psi student
   parameters, with P/G bytes per parameter/gradient (4 in fp32, 2 in bf16) and 12 bytes of Adam
   state (fp32 master + two moments; 8 at stage 0 in fp32, where the parameters are the master):
       stage 0: (P + G + K) psi      stage 1: (P + G) psi + K psi / N
       stage 2: P psi + (G + K) psi / N      stage 3: (P + G + K) psi / N
2. Throughput. `pretrain` itself on a prepared synthetic cohort: samples/s and the fraction of
   step time spent waiting for data, medians over the logging intervals after the first.
   Baseline: the ZeRO-0 run of the same config (samples/s of stage k / stage 0).

ratio = the worst stage's agreement min(measured, formula) / max(measured, formula): meeting the
goal (within 10 % of the formula at every stage) means ratio >= 0.9.

    python benchmarks/bench_train.py [--quick] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import synthetic_batch
from bench_prepare import hardware

STAGES = (0, 1, 2, 3)
TARGET = 0.9


def formula_bytes(stage: int, psi: int, world: int, bf16: bool) -> float:
    """Model-state bytes per rank from the ZeRO paper (see the module docstring)."""
    p = g = 2 if bf16 else 4
    k = 8 if stage == 0 and not bf16 else 12
    return {
        0: (p + g + k) * psi,
        1: (p + g) * psi + k * psi / world,
        2: p * psi + (g + k) * psi / world,
        3: (p + g + k) * psi / world,
    }[stage]


def _storages(params=()) -> dict[int, int]:
    """data_ptr -> bytes of every live tensor storage reachable from Python, and of the gradients of
    `params` (autograd creates those in C++: Python sees them only once someone reads `.grad`)."""
    import torch

    out: dict[int, int] = {}
    grads = [p.grad for p in params if p.grad is not None]
    for obj in [*gc.get_objects(), *grads]:
        if isinstance(obj, torch.Tensor):
            try:
                storage = obj.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue  # tensors without storage (meta, sparse)
            if storage.nbytes() and storage.device.type != "meta":
                out[storage.data_ptr()] = storage.nbytes()
    return out


def _ptrs(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def memory_worker(loop_config: dict) -> None:
    """Per rank: peak model-state bytes of the engine, per stage, written to out_dir/rank<r>.json."""
    import deepspeed
    import ray.train
    import torch

    from jepa_ray.config import Config
    from jepa_ray.model.jepa import JEPA
    from jepa_ray.model.optim import param_groups
    from jepa_ray.model.tokenizers import InputDims
    from jepa_ray.train.engine import deepspeed_config

    cfg = Config.model_validate(loop_config["config"])
    dims = InputDims.from_dict(loop_config["dims"])
    batch = synthetic_batch(dims, cfg.pipeline.batch_size, 0.5, "cpu")
    results = {}
    for stage in STAGES:
        gc.collect()
        # holding the tensors alive keeps their addresses from being reused by the engine's
        before_tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
        before = _storages()
        torch.manual_seed(0)
        model = JEPA(dims, cfg.model)
        student = model.student
        psi = sum(p.numel() for p in student.parameters())
        tc = cfg.train.model_copy(update={"zero_stage": stage, "grad_accum": 2})
        ds_config = deepspeed_config(tc, cfg.pipeline.batch_size, False, psi, model.width)
        if stage >= 1:  # buckets of 1/16 of the student, as a model above 64M parameters gets them:
            # the check is of the partitioned states; a small model's 4M-element floor would dwarf them
            bucket = max(psi // 16 // 256 * 256, 256)
            ds_config["zero_optimization"].update(
                reduce_bucket_size=bucket, allgather_bucket_size=bucket, stage3_prefetch_bucket_size=bucket
            )
        engine, *_ = deepspeed.initialize(
            model=student, model_parameters=param_groups(student), config=ds_config
        )
        target = _ptrs([*model.target.parameters(), *model.target.buffers()])
        peak, where = 0, ""
        for micro in range(4):  # two optimizer steps of two micro-batches
            z = model.targets(batch)
            out = engine(batch, *z)
            engine.backward(out["loss"])
            leave_out = target | _ptrs([*z, *out.values()])  # alive now, so these are theirs
            for point in ("backward", "step"):
                if point == "step":
                    engine.step()
                gc.collect()
                counted = _storages(student.parameters()).items()
                now = sum(v for k, v in counted if k not in before and k not in leave_out)
                if micro >= 2 and now > peak:  # Adam's moments exist from the first step on
                    peak, where = now, f"{point} of micro-batch {micro}"
            del z, out
        results[stage] = {"psi": psi, "peak_bytes": peak, "peak_at": where}
        del engine, model, student, before_tensors
        gc.collect()
    rank = ray.train.get_context().get_world_rank()
    Path(loop_config["out_dir"], f"rank{rank}.json").write_text(json.dumps(results))


def measure_memory(cfg, dims: dict) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    with tempfile.TemporaryDirectory(prefix="bench-train-") as d:
        TorchTrainer(
            memory_worker,
            train_loop_config={"config": cfg.model_dump(mode="json"), "dims": dims, "out_dir": d},
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.train.num_workers, resources_per_worker={"CPU": cfg.train.cpus_per_worker}
            ),
            run_config=ray.train.RunConfig(name="bench-memory", storage_path=d),
        ).fit()
        ranks = [json.loads(p.read_text()) for p in sorted(Path(d).glob("rank*.json"))]
    # the rank holding the most (ranks differ by at most one parameter-partition rounding)
    return {stage: max((r[str(stage)] for r in ranks), key=lambda m: m["peak_bytes"]) for stage in STAGES}


def measure_throughput(cfg, stage: int) -> dict:
    from jepa_ray.train.trainer import pretrain

    run = cfg.model_copy(deep=True)
    run.train.zero_stage = stage
    t0 = time.perf_counter()
    info = pretrain(run, name=f"bench-zero{stage}-{int(time.time())}")
    wall = time.perf_counter() - t0
    with (Path(info.run_url) / "metrics" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))[1:]  # the first interval holds start-up
    return {
        "samples_per_s": statistics.median(float(r["samples_per_s"]) for r in rows),
        "data_wait": statistics.median(float(r["data_wait"]) for r in rows),
        "final_loss": float(rows[-1]["loss"]),
        "wall_s": wall,
    }


def _prepare(workdir: Path, cfg) -> str:
    from jepa_ray.ingest.prepare import prepare
    from jepa_ray.synth.cohort import cohort_inputs, write_cohort

    cohort, shards = workdir / "cohort", workdir / "shards"
    write_cohort(cohort, cfg.synth)
    result = prepare(str(shards), cfg.prepare, **cohort_inputs(cohort))
    if not result.ok:
        raise SystemExit("prepare failed: " + "; ".join(result.problems))
    return str(shards)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps (< 3 minutes on 2 CPUs)")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    ap.add_argument("--workdir", type=Path, default=None, help="cohort, shards and runs (default: temp)")
    args = ap.parse_args()
    os.environ.setdefault("JEPA_RAY_SALT", "benchmark-salt-not-secret-0123456789abcdef")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

    import ray

    from jepa_ray.config import load_config
    from jepa_ray.stream.pipeline import open_split

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-train-"))
    steps = 30 if args.quick else 90
    cfg = load_config(
        Path(__file__).resolve().parents[1] / "jepa_ray" / "configs" / "demo-cpu.yaml",
        overrides=[
            f"train.storage_path={workdir / 'runs'}",
            f"train.steps={steps}",
            "train.warmup_steps=5",
            "train.log_every=10",
            f"train.checkpoint_every={steps}",
            "train.val_batches=1",
            "model.width=256",  # big enough that per-tensor overheads do not hide the formulas
            "model.depth=4",
            "model.heads=4",
        ],
    )
    ray.init(
        num_cpus=os.cpu_count(), include_dashboard=True, dashboard_host="127.0.0.1", logging_level="WARNING"
    )
    cfg.train.shards = _prepare(workdir, cfg)
    dims = open_split(cfg.train.shards, "train").spec.model_dims(cfg.pipeline)

    memory = measure_memory(cfg, dims)
    throughput = {stage: measure_throughput(cfg, stage) for stage in STAGES}
    ray.shutdown()

    world, base = cfg.train.num_workers, throughput[0]["samples_per_s"]
    rows, agreement = [], []
    for stage in STAGES:
        m = memory[stage]
        formula = formula_bytes(stage, m["psi"], world, bf16=False)
        agree = min(m["peak_bytes"], formula) / max(m["peak_bytes"], formula)
        agreement.append(agree)
        t = throughput[stage]
        rows.append(
            {
                "zero_stage": stage,
                "samples_per_s": t["samples_per_s"],
                "vs_zero0": t["samples_per_s"] / base,
                "data_wait": t["data_wait"],
                "final_loss": t["final_loss"],
                "psi": m["psi"],
                "measured_bytes_per_rank": m["peak_bytes"],
                "formula_bytes_per_rank": formula,
                "measured_over_formula": m["peak_bytes"] / formula,
                "peak_at": m["peak_at"],
            }
        )
    print(
        f"{'ZeRO':>4} {'samples/s':>10} {'vs 0':>6} {'wait':>6} {'MB meas':>8} {'MB formula':>10} {'ratio':>6}"
    )
    for r in rows:
        print(
            f"{r['zero_stage']:>4} {r['samples_per_s']:>10.1f} {r['vs_zero0']:>6.2f} {r['data_wait']:>6.0%}"
            f" {r['measured_bytes_per_rank'] / 2**20:>8.1f} {r['formula_bytes_per_rank'] / 2**20:>10.1f}"
            f" {r['measured_over_formula']:>6.2f}"
        )
    ratio = min(agreement)
    print(f"model-state memory vs ZeRO formulas, worst stage: {ratio:.3f} (target >= {TARGET})")
    doc = {
        "name": "train",
        "hardware": hardware(),
        "config": {
            "workers": world,
            "steps": steps,
            "quick": args.quick,
            "precision": "fp32",
            "model": cfg.model.model_dump(mode="json"),
            "image_size": cfg.pipeline.image_size,
            "batch_size_per_worker": cfg.pipeline.batch_size,
        },
        "results": {"stages": rows},
        "ratio": ratio,
        "target": TARGET,
        "meets_target": ratio >= TARGET,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
