"""The reconstruction baseline (model.objective=mae) on real pipeline batches: its targets are the
hidden content itself, hidden content never reaches its context encoder, it trains, and it exports,
loads and embeds like the JEPA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from shardkit import raw_batch, raw_samples, train_in_memory
from test_jepa import _pipeline_cfg, make_batch

from jepa_ray.config import ModelConfig, load_config
from jepa_ray.eval.embed import embed_batch
from jepa_ray.model.io import load_jepa, save_jepa
from jepa_ray.model.jepa import JEPA, embedding_stats
from jepa_ray.model.mae import normalise_patches, patchify
from jepa_ray.stream.pipeline import collate, open_split
from jepa_ray.stream.transform import transform_batch


@pytest.fixture(scope="module")
def split(small_shards):
    return open_split(str(small_shards), "train")


@pytest.fixture(scope="module")
def samples(split):
    out = {}
    for p in split.paths[:3]:
        out.update(raw_samples(p))
    return out


def _mae(split, **model) -> JEPA:
    torch.manual_seed(0)
    return JEPA(split.spec.model_dims(_pipeline_cfg()), ModelConfig(objective="mae", **model))


def _varying_pixel_heads(model: JEPA) -> None:
    """Against per-patch normalised pixels a near-zero prediction scores ~1 (the patch mean) for any
    content, so a content check first gives the pixel heads weights whose predictions vary across a
    patch."""
    with torch.no_grad():
        for h in model.predictor.heads.pixels:
            torch.nn.init.normal_(h.weight, std=1.0)


def test_patches_follow_the_patch_embeddings_grid_order():
    torch.manual_seed(0)
    image = torch.randn(2, 3, 8, 12)
    conv = torch.nn.Conv2d(3, 3 * 4 * 4, 4, stride=4, bias=False)
    with torch.no_grad():  # a convolution that copies each patch's pixels out, in (C, y, x) order
        conv.weight.copy_(torch.eye(48).reshape(48, 3, 4, 4))
    torch.testing.assert_close(patchify(image, (4, 4)), conv(image).flatten(2).transpose(1, 2))
    volume = torch.randn(2, 2, 4, 8, 8)
    tubes = patchify(volume, (2, 4, 4))  # (B, 2*2*2, 2*2*4*4)
    assert tubes.shape == (2, 8, 64)
    torch.testing.assert_close(tubes[:, 3], volume[:, :, :2, 4:, 4:].reshape(2, -1))  # grid (0, 1, 1)
    norm = normalise_patches(tubes)
    torch.testing.assert_close(norm.mean(-1), torch.zeros(2, 8), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="does not split"):
        patchify(torch.zeros(1, 1, 10, 10), (4, 4))


@pytest.mark.parametrize(
    "weights", ["image_intra=1 ehr_intra=0", "image_intra=0 ehr_intra=1", "cross_modal=1"]
)
def test_the_loss_is_the_hidden_contents_and_needs_no_target_encoder(split, samples, weights):
    overrides = [f"pipeline.mask.policy.{w}" for w in weights.split()]
    batch = make_batch(split, samples, *overrides)
    model = _mae(split).eval()
    assert model.targets(batch) == (None, None)
    with torch.no_grad():  # scoped: a failed assertion must not leave gradients off for later tests
        _varying_pixel_heads(model)
        out = model(batch)
        assert torch.isfinite(out["loss"]) and out["loss"] > 0
        assert out["targets"] == batch["img_tgt_keep"].sum() + batch["ehr_tgt"].sum()
        # the loss moves with the hidden content, and only with it
        hidden_px = ~batch["img_ctx"].reshape(-1, *model.dims.grid)
        px = hidden_px.repeat_interleave(8, 1).repeat_interleave(8, 2).unsqueeze(1)
        b, m, k = batch["img_tgt_idx"].shape
        keep = batch["img_tgt_keep"].reshape(b, m * k).long()  # padded entries point at slot 0: add, not set
        targeted = torch.zeros_like(keep).scatter_add_(1, batch["img_tgt_idx"].reshape(b, m * k), keep) > 0
        tgt_px = (
            targeted.reshape(-1, *model.dims.grid)
            .repeat_interleave(8, 1)
            .repeat_interleave(8, 2)
            .unsqueeze(1)
        )
        outside = dict(
            batch, image=torch.where(px & ~tgt_px, torch.randn_like(batch["image"]), batch["image"])
        )
        assert float(model(outside)["loss"]) == pytest.approx(float(out["loss"]), rel=1e-6)
        if batch["img_tgt_keep"].any():
            inside = dict(batch, image=torch.where(tgt_px, torch.randn_like(batch["image"]), batch["image"]))
            # beyond the tolerance within which outside content left it (few image targets under
            # cross_modal=1 move the mean over every target by little)
            assert float(model(inside)["loss"]) != pytest.approx(float(out["loss"]), rel=1e-5)
        if batch["ehr_tgt"].any():
            values = torch.where(batch["ehr_tgt"], batch["ehr_value"] + 3.0, batch["ehr_value"])
            assert abs(float(model(dict(batch, ehr_value=values))["loss"]) - float(out["loss"])) > 1e-4


def test_hidden_content_does_not_reach_the_mae_context_encoder(split, samples):
    batch = make_batch(split, samples, "pipeline.mask.policy.cross_modal=0.5")
    model = _mae(split).eval()
    args = (batch["img_ctx_idx"], batch["img_ctx_keep"], batch["ehr_ctx"])
    before = model.context(batch, *args)
    hidden = ~batch["img_ctx"].reshape(-1, *model.dims.grid)
    px = hidden.repeat_interleave(8, 1).repeat_interleave(8, 2).unsqueeze(1)
    ehr_hidden = ~batch["ehr_ctx"]
    changed = dict(batch)
    changed["image"] = torch.where(px, torch.randn_like(batch["image"]) * 5, batch["image"])
    changed["ehr_value"] = torch.where(ehr_hidden, torch.randn_like(batch["ehr_value"]), batch["ehr_value"])
    changed["ehr_value_present"] = torch.where(
        ehr_hidden, ~batch["ehr_value_present"], batch["ehr_value_present"]
    )
    after = model.context(changed, *args)
    assert px.any() and ehr_hidden.any()
    torch.testing.assert_close(after["tokens"][before["keep"]], before["tokens"][before["keep"]])


def test_every_student_parameter_learns_and_the_target_is_the_context(split, samples):
    batch = make_batch(split, samples, "pipeline.mask.policy.cross_modal=0.4")
    model = _mae(split)
    model(batch)["loss"].backward()
    heads = model.predictor.heads
    for head in (heads.pixels[0], heads.value, heads.category, heads.code):
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    missing = [n for n, p in model.student.named_parameters() if p.grad is None]
    assert not missing, missing
    with torch.no_grad():
        for p in model.context.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.update_target(0.996)  # an MAE's target is a copy, whatever momentum is asked for
    for t, c in zip(model.target.parameters(), model.context.parameters(), strict=True):
        torch.testing.assert_close(t, c)


def test_training_lowers_the_loss_without_collapse_and_exports(split, small_shards, tmp_path):
    samples = {}
    for p in split.paths:
        samples.update(raw_samples(p))
    cfg = _pipeline_cfg()
    model = _mae(split)
    held = [make_batch(split, samples, epoch=e) for e in (5, 6)]  # fixed batches and masks
    with torch.no_grad():
        before = [model(b) for b in held]
    losses = train_in_memory(model, samples, split.spec, cfg, steps=80)
    assert np.isfinite(losses).all()
    with torch.no_grad():
        after = [model(b) for b in held]
    for b, a in zip(before, after, strict=True):
        # per-patch normalised pixels: an untrained decoder (predictions ~0, the patch mean) scores 1
        assert float(b["loss_image_intra"]) == pytest.approx(1.0, abs=0.02)
        assert float(a["loss_image_intra"]) < 0.8 and float(a["loss_hide_image"]) < 0.9
        assert float(a["loss_ehr_intra"]) < 0.95 * float(b["loss_ehr_intra"])
        assert float(a["loss"]) < 0.85 * float(b["loss"])
    evaluation = collate(transform_batch(raw_batch(samples), split.spec, cfg, train=False, epoch=0))
    stats = embedding_stats(model.encode(evaluation, "both")["pooled"])
    assert stats["std"] > 0.05 and stats["rankme"] > 3
    # export -> load: the same encoders, decoder heads and loss
    weights = save_jepa(model, tmp_path / "mae", {"image_size": 32, "patch_size": 8}, step=80)
    loaded = load_jepa(weights)
    assert loaded.cfg.objective == "mae" and loaded.reconstructs
    batch = make_batch(split, samples)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(batch)["pooled"], model.encode(batch)["pooled"])
        assert float(loaded(batch)["loss"]) == pytest.approx(float(model(batch)["loss"]), rel=1e-5)
        columns = embed_batch(loaded, batch, regions=2)  # what evaluate computes for each batch
    assert columns["emb_image"].shape == (len(batch["key"]), model.width)
    assert all(torch.isfinite(v.float()).all() for v in columns.values() if torch.is_tensor(v))


def test_a_mixed_mae_reconstructs_each_kind_on_its_own_grid(ct_shards):
    mixed = [
        "pipeline.dims=mixed",
        "pipeline.image_size=32",
        "pipeline.patch_size=8",
        "pipeline.volume_size=[8,32,32]",
        "pipeline.tubelet=[4,8,8]",
        "pipeline.mask.min_context_patches=4",
        "pipeline.max_events=12",
    ]
    split = open_split(str(ct_shards), "train")
    samples = {}
    for p in split.paths:
        samples.update(raw_samples(p))
    cfg = load_config(overrides=mixed).pipeline
    batch = collate(transform_batch(raw_batch(samples), split.spec, cfg, train=True, epoch=0))
    torch.manual_seed(0)
    model = JEPA(split.spec.model_dims(cfg), ModelConfig(objective="mae"))
    pixels = model.predictor.heads.pixels
    assert [h.out_features for h in pixels] == [8 * 8, 2 * 4 * 8 * 8]  # radiograph patch, 2-window tubelet
    out = model(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and all(h.weight.grad.abs().sum() > 0 for h in pixels)
    # a hidden tubelet's content moves the loss of the volumes only
    ct = batch["is_volume"]
    noisy = dict(batch, volume=batch["volume"] + torch.randn_like(batch["volume"]))
    _varying_pixel_heads(model)
    with torch.no_grad():
        # (by 6.8e-4 at this seed: the volumes' hidden tubelets are a small part of
        # the batch's loss; what is read is that it moves, where below it does not move by 1e-6)
        assert abs(float(model(noisy)["loss"]) - float(model(batch)["loss"])) > 1e-4
        one = {
            k: v[~ct] if torch.is_tensor(v) else [x for x, c in zip(v, ct, strict=True) if not c]
            for k, v in batch.items()
        }
        noisy_one = dict(one, volume=one["volume"] + 1.0)  # radiographs only: the volume array is unused
        assert float(model(noisy_one)["loss"]) == pytest.approx(float(model(one)["loss"]), rel=1e-6)


def test_an_mae_starts_from_the_encoder_a_jepa_of_the_same_seed_starts_from(split):
    """The comparison JEPA vs MAE is paired: same seed, same initial encoder (and so the same
    random-init baseline); only the predictor's job differs."""
    dims = split.spec.model_dims(_pipeline_cfg())
    built = {}
    for objective in ("jepa", "mae"):
        torch.manual_seed(5)
        built[objective] = JEPA(dims, ModelConfig(objective=objective))
    jepa, mae = (built[o].context.state_dict() for o in ("jepa", "mae"))
    assert jepa.keys() == mae.keys()
    for name, w in jepa.items():
        torch.testing.assert_close(mae[name], w, rtol=0, atol=0, msg=name)
    # the decoder's heads are drawn too (not left at their default init), and differ by seed
    torch.manual_seed(6)
    other = JEPA(dims, ModelConfig(objective="mae"))
    assert not torch.equal(other.predictor.heads.value.weight, built["mae"].predictor.heads.value.weight)
    assert built["mae"].predictor.heads.value.bias.abs().max() == 0  # init_weights: zero biases
