"""Time-to-event heads on frozen embeddings under four fusion strategies, and their c-indices.

Every head is a Cox model trained with the partial likelihood of torchsurv (Efron ties) on the fit
split, stopped early on the validation split (with `head_seeds` > 1, the mean risk of that many
fits from consecutive seeds); Harrell's and Uno's c-index come from
scikit-survival, with percentile-bootstrap 95% intervals (the resamples scored at once, as counts
over the samples' pairs); `paired_cindex` sets two encoders' risks of the same samples against each
other on the same resamples. Strategies and missing modalities:

    image            Cox on the image tokens, pooled by a   samples without an image: excluded, counted
                     learned query (attentive pooling)
    ehr              Cox on the pooled EHR embedding        samples without EHR: excluded, counted
    late_fusion      Cox on the two unimodal risks, fit to  a missing modality's risk is its training mean
                     its optimum (Newton)
    contrastive      InfoNCE-aligned projections, averaged  a missing modality: the present one's projection
    cross_attention  EHR tokens attend to image tokens      no image: attention to a learned null token only;
                                                            no EHR: a learned query token attends
    co_attention     both directions, pooled, concatenated  as cross_attention, each direction
    raw_ehr_cox      classical Cox (ridge) on raw EHR       samples without EHR: excluded, counted
                     features, missing values imputed
    image_with_raw_ehr
                     Cox on the image head's risk and the   a missing modality's risk is its training mean
                     raw-EHR Cox model's (late fusion with
                     the clinical model), fit to its optimum

Samples without follow-up for the endpoint (no time) are excluded from every strategy and counted.

`cross_fitted` scores every labelled subject of a site instead of a held-out split alone: each of
K folds by heads fit on the others, its c-indices counting pairs within a fold (`strata`).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, fields

import numpy as np
import torch
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.metrics import concordance_index_censored, concordance_index_ipcw
from sksurv.nonparametric import CensoringDistributionEstimator
from sksurv.util import Surv
from torch import nn
from torchsurv.loss.cox import neg_partial_log_likelihood

from jepa_ray.eval.probes import bootstrap_indices

# torchsurv warns on every call whose batch has tied times; Efron's method is our choice for them
warnings.filterwarnings("ignore", message="Ties in `time` detected", category=UserWarning)

STRATEGIES = ("image", "ehr", "late_fusion", "contrastive", "cross_attention", "co_attention")
HIDDEN = 32  # width of projections and attention in the fusion heads
# steps without a better validation likelihood after which a head stops: on bench_learning's 128
# validation subjects the attention heads peak by step 40-50 of 300, the image head by 70-140, the
# EHR head by 220-260, the contrastive head near the last step; stopping 100 steps
# after the best left every c-index of its three seeds unchanged to the third decimal
PATIENCE = 100


@dataclass
class FusionInputs:
    """One split, n samples: what the heads see."""

    img_tokens: np.ndarray  # (n, Ti, D) image tokens (a coarse grid of pooled patch tokens)
    ehr_tokens: np.ndarray  # (n, Te, D) EHR tokens
    ehr_keep: np.ndarray  # (n, Te) bool: valid EHR slots
    has_image: np.ndarray  # (n,) bool
    has_ehr: np.ndarray  # (n,) bool
    img_pooled: np.ndarray  # (n, D)
    ehr_pooled: np.ndarray  # (n, D)
    time: np.ndarray  # (n,) days from the index; NaN without follow-up
    event: np.ndarray  # (n,) bool

    def check(self, split: str) -> None:
        """ValueError naming the field and split when shapes disagree."""
        n = len(self.time)
        for f in fields(self):
            v = getattr(self, f.name)
            if len(v) != n:
                raise ValueError(f"{split}: {f.name} has {len(v)} rows, time has {n}")
        ndim = {"img_tokens": 3, "ehr_tokens": 3, "ehr_keep": 2, "img_pooled": 2, "ehr_pooled": 2}
        for name, d in ndim.items():
            if getattr(self, name).ndim != d:
                raise ValueError(
                    f"{split}: {name} must have {d} dimensions, has shape {getattr(self, name).shape}"
                )
        if self.ehr_keep.shape != self.ehr_tokens.shape[:2]:
            raise ValueError(
                f"{split}: ehr_keep {self.ehr_keep.shape} does not match ehr_tokens {self.ehr_tokens.shape}"
            )

    def take(self, idx: np.ndarray) -> FusionInputs:
        return FusionInputs(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})


def harrell(time: np.ndarray, event: np.ndarray, risk: np.ndarray, strata: np.ndarray | None = None) -> float:
    """Harrell's c-index (higher risk = earlier event; tied risks count one half); with `strata`
    (one label per sample, e.g. cross-fitting's folds) over the pairs within a stratum only; NaN
    when no pair is comparable. Raises ValueError when every sample is censored or a risk is not
    one finite number per sample."""
    risk = np.asarray(risk, dtype=float)
    if risk.shape != (len(time),) or len(event) != len(time):
        raise ValueError(f"c-index: {len(time)} times, {len(event)} events and risks of shape {risk.shape}")
    if not np.isfinite(risk).all():
        raise ValueError(f"c-index: {int((~np.isfinite(risk)).sum())} of {len(risk)} risks are not finite")
    if not np.asarray(event).any():
        raise ValueError(f"c-index: all {len(time)} samples are censored")
    if strata is None and len(time) > 1000:  # past ~1,000 samples scikit-survival's loop is the quicker
        return float(concordance_index_censored(np.asarray(event).astype(bool), time, risk)[0])
    every = [np.arange(len(time))]
    return float(resampled_cindex(time, event, risk[None], np.ones(len(time)), every, strata=strata)[0, 0])


def uno(
    train_time: np.ndarray, train_event: np.ndarray, time: np.ndarray, event: np.ndarray, risk: np.ndarray,
    tau: float | None = None,
) -> float:  # fmt: skip
    """Uno's IPCW c-index over events before `tau` (default: the 90th percentile of the training
    follow-up, where the censoring distribution estimated on the training split is defined)."""
    tau = _tau(train_time, tau)
    y_train = Surv.from_arrays(train_event.astype(bool), train_time)
    y = Surv.from_arrays(event.astype(bool), time)
    return float(concordance_index_ipcw(y_train, y, risk, tau=tau)[0])


def uno_weights(
    train_time: np.ndarray, train_event: np.ndarray, time: np.ndarray, event: np.ndarray, tau: float | None = None
) -> np.ndarray:  # fmt: skip
    """Each sample's weight in Uno's c-index: 1 / G(t)² for an event before `tau` (G: the training
    split's Kaplan-Meier censoring survival), 0 otherwise; `uno` is the c-index under them."""
    tau = _tau(train_time, tau)
    cens = CensoringDistributionEstimator().fit(Surv.from_arrays(train_event.astype(bool), train_time))
    before = time < tau
    w = np.zeros(len(time))
    if before.any():
        w[before] = cens.predict_ipcw(Surv.from_arrays(event[before].astype(bool), time[before]))
    return np.square(w)


def _tau(train_time: np.ndarray, tau: float | None) -> float:
    """Uno's truncation time: as given, else the 90th percentile of the training follow-up."""
    return float(np.quantile(train_time, 0.9)) if tau is None else float(tau)


def bootstrap_cindex(
    time: np.ndarray, event: np.ndarray, risk: np.ndarray, weight: np.ndarray, n: int, seed: int,
    tied_tol: float = 1e-8, rows: int = 256,
) -> list[float] | None:  # fmt: skip
    """Percentile 95% interval of the weighted c-index (weight 1: Harrell's; `uno_weights`: Uno's)
    over n bootstrap resamples (`probes.bootstrap_indices`, as `probes.bootstrap_ci` draws them;
    those without a comparable pair redrawn), scored together (`resampled_cindex`). None if n == 0."""
    if n == 0:
        return None
    draws = bootstrap_indices(len(time), n, seed, lambda idx: cindex_defined(time[idx], event[idx]))
    c = resampled_cindex(time, event, risk[None], weight, draws, tied_tol, rows)[0]
    c = c[np.isfinite(c)]
    if not len(c):
        return None
    lo, hi = np.percentile(c, [2.5, 97.5])
    return [float(lo), float(hi)]


def paired_cindex(
    time: np.ndarray, event: np.ndarray, risk_a: np.ndarray, risk_b: np.ndarray, n: int, seed: int,
    strata: np.ndarray | None = None,
) -> dict:  # fmt: skip
    """Harrell's c-index of two risk scores of the same samples (two encoders' heads), their
    difference and its paired bootstrap 95% interval: each resample scores both, so the interval
    leaves out the draw of samples both share ("beyond_noise": it excludes 0). The form of
    `compare.paired_difference`: {"a", "b", "difference", "ci95", "beyond_noise", "n"}.
    risk_a, risk_b: (samples,), or (runs, samples) for several runs (seeds) scored on the same
    samples, pair by pair: then a and b are the runs' mean c-indices and the interval is that of
    the mean difference, every run scored on each resample (seeds that share their held-out
    subjects do not average away the draw of those subjects).
    strata: one label per sample; pairs are then counted only within a stratum (the folds of a
    cross-fit, whose risks come from different fits and are not on one scale)."""
    ra, rb = np.atleast_2d(risk_a), np.atleast_2d(risk_b)
    if ra.shape != rb.shape or ra.shape[1] != len(time):
        raise ValueError(
            f"paired risks need one per sample and run: {ra.shape}, {rb.shape}, {len(time)} samples"
        )
    every = [np.arange(len(time))]
    whole = resampled_cindex(time, event, np.concatenate([ra, rb]), np.ones(len(time)), every, strata=strata)[
        :, 0
    ]
    a, b = float(whole[: len(ra)].mean()), float(whole[len(ra) :].mean())
    out = {"a": a, "b": b, "difference": a - b, "n": len(time)}
    draws = (
        bootstrap_indices(len(time), n, seed, lambda idx: cindex_defined(time[idx], event[idx])) if n else []
    )
    c = resampled_cindex(time, event, np.concatenate([ra, rb]), np.ones(len(time)), draws, strata=strata)
    diff = c[: len(ra)].mean(0) - c[len(ra) :].mean(0)
    diff = diff[np.isfinite(diff)]
    if not len(diff):
        return out | {"ci95": None, "beyond_noise": None}
    lo, hi = np.percentile(diff, [2.5, 97.5])
    return out | {"ci95": [float(lo), float(hi)], "beyond_noise": bool(lo > 0 or hi < 0)}


def resampled_cindex(
    time: np.ndarray, event: np.ndarray, risks: np.ndarray, weight: np.ndarray, draws: list[np.ndarray],
    tied_tol: float = 1e-8, rows: int = 256, strata: np.ndarray | None = None,
) -> np.ndarray:  # fmt: skip
    """(k, len(draws)) weighted c-index of each of the k risk vectors `risks` (k, samples) on each
    resample `draws` (index arrays), NaN where a resample has no comparable pair. A resample is a
    vector of counts c, its c-index c'Nc / c'Dc with D[i, j] = w_i where i's event comes before j's
    time (or at it, j censored) and N = D x (1 if risk_i > risk_j, 1/2 if tied), as scikit-survival
    counts pairs; with `strata` (one label per sample) D keeps only the pairs within a stratum.
    Only the rows of events can be non-zero, so only they are built; memory stays (rows x samples)
    per block of them."""
    size = len(time)
    c = np.asarray([np.bincount(idx, minlength=size) for idx in draws], dtype=float).reshape(len(draws), size)
    ev = np.asarray(event).astype(bool)
    events = np.flatnonzero(ev)
    num, den = np.zeros((len(risks), len(c))), np.zeros(len(c))
    for lo in range(0, len(events), rows):
        i = events[lo : lo + rows]
        ti = time[i, None]
        d = ((time[None, :] > ti) | ((time[None, :] == ti) & ~ev[None, :])) * weight[i, None]
        if strata is not None:
            d = d * (strata[i, None] == strata[None, :])
        den += (c[:, i] * (c @ d.T)).sum(1)
        for k, risk in enumerate(risks):
            diff = risk[i, None] - risk[None, :]
            nm = d * np.where(np.abs(diff) <= tied_tol, 0.5, (diff > 0).astype(float))
            num[k] += (c[:, i] * (c @ nm.T)).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


# ---- heads -----------------------------------------------------------------------------------------


class _Linear(nn.Module):
    """Cox head on one standardised vector."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor, *_) -> torch.Tensor:
        return self.out(x).squeeze(-1)


class _Attend(nn.Module):
    """Queries attend to keys plus a learned null key (so a sample without keys attends to nothing)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(HIDDEN, 2, batch_first=True)
        self.null = nn.Parameter(torch.zeros(1, 1, HIDDEN))
        self.norm = nn.LayerNorm(HIDDEN)

    def forward(self, q: torch.Tensor, k: torch.Tensor, k_keep: torch.Tensor) -> torch.Tensor:
        k = torch.cat([self.null.expand(len(k), -1, -1), k], 1)
        keep = torch.cat([torch.ones_like(k_keep[:, :1]), k_keep], 1)
        out, _ = self.attn(q, k, k, key_padding_mask=~keep)
        return self.norm(q + out)


class _Pool(nn.Module):
    """Cox head on the image tokens: a learned query attends to them (the attentive probe's pooling),
    so that a finding in one region is not averaged away as in the mean-pooled embedding."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.img = nn.Linear(dim, HIDDEN)
        self.query = nn.Parameter(torch.zeros(1, 1, HIDDEN))
        self.attend = _Attend(dim)
        self.out = nn.Linear(HIDDEN, 1)

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        img = self.img(x["img_tokens"])
        keep = x["has_image"][:, None].expand(-1, img.shape[1])
        return self.out(self.attend(self.query.expand(len(img), -1, -1), img, keep)[:, 0]).squeeze(-1)


class _CrossAttention(nn.Module):
    """EHR tokens (and a learned query token) attend to image tokens; masked mean; Cox."""

    def __init__(self, dim: int, both: bool = False) -> None:
        super().__init__()
        self.img, self.ehr = nn.Linear(dim, HIDDEN), nn.Linear(dim, HIDDEN)
        self.query = nn.Parameter(torch.zeros(1, 1, HIDDEN))
        self.e2i = _Attend(dim)
        self.i2e = _Attend(dim) if both else None
        self.out = nn.Linear(HIDDEN * (2 if both else 1), 1)

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        b = len(x["has_image"])
        img, ehr = self.img(x["img_tokens"]), self.ehr(x["ehr_tokens"])
        img_keep = x["has_image"][:, None].expand(-1, img.shape[1])
        ehr_keep = x["ehr_keep"] & x["has_ehr"][:, None]
        q = torch.cat([self.query.expand(b, -1, -1), ehr], 1)
        q_keep = torch.cat([torch.ones_like(ehr_keep[:, :1]), ehr_keep], 1)
        pooled = [_masked_mean(self.e2i(q, img, img_keep), q_keep)]
        if self.i2e is not None:
            q = torch.cat([self.query.expand(b, -1, -1), img], 1)
            q_keep = torch.cat([torch.ones_like(img_keep[:, :1]), img_keep], 1)
            pooled.append(_masked_mean(self.i2e(q, ehr, ehr_keep), q_keep))
        return self.out(torch.cat(pooled, -1)).squeeze(-1)


def _masked_mean(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    w = keep.unsqueeze(-1).to(x.dtype)
    return (x * w).sum(1) / w.sum(1).clamp(min=1)


# ---- training --------------------------------------------------------------------------------------


def _tensors(d: FusionInputs, idx: np.ndarray) -> dict[str, torch.Tensor]:
    return {
        "img_tokens": torch.as_tensor(d.img_tokens[idx], dtype=torch.float32),
        "ehr_tokens": torch.as_tensor(d.ehr_tokens[idx], dtype=torch.float32),
        "ehr_keep": torch.as_tensor(d.ehr_keep[idx], dtype=torch.bool),
        "has_image": torch.as_tensor(d.has_image[idx], dtype=torch.bool),
        "has_ehr": torch.as_tensor(d.has_ehr[idx], dtype=torch.bool),
    }


def fit_cox(
    model: nn.Module, x_fit, t_fit: np.ndarray, e_fit: np.ndarray, x_val, t_val: np.ndarray | None,
    e_val: np.ndarray | None, steps: int, lr: float = 3e-3, weight_decay: float = 1e-3, batch: int = 512,
    patience: int | None = PATIENCE,
) -> nn.Module:  # fmt: skip
    """Adam on the negative partial likelihood (mini-batches of `batch`), keeping the weights with
    the best validation likelihood (checked every 10 steps; the last ones without validation).
    With validation, training stops once `patience` steps have not bettered it (None: all `steps`)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    tf, ef = torch.as_tensor(t_fit, dtype=torch.float32), torch.as_tensor(e_fit, dtype=torch.bool)
    # a partial likelihood needs two samples and an event: with less, the last weights are kept
    has_val = x_val is not None and e_val is not None and np.size(e_val) >= 2 and bool(np.any(e_val))
    if has_val:
        tv = torch.as_tensor(t_val, dtype=torch.float32).reshape(-1)
        ev = torch.as_tensor(e_val, dtype=torch.bool).reshape(-1)
    gen = torch.Generator().manual_seed(0)
    best, best_loss, best_step = copy.deepcopy(model.state_dict()), float("inf"), 0
    n = len(tf)
    for step in range(steps):
        model.train()
        if n > batch:
            idx = torch.randperm(n, generator=gen)[:batch]
            x, t, e = _index(x_fit, idx), tf[idx], ef[idx]
        else:  # every row, every step
            x, t, e = x_fit, tf, ef
        if not e.any():
            continue
        loss = neg_partial_log_likelihood(model(x), e, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if has_val and (step % 10 == 9 or step == steps - 1):
            model.eval()
            with torch.no_grad():
                v = float(neg_partial_log_likelihood(model(x_val).reshape(-1), ev, tv))
            if v < best_loss:
                best, best_loss, best_step = copy.deepcopy(model.state_dict()), v, step
            elif patience is not None and step - best_step >= patience:
                break
    if has_val:
        model.load_state_dict(best)
    return model.eval()


def fit_linear_cox(x: torch.Tensor, time: np.ndarray, event: np.ndarray, alpha: float = 1e-2) -> nn.Module:
    """A linear Cox head on a few inputs fit to the optimum of its partial likelihood (Newton's
    method, Efron's ties, ridge penalty `alpha`), as `fit_cox`'s heads score."""
    cox = CoxPHSurvivalAnalysis(alpha=alpha, ties="efron", n_iter=200)
    cox.fit(x.numpy().astype(float), Surv.from_arrays(event.astype(bool), time))
    head = _Linear(x.shape[1])
    with torch.no_grad():
        head.out.weight.copy_(torch.as_tensor(cox.coef_, dtype=torch.float32)[None])
        head.out.bias.zero_()
    return head.eval()


def _index(x, idx):
    return {k: v[idx] for k, v in x.items()} if isinstance(x, dict) else x[idx]


class _Standard:
    """Standardisation with the fit split's mean and std."""

    def __init__(self, x: np.ndarray) -> None:
        self.mean, self.std = x.mean(0), x.std(0) + 1e-6

    def __call__(self, x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor((x - self.mean) / self.std, dtype=torch.float32)


def _info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    a, b = nn.functional.normalize(a, dim=-1), nn.functional.normalize(b, dim=-1)
    logits = a @ b.T / temperature
    target = torch.arange(len(a))
    return (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)) / 2


def _standard_risks(sources, stats: list[tuple[float, float]], fit_stats: bool) -> torch.Tensor:
    """(n, k) risks of k sources, each standardised by its training mean and spread, the late
    combiners' input; a sample a source cannot score (a missing modality) gets 0, its training mean.
    sources: (present (n,) bool, risk of the present rows given that mask) per source; stats: each
    source's (mean, std), appended to with `fit_stats` (the fit split)."""
    cols = []
    for j, (present, risk) in enumerate(sources):
        r = np.zeros(len(present))
        if present.any():
            r[present] = risk(present)
        if fit_stats:
            stats.append((r[present].mean(), r[present].std() + 1e-6))
        mean, std = stats[j]
        cols.append(np.where(present, (r - mean) / std, 0.0))
    return torch.as_tensor(np.stack(cols, 1), dtype=torch.float32)


class _Strategy:
    """A fitted strategy: risk(inputs, rows) -> (rows,) scores, for the rows it can score."""

    def __init__(
        self, name: str, fit: FusionInputs, val: FusionInputs | None, steps: int, seed: int,
        parts: dict[str, _Ensemble] | None = None,
    ) -> None:  # fmt: skip
        """parts: late fusion's unimodal heads, fit on the same data (`_Ensemble` fits any not given)."""
        self.name = name
        torch.manual_seed(seed)
        rows_f = self.rows(fit, np.arange(len(fit.time)))
        rows_v = self.rows(val, np.arange(len(val.time))) if val is not None else None
        tf, ef = fit.time[rows_f], fit.event[rows_f]
        tv, ev = (val.time[rows_v], val.event[rows_v]) if val is not None else (None, None)
        if name == "image":
            xv = _tensors(val, rows_v) if val is not None else None
            self.model = fit_cox(
                _Pool(fit.img_pooled.shape[1]), _tensors(fit, rows_f), tf, ef, xv, tv, ev, steps
            )
        elif name == "ehr":
            self.std = _Standard(fit.ehr_pooled[rows_f])
            xv = self.std(val.ehr_pooled[rows_v]) if val is not None else None
            self.model = fit_cox(
                _Linear(self.std.mean.shape[0]), self.std(fit.ehr_pooled[rows_f]), tf, ef, xv, tv, ev, steps
            )
        elif name == "late_fusion":
            self.parts = {m: (parts or {})[m] for m in ("image", "ehr")}
            # two weights of a convex likelihood: fit to its optimum, not early-stopped (Adam's
            # 300 steps from a random start left one seed's image weight at 0.17, its optimum 0.67)
            self.model = fit_linear_cox(self._unimodal(fit, rows_f, fit_stats=True), tf, ef)
        elif name == "contrastive":
            self._fit_projections(fit, steps)
            z = self._aligned(fit, rows_f)
            zv = self._aligned(val, rows_v) if val is not None else None
            self.model = fit_cox(_Linear(HIDDEN), z, tf, ef, zv, tv, ev, steps)
        else:
            d = fit.img_pooled.shape[1]
            head = _CrossAttention(d, both=name == "co_attention")
            xv = _tensors(val, rows_v) if val is not None else None
            self.model = fit_cox(head, _tensors(fit, rows_f), tf, ef, xv, tv, ev, steps)

    def rows(self, d: FusionInputs, idx: np.ndarray) -> np.ndarray:
        """The rows of `idx` this strategy scores (unimodal: those with the modality)."""
        return idx[_scorable(self.name, d)[idx]]

    def risk(self, d: FusionInputs, rows: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            if self.name == "ehr":
                x = self.std(d.ehr_pooled[rows])
            elif self.name == "late_fusion":
                x = self._unimodal(d, rows)
            elif self.name == "contrastive":
                x = self._aligned(d, rows)
            else:  # the token heads: image, cross- and co-attention
                x = _tensors(d, rows)
            return self.model(x).numpy().astype(float)

    def _unimodal(self, d: FusionInputs, rows: np.ndarray, fit_stats: bool = False) -> torch.Tensor:
        """(rows, 2) standardised image and EHR head risks (`_standard_risks`)."""
        image, ehr = self.parts["image"], self.parts["ehr"]
        sources = (
            (d.has_image[rows], lambda p: image.risk(d, rows[p])),
            (d.has_ehr[rows], lambda p: ehr.risk(d, rows[p])),
        )
        if fit_stats:
            self.stats: list[tuple[float, float]] = []
        return _standard_risks(sources, self.stats, fit_stats)

    def _fit_projections(self, fit: FusionInputs, steps: int) -> None:
        self.std_i, self.std_e = (
            _Standard(fit.img_pooled[fit.has_image]),
            _Standard(fit.ehr_pooled[fit.has_ehr]),
        )
        d = fit.img_pooled.shape[1]
        self.proj_i, self.proj_e = nn.Linear(d, HIDDEN), nn.Linear(d, HIDDEN)
        both = np.flatnonzero(fit.has_image & fit.has_ehr)
        xi, xe = self.std_i(fit.img_pooled[both]), self.std_e(fit.ehr_pooled[both])
        opt = torch.optim.AdamW(
            [*self.proj_i.parameters(), *self.proj_e.parameters()], lr=3e-3, weight_decay=1e-2
        )
        gen = torch.Generator().manual_seed(1)
        for _ in range(steps if len(both) > 1 else 0):
            idx = torch.randperm(len(both), generator=gen)[:256]
            loss = _info_nce(self.proj_i(xi[idx]), self.proj_e(xe[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()

    def _aligned(self, d: FusionInputs, rows: np.ndarray) -> torch.Tensor:
        """Mean of the unit-norm aligned projections of the modalities a sample has."""
        with torch.no_grad():
            zi = nn.functional.normalize(self.proj_i(self.std_i(d.img_pooled[rows])), dim=-1)
            ze = nn.functional.normalize(self.proj_e(self.std_e(d.ehr_pooled[rows])), dim=-1)
            wi = torch.as_tensor(d.has_image[rows], dtype=torch.float32)[:, None]
            we = torch.as_tensor(d.has_ehr[rows], dtype=torch.float32)[:, None]
            return (zi * wi + ze * we) / (wi + we).clamp(min=1)


class _Ensemble:
    """`n` fits of one strategy from consecutive seeds, its risk their mean: the c-index of an
    attention head moves by several hundredths with its initialisation alone, more than the effects
    it is read for; the mean of a few fits moves less.

    committee: `fit` holds every labelled subject and `val` is unused; member i is fit on all but
    the i-th of `n` parts (`committee_parts`) and stopped early on that part. One head stopped on
    one validation split of ~100 subjects moves with which subjects those are (bench_learning's
    JEPA image head by 0.023 per seed between two draws); the committee stops on every subject
    once. Late fusion is one exact fit on its unimodal parts' mean risks; parts it is not given are
    fit here, `n` members each."""

    def __init__(
        self, name: str, fit: FusionInputs, val: FusionInputs | None, steps: int, seed: int, n: int,
        parts: dict[str, _Ensemble] | None = None, committee: bool = False,
    ) -> None:  # fmt: skip
        self.name = name
        if committee:
            val = None
        if name == "late_fusion":
            parts = {
                m: (parts or {}).get(m) or _Ensemble(m, fit, val, steps, seed, n, committee=committee)
                for m in ("image", "ehr")
            }
            self.members = [_Strategy(name, fit, val, steps, seed, parts=parts)]
        elif committee:  # parts of the subjects this strategy learns from
            scorable = _scorable(name, fit)
            part = np.full(len(fit.time), -1)
            part[scorable] = committee_parts(fit.event[scorable], n, seed)
            self.members = [
                _Strategy(name, fit.take(part != i), fit.take(part == i), steps, seed + i) for i in range(n)
            ]
        else:
            self.members = [_Strategy(name, fit, val, steps, seed + i) for i in range(n)]

    def rows(self, d: FusionInputs, idx: np.ndarray) -> np.ndarray:
        return self.members[0].rows(d, idx)

    def risk(self, d: FusionInputs, rows: np.ndarray) -> np.ndarray:
        return np.mean([m.risk(d, rows) for m in self.members], axis=0)


def _scorable(name: str, d: FusionInputs) -> np.ndarray:
    """(n,) bool: the samples of `d` a strategy scores (unimodal: those with its modality)."""
    return {"image": d.has_image, "ehr": d.has_ehr}.get(name, np.ones(len(d.time), dtype=bool))


def committee_parts(event: np.ndarray, n: int, seed: int) -> np.ndarray:
    """(len(event),) part 0..n-1 of each subject: shuffled by `seed`, then dealt in turn, the events
    first, so every part stops on about as many events."""
    order = np.random.default_rng(seed).permutation(len(event))
    order = order[np.argsort(~np.asarray(event, dtype=bool)[order], kind="stable")]
    part = np.empty(len(event), dtype=int)
    part[order] = np.arange(len(event)) % n
    return part


def _concat(parts: list[FusionInputs]) -> FusionInputs:
    """The samples of `parts`, one after another."""
    return FusionInputs(
        **{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(FusionInputs)}
    )


STOPPING = ("val", "committee")


def _check_stopping(stopping: str, head_seeds: int) -> bool:
    """Whether the heads are committees; ValueError for an unknown mode or a one-member committee."""
    if stopping not in STOPPING:
        raise ValueError(f"stopping must be one of {STOPPING}, got {stopping!r}")
    if stopping == "committee" and head_seeds < 2:
        raise ValueError(f"a committee needs at least 2 members (head_seeds), got {head_seeds}")
    return stopping == "committee"


# ---- the classical baseline ------------------------------------------------------------------------


def fill_values(x: np.ndarray) -> np.ndarray:
    """Each column's mean over the rows of `x` that have it (0 for a column missing in every row):
    what a model fit on `x` puts in place of a missing value."""
    return np.nan_to_num(np.nanmean(np.where(np.isnan(x).all(0), 0.0, x), axis=0))


class _BreslowCox:
    """The ridge Cox objective of scikit-survival's CoxPHSurvivalAnalysis (Breslow's ties; the mean
    negative partial log-likelihood + alpha |w|^2 / 2n), its value, gradient and Hessian summed over
    the risk sets with cumulative sums instead of a loop over the samples."""

    def __init__(self, x: np.ndarray, time: np.ndarray, event: np.ndarray, alpha: float) -> None:
        order = np.argsort(-time, kind="mergesort")  # latest first: a risk set is a prefix
        self.x, time, event = x[order], time[order], event[order].astype(bool)
        # the tie groups of times, latest first; each event's group's risk set ends at its last row
        new_time = np.r_[True, time[1:] != time[:-1]]
        starts, group = np.flatnonzero(new_time), np.cumsum(new_time) - 1
        self.ends = np.r_[starts[1:], len(time)] - 1
        self.d = np.bincount(group, weights=event, minlength=len(starts))  # events per group
        self.xsum = np.zeros((len(starts), x.shape[1]))
        np.add.at(self.xsum, group[event], self.x[event])
        self.group, self.alpha, self.n = group, alpha, len(time)
        self.at = self.d > 0

    def loss(self, w: np.ndarray) -> float:
        xw = self.x @ w
        s0 = np.cumsum(np.exp(xw))[self.ends][self.at]
        partial = (self.xsum[self.at] @ w - self.d[self.at] * np.log(s0)).sum()
        return float(-partial / self.n + self.alpha * (w @ w) / (2 * self.n))

    def gradient_hessian(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        e = np.exp(self.x @ w)
        s0 = np.cumsum(e)[self.ends][self.at]
        s1 = np.cumsum(e[:, None] * self.x, 0)[self.ends][self.at]
        z, d = s1 / s0[:, None], self.d[self.at]
        grad = -(self.xsum[self.at] - d[:, None] * z).sum(0) / self.n + self.alpha * w / self.n
        # sum over event groups g of d_g S2_g / S0_g = X' diag(e_k c_k) X, c_k the sum of d_g / S0_g
        # over the groups whose risk set holds k (those no later than k's time)
        per_group = np.zeros(len(self.d))
        per_group[self.at] = d / s0
        c = np.cumsum(per_group[::-1])[::-1][self.group]
        hess = (self.x * (e * c)[:, None]).T @ self.x - (z * d[:, None]).T @ z
        return grad, hess / self.n + np.eye(len(w)) * self.alpha / self.n


def ridge_cox_coefficients(
    x: np.ndarray, time: np.ndarray, event: np.ndarray, alpha: float, n_iter: int = 200, tol: float = 1e-9
) -> np.ndarray:  # fmt: skip
    """The coefficients of a ridge Cox model (Breslow's ties), by scikit-survival's Newton iteration
    (from 0, step halving when the loss rises, stopped when it changes by less than `tol` relative):
    its CoxPHSurvivalAnalysis's fit, quicker on many rows."""
    problem = _BreslowCox(x, time, event, alpha)
    w = w_prev = np.zeros(x.shape[1])
    loss = float("inf")
    for _ in range(n_iter):
        grad, hess = problem.gradient_hessian(w)
        delta = np.linalg.solve(hess, grad)
        if not np.isfinite(delta).all():
            raise ValueError("ridge Cox: the Newton direction is not finite")
        w_new = w - delta
        loss_new = problem.loss(w_new)
        if loss_new > loss:
            w = (w_prev + w) / 2
            loss = problem.loss(w)
            continue
        w_prev, w = w, w_new
        if abs(1 - loss_new / loss) < tol:
            break
        loss = loss_new
    return w


class RidgeCox:
    """Ridge Cox (Breslow's ties) on a feature matrix (raw EHR features, embeddings): fit-split
    mean imputation + missing indicators, standardised; `risk(x)` scores new rows. `alpha`: the
    ridge penalty (1: the classical baseline of `evaluate`)."""

    def __init__(self, x: np.ndarray, time: np.ndarray, event: np.ndarray, alpha: float = 1.0) -> None:
        if len(time) < 2 or not np.asarray(event).any():
            raise ValueError(f"ridge Cox: {len(time)} rows with {int(np.sum(event))} events cannot be fit")
        self.mean = fill_values(x)
        self.indicators = np.isnan(x).any(0)
        z = self._design(x)
        self.keep = z.std(0) > 1e-9
        if not self.keep.any():
            raise ValueError(f"ridge Cox: none of the {x.shape[1]} features varies over the {len(time)} rows")
        self.std = _Standard(z[:, self.keep])
        design = self.std(z[:, self.keep]).numpy().astype(float)
        self.coef = ridge_cox_coefficients(design, np.asarray(time, float), np.asarray(event), alpha)

    def _design(self, x: np.ndarray) -> np.ndarray:
        miss = np.isnan(x)
        return np.concatenate([np.where(miss, self.mean, x), miss[:, self.indicators].astype(float)], 1)

    def risk(self, x: np.ndarray) -> np.ndarray:
        return self.std(self._design(x)[:, self.keep]).numpy().astype(float) @ self.coef


class _ImageWithRaw:
    """Late fusion of the image head with the raw-EHR Cox model: what the image adds to the
    classical model of the EHR, the question a clinic asks of an imaging encoder. Two weights on
    the standardised risks, fit to the optimum of the partial likelihood as `late_fusion`'s."""

    name = "image_with_raw_ehr"

    def __init__(self, image: _Ensemble, base: RidgeCox, fit: FusionInputs, raw_fit: np.ndarray) -> None:
        self.image, self.base = image, base
        self.stats: list[tuple[float, float]] = []
        self.model = fit_linear_cox(self._risks(fit, raw_fit, fit_stats=True), fit.time, fit.event)

    def _risks(self, d: FusionInputs, raw: np.ndarray, fit_stats: bool = False) -> torch.Tensor:
        """(n, 2) standardised image-head and raw-EHR risks (`_standard_risks`)."""
        rows = np.arange(len(d.time))
        sources = (
            (d.has_image, lambda p: self.image.risk(d, rows[p])),
            (d.has_ehr, lambda p: self.base.risk(raw[p])),
        )
        return _standard_risks(sources, self.stats, fit_stats)

    def risk(self, d: FusionInputs, raw: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.model(self._risks(d, raw)).numpy().astype(float)


def _with_raw(
    fitted: dict, fit: FusionInputs, raw_fit: np.ndarray
) -> tuple[RidgeCox, _ImageWithRaw | None] | str:
    """The raw-EHR Cox model, fit on the subjects of `fit` with EHR (`raw_fit`: the raw features of
    `fit`'s rows), and, where an image head was fit, that head fused with it; or why the model
    cannot be fit."""
    rf = fit.has_ehr
    if not fit.event[rf].any():
        return "no subjects with EHR, follow-up and an event"
    base = RidgeCox(raw_fit[rf], fit.time[rf], fit.event[rf])
    image = fitted.get("image")
    return base, _ImageWithRaw(image, base, fit, raw_fit) if isinstance(image, _Ensemble) else None


# ---- cross-fitting ---------------------------------------------------------------------------------


def cross_fitted(
    splits: dict[str, FusionInputs], *, pool=("train", "val", "test"), folds: int = 5,
    strategies=("image", "ehr", "late_fusion"), val_fraction: float = 0.12, epochs: int = 300, seed: int = 0,
    head_seeds: int = 1, fold_seed: int = 0, stopping: str = "val", raw: dict[str, np.ndarray] | None = None,
) -> dict:  # fmt: skip
    """Out-of-fold risks over every subject of the `pool` splits (one site's labelled subjects): a
    test split of a hundred subjects cannot resolve a c-index difference of a hundredth, and the
    subjects the heads were fit on can be scored too, each by heads fit without it. The pooled
    subjects with follow-up are dealt into `folds` folds (by `fold_seed`, so every encoder and seed
    gets the same folds); each fold is scored by heads fit on the others, `val_fraction` of those
    held back for early stopping, as `evaluate_survival` fits them (`stopping="committee"`: no
    subjects held back, each head a committee of `head_seeds` members stopped on different parts of
    the other folds). The folds' risks come from different fits, so c-indices count pairs within a
    fold (`paired_cindex(..., strata=fold)`).
    raw: the raw EHR features of the `pool` splits (aligned by row, as `evaluate_survival`'s): each
    fold is then also scored by the classical Cox model on them (`raw_ehr_cox`, fit on the subjects
    the heads are fit on) and, with an image head, by that head fused with it (`image_with_raw_ehr`).
    Returns {"origin": (n,) split names, "row": (n,) rows of those splits, "fold", "time", "event",
    "paired": (n,) both modalities, "risks": {strategy: (n,) risk, NaN where it cannot score}}."""
    if folds < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, got {folds}")
    if not 0 <= val_fraction < 0.5:
        raise ValueError(f"val_fraction must be in [0, 0.5), got {val_fraction}")
    committee = _check_stopping(stopping, head_seeds)
    missing = [k for k in pool if k not in splits]
    if missing:
        raise ValueError(f"no {missing} split to pool for cross-fitting (splits: {sorted(splits)})")
    for name in pool:
        splits[name].check(name)
    if raw is not None and any(k not in raw for k in pool):
        raise ValueError(f"raw EHR features of {[k for k in pool if k not in raw]} are missing")
    whole = _concat([splits[k] for k in pool])
    origin = np.concatenate([np.full(len(splits[k].time), k, dtype=object) for k in pool])
    row = np.concatenate([np.arange(len(splits[k].time)) for k in pool])
    ok = np.flatnonzero(~np.isnan(whole.time) & (whole.time > 0))
    whole, origin, row = whole.take(ok), origin[ok], row[ok]
    raw_whole = None if raw is None else np.concatenate([raw[k] for k in pool])[ok]
    n = len(whole.time)
    if n < 2 * folds:
        raise ValueError(f"{n} subjects with follow-up in {list(pool)}: too few for {folds} folds")
    fold = np.random.default_rng(fold_seed).permutation(n) % folds
    with_raw = (
        () if raw is None else ("raw_ehr_cox", *(["image_with_raw_ehr"] if "image" in strategies else []))
    )
    risks = {name: np.full(n, np.nan) for name in (*strategies, *with_raw)}
    for k in range(folds):
        rest = np.random.default_rng([fold_seed, k]).permutation(np.flatnonzero(fold != k))
        held = 0 if committee else round(val_fraction * len(rest))
        fit_rows = np.sort(rest[held:])
        fit, val = whole.take(fit_rows), whole.take(np.sort(rest[:held])) if held else None
        scored = np.flatnonzero(fold == k)
        fitted = _fit_all(strategies, fit, val, epochs, seed, head_seeds, committee)
        for name, model in fitted.items():
            if isinstance(model, str):
                raise ValueError(f"fold {k}: cannot fit {name}: {model}")
            rows = model.rows(whole, scored)
            if len(rows):
                risks[name][rows] = model.risk(whole, rows)
        if raw_whole is not None:
            models = _with_raw(fitted, fit, raw_whole[fit_rows])
            if isinstance(models, str):
                raise ValueError(f"fold {k}: cannot fit raw_ehr_cox: {models}")
            base, both = models
            ehr_rows = scored[whole.has_ehr[scored]]
            risks["raw_ehr_cox"][ehr_rows] = base.risk(raw_whole[ehr_rows])
            if both is not None:
                risks["image_with_raw_ehr"][scored] = both.risk(whole.take(scored), raw_whole[scored])
    return {
        "origin": origin, "row": row, "fold": fold, "time": whole.time, "event": whole.event,
        "paired": whole.has_image & whole.has_ehr, "risks": risks,
    }  # fmt: skip


# ---- evaluation ------------------------------------------------------------------------------------


def with_paired(
    inputs: dict[str, FusionInputs], raw: dict[str, np.ndarray] | None, splits
) -> tuple[dict[str, FusionInputs], dict[str, np.ndarray] | None]:
    """`inputs` (and the raw EHR features `raw`, aligned by row) plus, for each split of `splits`
    that has any, its samples with both modalities as a split of its own, "<split>_paired". On a
    whole split a unimodal head scores only the samples with its modality and a fusion strategy
    scores them all; on the paired split every strategy scores the same samples, so their
    c-indices compare."""
    inputs = dict(inputs)
    raw = dict(raw) if raw is not None else None
    for split in splits:
        if split not in inputs:
            continue
        rows = np.flatnonzero(inputs[split].has_image & inputs[split].has_ehr)
        if len(rows) == 0:  # one modality only (an EHR table, an image archive): nothing to pair
            continue
        inputs[f"{split}_paired"] = inputs[split].take(rows)
        if raw is not None:
            raw[f"{split}_paired"] = raw[split][rows]
    return inputs, raw


def _scores(
    time: np.ndarray, event: np.ndarray, risk: np.ndarray, train: tuple[np.ndarray, np.ndarray], bootstrap: int,
    seed: int,
) -> dict:  # fmt: skip
    out = {"n": len(time), "events": int(event.sum())}
    if not event.any():
        return out | {"note": "no events"}
    if not cindex_defined(time, event):
        return out | {"note": "no comparable pairs (no event before another sample's time)"}
    out["harrell"] = harrell(time, event, risk)
    out["uno"] = uno(*train, time, event, risk)

    out["ci95"] = {
        "harrell": bootstrap_cindex(time, event, risk, np.ones(len(time)), bootstrap, seed),
        "uno": bootstrap_cindex(time, event, risk, uno_weights(*train, time, event), bootstrap, seed),
    }
    return out


def cindex_defined(time: np.ndarray, event: np.ndarray) -> bool:
    """Whether a c-index is defined: some event happens before another sample's time."""
    return bool(event.any()) and bool((time[event.astype(bool)].min() < time).any())


def _cannot_fit(name: str, fit: FusionInputs, committee: bool = False) -> str | None:
    """Why a strategy cannot be trained on the fit split (None when it can)."""
    if not fit.event.any():
        return "no events in the fit split"
    committees = ("image", "ehr") if name == "late_fusion" else (name,)  # late fusion: of its parts
    if committee and any(fit.event[_scorable(m, fit)].sum() < 2 for m in committees):
        # two events or more, dealt to different parts: every member is fit on one
        return "fewer than 2 events among the samples it scores: a committee's members need one each"
    needs = {"image": ("image",), "ehr": ("ehr",)}.get(name, ("image", "ehr"))
    paired = fit.has_image & fit.has_ehr
    for m in needs:
        if not (fit.has_image if m == "image" else fit.has_ehr).any():
            return f"no {'image' if m == 'image' else 'EHR'} in the fit split"
    if name == "contrastive" and paired.sum() < 2:
        return "fewer than 2 samples with both modalities in the fit split"
    return None


def _fit_all(
    strategies, fit: FusionInputs, val: FusionInputs | None, epochs: int, seed: int, head_seeds: int, committee: bool
) -> dict[str, _Ensemble | str]:  # fmt: skip
    """Each strategy fit (`_Ensemble`), or why it cannot be; late fusion combines the unimodal
    heads fit before it."""
    fitted: dict[str, _Ensemble | str] = {}
    for name in strategies:
        parts = {k: m for k, m in fitted.items() if isinstance(m, _Ensemble)}
        fitted[name] = _cannot_fit(name, fit, committee) or _Ensemble(
            name, fit, val, epochs, seed, head_seeds, parts=parts, committee=committee
        )
    return fitted


def _result(cindex: dict, counts: dict, risks: dict | None) -> dict:
    """`evaluate_survival`'s answer, with the kept risks when asked for."""
    return {"cindex": cindex, "counts": counts} | ({"risks": risks} if risks is not None else {})


def evaluate_survival(
    splits: dict[str, FusionInputs], *, raw: dict[str, np.ndarray] | None = None, strategies=STRATEGIES,
    fit_split: str = "train", val_split: str = "val", report_splits=("test", "external"), bootstrap: int = 200,
    seed: int = 0, epochs: int = 300, prefix: str = "", head_seeds: int = 1, keep_risks: bool = False,
    stopping: str = "val",
) -> dict:  # fmt: skip
    """Fit every strategy on `fit_split` (early stopping on `val_split`) and score the reported
    splits: {"cindex": {prefix+strategy: {split: {...}}}, "counts": {prefix+strategy: {split: {...}}}}.
    With `raw` (the raw EHR features, aligned by row): the classical Cox model on them
    (`raw_ehr_cox`, only without a prefix: it reads no encoder) and, where the image head was fit,
    its late fusion with the image head (prefix+`image_with_raw_ehr`).
    head_seeds: fits per trained head (seeds seed, seed + 1, ...), scored by their mean risk; late
    fusion, fit exactly, combines the unimodal heads' mean risks once.
    stopping: "val" (above) or "committee": every head, and the raw-EHR Cox model, is fit on
    `fit_split` and `val_split` together, each trained head a committee of `head_seeds` members,
    member i stopped early on the i-th part of those subjects and fit on the rest (`_Ensemble`).
    keep_risks: also return {"risks": {prefix+strategy: {split: (rows, risk)}}}, each strategy's
    risk of the rows of `splits[split]` it scored (the trained strategies and `image_with_raw_ehr`),
    to compare encoders on the same samples (`paired_cindex`)."""
    if head_seeds < 1:
        raise ValueError(f"head_seeds must be at least 1, got {head_seeds}")
    committee = _check_stopping(stopping, head_seeds)
    for name, d in splits.items():
        d.check(name)
    if fit_split not in splits:
        raise ValueError(f"no {fit_split!r} split to fit the time-to-event heads on")
    kept = {k: np.flatnonzero(~np.isnan(d.time) & (d.time > 0)) for k, d in splits.items()}  # with follow-up
    followed = {k: d.take(kept[k]) for k, d in splits.items()}
    # the splits the heads learn from: with a committee the validation subjects are fit on too
    pooled = [fit_split] + (
        [val_split] if committee and val_split in splits and val_split != fit_split else []
    )
    fit, val = _concat([followed[k] for k in pooled]), followed.get(val_split)
    train = (fit.time, fit.event)
    cindex: dict[str, dict] = {}
    counts: dict[str, dict] = {}
    risks: dict[str, dict] = {}
    fitted = _fit_all(strategies, fit, val, epochs, seed, head_seeds, committee)
    for name, model in fitted.items():
        if isinstance(model, str):
            cindex[prefix + name] = {split: {"note": model} for split in report_splits}
            continue
        cindex[prefix + name], counts[prefix + name] = {}, {}
        for split in report_splits:
            if split not in splits:
                cindex[prefix + name][split] = {"note": "split not in the data"}
                continue
            d = followed[split]
            rows = model.rows(d, np.arange(len(d.time)))
            counts[prefix + name][split] = {
                "scored": len(rows),
                "excluded_no_image": int((~d.has_image).sum()) if name == "image" else 0,
                "excluded_no_ehr": int((~d.has_ehr).sum()) if name == "ehr" else 0,
                "excluded_no_followup": int(len(splits[split].time) - len(d.time)),
            }
            risk = model.risk(d, rows) if len(rows) else np.zeros(0)
            risks.setdefault(prefix + name, {})[split] = (kept[split][rows], risk)
            cindex[prefix + name][split] = _scores(d.time[rows], d.event[rows], risk, train, bootstrap, seed)
    if raw is not None:
        ok = {k: ~np.isnan(splits[k].time) & (splits[k].time > 0) for k in splits}
        raw_fit = np.concatenate([raw[k][ok[k]] for k in pooled])  # rows of `fit`
        models = _with_raw(fitted, fit, raw_fit)
        if isinstance(models, str):
            if not prefix:
                note = {"note": f"{models} in the {fit_split!r} split"}
                cindex["raw_ehr_cox"] = {split: note for split in report_splits}
            return _result(cindex, counts, risks if keep_risks else None)
        base, both = models
        if both is not None:
            name = prefix + both.name
            cindex[name], counts[name] = {}, {}
            for split in report_splits:
                if split not in splits:
                    continue
                d = followed[split]
                counts[name][split] = {
                    "scored": len(d.time),
                    "excluded_no_image": 0,
                    "excluded_no_ehr": 0,
                    "excluded_no_followup": int(len(splits[split].time) - len(d.time)),
                }
                risk = both.risk(d, raw[split][ok[split]])
                risks.setdefault(name, {})[split] = (kept[split], risk)
                cindex[name][split] = _scores(d.time, d.event, risk, train, bootstrap, seed)
        if prefix:  # the classical model reads no encoder: scored once, without a prefix
            return _result(cindex, counts, risks if keep_risks else None)
        cindex["raw_ehr_cox"], counts["raw_ehr_cox"] = {}, {}
        for split in report_splits:
            if split not in splits:
                continue
            d, rows = splits[split], ok[split] & splits[split].has_ehr
            counts["raw_ehr_cox"][split] = {
                "scored": int(rows.sum()),
                "excluded_no_image": 0,
                "excluded_no_ehr": int((ok[split] & ~d.has_ehr).sum()),
                "excluded_no_followup": int((~ok[split]).sum()),
            }
            if not rows.any():
                cindex["raw_ehr_cox"][split] = {"note": "no samples with EHR and follow-up"}
                continue
            cindex["raw_ehr_cox"][split] = _scores(
                d.time[rows], d.event[rows], base.risk(raw[split][rows]), train, bootstrap, seed
            )
    return _result(cindex, counts, risks if keep_risks else None)
