"""The pretraining step on one GPU: ViT-B/16 samples/s and MFU, bare and inside DeepSpeed ZeRO-2.

One process, no Ray (so that it runs on a machine that has PyTorch and a GPU but no Ray cluster):
the JEPA training step of `jepa_ray.train.loop.train_step` (context encoder, EMA target, predictor,
SIGReg, backward, optimizer step, EMA update) on synthetic 224 px batches with the default masks'
share of visible patches (`--visible`), in three forms measured in the same run:

1. bare PyTorch, fp32 (TF32 matmuls allowed): the baseline;
2. bare PyTorch, bf16 autocast: samples/s against (1);
3. the pretraining's own DeepSpeed engine (`deepspeed_config`, ZeRO-2, bf16, one rank; the step
   `jepa-ray pretrain` runs): samples/s against (2), the engine's overhead.

MFU = samples/s x model FLOPs per sample (`jepa_ray.bench.train_flops_per_sample`, the convention of
`jepa-ray bench train`: every token counted) / the GPU's dense bf16 peak (`jepa_ray.bench.PEAK_TFLOPS`
by device name). Peak memory per form from torch.cuda. `--quick`: the tiny model at 32 px, on
whatever device there is (a check of the script, not a measurement).

    python benchmarks/bench_gpu.py [--preset base] [--batch 64] [--steps 20] [--quick] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import synthetic_batch, timed
from bench_prepare import hardware


def config(preset: str, image_size: int, patch: int, batch: int, zero: int):
    from jepa_ray.config import load_config

    return load_config(
        overrides=[
            f"model.preset={preset}",
            f"pipeline.image_size={image_size}",
            f"pipeline.patch_size={patch}",
            f"pipeline.batch_size={batch}",
            "pipeline.max_events=16",
            f"train.zero_stage={zero}",
            "train.num_workers=1",
            "train.precision=bf16",
        ]
    )


def batches(dims, batch: int, visible: float, device: str, n: int = 4) -> list[dict]:
    """`n` synthetic batches (different patches visible), with the keys the training step reads."""
    out = []
    for i in range(n):
        torch.manual_seed(i)
        b = synthetic_batch(dims, batch, visible, device)
        b["key"] = [f"s{i}-{j}" for j in range(batch)]
        out.append(b)
    return out


def bare(cfg, dims, data, steps: int, device: str, bf16: bool) -> dict:
    """The single-process training step (jepa_ray.model.optim.train_step), fp32 or bf16 autocast."""
    from jepa_ray.model.jepa import JEPA
    from jepa_ray.model.optim import Schedule, make_optimizer, train_step

    torch.manual_seed(0)
    model = JEPA(dims, cfg.model).to(device)
    schedule = Schedule(total_steps=1000, lr=1e-4, warmup_steps=10)
    optimizer = make_optimizer(model, schedule)
    counter = iter(range(10**9))

    def step(b):
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            train_step(model, optimizer, b, next(counter), schedule)

    return {"s_per_step": timed(lambda i: step(data[i % len(data)]), steps, device, warmup=3)}


def engine(cfg, dims, data, steps: int, device: str) -> dict:
    """The pretraining's step inside its DeepSpeed engine (one rank)."""
    if device == "cuda":  # a DeepSpeed built on a machine without a GPU must not pick its CPU backend
        os.environ.setdefault("DS_ACCELERATOR", "cuda")
    import deepspeed

    from jepa_ray.model.jepa import JEPA
    from jepa_ray.model.optim import Schedule, param_groups
    from jepa_ray.train.engine import deepspeed_config
    from jepa_ray.train.loop import Hooks, Worker, _skip_cpu_shm_op, train_step

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    if device == "cpu":
        _skip_cpu_shm_op()
    torch.manual_seed(0)
    model = JEPA(dims, cfg.model)
    student = model.student
    tc = cfg.train
    eng, *_ = deepspeed.initialize(
        model=student,
        model_parameters=param_groups(student),
        config=deepspeed_config(
            tc,
            cfg.pipeline.batch_size,
            device == "cuda",
            sum(p.numel() for p in student.parameters()),
            model.width,
            1,
        ),
    )
    model.target.to(device)
    w = Worker(
        cfg=cfg,
        dims=dims,
        run_url="",
        rank=0,
        world=1,
        device=torch.device(device),
        model=model,
        engine=eng,
        schedule=Schedule(total_steps=1000, lr=1e-4, warmup_steps=10),
        hooks=Hooks(),
    )
    return {"s_per_step": timed(lambda i: train_step(w, data[i % len(data)]), steps, device, warmup=3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="base")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--visible", type=float, default=0.25, help="share of image patches the context sees")
    ap.add_argument("--quick", action="store_true", help="tiny model at 32 px: checks the script")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.preset, args.image_size, args.patch, args.batch, args.steps = "tiny", 32, 8, 8, 3
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    from jepa_ray.bench import PEAK_TFLOPS, train_flops_per_sample
    from jepa_ray.model.tokenizers import InputDims

    cfg = config(args.preset, args.image_size, args.patch, args.batch, 2)
    dims = InputDims(args.image_size, args.patch, 64, 2, (4,), 4, 16)
    data = batches(dims, args.batch, args.visible, device)
    flops = train_flops_per_sample(cfg, dims)
    name = torch.cuda.get_device_name(0) if device == "cuda" else None
    peak = next((v for k, v in PEAK_TFLOPS.items() if name and k in name), None)
    forms = {}
    for form, run in (
        ("fp32", lambda: bare(cfg, dims, data, args.steps, device, bf16=False)),
        ("bf16", lambda: bare(cfg, dims, data, args.steps, device, bf16=True)),
        ("zero2_bf16", lambda: engine(cfg, dims, data, args.steps, device)),
    ):
        r = run()
        r["samples_per_s"] = args.batch / r["s_per_step"]
        r["mfu"] = r["samples_per_s"] * flops / (peak * 1e12) if peak else None
        r["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
        forms[form] = r
        mfu = "" if r["mfu"] is None else f"  MFU {100 * r['mfu']:.1f}%"
        mem = "" if r["peak_mem_gib"] is None else f"  peak {r['peak_mem_gib']:.1f} GiB"
        print(
            f"{form:<11} {r['samples_per_s']:9.1f} samples/s  {r['s_per_step'] * 1e3:8.1f} ms/step{mfu}{mem}",
            flush=True,
        )
        if device == "cuda":
            torch.cuda.empty_cache()
    ratios = {
        "bf16_over_fp32": forms["bf16"]["samples_per_s"] / forms["fp32"]["samples_per_s"],
        "zero2_over_bare_bf16": forms["zero2_bf16"]["samples_per_s"] / forms["bf16"]["samples_per_s"],
    }
    print(
        f"{args.preset} {args.image_size} px, batch {args.batch}, {device} ({name or 'no GPU'}): bf16 / fp32 "
        f"{ratios['bf16_over_fp32']:.2f}x; ZeRO-2 engine / bare bf16 {ratios['zero2_over_bare_bf16']:.2f}x"
    )
    report = {
        "name": "gpu",
        "hardware": hardware(),
        "config": {
            **vars(args),
            "out": str(args.out),
            "device": device,
            "flops_per_sample": flops,
            "peak_tflops": peak,
        },
        "results": forms,
        "ratios": ratios,
        "quick": args.quick,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
