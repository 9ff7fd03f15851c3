"""jepa-ray against timm itself, both ways (`benchmarks/check_timm.py`, in a subprocess): an
export with `--format timm` loaded by `timm.create_model("local-dir:...", pretrained=True)` gives
jepa-ray's tokens and pooled embedding; ViTs created by timm with random weights (one channel; RGB
with LayerScale) initialise a jepa-ray model whose features are timm's on the same image.

timm is installed without its dependencies (README, `.ci/run`): it imports torchvision, and the
torchvision PyPI has for Linux is a CUDA build that cannot load beside the CPU-only torch (and,
installed, breaks `transformers`). The check gives timm's import an empty torchvision; a ViT's
forward uses nothing from it. It runs in its own process so that stand-in reaches no other test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CHECK = Path(__file__).resolve().parents[2] / "benchmarks" / "check_timm.py"


def test_timm_loads_the_export_and_its_vits_initialise_a_run_with_the_same_features(tmp_path):
    try:
        import importlib.metadata

        version = importlib.metadata.version("timm")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(
            "timm is not installed: pip install --no-deps timm==1.0.29 (see the README's test command)"
        )
    out = tmp_path / "timm.json"
    r = subprocess.run(
        [sys.executable, str(CHECK), "--stub-torchvision", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["timm"] == version and len(result["cases"]) == 4 and len(result["imports"]) == 2
    for case in result["cases"]:
        limit = 1e-5 if case["norm_eps"] == 1e-6 else 5e-3  # timm's LayerNorm epsilon is 1e-6
        assert case["max_abs_diff_tokens"] < limit and case["max_abs_diff_pooled"] < limit, case
    assert any(c["max_abs_diff_tokens"] > 1e-4 for c in result["cases"] if c["norm_eps"] == 1e-5)
    for case in result["imports"]:
        assert case["layout"] == "timm" and case["unused"] == []
        assert case["max_abs_diff_tokens"] < 1e-5, case
