"""The segmentation probe: Dice as defined, a planted mask recovered from tokens that carry it (and
not from tokens that do not), and annotated shards read into tokens and aligned masks."""

from __future__ import annotations

import numpy as np
import pytest

from jepa_ray.eval.segmentation import SegSplit, dice, segmentation_probe


def test_dice_is_overlap_over_size_and_one_when_both_are_empty():
    a = np.zeros((1, 2, 4, 4), bool)
    b = np.zeros((1, 2, 4, 4), bool)
    a[0, 0, :2], b[0, 0, 1:3] = True, True  # 8 and 8 pixels, 4 shared
    assert dice(a, b).tolist() == [[0.5, 1.0]]
    assert dice(b, b)[0, 0] == 1.0


def _planted(n: int, informative: bool, seed: int, patch: tuple[int, ...] = (4, 4)) -> SegSplit:
    """Masks made of whole patches on a token grid of 4 per axis (2-D patches or 3-D tubelets); a
    token's first channel says whether its patch is inside when `informative`, else every channel
    is noise."""
    rng = np.random.default_rng(seed)
    grid = (4,) * len(patch)
    inside = rng.random((n, *grid)) < 0.4
    tokens = rng.normal(size=(n, *grid, 8)).astype(np.float32)
    if informative:
        tokens[..., 0] = np.where(inside, 2.0, -2.0) + 0.3 * tokens[..., 0]
    masks = inside
    for axis, p in enumerate(patch):
        masks = np.repeat(masks, p, axis=1 + axis)
    return SegSplit([str(i) for i in range(n)], tokens, masks[:, None], ["planted"])


@pytest.mark.parametrize(
    ("patch", "steps", "informative", "lo", "hi"),
    [((4, 4), 400, True, 0.95, 1.0), ((4, 4), 400, False, 0.0, 0.75), ((2, 4, 4), 300, True, 0.95, 1.0)],
    ids=["2d", "2d-noise", "3d"],
)
def test_the_probe_recovers_a_planted_mask_only_from_tokens_that_carry_it(patch, steps, informative, lo, hi):
    splits = {"train": _planted(96, informative, 0, patch), "test": _planted(48, informative, 1, patch)}
    result = segmentation_probe(
        splits, "train", ["test"], patch=patch if len(patch) == 3 else 4, bootstrap=50, steps=steps
    )
    for head in ("linear", "conv"):
        row = result[head]["test"]["planted"]
        assert lo <= row["dice"] <= hi, (head, row)
        assert row["ci"][0] <= row["dice"] <= row["ci"][1]
        assert result[head]["test"]["mean"]["dice"] == pytest.approx(row["dice"])


