"""Training-input throughput: jepa-ray's Ray Data pipeline against webdataset + DataLoader.

System (a): `build_dataset` + `iter_training_batches` (Ray Data reading the shards, decoding,
augmenting and masking in `map_batches`, torch batches on the consumer side) on a local Ray with
`--cpus` CPUs. Baseline (b): `webdataset.WebDataset` over the same shards + `torch.utils.data.
DataLoader(num_workers=--cpus)` calling the very same `transform_batch` and `collate` per batch.
Both read the training split of one synthetic cohort, with the same batch size and image size.

Each runs `--epochs` epochs; the first is reported apart (process start-up, imports), the headline
is the samples/s of the later epochs. ratio = (a) / (b); higher is better; target >= 1.0.

    python benchmarks/bench_ingest.py [--quick] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prepare import hardware

os.environ.setdefault("JEPA_RAY_SALT", "benchmark-salt-not-secret-0123456789abcdef")


def _raw_batch(samples: list[dict]) -> dict[str, np.ndarray]:
    """webdataset samples (raw bytes per field) -> the column batch `transform_batch` takes."""
    col = lambda k: np.array([s.get(k) for s in samples], dtype=object)  # noqa: E731
    return {
        "key": np.array([s["__key__"] for s in samples], dtype=object),
        "shard": np.array([os.path.basename(s["__url__"]) for s in samples], dtype=object),
        "image": col("image.npy"),
        "ehr": col("ehr.npz"),
        "meta": col("meta.json"),
    }


def _loader_collate(samples, spec, cfg):
    from jepa_ray.stream.pipeline import collate
    from jepa_ray.stream.transform import transform_batch

    return collate(transform_batch(_raw_batch(samples), spec, cfg, train=True, epoch=0))


def run_epochs(batches_of_epoch, epochs: int) -> list[dict]:
    """Time each epoch: samples/s, time to the first batch."""
    out = []
    for e in range(epochs):
        t0 = time.perf_counter()
        first, n = None, 0
        for batch in batches_of_epoch(e):
            if first is None:
                first = time.perf_counter() - t0
            n += len(batch["key"])
        wall = time.perf_counter() - t0
        out.append({"samples": n, "seconds": wall, "samples_per_s": n / wall, "first_batch_s": first})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small cohort (< 3 minutes on 2 CPUs)")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    ap.add_argument("--subjects", type=int, default=None)
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    subjects = args.subjects or (300 if args.quick else 1500)

    import ray
    import torch
    import webdataset as wds

    from jepa_ray.config import SynthConfig, load_config
    from jepa_ray.ingest.prepare import prepare
    from jepa_ray.stream.pipeline import build_dataset, iter_training_batches, open_split
    from jepa_ray.synth.cohort import cohort_inputs, write_cohort

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    cohort, shards = work / "cohort", work / "shards"
    write_cohort(cohort, SynthConfig(subjects=subjects, seed=2))
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    prep = load_config(overrides=["prepare.shards.max_samples=128"]).prepare
    prepare(str(shards), prep, **cohort_inputs(cohort))
    cfg = load_config(
        overrides=[f"pipeline.image_size={args.image_size}", f"pipeline.batch_size={args.batch_size}"]
    ).pipeline
    split = open_split(str(shards), "train")

    # (a) Ray Data: one dataset, re-executed every epoch (new file order, new crops and masks)
    ds = build_dataset(split, cfg, train=True)
    ray_epochs = run_epochs(lambda e: iter_training_batches(ds, cfg), args.epochs)

    # (b) webdataset + DataLoader doing the same per-batch work
    urls = [str(p) for p in split.paths]
    torch.set_num_threads(1)

    def loader_epoch(e: int):
        dataset = wds.WebDataset(urls, shardshuffle=len(urls), seed=e, empty_check=False)
        loader = torch.utils.data.DataLoader(
            dataset.batched(
                cfg.batch_size, collation_fn=functools.partial(_loader_collate, spec=split.spec, cfg=cfg)
            ),
            batch_size=None,
            num_workers=args.cpus,
            prefetch_factor=cfg.prefetch_batches or None,
        )
        return iter(loader)

    base_epochs = run_epochs(loader_epoch, args.epochs)
    ray.shutdown()

    def steady(epochs: list[dict]) -> float:
        later = epochs[1:] or epochs
        return sum(e["samples"] for e in later) / sum(e["seconds"] for e in later)

    a, b = steady(ray_epochs), steady(base_epochs)
    ratio = a / b
    rows = [
        (f"samples per epoch (train split of {subjects} subjects)", f"{split.samples:8d}"),
        ("(a) Ray Data pipeline, epoch 1", f"{ray_epochs[0]['samples_per_s']:8.1f} samples/s"),
        ("(a) later epochs", f"{a:8.1f} samples/s"),
        ("(a) time to first batch, epoch 1 / later", "{:8.2f} / {:.2f} s".format(
            ray_epochs[0]["first_batch_s"], np.mean([e["first_batch_s"] for e in ray_epochs[1:]] or [0]))),
        (f"(b) webdataset + DataLoader({args.cpus} workers), epoch 1", f"{base_epochs[0]['samples_per_s']:8.1f} samples/s"),
        ("(b) later epochs", f"{b:8.1f} samples/s"),
        ("(b) time to first batch, epoch 1 / later", "{:8.2f} / {:.2f} s".format(
            base_epochs[0]["first_batch_s"], np.mean([e["first_batch_s"] for e in base_epochs[1:]] or [0]))),
        ("ratio (a) / (b), later epochs", f"{ratio:8.2f}  (target >= 1.0)"),
    ]  # fmt: skip
    width = max(len(r[0]) for r in rows)
    for name, val in rows:
        print(f"{name:<{width}}  {val}")
    report = {
        "name": "ingest",
        "hardware": hardware(),
        "config": {
            "subjects": subjects,
            "samples_per_epoch": split.samples,
            "cpus": args.cpus,
            "epochs": args.epochs,
            "image_size": args.image_size,
            "stored_size": split.spec.stored_size,
            "batch_size": args.batch_size,
            "quick": args.quick,
        },
        "results": {
            "ray_data": ray_epochs,
            "dataloader": base_epochs,
            "ray_data_steady": a,
            "dataloader_steady": b,
        },
        "ratio": ratio,
        "target": 1.0,
        "meets_target": ratio >= 1.0,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
