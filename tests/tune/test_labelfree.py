"""The label-free objectives on embeddings whose answer is known and on a tiny JEPA fed real
pipeline batches: LiDAR counts the directions that tell samples apart across masked views, the
fixed-mask loss ignores the trial's own masks, every value comes with a finite standard error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jepa_ray.config import ModelConfig, load_config
from jepa_ray.model.jepa import JEPA
from jepa_ray.stream.local import raw_batch, read_samples
from jepa_ray.stream.pipeline import collate, open_split
from jepa_ray.stream.transform import transform_batch
from jepa_ray.tune.labelfree import MIN_CLASSES, bootstrap_se, collapsed, health, lidar, rankme, spread
from jepa_ray.tune.objective import COLLAPSED, LABEL_FREE, measure, pooled_embeddings


def _views(k: int, n: int = 96, q: int = 8, d: int = 16, seed: int = 0) -> np.ndarray:
    """(n, q, d): each sample is told apart by k directions; the view (its mask) moves the rest."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, q, d))  # view-to-view variation everywhere
    z[:, :, :k] = 0.05 * z[:, :, :k] + rng.standard_normal((n, 1, k))  # k sample directions
    return z


def test_lidar_counts_the_directions_that_tell_samples_apart():
    values = [lidar(_views(k)) for k in (2, 4, 8, 12)]
    assert values == sorted(values) and values[-1] > 2 * values[0]
    assert 1.5 < values[0] < 3.5 and 6 < values[2] < 10  # about k
    z = _views(4)
    assert lidar(1000 * z) == pytest.approx(lidar(z), rel=1e-6)  # scale-free
    # RankMe sees the views' variation too: it cannot tell 2 useful directions from 12
    flat = lambda z: z.reshape(-1, z.shape[-1])  # noqa: E731
    assert abs(rankme(flat(_views(2))) - rankme(flat(_views(12)))) < 0.2 * rankme(flat(_views(12)))
    # collapsed: every view of every sample on one line, or one point
    rng = np.random.default_rng(1)
    line = rng.standard_normal((96, 1, 1)) * np.ones((1, 8, 16)) + 1e-6 * rng.standard_normal((96, 8, 16))
    assert lidar(line) < 1.5 and lidar(np.ones((96, 8, 16))) < 1.01
    se = bootstrap_se(lambda i: lidar(z[i]), len(z))
    assert 0 < se < 0.5 * lidar(z)


# ---- on a tiny JEPA ---------------------------------------------------------------------------------


def _pipeline(*overrides: str):
    return load_config(
        overrides=["pipeline.image_size=32", "pipeline.patch_size=8", "pipeline.max_events=12", *overrides]
    ).pipeline


@pytest.fixture(scope="module")
def val(small_shards):
    split = open_split(str(small_shards), "train")
    samples = {}
    for p in split.paths[:5]:
        samples.update(read_samples(p))
    return split, samples


def _batches(val, *overrides: str, size: int = 16) -> list[dict]:
    """The validation batches a trial with these pipeline settings would measure on."""
    split, samples = val
    keys = sorted(samples)[: 3 * size]
    cfg = _pipeline(*overrides)
    return [
        collate(transform_batch(raw_batch({k: samples[k] for k in keys[i : i + size]}), split.spec, cfg, train=False, epoch=0))
        for i in range(0, len(keys), size)
    ]  # fmt: skip


def _model(val, **model) -> JEPA:
    torch.manual_seed(0)
    size = {"preset": "tiny", "width": 96, "depth": 3, "heads": 4}  # a sweep's trial (tune-demo.yaml)
    return JEPA(val[0].spec.model_dims(_pipeline()), ModelConfig(**size | model))


