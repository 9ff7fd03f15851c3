"""One JEPA over radiographs and CT volumes (pipeline.dims=mixed): a 2-D patch embedder and a 3-D
tubelet embedder feeding one trunk, each sample masked and predicted on its own grid."""

from __future__ import annotations

import pytest
import torch
from shardkit import raw_batch, raw_samples

from jepa_ray.config import ModelConfig, load_config
from jepa_ray.errors import ConfigError
from jepa_ray.eval.embed import embed_batch
from jepa_ray.model.jepa import JEPA, image_slots
from jepa_ray.stream.pipeline import collate, open_split
from jepa_ray.stream.transform import transform_batch

MIXED = [
    "pipeline.dims=mixed",
    "pipeline.image_size=32",
    "pipeline.patch_size=8",  # 4x4 = 16 patches
    "pipeline.volume_size=[8,32,32]",
    "pipeline.tubelet=[4,8,8]",  # 2x4x4 = 32 tubelets
    "pipeline.mask.min_context_patches=4",
    "pipeline.max_events=12",
]
N2, N3 = 16, 32


@pytest.fixture(scope="module")
def split(ct_shards):
    return open_split(str(ct_shards), "train")


@pytest.fixture(scope="module")
def samples(split):
    out = {}
    for p in split.paths:
        out.update(raw_samples(p))
    return out


@pytest.fixture(scope="module")
def batch(split, samples):
    cfg = load_config(overrides=[*MIXED, "pipeline.mask.policy.cross_modal=0.4"]).pipeline
    return collate(transform_batch(raw_batch(samples), split.spec, cfg, train=True, epoch=0))


def _model(split, **model) -> JEPA:
    torch.manual_seed(0)
    return JEPA(split.spec.model_dims(load_config(overrides=MIXED).pipeline), ModelConfig(**model))


def test_a_mixed_batch_carries_both_kinds_each_masked_on_its_own_grid(batch):
    ct, xr = batch["is_volume"], batch["has_image"] & ~batch["is_volume"]
    assert ct.sum() >= 3 and xr.sum() >= 3  # the cohort mixes both kinds
    assert not (ct & ~batch["has_image"]).any()
    assert batch["image"].shape[1:] == (1, 32, 32) and batch["volume"].shape[1:] == (2, 8, 32, 32)
    assert batch["img_ctx"].shape[1] == N3  # the larger grid's slots
    # a radiograph never uses the slots past its 16 patches; a volume's masks run through both slices
    assert not batch["img_ctx"][xr, N2:].any() and not batch["img_tgt"][xr][..., N2:].any()
    assert (batch["img_ctx"][xr].any(1) | batch["img_tgt"][xr].any((1, 2))).all()  # each one is masked
    vol_ctx = batch["img_ctx"][ct].reshape(-1, 2, 16)
    assert torch.equal(vol_ctx[:, 0], vol_ctx[:, 1])
    # each array holds only its own kind's samples
    assert (
        batch["volume"][~ct].abs().sum() == 0 and batch["volume"][ct].abs().sum(dim=(1, 2, 3, 4)).gt(0).all()
    )
    assert batch["image"][ct].abs().sum() == 0 and batch["image"][xr].std(dim=(1, 2, 3)).gt(0).all()


def test_both_embedders_feed_one_trunk_and_every_policy_trains(split, batch):
    model = _model(split)
    image = model.context.image
    assert isinstance(image.patch, torch.nn.Conv2d) and isinstance(image.patch3, torch.nn.Conv3d)
    assert model.dims.grids == ((4, 4), (2, 4, 4)) and model.dims.patches == N3
    out = model(batch)
    assert torch.isfinite(out["loss"]) and {"loss_image_intra", "loss_hide_image"} <= set(out)
    out["loss"].backward()
    for conv in (image.patch, image.patch3):
        assert conv.weight.grad.abs().sum() > 0
    assert model.predictor.img_modality.grad.abs().sum() > 0
    assert model.predictor.img_modality3.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["radiographs", "volumes"])
def test_a_batch_of_one_kind_still_reaches_every_parameter(split, samples, kind):
    """Data-parallel ranks must produce a gradient for every parameter on every step, whatever
    kinds their batch holds: the absent kind's embedder runs on no samples and gets zeros."""
    cfg = load_config(overrides=MIXED).pipeline
    full = collate(transform_batch(raw_batch(samples), split.spec, cfg, train=True, epoch=0))
    rows = full["is_volume"] if kind == "volumes" else ~full["is_volume"]
    one = {
        k: v[rows] if torch.is_tensor(v) else [x for x, r in zip(v, rows, strict=True) if r]
        for k, v in full.items()
    }
    model = _model(split)
    out = model(one)
    out["loss"].backward()
    missing = [n for n, p in model.student.named_parameters() if p.grad is None]
    assert not missing, missing
    absent = model.context.image.patch if kind == "volumes" else model.context.image.patch3
    assert absent.weight.grad.abs().sum() == 0


