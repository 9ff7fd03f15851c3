"""The DeepSpeed config jepa-ray builds (bucket sizes DeepSpeed accepts for any model) and how a
worker loads DeepSpeed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from jepa_ray.train.engine import BUCKET_FLOOR, BUCKET_NUMEL, zero_buckets


@pytest.mark.parametrize("params", [1_000, 1_048_593, 21_800_017, 123_456_789, 10**11])
def test_zero_buckets_are_aligned_and_bounded_for_any_parameter_count(params):
    """A sixteenth of the student, at least 4M elements (fewer collectives for a small model), at
    most DeepSpeed's default: and a multiple of 256 (an odd all-gather bucket fails DeepSpeed's
    alignment assertion at start-up)."""
    b = zero_buckets(params, width=384)
    for key in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size"):
        assert b[key] % 256 == 0
        assert BUCKET_FLOOR <= b[key] <= BUCKET_NUMEL
        assert b[key] <= max(params // 16, BUCKET_FLOOR)
    assert b["stage3_param_persistence_threshold"] == 3840


def test_deepspeed_loads_without_importing_mlflow_and_mlflow_still_imports_after():
    """A fresh process (the test process has both imported already): the worker's DeepSpeed import
    skips its autotuner's MLflow import, and leaves `import mlflow` working for the tracker."""
    code = (
        "import sys\n"
        "from jepa_ray.train.engine import load_deepspeed\n"
        "ds = load_deepspeed()\n"
        "assert ds.initialize and 'mlflow' not in sys.modules, sorted(m for m in sys.modules if 'mlflow' in m)\n"
        "from deepspeed.autotuning import autotuner\n"
        "assert autotuner.has_mlflow is False\n"
        "import mlflow\n"
        "assert mlflow.start_run and load_deepspeed() is ds\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
