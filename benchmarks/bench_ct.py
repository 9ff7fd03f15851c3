"""CT: series assembly throughput, and what activation checkpointing buys a 3-D encoder.

1. Series. System: `jepa_ray.ingest.series` on chest-CT phantom series written one file per slice
   (group by series, order along the normal, check, HU, resample to prepare.volume's spacing and
   size, window into channels). Baseline, measured in the same run: a plain loop of
   `pydicom.dcmread(f).pixel_array` over the same files (no ordering, no checks, no resampling).
   ratio = system slices/s / baseline slices/s (what the volume costs over merely reading it).
2. Memory. A 3-D JEPA training step (context + target encoders, predictor, backward) at ViT-S
   width on a CT-sized volume, with every encoder block checkpointed vs none, each in a fresh
   process: the bytes autograd keeps for the backward pass (saved-tensor hooks; a recomputed block
   keeps only its input, not counted), the peak resident memory the step adds (ru_maxrss after -
   before: allocator noise included) and the step time. ratios = without / with checkpointing for
   memory (higher is better), with / without for time.

    python benchmarks/bench_ct.py [--quick] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prepare import hardware


def write_series(root: Path, n: int, size: int, slices: int) -> list[Path]:
    from jepa_ray.synth.ct_phantom import CTStudy, write_ct_series

    for i in range(n):
        job = CTStudy(
            path=f"s{i}", entropy=(9, i), z=(0.0, 0.5, 0.0), thorax=150.0, site=0, size=size, slices=slices,
            spacing=round(380 / size, 4), step=round(300 / slices, 3), noise=15.0, patient_name="P^Q",
            patient_id=str(i), birth_date="19500101", sex="F", age="070Y", physician="R^S", accession=f"A{i}",
            study_date="20200101", study_time="120000", study_uid=f"1.2.999.73.1.{i}", series_uid=f"1.2.999.73.2.{i}",
            frame_uid=f"1.2.999.73.5.{i}", sop_uids=tuple(f"1.2.999.73.3.{i}.{k}" for k in range(slices)),
        )  # fmt: skip
        write_ct_series(job, root)
    return sorted(root.rglob("*.dcm"))


def bench_series(work: Path, n: int, size: int, slices: int) -> dict:
    import pydicom

    from jepa_ray.config import VolumeConfig
    from jepa_ray.ingest.series import group_series, read_volume

    files = write_series(work / "ct", n, size, slices)
    cfg = VolumeConfig(enabled=True)
    first = [f for f in files if f.parent == files[0].parent]
    pydicom.dcmread(files[0]).pixel_array  # noqa: B018 - warm-up of both: imports, decoder lookup
    read_volume(next(iter(group_series(first)[0].values())), cfg)
    t0 = time.perf_counter()
    for f in files:
        pydicom.dcmread(f).pixel_array  # noqa: B018 - the decode is the work
    base = len(files) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    series, problems = group_series(files)
    assert not problems and len(series) == n
    shapes = []
    for refs in series.values():
        volume, _meta = read_volume(refs, cfg)
        shapes.append(list(volume.shape))
    system = len(files) / (time.perf_counter() - t0)
    return {
        "series": n,
        "slices_per_series": slices,
        "slice_size": size,
        "volume": shapes[0],
        "baseline_slices_per_s": base,
        "system_slices_per_s": system,
        "ratio": system / base,
    }


STEP = r"""
import json, resource, sys, time, torch
from jepa_ray.config import ModelConfig
from jepa_ray.model.jepa import JEPA
ckpt, width, depth, volume, tubelet, batch = json.loads(sys.argv[1])
torch.manual_seed(0); torch.set_num_threads(max(1, torch.get_num_threads()))
dims = dict(image_size=16, patch_size=16, vocab_size=8, n_num=0, cat_sizes=[], max_static_codes=0, max_events=1,
            channels=2, volume_size=volume, tubelet=tubelet)