@pytest.mark.parametrize("patch", [8, 16, 7])
def test_the_conv_head_covers_every_pixel_of_the_grid_for_even_and_odd_patches(patch):
    """Its second convolution runs at half resolution for an even patch (logits upsampled x2),
    at full resolution for an odd one: either way one logit per pixel and structure."""
    import torch

    from jepa_ray.eval.segmentation import _head

    head = _head("conv", 12, 3, (patch, patch))
    assert head(torch.randn(2, 12, 4, 5)).shape == (2, 3, 4 * patch, 5 * patch)
    upsamples = [m.scale_factor for m in head if isinstance(m, torch.nn.Upsample)]
    assert upsamples == ([patch // 2, 2] if patch % 2 == 0 else [patch])  # no x1 pass for an odd one


def test_the_linear_head_lays_each_tokens_logits_over_its_own_patch():
    """The per-token logits go to their patch's pixels (voxels) in order: 2-D as PixelShuffle, 3-D
    with the same (structure, then within-patch row-major) channel order."""
    import torch

    from jepa_ray.eval.segmentation import _unpatch

    x = torch.randn(2, 3 * 4 * 4, 5, 6)
    assert torch.equal(_unpatch(3, (4, 4))(x), torch.nn.PixelShuffle(4)(x))
    patch, grid = (2, 3, 4), (2, 5, 3)
    x = torch.randn(2, 3 * 24, *grid)
    out = _unpatch(3, patch)(x)
    assert out.shape == (2, 3, 4, 15, 12)
    for s, a, b, c, i, j, k in [(0, 0, 0, 0, 0, 0, 0), (2, 1, 4, 2, 1, 2, 3), (1, 0, 3, 1, 1, 0, 2)]:
        channel = s * 24 + (i * 3 + j) * 4 + k  # structure s, voxel (i, j, k) of the tubelet
        assert out[1, s, a * 2 + i, b * 3 + j, c * 4 + k] == x[1, channel, a, b, c]


def test_annotated_shards_become_tokens_and_masks_in_the_encoders_grid(
    ray_session, small_cohort, cohort_inputs, tmp_path
):
    import torch

    from jepa_ray.config import ModelConfig, load_config
    from jepa_ray.eval.segmentation import load_split
    from jepa_ray.ingest.prepare import prepare
    from jepa_ray.model.jepa import JEPA
    from jepa_ray.stream.pipeline import open_split
    from jepa_ray.synth.phantom import STRUCTURES

    prep = load_config(overrides=["prepare.image.size=64", "prepare.shards.max_samples=16"]).prepare
    prepare(str(tmp_path), prep, **cohort_inputs(small_cohort), masks=str(small_cohort / "masks"))
    cfg = load_config(overrides=["pipeline.image_size=32", "pipeline.patch_size=8", "pipeline.max_events=12"])
    split = open_split(str(tmp_path), "train")
    torch.manual_seed(0)
    model = JEPA(split.spec.model_dims(cfg.pipeline), ModelConfig(width=32, depth=1, heads=2)).eval()
    s = load_split(model, split, cfg.pipeline)
    n_images = sum(1 for _ in s.keys)
    assert n_images == split.manifest["splits"]["train"]["masks"] > 0
    assert s.tokens.shape == (n_images, 4, 4, 32) and s.masks.shape == (n_images, len(STRUCTURES), 32, 32)
    assert s.names == sorted(STRUCTURES)
    heart = s.names.index("heart")
    lungs = [s.names.index("right_lung"), s.names.index("left_lung")]
    assert all(s.masks[i, heart].any() and s.masks[i, lungs].any() for i in range(n_images))
    # eval.encoder=context reads the trained encoder: once the two differ, so do the tokens; the
    # target read is unchanged
    with torch.no_grad():
        for p in model.context.parameters():
            p.add_(0.5 * torch.randn_like(p))
    ctx, again = load_split(model, split, cfg.pipeline, "context"), load_split(model, split, cfg.pipeline)
    assert ctx.keys == s.keys and ctx.tokens.shape == s.tokens.shape
    np.testing.assert_array_equal(again.tokens, s.tokens)
    assert np.abs(ctx.tokens - s.tokens).mean() > 0.1 * np.abs(s.tokens).mean()


def _ct_volumes(root, shards: list[str]) -> int:
    """The CT volumes with masks in these shards, counted from their meta.json."""
    import json
    import tarfile

    n = 0
    for shard in shards:
        with tarfile.open(root / shard) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".meta.json"):
                    meta = json.loads(tf.extractfile(m).read())
                    n += (meta.get("image") or {}).get("kind") == "ct_volume" and bool(meta.get("masks"))
    return n


def test_annotated_ct_volumes_become_tubelet_tokens_and_voxel_masks(
    ray_session, ct_cohort, cohort_inputs, tmp_path
):
    """pipeline.dims=3: the CT volumes' masks resized to volume_size, tokens on the tubelet grid,
    the radiographs of the same shards left out; the 3-D heads fit and score them."""
    import torch
    from conftest import CT_VOLUME

    from jepa_ray.config import ModelConfig, load_config
    from jepa_ray.eval.segmentation import load_split
    from jepa_ray.ingest.prepare import prepare
    from jepa_ray.model.jepa import JEPA
    from jepa_ray.stream.pipeline import open_split
    from jepa_ray.synth.ct_phantom import CT_STRUCTURES

    root = ct_cohort[0]
    prep = load_config(overrides=[*CT_VOLUME, "prepare.image.size=64", "prepare.split.test=0.3"]).prepare
    assert prepare(str(tmp_path), prep, **cohort_inputs(root), masks=str(root / "masks")).ok
    cfg = load_config(
        overrides=[
            "pipeline.dims=3",
            "pipeline.volume_size=[8,16,16]",
            "pipeline.tubelet=[2,4,4]",
            "pipeline.max_events=12",
        ]
    )
    splits = {}
    for name in ("train", "test"):
        split = open_split(str(tmp_path), name)
        torch.manual_seed(0)
        model = JEPA(split.spec.model_dims(cfg.pipeline), ModelConfig(width=32, depth=1, heads=2)).eval()
        splits[name] = load_split(model, split, cfg.pipeline)
        s = splits[name]
        volumes = _ct_volumes(tmp_path, split.manifest["splits"][name]["shards"])
        assert len(s.keys) == volumes > 0  # every CT volume, no radiograph
        assert s.tokens.shape == (volumes, 4, 4, 4, 32)
        assert s.masks.shape == (volumes, len(CT_STRUCTURES), 8, 16, 16)
        assert s.names == sorted(CT_STRUCTURES)
        heart = s.names.index("heart")
        assert all(s.masks[i, heart].any() for i in range(volumes))
    result = segmentation_probe(splits, "train", ["test"], patch=(2, 4, 4), bootstrap=20, steps=30)
    for head in ("linear", "conv"):
        row = result[head]["test"]
        assert set(row) == {*CT_STRUCTURES, "mean"}
        assert 0.0 <= row["mean"]["dice"] <= 1.0
