"""The JEPA on CT volumes (pipeline.dims=3): tubelet tokens, 3-D masks through depth, no leak of
hidden tubelets into the context encoder, activation checkpointing that changes memory, not math."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from shardkit import raw_batch, raw_samples

from jepa_ray.config import ModelConfig, load_config
from jepa_ray.model.jepa import JEPA
from jepa_ray.stream.pipeline import collate, open_split
from jepa_ray.stream.transform import transform_batch

THREE_D = [
    "pipeline.dims=3",
    "pipeline.volume_size=[8,32,32]",
    "pipeline.tubelet=[4,8,8]",
    "pipeline.mask.min_context_patches=4",
    "pipeline.max_events=12",
]


@pytest.fixture(scope="module")
def split(ct_shards):
    return open_split(str(ct_shards), "train")


@pytest.fixture(scope="module")
def batch(split):
    samples = {}
    for p in split.paths:
        samples.update(raw_samples(p))
    cfg = load_config(overrides=[*THREE_D, "pipeline.mask.policy.cross_modal=0.4"]).pipeline
    return collate(transform_batch(raw_batch(samples), split.spec, cfg, train=True, epoch=0))


def _model(split, **model) -> JEPA:
    torch.manual_seed(0)
    return JEPA(split.spec.model_dims(load_config(overrides=THREE_D).pipeline), ModelConfig(**model))


def test_volumes_become_tubelet_tokens_and_every_policy_trains(split, batch):
    model = _model(split)
    assert batch["image"].shape[1:] == (2, 8, 32, 32) and batch["has_image"].sum() > 5
    assert model.dims.grid == (2, 4, 4) and model.dims.patches == 32
    assert isinstance(model.context.image.patch, torch.nn.Conv3d)
    out = model(batch)
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    assert {"loss_image_intra", "loss_hide_image"} <= set(out)
    out["loss"].backward()
    assert model.context.image.patch.weight.grad.abs().sum() > 0
    enc = model.encode(batch, "image")
    assert enc["tokens"].shape[1] >= 1 + 32 and enc["pooled"].shape == (batch["image"].shape[0], model.width)


def test_image_masks_run_through_every_slice(batch):
    ctx = batch["img_ctx"].reshape(-1, 2, 16)  # (B, slices of tubelets, in-plane tubelets)
    tgt = batch["img_tgt"].reshape(batch["img_tgt"].shape[0], -1, 2, 16)
    assert torch.equal(ctx[:, 0], ctx[:, 1]) and torch.equal(tgt[:, :, 0], tgt[:, :, 1])
    assert not (batch["img_ctx"] & batch["img_tgt"].any(1)).any()


def test_hidden_tubelets_do_not_reach_the_context_encoder(split, batch):
    model = _model(split)
    model.eval()
    args = (batch["img_ctx_idx"], batch["img_ctx_keep"], batch["ehr_ctx"])
    before = model.context(batch, *args)
    hidden = ~batch["img_ctx"].reshape(-1, *model.dims.grid)  # (B, 2, 4, 4)
    t = model.dims.tubelet
    voxels = hidden.repeat_interleave(t[0], 1).repeat_interleave(t[1], 2).repeat_interleave(t[2], 3)
    changed = dict(batch)
    changed["image"] = torch.where(voxels.unsqueeze(1), torch.randn_like(batch["image"]) * 5, batch["image"])
    after = model.context(changed, *args)
    assert (changed["image"] != batch["image"]).any()
    keep = before["keep"]
    torch.testing.assert_close(after["tokens"][keep], before["tokens"][keep])
    assert not torch.allclose(model.targets(changed)[0], model.targets(batch)[0])


def test_activation_checkpointing_gives_the_same_loss_and_gradients(split, batch):
    grads = []
    for blocks in (0, -1):
        model = _model(split, activation_checkpointing=blocks)
        out = model(batch)
        out["loss"].backward()
        grads.append(
            (out["loss"].detach(), [p.grad.clone() for p in model.student.parameters() if p.grad is not None])
        )
    (l0, g0), (l1, g1) = grads
    torch.testing.assert_close(l0, l1)
    assert len(g0) == len(g1) > 10
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert np.isfinite(float(l1))
