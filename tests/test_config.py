"""Config: YAML + overrides, and clear errors naming the bad key."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from jepa_ray.cli import app
from jepa_ray.config import load_config
from jepa_ray.errors import ConfigError


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("prepare:\n  image:\n    size: 128\n  split:\n    external_sites: [A]\n")
    cfg = load_config(p, ["prepare.shards.max_samples=7", "prepare.split.val=0.2"])
    assert cfg.prepare.image.size == 128
    assert cfg.prepare.shards.max_samples == 7
    assert cfg.prepare.split.val == 0.2
    assert cfg.prepare.split.external_sites == ["A"]


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("prepare:\n  image:\n    sise: 128\n")
    with pytest.raises(ConfigError, match=r"prepare\.image\.sise: unknown key"):
        load_config(p)


def test_ill_typed_value_is_named():
    with pytest.raises(ConfigError, match=r"prepare\.image\.size: .*integer.*'big'"):
        load_config(overrides=["prepare.image.size=big"])
    with pytest.raises(ConfigError, match=r"prepare\.split: .*val \+ test"):
        load_config(overrides=["prepare.split.val=0.5", "prepare.split.test=0.5"])


def test_bad_override_syntax_and_files(tmp_path):
    with pytest.raises(ConfigError, match=r"expected key\.path=value"):
        load_config(overrides=["prepare.image.size"])
    with pytest.raises(ConfigError, match="cannot read it"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prepare: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cli_reports_config_errors_and_exits_2(tmp_path):
    r = CliRunner().invoke(app, ["inspect", str(tmp_path), "prepare.nope=1"])
    assert r.exit_code == 2
    assert "prepare.nope: unknown key" in r.output


def test_example_configs_load():
    from pathlib import Path

    root = Path(__file__).parents[1]
    configs = sorted(
        [*(root / "jobs" / "configs").glob("*.yaml"), *(root / "jepa_ray" / "configs").glob("*.yaml")]
    )
    assert len(configs) >= 7
    for c in configs:
        load_config(c)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["pipeline.image_size=100"], r"pipeline: .*image_size 100 is not a multiple of patch_size 16"),
        (["pipeline.crop_scale=[0.9, 1.2]"], r"pipeline: .*crop_scale: need 0 < low <= high <= 1"),
        (
            ["pipeline.image_size=32", "pipeline.mask.min_context_patches=4"],
            r"min_context_patches must be below the 4",
        ),
        (["pipeline.mask.mask_ratio=1.5"], r"pipeline\.mask\.mask_ratio: .*less than 1"),
        (["pipeline.mask.policy.cross_modl=1"], r"pipeline\.mask\.policy\.cross_modl: unknown key"),
        (
            ["eval.survival_stopping=committee", "eval.survival_head_seeds=1"],
            r"eval: .*survival_stopping=committee needs survival_head_seeds of at least 2",
        ),
        (["eval.survival_stopping=test"], r"eval\.survival_stopping: .*'val' or 'committee'"),
    ],
)
def test_pipeline_settings_are_checked_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=override)


def test_mask_ratio_is_one_override_away():
    cfg = load_config(overrides=["pipeline.mask.mask_ratio=0.7"]).pipeline
    assert cfg.mask.mask_ratio == 0.7 and cfg.mask.target_scale is None


def test_the_default_tune_objective_fits_the_sweep_and_the_zero_stage():
    assert load_config().tune.objective == "val_loss"
    lr = "tune.space={train.lr: {values: [0.001, 0.003]}, pipeline.mask.mask_ratio: {values: [0.5, 0.7]}}"
    assert load_config(overrides=[lr]).tune.objective == "val_loss"
    # val_loss does not compare predictors, losses or SIGReg weights: the default moves to lidar_context
    for key in ("model.predictor_depth", "model.sigreg", "model.objective"):
        values = {
            "model.predictor_depth": "[1, 2]",
            "model.sigreg": "[0.0, 0.05]",
            "model.objective": "[jepa, mae]",
        }
        cfg = load_config(overrides=[f"tune.space={{{key}: {{values: {values[key]}}}}}"])
        assert cfg.tune.objective == "lidar_context", key
    # val_loss and lidar_context run the context encoder on one worker, which ZeRO-3 shards
    zero3 = load_config(overrides=["train.zero_stage=3"])
    assert zero3.tune.objective == "lidar"
    assert type(zero3).model_validate(zero3.model_dump()).tune.objective == "lidar"
    # a named objective is kept (the sweep refuses the ones that cannot run, naming the key)
    assert load_config(overrides=["train.zero_stage=3", "tune.objective=rankme"]).tune.objective == "rankme"


def test_numbers_in_exponent_notation_are_numbers_in_configs_and_overrides(tmp_path):
    """YAML 1.1 (PyYAML's) reads `1e-05` as a string; jepa-ray reads it as YAML 1.2 does, so a
    sweep's values reach the trials, Tune and the trackers as numbers; quoted, it stays a string."""
    space = "{train.lr: {values: [1e-05, 3E-4, 2.5e-3]}, train.weight_decay: {values: [1e-4, '1e-4']}}"
    cfg = load_config(overrides=[f"tune.space={space}", "train.lr=5e-4", "train.steps=2e3"])
    assert cfg.tune.space["train.lr"].values == [1e-05, 3e-4, 2.5e-3]
    assert all(isinstance(v, float) for v in cfg.tune.space["train.lr"].values)
    assert cfg.tune.space["train.weight_decay"].values == [1e-4, "1e-4"]
    assert cfg.train.lr == 5e-4 and cfg.train.steps == 2000
    path = tmp_path / "sweep.yaml"
    path.write_text("train:\n  lr: 1e-5\ntune:\n  space:\n    train.lr: {values: [1e-05, 1e-4]}\n")
    from_file = load_config(path)
    assert from_file.train.lr == 1e-5 and from_file.tune.space["train.lr"].values == [1e-05, 1e-4]


def test_run_and_sweep_names_are_plain_directory_names():
    from jepa_ray.train.trainer import run_name
    from jepa_ray.tune.sweep import sweep_name

    cfg = load_config(overrides=["train.name=from-config", "tune.name=sweep.1"])
    assert run_name(cfg) == "from-config" and run_name(cfg, "given_2") == "given_2"
    assert sweep_name(cfg) == "sweep.1"
    assert run_name(load_config()).startswith("jepa-") and sweep_name(load_config()).startswith("tune-")
    with pytest.raises(ConfigError, match=r"train.name '\.\./up': use letters"):
        run_name(cfg, "../up")
    with pytest.raises(ConfigError, match=r"tune.name 'a b': use letters"):
        sweep_name(load_config(overrides=["tune.name=a b"]))


def test_workers_elastic_range_and_global_batch():
    """num_workers is a count or [min, max]; global_batch fixes the samples of a step, and the
    accumulation follows the number of workers the run has."""
    fixed = load_config(overrides=["train.num_workers=4"]).train
    assert (fixed.min_workers, fixed.max_workers, fixed.elastic) == (4, 4, False)
    elastic = load_config(overrides=["train.num_workers=[1, 4]"]).train
    assert (elastic.min_workers, elastic.max_workers, elastic.elastic) == (1, 4, True)
    assert load_config(overrides=["train.num_workers=[2, 2]"]).train.num_workers == 2
    for bad in ("[2, 1]", "[0, 2]", "0"):
        with pytest.raises(ConfigError, match=r"train\.num_workers: .*min <= max"):
            load_config(overrides=[f"train.num_workers={bad}"])

    cfg = load_config(
        overrides=[
            "train.num_workers=[1, 4]",
            "pipeline.batch_size=8",
            "train.global_batch=96",
            "train.grad_accum=5",
        ]
    )
    b = cfg.pipeline.batch_size
    assert [cfg.train.accumulation(b, w) for w in (1, 2, 3, 4)] == [12, 6, 4, 3]
    assert load_config().train.accumulation(b, 3) == 1  # no global_batch: train.grad_accum
    # what a run's remaining steps read: the global batch per step, whatever the world size
    assert [cfg.train.rows(10, b, w) for w in (1, 2, 3, 4)] == [960] * 4
    assert load_config(overrides=["train.grad_accum=5"]).train.rows(10, b, 3) == 10 * 5 * 8 * 3
    with pytest.raises(ConfigError, match=r"global_batch=64 is not a multiple of pipeline\.batch_size=8 x 3"):
        load_config(overrides=["train.num_workers=[2, 4]", "pipeline.batch_size=8", "train.global_batch=64"])
