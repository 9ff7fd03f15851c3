"""The README's demo path through the command line: synth → prepare → inspect."""

from __future__ import annotations

import json
import re
from pathlib import Path

from typer.testing import CliRunner

from jepa_ray.cli import app


def test_synth_prepare_inspect(ray_session, tmp_path):
    runner = CliRunner()
    cohort, shards = tmp_path / "cohort", tmp_path / "shards"
    synth_args = ["synth", "--subjects", "12", "--out", str(cohort), "--seed", "5"]
    size = ["synth.min_size=64", "synth.max_size=96"]
    r = runner.invoke(app, [*synth_args, *size])
    assert r.exit_code == 0, r.output
    assert "images=" in r.output and (cohort / "synth.json").exists()
    # rerunning the same command is a no-op; a different cohort into the same place is an error
    assert runner.invoke(app, [*synth_args, *size]).exit_code == 0
    r = runner.invoke(app, ["synth", "--subjects", "13", "--out", str(cohort), *size])
    assert r.exit_code == 2 and "not empty" in r.output

    args = ["prepare", "--out", str(shards), "--dicom", str(cohort / "dicom"), "--meds", str(cohort / "meds")]
    args += ["--static", str(cohort / "static.parquet"), "--outcomes", str(cohort / "outcomes.parquet")]
    r = runner.invoke(app, [*args, "prepare.image.size=32"])
    assert r.exit_code == 0, r.output
    assert "samples per split" in r.output and "shards written: " in r.output
    # not a terminal: each phase's progress as plain lines, no escape codes and no bars
    assert "\x1b[" not in r.output, r.output
    lines = r.output.splitlines()
    assert "scan DICOM: 0/1" in lines and not any("━" in x for x in lines if x.startswith("scan")), lines
    assert any(re.fullmatch(r"scan DICOM: done: \d+/\d+ in \d+s", line) for line in lines), lines
    assert any(re.fullmatch(r"write shards: done: \d+/\d+ in \d+s", line) for line in lines), lines
    assert f"log: {(shards / 'jepa-ray.log').resolve()}" in r.output
    assert "write shards: done" in (shards / "jepa-ray.log").read_text()
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["image"]["size"] == 32
    assert manifest["counts"]["image"] == json.loads((cohort / "synth.json").read_text())["summary"]["images"]

    r = runner.invoke(app, ["inspect", str(shards), "--verify"])
    assert r.exit_code == 0 and "match their sha256" in r.output


def test_the_demos_configs_ship_with_the_package_and_run_from_any_directory(ray_session, tmp_path):
    """From a directory outside the checkout, the shipped configs are found by name alone."""
    import subprocess
    import sys

    def jepa_ray(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "jepa_ray", *args]
        return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    assert not (tmp_path / "jepa_ray").exists()
    r = jepa_ray("demo", "--help")
    assert r.returncode == 0 and "demo-cpu.yaml" in r.stdout, r.stdout + r.stderr
    r = jepa_ray(
        *("synth", "--config", "prepare-demo.yaml", "--subjects", "12", "--out", "cohort"),
        *("synth.min_size=64", "synth.max_size=96"),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    address = ray_session.get_runtime_context().gcs_address
    r = jepa_ray(
        *("prepare", "--config", "prepare-demo.yaml", "--out", "shards"),
        *("--dicom", "cohort/dicom", "--meds", "cohort/meds"),
        *("prepare.image.size=32", f"ray_address={address}"),
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text())["image"]["size"] == 32
    # the shards too, where the command was run (Ray's workers run elsewhere: a relative --out is the
    # driver's), and nothing in the checkout
    assert list((tmp_path / "shards").glob("*.tar"))
    assert not (Path(__file__).resolve().parents[1] / "shards").exists()
    r = jepa_ray("pretrain", "--config", "no-such-config.yaml")
    assert r.returncode == 2 and "demo-cpu.yaml" in r.stderr + r.stdout  # the shipped ones are listed


def test_missing_inputs_and_manifest_are_clear_errors(ray_session, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["prepare", "--out", str(tmp_path / "o"), "--dicom", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "--dicom" in r.output and "no such file" in r.output
    r = runner.invoke(app, ["prepare", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "nothing to ingest" in r.output and "--static" in r.output
    r = runner.invoke(app, ["inspect", str(tmp_path)])
    assert r.exit_code == 2 and "no manifest" in r.output


TUNE_DEMO = str(Path(__file__).resolve().parents[1] / "jepa_ray" / "configs" / "tune-demo.yaml")


def test_tune_refuses_a_bad_search_space_before_ray_starts(tmp_path):
    r = CliRunner().invoke(
        app,
        [
            "tune",
            "-c",
            TUNE_DEMO,
            f"train.shards={tmp_path}",
            "tune.space={pipeline.mask.mask_ratio: {values: [0.5, 1.2]}, model.predictor_depth: {values: [2]}}",
        ],
    )
    assert r.exit_code == 2, r.output
    assert "tune.space.pipeline.mask.mask_ratio: value 1.2 is not allowed" in r.output
    r = CliRunner().invoke(app, ["tune", "-c", TUNE_DEMO, "--objective", "loss"])
    assert r.exit_code == 2 and "tune.objective" in r.output


def test_sweep_summary_marks_the_best_trial(capsys):
    from jepa_ray.cli import _print_sweep
    from jepa_ray.tune.sweep import SweepInfo

    def row(trial, mask, depth, objective, steps):
        return {"trial": trial, "pipeline.mask.mask_ratio": mask, "model.predictor_depth": depth} | {
            "objective": objective,
            "rankme": 8.0,
            "steps": steps,
            "stopped_early": steps < 120,
            "status": "TERMINATED",
        }

    rows = [row("t0", 0.3, 1, 0.9, 40), row("t1", 0.5, 2, 0.7, 120), row("t2", 0.7, 1, None, 120)]
    rows[1]["objective_se"] = 0.02
    rows[2]["collapsed"] = True  # ranked last by the collapse guard
    sp = {"rho": -0.5, "step": 40, "trials": 2}
    gap = {"runner_up": "t3", "gap": 0.01, "se": 0.03, "beyond_noise": False}
    _print_sweep(SweepInfo("s", "/x", rows, rows[1], sp, {}, {"best.yaml": "/x/best.yaml"}, gap=gap))
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if "t1" in line)
    assert row.split() == ["*", "t1", "0.5", "2", "0.7000", "0.0200", "120", "done"]
    assert next(line for line in lines if "t0" in line).split() == [
        "t0",
        "0.3",
        "1",
        "0.9000",
        "-",
        "40",
        "early",
    ]
    assert "collapsed" in next(line for line in lines if "t2" in line)
    assert any("Best beyond noise: no (gap to the runner-up t3 0.01" in line for line in lines)
    assert any("across 2 trials at step 40: -0.50" in line for line in lines)
    assert lines[-1] == "run the best: jepa-ray pretrain --config /x/best.yaml"
