"""The objectives that rank a sweep's trials, measured on validation batches during training.

Each is measured on up to `tune.eval_batches` validation batches; higher is better. Label-free
(`jepa_ray.tune.labelfree`; they work on the unlabelled cohorts that pretraining is for):

- `rankme`: effective rank of the target encoder's pooled embeddings (Garrido et al., 2023).
- `lidar` / `lidar_context`: LiDAR (Thilak et al., 2023) over masked views of each sample.
- `val_loss`: the model's loss with masks fixed for every trial (a mask ratio of the sweep's base
  config, not the trial's: the trial's own loss is not comparable across mask ratios), negated.

Labelled, on the pooled target-encoder embeddings (image and EHR together):

- `probe_auroc`: out-of-fold AUROC of the logistic probe of `jepa-ray evaluate` on a binary label
  (stratified k-fold on the validation samples that carry it).
- `cindex`: out-of-fold Harrell's c-index of a ridge Cox model on a time-to-event outcome.

Every measurement comes with a bootstrap standard error (`objective_se`). A label-free objective is
COLLAPSED (ranked last, stopped by ASHA) for a trial whose encoder collapsed against the one it
started from (`jepa_ray.tune.labelfree.collapsed`), which every one of them would otherwise score well.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from jepa_ray.errors import ConfigError
from jepa_ray.train.loop import Worker

FOLDS = 5
LABEL_FREE = ("rankme", "lidar", "lidar_context", "val_loss")
STUDENT = ("lidar_context", "val_loss")  # need the context encoder (and predictor) whole on rank 0
# a collapsed trial's label-free objective: below any score, yet finite, because ASHA's rung cutoff
# is a percentile interpolated between trials (with -inf it becomes -inf or NaN and stops no one)
COLLAPSED = -1e30


def batch_outcomes(batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each sample's metadata (labels, time-to-event outcomes) in batch order."""
    return [json.loads(m) if isinstance(m, str | bytes) else m for b in batches for m in b["meta"]]


def pick_label(metas: list[dict[str, Any]], objective: str, label: str | None) -> str | None:
    """The label or outcome the objective uses: the one asked for, else the first present (death
    first for cindex); ConfigError naming what the split does carry when it is not there."""
    if objective in LABEL_FREE:
        return None
    field = "labels" if objective == "probe_auroc" else "tte"
    seen: dict[str, int] = {}
    for m in metas:
        for k in m.get(field) or {}:
            seen[k] = seen.get(k, 0) + 1
    if label is not None:
        if label not in seen:
            raise ConfigError(
                f"tune.label={label!r}: the validation split carries no such {'label' if field == 'labels' else 'outcome'}"
                f" (it has: {', '.join(sorted(seen)) or 'none'})"
            )
        return label
    if not seen:
        raise ConfigError(
            f"tune.objective={objective}: the validation samples carry no "
            f"{'binary labels' if field == 'labels' else 'time-to-event outcomes'}; use objective rankme"
        )
    if objective == "cindex" and "death" in seen:
        return "death"
    return sorted(seen)[0]


def _folds(n: int, y: np.ndarray | None, k: int, seed: int):
    from sklearn.model_selection import KFold, StratifiedKFold

    if y is not None:
        return StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(n), y)
    return KFold(k, shuffle=True, random_state=seed).split(np.zeros(n))


def _auroc(y: np.ndarray, score: np.ndarray) -> float:
    from jepa_ray.eval.probes import auroc_score

    return auroc_score(y, score) if 0 < y.sum() < len(y) else float("nan")


def probe_auroc(x: np.ndarray, y: np.ndarray, seed: int = 0, se: bool = False):
    """Out-of-fold AUROC of the evaluation's logistic probe; NaN with fewer than 2 per class. With
    `se`: (AUROC, bootstrap SE over the samples, the out-of-fold scores held fixed)."""
    from jepa_ray.eval.probes import logistic_probe
    from jepa_ray.tune.labelfree import bootstrap_se

    y = y.astype(int)
    k = min(FOLDS, int(y.sum()), int(len(y) - y.sum()))
    if k < 2:
        return (float("nan"), float("nan")) if se else float("nan")
    score = np.zeros(len(y))
    for fit, held in _folds(len(y), y, k, seed):
        score[held] = logistic_probe(x[fit], y[fit])(x[held])
    value = _auroc(y, score)
    return (value, bootstrap_se(lambda i: _auroc(y[i], score[i]), len(y))) if se else value


