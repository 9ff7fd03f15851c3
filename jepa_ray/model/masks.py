"""Per-sample JEPA masks: I-JEPA multi-block image masks, EHR token masks, and the masking policy.

What a sample hides is chosen by a policy (docs/pipeline.md tells when each is used):

    image_intra    context: one image context block minus the targets (+ every EHR token)
                   predicted: M image target blocks
    ehr_intra      context: the whole image (when present) + the unmasked EHR tokens
                   predicted: a random subset of the EHR tokens
    hide_image     (cross-modal) context: every EHR token, no image at all
                   predicted: M image target blocks
    hide_ehr       (cross-modal) context: the whole image, no EHR at all
                   predicted: a random subset of the EHR tokens

`mask_ratio` is the fraction of a modality's tokens the predictor must predict, under every policy:
the union of the image target blocks covers ~mask_ratio of the image patches, and mask_ratio of the
EHR tokens are targets (`ehr_mask_ratio` when set). A policy that needs a modality the sample
lacks is never chosen.

On a 3-D grid (CT volumes) the blocks are drawn on the in-plane grid and span every slice
(`mask.through_depth`, as V-JEPA masks through time), or are 3-D blocks.

Masks are boolean arrays over a flat token index (patches in row-major order; EHR tokens as laid
out by `transform.EhrLayout`); `mask_indices` (torch, on the trainer side) turns a batch of them into
the padded index tensors the model gathers with. Unlike the reference collator, block scale and
aspect ratio are drawn independently per block, the last patch row and column can be sampled, and
blocks stay inside the part of the grid that holds image (not the padding).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from jepa_ray.config import MaskConfig

IMAGE_INTRA, EHR_INTRA, HIDE_IMAGE, HIDE_EHR, NO_POLICY = 0, 1, 2, 3, -1
POLICY_NAMES = {
    IMAGE_INTRA: "image_intra",
    EHR_INTRA: "ehr_intra",
    HIDE_IMAGE: "hide_image",
    HIDE_EHR: "hide_ehr",
}
_MAX_TRIES = 20
_CALIBRATION_DRAWS = 200


@dataclass
class SampleMasks:
    """The masks of one sample; shapes are fixed by the grid and the EHR length."""

    policy: int
    img_ctx: np.ndarray  # (N,) bool, patches the context encoder sees
    img_tgt: np.ndarray  # (M, N) bool, one row per target block
    ehr_ctx: np.ndarray  # (L,) bool, EHR tokens the context encoder sees
    ehr_tgt: np.ndarray  # (L,) bool, EHR tokens to predict


def target_scale_range(cfg: MaskConfig, grid: tuple[int, ...]) -> tuple[float, float]:
    """Per-block scale range: the explicit one, or one whose M blocks cover ~mask_ratio of the grid.

    Blocks overlap more than independent draws would (they are large and must fit the grid), so
    the scale is calibrated once per setting by bisection on simulated masks; the range is that
    scale ±15%, like the reference's 0.15-0.2.
    """
    if cfg.target_scale is not None:
        return cfg.target_scale
    s = _calibrated_scale(cfg.mask_ratio, cfg.num_target_blocks, tuple(cfg.target_aspect), tuple(grid))
    return s * 0.85, min(s * 1.15, 1.0)


@functools.lru_cache(maxsize=64)
def _calibrated_scale(ratio: float, blocks: int, aspect: tuple[float, float], grid: tuple[int, ...]) -> float:
    region = tuple((0, g) for g in grid)
    lo_a, hi_a = (math.log(a) for a in aspect)

    def covered(s: float) -> float:
        rng = np.random.default_rng(0)  # the same draws for every s: a smooth, monotone estimate
        total = 0.0
        for _ in range(_CALIBRATION_DRAWS):
            tgt = np.zeros(grid, dtype=bool)
            for _ in range(blocks):
                scale = min(rng.uniform(0.85, 1.15) * s, 1.0)
                tgt[_block(rng, region, scale, math.exp(rng.uniform(lo_a, hi_a)))] = True
            total += tgt.mean()
        return total / _CALIBRATION_DRAWS

    lo, hi = 1e-4, 1.0
    for _ in range(14):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if covered(mid) < ratio else (lo, mid)
    return (lo + hi) / 2


def _block(
    rng: np.random.Generator, region: tuple[tuple[int, int], ...], scale: float, aspect: float
) -> tuple[slice, ...]:
    """A block of ~scale x region-size patches with aspect (axis 0 : the others), placed uniformly."""
    sizes = [hi - lo for lo, hi in region]
    d = len(sizes)
    volume = scale * math.prod(sizes)
    base = volume ** (1 / d)
    sides = [base * aspect ** ((d - 1) / d)] + [base * aspect ** (-1 / d)] * (d - 1)
    out = []
    for (lo, _), size, side in zip(region, sizes, sides, strict=True):
        n = min(max(1, round(side)), size)
        start = lo + int(rng.integers(0, size - n + 1))  # inclusive of the last row/column
        out.append(slice(start, start + n))
    return tuple(out)


def image_masks(
    rng: np.random.Generator,
    grid: tuple[int, ...],
    cfg: MaskConfig,
    region: tuple[tuple[int, int], ...] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Multi-block masks: context (N,) bool and targets (M, N) bool, disjoint.

    `region` bounds the blocks (per axis [lo, hi) in patches): the patches that hold image.
    The context keeps at least `min_context_patches` (or every non-target patch when the region
    is too small for that).
    """
    if len(grid) == 3 and cfg.through_depth:  # in-plane blocks through every slice (V-JEPA's tubes)
        ctx, tgt = image_masks(rng, grid[1:], cfg, region[1:] if region else None)
        depth, plane = grid[0], ctx.size
        return np.tile(ctx, depth), np.tile(tgt, (1, depth)).reshape(cfg.num_target_blocks, depth * plane)
    region = region or tuple((0, g) for g in grid)
    lo_s, hi_s = target_scale_range(cfg, grid)
    lo_a, hi_a = (math.log(a) for a in cfg.target_aspect)
    for _ in range(_MAX_TRIES):
        tgt = np.zeros((cfg.num_target_blocks, *grid), dtype=bool)
        for m in range(cfg.num_target_blocks):  # scale and aspect drawn per block
            scale = rng.uniform(lo_s, hi_s)
            aspect = math.exp(rng.uniform(lo_a, hi_a))
            tgt[(m, *_block(rng, region, scale, aspect))] = True
        ctx = np.zeros(grid, dtype=bool)
        ctx[_block(rng, region, rng.uniform(*cfg.context_scale), 1.0)] = True
        ctx &= ~tgt.any(axis=0)
        if ctx.sum() >= cfg.min_context_patches:
            break
    else:  # the blocks keep swallowing the context: keep every non-target patch of the region
        ctx = np.zeros(grid, dtype=bool)
        ctx[tuple(slice(a, b) for a, b in region)] = True
        ctx &= ~tgt.any(axis=0)
    n = math.prod(grid)
    return ctx.reshape(n), tgt.reshape(cfg.num_target_blocks, n)


