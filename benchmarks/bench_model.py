"""JEPA compute against the visible-token fraction: does the context encoder only pay for what it sees?

System: the context encoder's forward, and a whole JEPA training step (context + target encoders,
predictor, backward), on batches where a fraction f of the image patches is visible. Baseline: the
same model on the same batch with every patch visible (f = 1), measured in the same run.
ratio = forward time at f = 1 / forward time at f = 0.25 (higher is better; target >= 2.0, an
ideal encoder would reach ~4 as its cost is linear-to-quadratic in the tokens).

    python benchmarks/bench_model.py [--quick] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prepare import hardware

FRACTIONS = (1.0, 0.75, 0.5, 0.25)


def synthetic_batch(dims, b: int, visible: float, device: str) -> dict[str, torch.Tensor]:
    """An image-only batch in the pipeline's format with round(visible x N) context patches."""
    n, m, L = dims.patches, dims.num_target_blocks, dims.ehr_tokens
    g = torch.Generator().manual_seed(0)
    k = max(1, round(visible * n))
    order = torch.stack([torch.randperm(n, generator=g) for _ in range(b)])
    kt = max(1, n // 10)
    batch = {
        "image": torch.randn(b, 1, dims.image_size, dims.image_size, generator=g),
        "has_image": torch.ones(b, dtype=torch.bool),
        "has_ehr": torch.zeros(b, dtype=torch.bool),
        "ehr_code": torch.zeros(b, L, dtype=torch.long),
        "ehr_time": torch.zeros(b, L),
        "ehr_value": torch.zeros(b, L),
        "ehr_value_present": torch.zeros(b, L, dtype=torch.bool),
        "ehr_valid": torch.zeros(b, L, dtype=torch.bool),
        "ehr_ctx": torch.zeros(b, L, dtype=torch.bool),
        "ehr_tgt": torch.zeros(b, L, dtype=torch.bool),
        "policy": torch.zeros(b, dtype=torch.int8),
        "img_ctx_idx": order[:, :k].sort(-1).values,
        "img_ctx_keep": torch.ones(b, k, dtype=torch.bool),
        "img_tgt_idx": order[:, -m * kt :].reshape(b, m, kt),
        "img_tgt_keep": torch.ones(b, m, kt, dtype=torch.bool),
    }
    return {k: v.to(device) for k, v in batch.items()}


def timed(fn, repeats: int, device: str, warmup: int = 1) -> float:
    """Seconds per call of `fn(i)` over calls i = warmup .. warmup + repeats - 1, after `warmup`
    calls (i = 0 ..) that are not timed; on a GPU the peak-memory counter restarts after them."""
    for i in range(warmup):
        fn(i)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(warmup, warmup + repeats):
        fn(i)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def measure(preset: str, image_size: int, batch: int, repeats: int, device: str, dtype) -> dict:
    from jepa_ray.config import ModelConfig
    from jepa_ray.model.jepa import JEPA
    from jepa_ray.model.tokenizers import InputDims

    dims = InputDims(image_size, 16, 64, 2, (4,), 4, 16)
    model = JEPA(dims, ModelConfig(preset=preset)).to(device)
    rows = []
    for f in FRACTIONS:
        b = synthetic_batch(dims, batch, f, device)
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None):

            def forward(_, b=b):
                with torch.no_grad():
                    model.context(b, b["img_ctx_idx"], b["img_ctx_keep"], b["ehr_ctx"])

            def step(_, b=b):
                model.zero_grad(set_to_none=True)
                model(b)["loss"].backward()

            rows.append(
                {
                    "visible": f,
                    "forward_s": timed(forward, repeats, device),
                    "step_s": timed(step, repeats, device),
                }
            )
    full = rows[0]
    for r in rows:
        r["forward_vs_full"] = r["forward_s"] / full["forward_s"]
        r["step_vs_full"] = r["step_s"] / full["step_s"]
    return {"preset": preset, "image_size": image_size, "batch": batch, "rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny only (< 1 minute on 2 CPUs)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    runs = [("tiny", 224, 16, 10, None)]
    if not args.quick:
        runs.append(("small", 224, 8, 3, None))
        if device == "cuda":
            runs.append(("base", 224, 64, 10, torch.bfloat16))
    results = [measure(p, s, b, r, device, dt) for p, s, b, r, dt in runs]
    for res in results:
        print(f"{res['preset']} ({res['image_size']} px, batch {res['batch']}, {device})")
        for r in res["rows"]:
            print(
                f"  visible {r['visible']:4.2f}: forward {r['forward_s'] * 1e3:8.1f} ms ({r['forward_vs_full']:.2f}x)"
                f"   step {r['step_s'] * 1e3:8.1f} ms ({r['step_vs_full']:.2f}x)"
            )
    headline = results[-1] if len(results) > 1 else results[0]
    ratio = headline["rows"][0]["forward_s"] / headline["rows"][-1]["forward_s"]
    print(f"ratio: {headline['preset']} forward at 100% / at 25% visible = {ratio:.2f}  (target >= 2.0)")
    report = {
        "name": "model",
        "hardware": hardware(),
        "config": {
            "runs": [{"preset": p, "image_size": s, "batch": b} for p, s, b, _, _ in runs],
            "quick": args.quick,
        },
        "results": results,
        "ratio": ratio,
        "target": 2.0,
        "meets_target": ratio >= 2.0,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
