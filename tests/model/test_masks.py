"""Mask statistics: block scales and aspects, disjoint context, hidden fraction, policies."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from jepa_ray.config import MaskConfig
from jepa_ray.model.masks import (
    EHR_INTRA,
    HIDE_EHR,
    HIDE_IMAGE,
    IMAGE_INTRA,
    NO_POLICY,
    ehr_masks,
    image_masks,
    sample_masks,
    target_scale_range,
)


def _box(mask2d: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask2d.any(1)), np.flatnonzero(mask2d.any(0))
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def test_target_blocks_are_rectangles_within_the_scale_and_aspect_ranges():
    grid = (32, 32)
    cfg = MaskConfig(target_scale=(0.1, 0.2), target_aspect=(0.75, 1.5))
    rng = np.random.default_rng(0)
    scales, aspects = [], []
    for _ in range(300):
        _, tgt = image_masks(rng, grid, cfg)
        for block in tgt.reshape(-1, *grid):
            r0, r1, c0, c1 = _box(block)
            assert block.sum() == (r1 - r0) * (c1 - c0), "a target block is not a rectangle"
            scales.append(block.sum() / block.size)
            aspects.append((r1 - r0) / (c1 - c0))
    # rounding sides to whole patches moves a 32x32 block by at most ~1 patch per side
    assert min(scales) >= 0.085 and max(scales) <= 0.225
    assert 0.1 < np.mean(scales) < 0.2
    assert min(aspects) >= 0.75 / 1.15 and max(aspects) <= 1.5 * 1.15
    assert min(aspects) < 0.85 and max(aspects) > 1.3  # the whole aspect range is used


def test_scale_and_aspect_are_drawn_per_block_not_once_per_sample():
    rng = np.random.default_rng(1)
    cfg = MaskConfig(target_scale=(0.05, 0.3))
    differing = 0
    for _ in range(50):
        _, tgt = image_masks(rng, (16, 16), cfg)
        differing += len({int(b.sum()) for b in tgt}) > 1
    assert differing > 40


@pytest.mark.parametrize("grid", [(14, 14), (8, 8)])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_hidden_fraction_follows_mask_ratio(grid, ratio):
    cfg = MaskConfig(mask_ratio=ratio, min_context_patches=4)
    rng = np.random.default_rng(2)
    hidden, context = [], []
    for _ in range(400):
        ctx, tgt = image_masks(rng, grid, cfg)
        union = tgt.any(0)
        assert not (ctx & union).any(), "context and targets overlap"
        assert ctx.sum() >= cfg.min_context_patches
        hidden.append(union.mean())
        context.append(ctx.mean())
    assert abs(np.mean(hidden) - ratio) < 0.03
    assert np.mean(context) <= 1 - np.mean(hidden) + 1e-9


def test_default_scale_matches_the_reference_at_mask_ratio_one_half():
    lo, hi = target_scale_range(MaskConfig(), (14, 14))
    assert 0.13 < lo < 0.17 and 0.18 < hi < 0.23  # I-JEPA: 4 blocks of 0.15-0.2


def test_last_patch_row_and_column_are_sampled():
    rng = np.random.default_rng(3)
    grid = (10, 10)
    last_row = last_col = 0
    for _ in range(300):
        _, tgt = image_masks(rng, grid, MaskConfig())
        union = tgt.any(0).reshape(grid)
        last_row += union[-1].any()
        last_col += union[:, -1].any()
    assert last_row > 30 and last_col > 30


def test_blocks_stay_inside_the_region_of_image():
    rng = np.random.default_rng(4)
    region = ((3, 11), (0, 6))  # rows 3..10, cols 0..5 hold image; the rest is padding
    outside = np.ones((14, 14), bool)
    outside[3:11, 0:6] = False
    for _ in range(200):
        ctx, tgt = image_masks(rng, (14, 14), MaskConfig(min_context_patches=4), region)
        assert not (ctx.reshape(14, 14) & outside).any()
        assert not (tgt.any(0).reshape(14, 14) & outside).any()


def test_too_small_a_region_keeps_every_non_target_patch():
    rng = np.random.default_rng(5)
    ctx, tgt = image_masks(rng, (8, 8), MaskConfig(min_context_patches=50), ((0, 2), (0, 2)))
    assert ctx.sum() + tgt.any(0).sum() == 4  # the whole 2x2 region, nothing outside it


def test_ehr_masks_hide_the_ratio_of_valid_tokens():
    rng = np.random.default_rng(6)
    valid = np.zeros(65, bool)
    valid[:41] = True
    fractions = []
    for _ in range(200):
        ctx, tgt = ehr_masks(rng, valid, 0.3)
        assert not (ctx & tgt).any() and not ((ctx | tgt) & ~valid).any()
        assert (ctx | tgt).sum() == 41 and ctx.sum() >= 1 and tgt.sum() >= 1
        fractions.append(tgt.sum() / 41)
    assert abs(np.mean(fractions) - 0.3) < 0.02
    ctx, tgt = ehr_masks(rng, valid[:3] | True, 0.99)  # never all hidden, never none
    assert ctx.sum() == 1 and tgt.sum() == 2


def _valid(n: int, length: int = 17) -> np.ndarray:
    v = np.zeros(length, bool)
    v[:n] = True
    return v


def test_policies_never_need_a_missing_modality():
    rng = np.random.default_rng(7)
    cfg = MaskConfig()
    image_only = Counter(sample_masks(rng, (8, 8), _valid(0), True, cfg).policy for _ in range(200))
    ehr_only = Counter(sample_masks(rng, (8, 8), _valid(9), False, cfg).policy for _ in range(200))
    assert set(image_only) == {IMAGE_INTRA}
    assert set(ehr_only) == {EHR_INTRA}
    lone = sample_masks(rng, (8, 8), _valid(1), False, cfg)  # a single EHR token: nothing to predict
    assert lone.policy == NO_POLICY and not lone.ehr_tgt.any() and not lone.img_tgt.any()


def test_paired_policy_frequencies_follow_the_weights():
    rng = np.random.default_rng(8)
    cfg = MaskConfig(policy={"image_intra": 0.4, "ehr_intra": 0.2, "cross_modal": 0.4, "hide_image": 0.25})
    counts = Counter(sample_masks(rng, (8, 8), _valid(9), True, cfg).policy for _ in range(4000))
    expected = {IMAGE_INTRA: 0.4, EHR_INTRA: 0.2, HIDE_IMAGE: 0.1, HIDE_EHR: 0.3}
    for policy, p in expected.items():
        assert abs(counts[policy] / 4000 - p) < 0.03, (policy, counts)


def test_cross_modal_context_holds_nothing_of_the_hidden_modality():
    rng = np.random.default_rng(9)
    cfg = MaskConfig(policy={"image_intra": 0, "ehr_intra": 0, "cross_modal": 1})
    valid = _valid(9)
    seen = set()
    for _ in range(100):
        m = sample_masks(rng, (8, 8), valid, True, cfg)
        seen.add(m.policy)
        if m.policy == HIDE_IMAGE:
            assert not m.img_ctx.any() and m.img_tgt.any()
            assert (m.ehr_ctx == valid).all() and not m.ehr_tgt.any()
        else:
            assert m.policy == HIDE_EHR
            assert not m.ehr_ctx.any() and m.ehr_tgt.any() and not (m.ehr_tgt & ~valid).any()
            assert m.img_ctx.all() and not m.img_tgt.any()
            assert abs(m.ehr_tgt.sum() - round(cfg.mask_ratio * 9)) <= 1
    assert seen == {HIDE_IMAGE, HIDE_EHR}


def test_intra_policies_show_the_other_modality_whole():
    rng = np.random.default_rng(10)
    valid = _valid(9)
    m = sample_masks(
        rng, (8, 8), valid, True, MaskConfig(policy={"image_intra": 1, "ehr_intra": 0, "cross_modal": 0})
    )
    assert m.policy == IMAGE_INTRA and (m.ehr_ctx == valid).all() and not m.ehr_tgt.any()
    m = sample_masks(
        rng, (8, 8), valid, True, MaskConfig(policy={"image_intra": 0, "ehr_intra": 1, "cross_modal": 0})
    )
    assert m.policy == EHR_INTRA and m.img_ctx.all() and not m.img_tgt.any()
    assert m.ehr_tgt.sum() == round(0.5 * 9) or m.ehr_tgt.sum() == math.ceil(0.5 * 9)


def test_zero_weights_for_every_allowed_policy_fall_back_to_an_allowed_one():
    rng = np.random.default_rng(11)
    cfg = MaskConfig(policy={"image_intra": 0, "ehr_intra": 1, "cross_modal": 0})
    assert sample_masks(rng, (8, 8), _valid(0), True, cfg).policy == IMAGE_INTRA


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"mask_ratio": 1.0}, "mask_ratio"),
        ({"mask_ratio": 0}, "mask_ratio"),
        ({"target_scale": (0.3, 0.2)}, "target_scale"),
        ({"target_aspect": (0, 2)}, "target_aspect"),
        ({"policy": {"hide_image": 1.5}}, "hide_image"),
    ],
)
def test_bad_mask_settings_are_refused_naming_the_key(override, key):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=key):
        MaskConfig(**override)


def test_ehr_mask_ratio_sets_the_ehr_targets_apart_from_the_image_ratio():
    from jepa_ray.model.masks import EHR_INTRA, HIDE_EHR, IMAGE_INTRA

    rng = np.random.default_rng(3)
    fractions: dict[int, list[float]] = {EHR_INTRA: [], HIDE_EHR: [], IMAGE_INTRA: []}
    cfg = MaskConfig(mask_ratio=0.3, ehr_mask_ratio=0.8)
    for _ in range(300):
        s = sample_masks(rng, (8, 8), _valid(20, 24), True, cfg)
        if s.policy in (EHR_INTRA, HIDE_EHR):
            fractions[s.policy].append(s.ehr_tgt.sum() / 20)
        elif s.policy == IMAGE_INTRA:
            fractions[IMAGE_INTRA].append(s.img_tgt.any(0).mean())
    assert np.mean(fractions[EHR_INTRA]) == pytest.approx(0.8, abs=0.05)
    assert np.mean(fractions[HIDE_EHR]) == pytest.approx(0.8, abs=0.05)
    assert np.mean(fractions[IMAGE_INTRA]) == pytest.approx(0.3, abs=0.1)  # the image keeps mask_ratio
    unset = sample_masks(np.random.default_rng(0), (8, 8), _valid(20, 24), False, MaskConfig(mask_ratio=0.3))
    assert unset.ehr_tgt.sum() == 6  # default: mask_ratio for both


@pytest.mark.parametrize("through_depth", [True, False])
def test_3d_masks_cover_the_ratio_and_tubes_run_through_depth(through_depth):
    cfg = MaskConfig(mask_ratio=0.5, min_context_patches=4, through_depth=through_depth)
    grid = (4, 6, 6)
    rng = np.random.default_rng(0)
    hidden, context = [], []
    for _ in range(200):
        ctx, tgt = image_masks(rng, grid, cfg)
        union = tgt.any(0)
        assert not (ctx & union).any() and ctx.sum() >= 4
        if through_depth:  # the same in-plane mask on every slice
            assert (ctx.reshape(4, 36) == ctx.reshape(4, 36)[0]).all()
            assert (tgt.reshape(-1, 4, 36) == tgt.reshape(-1, 4, 36)[:, :1]).all()
        hidden.append(union.mean())
        context.append(ctx.mean())
    assert abs(np.mean(hidden) - 0.5) < 0.08, np.mean(hidden)
    assert 0.25 < np.mean(context) < 0.6