def test_hidden_content_of_either_kind_does_not_reach_the_context_encoder(split, batch):
    model = _model(split)
    model.eval()
    args = (batch["img_ctx_idx"], batch["img_ctx_keep"], batch["ehr_ctx"])
    before = model.context(batch, *args)
    ct = batch["is_volume"]
    hidden = ~batch["img_ctx"]  # (B, 32)
    changed = dict(batch)
    # radiographs: every hidden patch (4x4 grid of 8x8 pixels) gets noise
    px = hidden[:, :N2].reshape(-1, 4, 4).repeat_interleave(8, 1).repeat_interleave(8, 2)
    changed["image"] = torch.where(px.unsqueeze(1), torch.randn_like(batch["image"]) * 5, batch["image"])
    # volumes: every hidden tubelet (2x4x4 grid of 4x8x8 voxels)
    vx = hidden.reshape(-1, 2, 4, 4).repeat_interleave(4, 1).repeat_interleave(8, 2).repeat_interleave(8, 3)
    changed["volume"] = torch.where(vx.unsqueeze(1), torch.randn_like(batch["volume"]) * 5, batch["volume"])
    after = model.context(changed, *args)
    assert (changed["image"] != batch["image"])[~ct].any() and (changed["volume"] != batch["volume"])[
        ct
    ].any()
    keep = before["keep"]
    torch.testing.assert_close(after["tokens"][keep], before["tokens"][keep])
    z_before, z_after = model.targets(batch)[0], model.targets(changed)[0]
    assert not torch.allclose(z_after[ct], z_before[ct]) and not torch.allclose(z_after[~ct], z_before[~ct])


def test_embeddings_pool_each_sample_over_its_own_grid(split, batch):
    model = _model(split)
    ct, xr = batch["is_volume"], batch["has_image"] & ~batch["is_volume"]
    slots = image_slots(batch, model.dims)
    assert slots[xr].sum(1).eq(N2).all() and slots[ct].sum(1).eq(N3).all()
    enc = model.encode(batch, "image")
    patches = enc["tokens"][:, 1 : 1 + N3]
    torch.testing.assert_close(enc["pooled"][xr], patches[xr, :N2].mean(1))
    torch.testing.assert_close(enc["pooled"][ct], patches[ct].mean(1))
    cols = embed_batch(model, batch, regions=2)
    assert cols["img_tokens"].shape == (len(batch["key"]), 4, model.width)
    # a radiograph's top-left region is the mean of its top-left 2x2 patches; a volume's, of the
    # top-left 2x2 tubelets of both slices
    grid2 = patches[xr, :N2].reshape(-1, 4, 4, model.width)
    torch.testing.assert_close(
        cols["img_tokens"][xr][:, 0].float(), grid2[:, :2, :2].mean((1, 2)), atol=2e-3, rtol=2e-3
    )
    grid3 = patches[ct].reshape(-1, 2, 4, 4, model.width)
    torch.testing.assert_close(
        cols["img_tokens"][ct][:, 0].float(), grid3[:, :, :2, :2].mean((1, 2, 3)), atol=2e-3, rtol=2e-3
    )
    assert torch.isfinite(cols["q_ehr2img"]).all() and torch.isfinite(cols["g_img"]).all()


def test_tune_objectives_measure_a_mixed_model(split, batch):
    """A sweep over a mixed cohort ranks trials on the same pooled embeddings (both kinds)."""
    from jepa_ray.tune.objective import measure

    model = _model(split)
    rankme = measure(model, [batch], "rankme", None)
    assert rankme["objective"] == rankme["rankme"] > 1
    probe = measure(model, [batch], "probe_auroc", "cardiomegaly")
    assert 0 <= probe["objective"] <= 1 and probe["objective_samples"] == len(batch["key"])


def test_a_mixed_model_refuses_a_one_kind_batch(split, batch):
    one_kind = {k: v for k, v in batch.items() if k not in ("volume", "is_volume")}
    with pytest.raises(ValueError, match=r"takes batches of pipeline\.dims=mixed"):
        _model(split)(one_kind)


def test_mixed_needs_volumes_in_the_shards_and_context_floors_below_both_grids(small_shards):
    spec = open_split(str(small_shards), "train").spec
    with pytest.raises(ConfigError, match=r"pipeline\.dims=mixed .* no CT volume"):
        spec.model_dims(load_config(overrides=MIXED).pipeline)
    # the context floor must leave targets on both grids (through depth: 16 tubelets in plane)
    with pytest.raises(ConfigError, match="below the 16 patches of the image"):
        load_config(overrides=[*MIXED, "pipeline.mask.min_context_patches=16"])
    with pytest.raises(ConfigError, match="below the 16 patches of the volume"):
        load_config(overrides=[*MIXED, "pipeline.image_size=64", "pipeline.mask.min_context_patches=16"])
