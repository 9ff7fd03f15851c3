"""The objectives that rank a sweep's trials, measured on validation batches during training.

All three score the pooled target-encoder embeddings (image and EHR together, what downstream
models use) of up to `tune.eval_batches` validation batches; higher is better:

- `rankme`: effective rank of the embeddings (Garrido et al., 2023). Needs no labels, so it works on
  the unlabelled cohorts that pretraining is for; it detects collapse, not usefulness.
- `probe_auroc`: out-of-fold AUROC of the logistic probe of `jepa-ray evaluate` on a binary label
  (stratified k-fold on the validation samples that carry it).
- `cindex`: out-of-fold Harrell's c-index of a ridge Cox model on a time-to-event outcome.

The JEPA loss is never an objective: how hard the prediction task is depends on the mask ratio.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from jepa_ray.errors import ConfigError

FOLDS = 5


def batch_outcomes(batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each sample's metadata (labels, time-to-event outcomes) in batch order."""
    return [json.loads(m) if isinstance(m, str | bytes) else m for b in batches for m in b["meta"]]


def pick_label(metas: list[dict[str, Any]], objective: str, label: str | None) -> str | None:
    """The label or outcome the objective uses: the one asked for, else the first present (death
    first for cindex); ConfigError naming what the split does carry when it is not there."""
    if objective == "rankme":
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


def probe_auroc(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """Out-of-fold AUROC of the evaluation's logistic probe; NaN with fewer than 2 per class."""
    from sklearn.metrics import roc_auc_score

    from jepa_ray.eval.probes import logistic_probe

    y = y.astype(int)
    k = min(FOLDS, int(y.sum()), int(len(y) - y.sum()))
    if k < 2:
        return float("nan")
    score = np.zeros(len(y))
    for fit, held in _folds(len(y), y, k, seed):
        score[held] = logistic_probe(x[fit], y[fit])(x[held])
    return float(roc_auc_score(y, score))


def cv_cindex(x: np.ndarray, days: np.ndarray, event: np.ndarray, seed: int = 0) -> float:
    """Out-of-fold Harrell's c-index of a ridge Cox model; NaN with fewer than 2 events."""
    from jepa_ray.eval.survival import RidgeCox, harrell

    k = min(FOLDS, int(event.sum()))
    if k < 2 or len(days) < 2 * k:
        return float("nan")
    risk = np.zeros(len(days))
    for fit, held in _folds(len(days), None, k, seed):
        if event[fit].sum() == 0:
            return float("nan")
        risk[held] = RidgeCox(x[fit], days[fit], event[fit]).risk(x[held])
    return harrell(days, event, risk)


@torch.no_grad()
def measure(model: Any, batches: list[dict[str, Any]], objective: str, label: str | None) -> dict[str, float]:
    """{"rankme", "objective" and, for a labelled objective, its value and the samples it used} from
    the target encoder's pooled embeddings of these (already on-device) batches."""
    from jepa_ray.model.jepa import embedding_stats

    x = torch.cat([model.encode(b, "both")["pooled"].float().cpu() for b in batches]).numpy()
    out = {"rankme": embedding_stats(torch.from_numpy(x))["rankme"]}
    if objective == "rankme":
        return out | {"objective": out["rankme"]}
    metas = batch_outcomes(batches)
    if objective == "probe_auroc":
        y = np.array([float((m.get("labels") or {}).get(label, np.nan)) for m in metas])
        rows = ~np.isnan(y)
        value = probe_auroc(x[rows], y[rows])
    else:
        tte = [(m.get("tte") or {}).get(label) for m in metas]
        rows = np.array([t is not None and t.get("days") is not None for t in tte])
        days = np.array([t["days"] if r else np.nan for t, r in zip(tte, rows, strict=True)], float)
        event = np.array([bool(t["event"]) if r else False for t, r in zip(tte, rows, strict=True)])
        value = cv_cindex(x[rows], days[rows], event[rows])
    return out | {objective: value, "objective": value, "objective_samples": float(rows.sum())}
