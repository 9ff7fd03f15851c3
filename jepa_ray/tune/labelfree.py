"""Label-free objectives of a sweep, measured on rank 0's validation batches with fixed masks.

Every trial is scored on the same inputs: its masks are re-drawn here from a reference mask
setting (the sweep's base config, not the trial's) and a fixed seed per sample key and view, so
that a trial with mask ratio 0.3 and one with 0.7 answer the same questions.

- `rankme`: effective rank of the target encoder's pooled embeddings (Garrido et al., 2023).
- `lidar`: effective rank of the LDA matrix Sigma_w^-1/2 Sigma_b Sigma_w^-1/2 (Thilak et al., 2023,
  arXiv 2312.04000), whose surrogate classes are validation samples and whose class members are
  the pooled embeddings of `VIEWS` differently masked views of each (the JEPA's context views:
  what the context encoder is shown); `lidar` embeds the views with the target encoder,
  `lidar_context` with the context encoder.
- `val_loss`: the model's own loss (JEPA latent prediction, or an MAE's reconstruction) with the
  reference masks, negated so that higher is better.

Each comes with a bootstrap standard error: over samples (rankme), surrogate classes (lidar) or
chunks of samples (val_loss). All are deterministic given the weights and the batches.

Each is fooled by a collapsed encoder: a JEPA whose embeddings shrink onto a few directions (or one
point) predicts its own targets all the better, and centred RankMe and LiDAR measure only noise
once every sample maps to one point. `collapsed` compares the target encoder's pooled embeddings
with those of the encoder the run started from; a trial that lost half of their effective rank
or half of their spread is ranked last whatever its label-free score (`jepa_ray.tune.objective`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from jepa_ray.config import MaskConfig

VIEWS = 8  # masked views per sample (LiDAR's q)
DELTA = 1e-4  # Sigma_w regulariser, relative to Sigma_w's mean eigenvalue (scale-free)
EPS = 1e-7  # added to the normalised eigenvalues before the entropy, as in the paper
# fewest surrogate classes (validation samples) for LiDAR: its LDA matrix has rank < classes, so
# fewer would cap the value below what the embeddings hold (the SE says how uncertain the rest is)
MIN_CLASSES = 16
BOOTSTRAP = 100
LIDAR_BOOTSTRAP = 50  # each resample is two eigendecompositions of a D x D matrix
REFERENCE_SEED = 20231206  # the masks' seed, the same for every trial of every sweep
CHUNKS = 4  # val_loss: each batch is scored in this many chunks (the bootstrap's units)
# collapse guard: the share of the starting encoder's RankMe or spread a trial must keep. On the
# learning benchmark's cohort (bench_labelfree.py), the 48 settings of its two grids kept 1.0-1.2x
# the start's RankMe; runs without SIGReg, with no EMA or at a high learning rate kept 0.08-0.38x
# of it or 0.08-0.13x of the spread (mean attentive R² 0.17-0.30 against the default's 0.37), and
# each had the better val_loss (--grid collapse)
COLLAPSE_FRACTION = 0.5


def effective_rank(values: np.ndarray, eps: float = EPS) -> float:
    """exp(entropy) of non-negative spectrum values normalised to sum 1 (+eps): 1 .. len(values)."""
    v = np.clip(np.asarray(values, np.float64), 0.0, None)
    p = v / max(v.sum(), 1e-12) + eps
    return float(math.exp(-(p * np.log(p)).sum()))


def rankme(x: np.ndarray) -> float:
    """RankMe of embeddings (n, d): effective rank of their centred singular values (the value of
    `jepa_ray.model.jepa.embedding_stats`)."""
    x = np.asarray(x, np.float64)
    return effective_rank(np.linalg.svd(x - x.mean(0), compute_uv=False), eps=1e-12)


def spread(x: np.ndarray) -> float:
    """Mean per-dimension standard deviation of the L2-normalised embeddings (n, d), times sqrt(d):
    near 1 for embeddings spread over the sphere, 0 when every sample maps to one point (where
    centred RankMe measures only numerical noise)."""
    x = np.asarray(x, np.float64)
    x = x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)
    return float(x.std(0).mean() * math.sqrt(x.shape[1]))


def health(x: np.ndarray) -> dict[str, float]:
    """{"rankme", "spread"} of embeddings (n, d): what the collapse guard compares."""
    return {"rankme": rankme(x), "spread": spread(x)}


def collapsed(
    now: dict[str, float], start: dict[str, float], fraction: float = COLLAPSE_FRACTION
) -> str | None:
    """Why embeddings whose `health` is `now` count as collapsed against `start` (the `health` of
    the encoder the run started from, on the same samples), or None: below `fraction` of either."""
    for name in ("rankme", "spread"):
        if now[name] < fraction * start[name]:
            return f"{name} {now[name]:.3g} < {fraction:g} x {start[name]:.3g} at the start"
    return None


def lidar(z: np.ndarray, delta: float = DELTA) -> float:
    """LiDAR of embeddings (n classes, q views, d): effective rank of the LDA matrix.

    Sigma_b: covariance of the class means; Sigma_w: mean within-class covariance + delta * (its mean
    eigenvalue) * I, so that the value does not depend on the embeddings' scale.
    """
    z = np.asarray(z, np.float64)
    mu = z.mean(1)  # (n, d) class means
    between = np.cov(mu, rowvar=False, bias=True)
    dev = (z - mu[:, None]).reshape(-1, z.shape[-1])
    within = dev.T @ dev / dev.shape[0]
    scale = max(float(np.trace(within)) / within.shape[0], 1e-12)
    w, v = np.linalg.eigh(within + delta * scale * np.eye(within.shape[0]))
    inv_sqrt = (v / np.sqrt(np.clip(w, 1e-12, None))) @ v.T
    return effective_rank(np.linalg.eigvalsh(inv_sqrt @ between @ inv_sqrt))


def bootstrap_se(stat: Callable[[np.ndarray], float], n: int, reps: int = BOOTSTRAP, seed: int = 0) -> float:
    """Standard deviation of `stat(rows)` over `reps` resamples (with replacement) of range(n)."""
    if n < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    vals = [stat(rng.integers(0, n, n)) for _ in range(reps)]
    vals = [v for v in vals if math.isfinite(v)]
    return float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")


def reference_masks(
    batch: dict[str, Any], grids: tuple[tuple[int, ...], ...], mask: MaskConfig, views: int | list[int]
) -> dict[str, Any]:
    """The batch with masks re-drawn from `mask`: the same for every trial (the seed is
    REFERENCE_SEED, the sample's key and the view). `views` a list: the batch repeated once per
    view, view-major (B * len(views) rows). Blocks may fall on the image's padding: the batch does
    not carry where each image lies in its grid."""
    from jepa_ray.model.masks import mask_indices, sample_masks
    from jepa_ray.stream.transform import sample_rng

    views = [views] if isinstance(views, int) else list(views)
    q = len(views)
    out = {
        k: (v.repeat(q, *([1] * (v.dim() - 1))) if isinstance(v, torch.Tensor) else list(v) * q)
        for k, v in batch.items()
    }
    ehr_valid = out["ehr_valid"].cpu().numpy()
    has_image = out["has_image"].cpu().numpy()
    kind = out["is_volume"].long().cpu().numpy() if "is_volume" in out else np.zeros(len(has_image), int)
    b, n, m = len(has_image), max(math.prod(g) for g in grids), mask.num_target_blocks
    img_ctx, img_tgt = np.zeros((b, n), bool), np.zeros((b, m, n), bool)
    ehr_ctx, ehr_tgt = np.zeros_like(ehr_valid), np.zeros_like(ehr_valid)
    policy = np.zeros(b, np.int8)
    size = len(batch["key"])
    for j, key in enumerate(out["key"]):
        rng = sample_rng(REFERENCE_SEED, views[j // size], str(key))
        s = sample_masks(rng, grids[int(kind[j])], ehr_valid[j], bool(has_image[j]), mask)
        k = s.img_ctx.size
        img_ctx[j, :k], img_tgt[j, :, :k] = s.img_ctx, s.img_tgt
        ehr_ctx[j], ehr_tgt[j], policy[j] = s.ehr_ctx, s.ehr_tgt, s.policy
    dev = out["ehr_valid"].device
    for name, arr in (("img_ctx", img_ctx), ("img_tgt", img_tgt)):
        out[name] = torch.from_numpy(arr).to(dev)
        out[f"{name}_idx"], out[f"{name}_keep"] = mask_indices(out[name])
    out["ehr_ctx"], out["ehr_tgt"] = torch.from_numpy(ehr_ctx).to(dev), torch.from_numpy(ehr_tgt).to(dev)
    out["policy"] = torch.from_numpy(policy).to(dev)
    return out


@torch.no_grad()
def view_embeddings(
    model: Any, batches: list[dict[str, Any]], mask: MaskConfig, encoders: tuple[str, ...], views: int = VIEWS
) -> dict[str, np.ndarray]:
    """encoder ("target" / "context") -> (samples, views, D): each sample's pooled embedding of its
    context-visible tokens, one row per reference masking (the same masked inputs for both)."""
    out: dict[str, list[torch.Tensor]] = {e: [] for e in encoders}
    for batch in batches:
        b = reference_masks(batch, model.dims.grids, mask, list(range(views)))
        size = len(batch["key"])
        for name in encoders:
            enc = model.target if name == "target" else model.context
            o = enc(b, b["img_ctx_idx"], b["img_ctx_keep"], b["ehr_ctx"])
            keep = o["keep"].clone()
            keep[:, 0] = False  # the global token is in every view: pool what the view shows
            w = keep.unsqueeze(-1).to(o["tokens"].dtype)
            pooled = ((o["tokens"] * w).sum(1) / w.sum(1).clamp(min=1)).float().cpu()  # (views * B, D)
            out[name].append(pooled.view(views, size, -1).transpose(0, 1))  # (B, views, D)
    return {name: torch.cat(z).numpy() for name, z in out.items()}


@torch.no_grad()
def fixed_mask_losses(model: Any, batches: list[dict[str, Any]], mask: MaskConfig) -> np.ndarray:
    """(chunks, 2): the model's mean loss and target count for each chunk of each batch, with the
    reference masks (view 0). The model's own loss: latent prediction for a JEPA, reconstruction
    for an MAE."""
    student = model.student
    was_training = student.training
    student.eval()
    rows = []
    try:
        for batch in batches:
            b = reference_masks(batch, model.dims.grids, mask, 0)
            size = len(b["key"])
            step = max(math.ceil(size / CHUNKS), 1)
            for lo in range(0, size, step):
                part = {k: v[lo : lo + step] for k, v in b.items()}
                out = model(part)
                rows.append((float(out["loss"]), float(out["targets"])))
    finally:
        student.train(was_training)
    return np.array(rows, np.float64).reshape(-1, 2)


def weighted_mean(rows: np.ndarray) -> float:
    """Target-weighted mean loss of (loss, targets) rows."""
    return float((rows[:, 0] * rows[:, 1]).sum() / max(rows[:, 1].sum(), 1.0))


def scores(
    names: list[str], model: Any, batches: list[dict[str, Any]], mask: MaskConfig, pooled: np.ndarray
) -> dict[str, tuple[float, float]]:
    """name -> (value, bootstrap SE) of label-free objectives, higher is better. `pooled`: the target
    encoder's pooled embeddings of the batches (rankme's input)."""
    out = {}
    encoders = tuple(e for e, n in (("target", "lidar"), ("context", "lidar_context")) if n in names)
    views = view_embeddings(model, batches, mask, encoders) if encoders else {}
    for name in names:
        if name == "rankme":
            out[name] = rankme(pooled), bootstrap_se(lambda i: rankme(pooled[i]), len(pooled))
        elif name in ("lidar", "lidar_context"):
            z = views["target" if name == "lidar" else "context"]
            out[name] = lidar(z), bootstrap_se(lambda i, z=z: lidar(z[i]), len(z), reps=LIDAR_BOOTSTRAP)
        elif name == "val_loss":
            rows = fixed_mask_losses(model, batches, mask)
            out[name] = -weighted_mean(rows), bootstrap_se(lambda i, r=rows: weighted_mean(r[i]), len(rows))
        else:
            raise ValueError(f"unknown label-free objective {name!r}")
    return out
