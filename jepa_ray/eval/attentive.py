"""Attentive probe on frozen tokens: the read-out of the I-JEPA and V-JEPA evaluations.

    tokens (N, T, D), keep (N, T)
      -> standardised with fit-split statistics -> LayerNorm
      -> one learned query attends to the kept tokens (multi-head cross-attention)   # (N, D)
      -> linear                                                   # (N, F) outputs or (N,) logits

Unlike a linear probe on mean-pooled tokens, it can read what one position carries. Trained with
AdamW (weight decay) on the fit split: a held-out fraction of it (stratified for a binary label,
grouped by subject when groups are given) picks the number of epochs, the one with the lowest
held-out loss; the probe is then refit on the whole fit split for that many epochs.
Plain PyTorch on the CPU, deterministic given the seed (the global RNG is left untouched).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from sklearn.metrics import r2_score
from torch import nn

Task = Literal["regression", "binary"]
MIN_SAMPLES = 4  # fewest fit samples the probe accepts


@dataclass(frozen=True)
class AttentiveSettings:
    """How the probe is trained (EvalConfig's attentive_* keys)."""

    epochs: int = 100  # the most epochs; the held-out fraction picks how many
    lr: float = 3e-3
    weight_decay: float = 0.05
    heads: int = 4
    batch_size: int = 128
    val_fraction: float = 0.2
    layernorm: bool = True
    seed: int = 0


class AttentivePooler(nn.Module):
    """One learned query, multi-head cross-attention over the tokens, then a linear layer.

    The same function as nn.MultiheadAttention with one query, computed query-side: a head's logit
    for token x is q_h . (W_k,h x) = (W_k,h^T q_h) . x, and its output W_v,h (sum_t a_t x_t) + b_v,h,
    so the tokens are never projected (a key bias shifts a head's logits equally: left out)."""

    def __init__(self, dim: int, outputs: int, heads: int, layernorm: bool) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim) if layernorm else nn.Identity()
        self.query = nn.Parameter(torch.zeros(dim))
        nn.init.trunc_normal_(self.query, std=0.02)  # near-uniform attention at the start: a mean pool
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, outputs)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, _, d = x.shape
        h, c = self.heads, d // self.heads
        x = self.norm(x)  # (B, T, D)
        q = self.q_proj(self.query).view(h, c)  # (H, C)
        kq = torch.einsum("hc,hcd->hd", q, self.k_proj.weight.view(h, c, d)) / math.sqrt(c)  # (H, D)
        logits = (x @ kq.T).masked_fill(~keep[..., None], float("-inf"))  # (B, T, H)
        pooled = torch.einsum("bth,btd->bhd", logits.softmax(1), x)  # (B, H, D)
        v = torch.einsum("bhd,hcd->bhc", pooled, self.v_proj.weight.view(h, c, d))  # (B, H, C)
        return self.head(self.out_proj(v.reshape(b, d) + self.v_proj.bias))  # (B, F)