model = JEPA(dims, ModelConfig(width=width, depth=depth, heads=6, activation_checkpointing=ckpt))
n, m = model.dims.patches, 4
g = torch.Generator().manual_seed(0)
order = torch.stack([torch.randperm(n, generator=g) for _ in range(batch)])
k, kt = n // 2, n // 16
b = {"image": torch.randn(batch, 2, *volume, generator=g), "has_image": torch.ones(batch, dtype=torch.bool),
     "has_ehr": torch.zeros(batch, dtype=torch.bool), "ehr_code": torch.zeros(batch, 1, dtype=torch.long),
     "ehr_time": torch.zeros(batch, 1), "ehr_value": torch.zeros(batch, 1),
     "ehr_value_present": torch.zeros(batch, 1, dtype=torch.bool), "ehr_valid": torch.zeros(batch, 1, dtype=torch.bool),
     "ehr_ctx": torch.zeros(batch, 1, dtype=torch.bool), "ehr_tgt": torch.zeros(batch, 1, dtype=torch.bool),
     "policy": torch.zeros(batch, dtype=torch.int8), "img_ctx_idx": order[:, :k].sort(-1).values,
     "img_ctx_keep": torch.ones(batch, k, dtype=torch.bool), "img_tgt_idx": order[:, -m * kt:].reshape(batch, m, kt),
     "img_tgt_keep": torch.ones(batch, m, kt, dtype=torch.bool)}
saved = {}
def pack(t):  # what autograd keeps for the backward pass (a recomputed block keeps only its input)
    st = t.untyped_storage()
    saved[st.data_ptr()] = st.nbytes()
    return t
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    loss = model(b)["loss"]
loss.backward()
step = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"step_s": step, "peak_added_mib": (peak - before) / 1024, "saved_for_backward_mib":
                  sum(saved.values()) / 2**20, "tokens": n, "context_tokens": k}))
"""


def bench_memory(width: int, depth: int, volume: list[int], tubelet: list[int], batch: int) -> dict:
    out = {}
    for name, ckpt in (("none", 0), ("every_block", -1)):
        args = json.dumps([ckpt, width, depth, volume, tubelet, batch])
        res = subprocess.run([sys.executable, "-c", STEP, args], capture_output=True, text=True, check=True)
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])
    return {
        "model": {"width": width, "depth": depth, "volume": volume, "tubelet": tubelet, "batch": batch},
        **out,
        "memory_ratio": out["none"]["peak_added_mib"] / out["every_block"]["peak_added_mib"],
        "saved_ratio": out["none"]["saved_for_backward_mib"] / out["every_block"]["saved_for_backward_mib"],
        "time_ratio": out["every_block"]["step_s"] / out["none"]["step_s"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer, smaller series; a smaller volume")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="bench-ct-") as work:
        n, size, slices = (3, 128, 40) if args.quick else (6, 256, 80)
        series = bench_series(Path(work), n, size, slices)
    volume = [32, 96, 96] if args.quick else [64, 128, 128]
    memory = bench_memory(384, 12, volume, [4, 16, 16], 2)
    print(
        f"series: {series['system_slices_per_s']:.0f} slices/s assembled into {series['volume']} volumes vs "
        f"{series['baseline_slices_per_s']:.0f} slices/s read by a plain pydicom loop: ratio {series['ratio']:.2f}"
    )
    for name in ("none", "every_block"):
        m = memory[name]
        print(
            f"3-D step ({m['tokens']} tubelets, {m['context_tokens']} visible), checkpointing {name}: "
            f"{m['step_s']:.2f} s, peak +{m['peak_added_mib']:.0f} MiB, saved for backward "
            f"{m['saved_for_backward_mib']:.0f} MiB"
        )
    print(
        f"checkpointing: saved for backward / {memory['saved_ratio']:.2f}, peak memory / "
        f"{memory['memory_ratio']:.2f}, step time x {memory['time_ratio']:.2f}"
    )
    report = {
        "name": "ct",
        "hardware": hardware(),
        "config": {"quick": args.quick},
        "results": {"series": series, "memory": memory},
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