def test_every_label_free_objective_on_a_tiny_jepa(val):
    batches = _batches(val)
    model = _model(val)
    out = measure(model, batches, "lidar", None, candidates=LABEL_FREE)
    assert out["objective"] == out["lf_lidar"] and out["objective_se"] == out["lf_lidar_se"]
    n, d = sum(len(b["key"]) for b in batches), model.width
    assert n >= MIN_CLASSES
    for name in LABEL_FREE:
        value, se = out[f"lf_{name}"], out[f"lf_{name}_se"]
        assert np.isfinite(value) and np.isfinite(se) and se > 0, (name, value, se)
        if name != "val_loss":
            assert 1.0 <= value <= min(n, d)
    assert out["lf_val_loss"] < 0  # a loss, negated: higher is better
    assert out["rankme"] == out["lf_rankme"]
    again = measure(model, batches, "lidar", None, candidates=LABEL_FREE)
    assert again == out  # deterministic: the views' masks are drawn from fixed seeds


def test_val_loss_uses_the_same_masks_whatever_the_trials_mask_ratio(val):
    low, high = _batches(val, "pipeline.mask.mask_ratio=0.3"), _batches(val, "pipeline.mask.mask_ratio=0.7")
    assert not torch.equal(low[0]["img_tgt"], high[0]["img_tgt"])
    model = _model(val)
    with torch.no_grad():  # the trial's own loss depends on its masks
        assert float(model(low[0])["loss"]) != pytest.approx(float(model(high[0])["loss"]), rel=1e-3)
    a = measure(model, low, "val_loss", None)
    b = measure(model, high, "val_loss", None)
    assert a["objective"] == pytest.approx(b["objective"], rel=1e-6)
    assert a["objective_se"] > 0
    # the reference mask setting, not the trial's, decides: another reference, another value
    c = measure(model, low, "val_loss", None, mask={"mask_ratio": 0.7})
    # 10x the tolerance the same reference is held to above (an untrained model's loss moves by
    # 7e-5 to 1e-3 between references at a small SIGReg weight, by the draw of its initial weights)
    assert c["objective"] != pytest.approx(a["objective"], rel=1e-5)


def test_a_reconstruction_model_is_measured_too(val):
    """model.objective=mae: its target encoder is its context encoder, its loss a reconstruction."""
    batches = _batches(val)[:1]
    out = measure(_model(val, objective="mae"), batches, "val_loss", None, candidates=LABEL_FREE)
    assert all(np.isfinite(out[f"lf_{n}"]) and out[f"lf_{n}_se"] > 0 for n in LABEL_FREE)


def test_collapse_is_told_from_the_starting_encoder():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 64)) + 3.0  # spread over many directions, off the origin
    start = health(x)
    assert start == {"rankme": rankme(x), "spread": spread(x)}
    assert collapsed(start, start) is None
    assert (
        collapsed(health(1.1 * x + 0.05 * rng.standard_normal(x.shape)), start) is None
    )  # training moves it
    # onto 3 directions: RankMe falls, the spread need not
    low = x[:, :3] @ rng.standard_normal((3, 64))
    assert collapsed(health(low), start).startswith("rankme ")
    # onto one point: centred RankMe measures only the noise left (high), the spread is gone
    point = np.ones((128, 64)) + 1e-6 * rng.standard_normal((128, 64))
    assert rankme(point) > 0.5 * start["rankme"] and spread(point) < 1e-3
    assert collapsed(health(point), start).startswith("spread ")


def test_a_collapsed_encoder_is_ranked_last_by_every_label_free_objective(val):
    batches = _batches(val)
    model = _model(val)
    x = pooled_embeddings(model, batches)
    start = {"rankme": rankme(x), "spread": spread(x)}
    for name in LABEL_FREE:
        healthy = measure(model, batches, name, None, start=start)
        assert healthy["collapsed"] == 0.0 and np.isfinite(healthy["objective"]), name
    with torch.no_grad():  # every sample's pooled embedding is the final norm's bias: one point
        model.target.trunk.norm.weight.zero_()
    for name in LABEL_FREE:
        out = measure(model, batches, name, None, start=start)
        assert out["collapsed"] == 1.0 and out["objective"] == COLLAPSED, name
        assert np.isfinite(out[f"lf_{name}"])  # what it would have scored is still reported
    assert measure(model, batches, "val_loss", None)["objective"] > COLLAPSED  # no reference, no guard