@dataclass
class AttentiveProbe:
    """A trained probe with the fit split's token and target statistics."""

    model: AttentivePooler
    mean: np.ndarray  # (D,) token mean over the fit split's kept tokens
    std: np.ndarray  # (D,)
    y_mean: np.ndarray  # (F,) regression targets' mean (0 for a binary label)
    y_std: np.ndarray  # (F,)
    task: Task
    epochs: int  # the epochs it was refit for (chosen on the held-out fraction)
    squeeze: bool  # the targets were 1-D: predictions are too

    def predict(self, tokens: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
        """Regression: (N, F) targets in their own units ((N,) for 1-D targets); binary: (N,) logits."""
        tokens, keep = check_tokens(tokens, keep)
        if tokens.shape[2] != len(self.mean):
            raise ValueError(f"tokens have width {tokens.shape[2]}, the probe was fit on {len(self.mean)}")
        x, k = _tensors(tokens, keep, self.mean, self.std)
        self.model.eval()
        with torch.no_grad(), _one_thread():
            out = self.model(x, k).numpy().astype(float)  # (N, F)
        if self.task == "binary":
            return out[:, 0]
        out = out * self.y_std + self.y_mean
        return out[:, 0] if self.squeeze else out


def check_tokens(tokens: np.ndarray, keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tokens as float32 (N, T, D) and keep as bool (N, T) (all True when None); ValueError naming
    what is wrong otherwise."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be (N, T, D), got shape {tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.number):
        raise ValueError(f"tokens must be numeric, got dtype {tokens.dtype}")
    tokens = tokens.astype(np.float32)
    if keep is None:
        keep = np.ones(tokens.shape[:2], bool)
    keep = np.asarray(keep)
    if keep.shape != tokens.shape[:2]:
        raise ValueError(f"keep must be (N, T) = {tokens.shape[:2]}, got shape {keep.shape}")
    if keep.dtype != bool:
        raise ValueError(f"keep must be a bool mask, got dtype {keep.dtype}")
    empty = np.flatnonzero(~keep.any(1))
    if len(empty):
        raise ValueError(f"keep: {len(empty)} sample(s) with no kept token (first: row {empty[0]})")
    if not np.isfinite(tokens[keep]).all():
        raise ValueError("tokens: NaN or infinite values among the kept tokens")
    return tokens, keep


def fit_attentive(
    tokens: np.ndarray,
    y: np.ndarray,
    keep: np.ndarray | None = None,
    task: Task = "regression",
    settings: AttentiveSettings = AttentiveSettings(),
    groups: np.ndarray | list | None = None,
) -> AttentiveProbe:
    """Train the probe on tokens (N, T, D) for targets y: (N,) or (N, F) for regression, (N,) 0/1
    for a binary label; groups (N,) keep a subject's samples on one side of the held-out fraction."""
    tokens, keep = check_tokens(tokens, keep)
    n, _, dim = tokens.shape
    y = np.asarray(y, dtype=float)
    squeeze = y.ndim == 1
    y2 = y.reshape(n, -1) if y.ndim == 1 and len(y) == n else y
    _check_targets(y2, n, task)
    if dim % settings.heads:
        raise ValueError(f"heads: {settings.heads} attention heads do not divide the token width {dim}")
    if groups is not None and len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries, tokens have {n} samples")

    kept = tokens[keep]  # (M, D)
    mean, std = kept.mean(0), kept.std(0).clip(min=1e-6)
    if task == "regression":
        y_mean, y_std = y2.mean(0), y2.std(0).clip(min=1e-12)
    else:
        y_mean, y_std = np.zeros(1), np.ones(1)
    x, k = _tensors(tokens, keep, mean, std)
    t = torch.as_tensor((y2 - y_mean) / y_std, dtype=torch.float32)  # (N, F)

    train, val = _holdout(y2[:, 0], task, settings, groups)
    with _one_thread():
        if val is None:
            epochs = settings.epochs  # too few samples to hold any out
        else:
            _, losses = _train(x, k, t, train, task, settings, settings.epochs, val=val)
            epochs = int(np.argmin(losses)) + 1
        model, _ = _train(x, k, t, np.arange(n), task, settings, epochs)
    return AttentiveProbe(model, mean, std, y_mean, y_std, task, epochs, squeeze)


def attentive_r2(
    tokens_fit: np.ndarray,
    z_fit: np.ndarray,
    reports: dict[str, tuple[np.ndarray, np.ndarray]],
    settings: AttentiveSettings = AttentiveSettings(),
    probe: AttentiveProbe | None = None,
) -> dict:
    """The probe from tokens (N, T, D) to latent factors z (N, F), fit once (or `probe`, already
    fit on them); R² per factor on each reported split (tokens, z): {split: {"r2": [per factor],
    "n", "epochs"}}, as probes.latent_r2."""
    probe = probe or fit_attentive(tokens_fit, z_fit, settings=settings)
    out = {}
    for split, (x, z) in reports.items():
        pred = probe.predict(x).reshape(len(z), -1)
        z = np.asarray(z, float).reshape(len(z), -1)
        out[split] = {
            "r2": [float(r2_score(z[:, j], pred[:, j])) for j in range(z.shape[1])],
            "n": len(z),
            "epochs": probe.epochs,
        }
    return out


def oof_attentive(
    tokens: np.ndarray,
    z: np.ndarray,
    groups: np.ndarray | list,
    folds: int = 5,
    seed: int = 0,
    keep: np.ndarray | None = None,
    settings: AttentiveSettings | None = None,
) -> np.ndarray:
    """Out-of-fold predictions (N, F) of the probe from tokens (N, T, D) to targets z (N, F), folds
    grouped by subject (sklearn GroupKFold), epochs chosen inside each training fold (settings'
    seed replaced by `seed`)."""
    from sklearn.model_selection import GroupKFold

    tokens, keep = check_tokens(tokens, keep)
    z = np.asarray(z, float)
    z = z.reshape(len(z), -1)
    if len(z) != len(tokens) or len(groups) != len(tokens):
        raise ValueError(f"tokens have {len(tokens)} samples, z {len(z)} and groups {len(groups)}")
    groups = np.asarray(groups)
    if folds < 2 or len(np.unique(groups)) < folds:
        raise ValueError(f"folds: need 2 <= folds <= distinct groups ({len(np.unique(groups))}), got {folds}")
    settings = replace(settings or AttentiveSettings(), seed=seed)
    pred = np.zeros_like(z)
    for train, test in GroupKFold(folds).split(tokens, z, groups):
        probe = fit_attentive(tokens[train], z[train], keep[train], settings=settings, groups=groups[train])
        pred[test] = probe.predict(tokens[test], keep[test]).reshape(len(test), -1)
    return pred


def cv_attentive_r2(
    tokens: np.ndarray,
    z: np.ndarray,
    groups: np.ndarray | list,
    folds: int = 5,
    seed: int = 0,
    keep: np.ndarray | None = None,
    settings: AttentiveSettings | None = None,
) -> list[float]:
    """Out-of-fold R² per latent factor of the probe from tokens (N, T, D) to z (N, F)
    (`oof_attentive`): as probes.cv_latent_r2, for a cohort too small for a held-out split."""
    pred = oof_attentive(tokens, z, groups, folds, seed, keep, settings)
    z = np.asarray(z, float).reshape(len(pred), -1)
    return [float(r2_score(z[:, j], pred[:, j])) for j in range(z.shape[1])]


def _check_targets(y: np.ndarray, n: int, task: Task) -> None:
    if y.ndim != 2 or len(y) != n:
        raise ValueError(f"y must be (N,) or (N, F) with N = {n} (the tokens' samples), got shape {y.shape}")
    if not np.isfinite(y).all():
        raise ValueError("y: NaN or infinite targets; drop those samples first")
    if task == "binary":
        if y.shape[1] != 1 or not np.isin(y, (0.0, 1.0)).all():
            raise ValueError("y: a binary label must be one column of 0/1")
        if not 0 < y.sum() < n:
            raise ValueError("y: a binary label needs both classes in the fit split")
    elif task != "regression":
        raise ValueError(f"task must be 'regression' or 'binary', got {task!r}")
    if n < MIN_SAMPLES:
        raise ValueError(f"too few samples to fit the probe: {n} (need {MIN_SAMPLES})")


@contextmanager
def _one_thread() -> Iterator[None]:
    """Torch ops this small gain nothing from intra-op threads, and on a busy machine spinning
    OpenMP workers slow them tenfold: one thread while the probe runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _tensors(tokens: np.ndarray, keep: np.ndarray, mean: np.ndarray, std: np.ndarray):
    x = (tokens - mean) / std * keep[..., None]  # (N, T, D), zeros at dropped tokens
    return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(keep)


def _holdout(y: np.ndarray, task: Task, s: AttentiveSettings, groups) -> tuple[np.ndarray, np.ndarray | None]:
    """(train, held-out) indices: whole groups when given, both classes on each side for a binary
    label; held-out None when the fit split is too small to spare one."""
    rng = np.random.default_rng(s.seed)
    n = len(y)
    if groups is not None:
        names, index = np.unique(np.asarray(groups), return_inverse=True)
        chosen = rng.permutation(len(names))[: round(s.val_fraction * len(names))]
        is_val = np.isin(index, chosen)
    elif task == "binary":
        is_val = np.zeros(n, bool)
        for cls in (0.0, 1.0):
            members = rng.permutation(np.flatnonzero(y == cls))
            is_val[members[: round(s.val_fraction * len(members))]] = True
    else:
        is_val = np.zeros(n, bool)
        is_val[rng.permutation(n)[: round(s.val_fraction * n)]] = True
    train, val = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    too_small = len(val) < 2 or len(train) < 2
    if task == "binary":
        too_small = too_small or any(len(np.unique(y[i])) < 2 for i in (train, val))
    return (np.arange(n), None) if too_small else (train, val)


def _train(
    x: torch.Tensor,
    keep: torch.Tensor,
    y: torch.Tensor,
    rows: np.ndarray,
    task: Task,
    s: AttentiveSettings,
    epochs: int,
    val: np.ndarray | None = None,
) -> tuple[AttentivePooler, list[float]]:
    """AdamW for `epochs` epochs of shuffled mini-batches of `rows`; with `val`, the held-out loss
    after each epoch (all of them: a plateau before the query finds its tokens is common)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        model = AttentivePooler(x.shape[2], y.shape[1], s.heads, s.layernorm)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss() if task == "binary" else nn.MSELoss()
    gen = torch.Generator().manual_seed(s.seed)
    rows_t = torch.as_tensor(rows)
    losses: list[float] = []
    for _ in range(epochs):
        model.train()
        for batch in rows_t[torch.randperm(len(rows_t), generator=gen)].split(s.batch_size):
            opt.zero_grad()
            loss_fn(model(x[batch], keep[batch]), y[batch]).backward()
            opt.step()
        if val is not None:
            model.eval()
            with torch.no_grad():
                losses.append(float(loss_fn(model(x[val], keep[val]), y[val])))
    return model, losses