def ehr_masks(rng: np.random.Generator, valid: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Context and target masks over EHR tokens: round(ratio x valid) targets, at least one of each."""
    idx = np.flatnonzero(valid)
    k = min(max(1, round(ratio * idx.size)), idx.size - 1)
    tgt = np.zeros(valid.shape, dtype=bool)
    tgt[rng.choice(idx, size=k, replace=False)] = True
    return valid & ~tgt, tgt


def allowed_policies(has_image: bool, ehr_tokens: int) -> list[int]:
    """Policies whose context and targets exist for this sample."""
    out = []
    if has_image:
        out.append(IMAGE_INTRA)
    if ehr_tokens >= 2:
        out.append(EHR_INTRA)
    if has_image and ehr_tokens >= 1:
        out += [HIDE_IMAGE, HIDE_EHR]
    return out


def choose_policy(rng: np.random.Generator, allowed: list[int], cfg: MaskConfig) -> int:
    """Draw a policy among the allowed ones with the configured weights (renormalised)."""
    if not allowed:
        return NO_POLICY
    weights = {
        IMAGE_INTRA: cfg.policy.image_intra,
        EHR_INTRA: cfg.policy.ehr_intra,
        HIDE_IMAGE: cfg.policy.cross_modal * cfg.policy.hide_image,
        HIDE_EHR: cfg.policy.cross_modal * (1 - cfg.policy.hide_image),
    }
    w = np.array([weights[p] for p in allowed], dtype=np.float64)
    if w.sum() <= 0:  # the configured policies do not apply to this sample: any that does
        w = np.ones(len(allowed))
    return allowed[int(rng.choice(len(allowed), p=w / w.sum()))]


def sample_masks(
    rng: np.random.Generator,
    grid: tuple[int, ...],
    ehr_valid: np.ndarray,
    has_image: bool,
    cfg: MaskConfig,
    region: tuple[tuple[int, int], ...] | None = None,
) -> SampleMasks:
    """Choose a policy for one sample and draw its masks."""
    n, m = math.prod(grid), cfg.num_target_blocks
    policy = choose_policy(rng, allowed_policies(has_image, int(ehr_valid.sum())), cfg)
    img_ctx = np.zeros(n, dtype=bool)
    img_tgt = np.zeros((m, n), dtype=bool)
    ehr_ctx = np.zeros(ehr_valid.shape, dtype=bool)
    ehr_tgt = np.zeros(ehr_valid.shape, dtype=bool)
    ehr_ratio = cfg.mask_ratio if cfg.ehr_mask_ratio is None else cfg.ehr_mask_ratio
    whole_image = np.zeros(n, dtype=bool)
    if has_image:
        region = region or tuple((0, g) for g in grid)
        whole_image.reshape(grid)[tuple(slice(a, b) for a, b in region)] = True
    if policy == IMAGE_INTRA:
        img_ctx, img_tgt = image_masks(rng, grid, cfg, region)
        ehr_ctx = ehr_valid.copy()
    elif policy == EHR_INTRA:
        img_ctx = whole_image
        ehr_ctx, ehr_tgt = ehr_masks(rng, ehr_valid, ehr_ratio)
    elif policy == HIDE_IMAGE:
        _, img_tgt = image_masks(rng, grid, cfg, region)
        ehr_ctx = ehr_valid.copy()
    elif policy == HIDE_EHR:
        img_ctx = whole_image
        ehr_tgt = ehr_valid.copy()
        if ehr_valid.sum() >= 2:  # predict the same fraction of the hidden tokens as in ehr_intra
            _, ehr_tgt = ehr_masks(rng, ehr_valid, ehr_ratio)
    return SampleMasks(policy, img_ctx, img_tgt, ehr_ctx, ehr_tgt)


def mask_indices(mask):
    """(..., N) bool -> (idx, keep), both (..., K) with K the batch's largest count.

    idx lists each row's True positions in increasing order, padded with 0; keep marks the real
    entries. Padding (instead of the reference's trimming to the smallest count) loses no target.
    """
    import torch

    counts = mask.sum(-1)
    k = max(int(counts.max()) if counts.numel() else 0, 1)
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[..., :k]
    keep = torch.arange(k, device=mask.device) < counts.unsqueeze(-1)
    return torch.where(keep, order, torch.zeros_like(order)), keep