def cv_cindex(x: np.ndarray, days: np.ndarray, event: np.ndarray, seed: int = 0, se: bool = False):
    """Out-of-fold Harrell's c-index of a ridge Cox model; NaN with fewer than 2 events. With `se`:
    (c-index, bootstrap SE over the samples, the out-of-fold risks held fixed)."""
    from jepa_ray.eval.survival import RidgeCox, harrell
    from jepa_ray.tune.labelfree import bootstrap_se

    nan = (float("nan"), float("nan")) if se else float("nan")
    k = min(FOLDS, int(event.sum()))
    if k < 2 or len(days) < 2 * k:
        return nan
    risk = np.zeros(len(days))
    for fit, held in _folds(len(days), None, k, seed):
        if event[fit].sum() == 0:
            return nan
        risk[held] = RidgeCox(x[fit], days[fit], event[fit]).risk(x[held])
    value = harrell(days, event, risk)

    def resampled(i: np.ndarray) -> float:
        return harrell(days[i], event[i], risk[i]) if event[i].any() else float("nan")

    return (value, bootstrap_se(resampled, len(days))) if se else value


@torch.no_grad()
def measure(
    model: Any,
    batches: list[dict[str, Any]],
    objective: str,
    label: str | None,
    *,
    mask: dict[str, Any] | None = None,
    candidates: tuple[str, ...] | list[str] = (),
    start: dict[str, float] | None = None,
) -> dict[str, float]:
    """{"rankme", "spread", "objective", "objective_se"} from these (already on-device) batches, and
    for a labelled objective its value under its own name and the samples it used; `candidates`:
    also every named label-free objective as `lf_<name>` and `lf_<name>_se`. `mask`: the reference
    mask setting of the label-free objectives (a MaskConfig as a dict; default MaskConfig()).
    `start`: `embedding_start` of the encoder the run started from, on the same batches; then also
    "collapsed" (1.0 or 0.0), and a label-free objective of a collapsed encoder is COLLAPSED."""
    from jepa_ray.config import MaskConfig
    from jepa_ray.tune.labelfree import collapsed, rankme, scores, spread

    ref = MaskConfig.model_validate(mask or {})
    x = pooled_embeddings(model, batches)
    out: dict[str, float] = {}
    names = list(dict.fromkeys([*candidates, *([objective] if objective in LABEL_FREE else [])]))
    for name, (value, se) in scores(names, model, batches, ref, x).items():
        out |= {f"lf_{name}": value, f"lf_{name}_se": se}
    out["rankme"] = out["lf_rankme"] if "lf_rankme" in out else rankme(x)  # one SVD, not two
    out["spread"] = spread(x)
    why = None if start is None else collapsed(out, start)
    if start is not None:
        out["collapsed"] = float(why is not None)
    if objective in LABEL_FREE:
        if why is not None:
            return out | {"objective": COLLAPSED, "objective_se": float("nan")}
        return out | {"objective": out[f"lf_{objective}"], "objective_se": out[f"lf_{objective}_se"]}
    metas = batch_outcomes(batches)
    if objective == "probe_auroc":
        y = np.array([float((m.get("labels") or {}).get(label, np.nan)) for m in metas])
        rows = ~np.isnan(y)
        value, se = probe_auroc(x[rows], y[rows], se=True)
    else:
        tte = [(m.get("tte") or {}).get(label) for m in metas]
        rows = np.array([t is not None and t.get("days") is not None for t in tte])
        days = np.array([t["days"] if r else np.nan for t, r in zip(tte, rows, strict=True)], float)
        event = np.array([bool(t["event"]) if r else False for t, r in zip(tte, rows, strict=True)])
        value, se = cv_cindex(x[rows], days[rows], event[rows], se=True)
    return out | {
        objective: value,
        "objective": value,
        "objective_se": se,
        "objective_samples": float(rows.sum()),
    }


@torch.no_grad()
def pooled_embeddings(model: Any, batches: list[dict[str, Any]]) -> np.ndarray:
    """(samples, D): the target encoder's pooled embeddings (image and EHR together)."""
    return torch.cat([model.encode(b, "both")["pooled"].float().cpu() for b in batches]).numpy()


@torch.no_grad()
def embedding_start(worker: Worker, batches: list[dict[str, Any]]) -> dict[str, float]:
    """RankMe and spread of the encoder the worker's run started from (`initial_model`, rebuilt: the
    same after a restart), on these batches: the collapse guard's reference."""
    from jepa_ray.train.loop import initial_model
    from jepa_ray.tune.labelfree import health

    with torch.random.fork_rng(devices=[]):  # leaves the run's random state alone
        model = initial_model(worker.cfg, worker.dims)
    model.target.to(worker.device).eval()  # all that `encode` runs: the rest stays on the CPU
    x = pooled_embeddings(model, batches)
    del model
    return health(x)
