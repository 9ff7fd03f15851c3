"""A finished sweep's outputs: results table (CSV + markdown), best.yaml, heat map, sweep.json.

One row per trial: its parameters, the objective it last reported with its bootstrap standard
error (and RankMe, and with tune.measure_all every label-free objective, beside it), the steps it
ran, whether ASHA stopped it early, its status. The summary says whether the best trial beats the
runner-up by more than twice the gap's standard error. The best trial is the one
with the highest objective among the trials that ran the most steps: trials stopped at a lower
rung were measured earlier in training, which is not a like-for-like comparison (RankMe, for
one, tends to fall as training goes on).
"""

from __future__ import annotations

import csv
import io
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from jepa_ray.config import Config
from jepa_ray.tune.space import with_params


@dataclass
class SweepInfo:
    """Where a sweep lives and what it found."""

    name: str
    url: str
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    spearman: dict[str, Any] | None  # {"rho", "step", "trials"}: RankMe vs a labelled objective
    history: dict[str, list[tuple[int, float | None, float | None]]]  # trial -> (step, objective, rankme)
    outputs: dict[str, str]
    candidates: dict[str, dict[str, Any] | None] = field(default_factory=dict)  # tune.measure_all:
    # label-free objective -> its Spearman correlation with a labelled objective
    gap: dict[str, Any] | None = None  # the best trial against the runner-up (runner_up_gap)
    grid: Any = None  # Tune's ResultGrid


HEATMAP_AXES = ("pipeline.mask.mask_ratio", "model.predictor_depth")


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def trial_rows(cfg: Config, grid: Any, objective: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per trial of a Ray Tune ResultGrid."""
    keys = list(cfg.tune.space)
    rows = []
    for result in grid:
        m = result.metrics or {}
        # a trial that has not reported yet (the sweep was interrupted first) has no config here
        params = {k: (result.config or {}).get(k) for k in keys}
        step = int(m.get("step") or 0)
        failed = result.error is not None
        # A trial ended when it ran all its steps, or when its scheduler stopped it: Tune marks that
        # result done (it marks a trial's end done too, but after saving its state: a resumed sweep
        # reads a finished trial's last result without it). A trial still running, or not yet
        # started, when the sweep was interrupted is neither.
        planned = int((result.config or {}).get("train.steps") or cfg.train.steps)  # a swept one too
        ended = step >= planned or bool(m.get("done"))
        row = {
            "trial": m.get("trial_id") or Path(result.path).name,
            **params,
            "objective": None if m.get("collapsed") else _finite(m.get("objective")),  # ranked last
            "objective_se": _finite(m.get("objective_se")),
            "rankme": _finite(m.get("rankme")),
            "spread": _finite(m.get("spread")),
            **({"collapsed": bool(m["collapsed"])} if "collapsed" in m else {}),
            **{k: _finite(v) for k, v in sorted(m.items()) if k.startswith("lf_")},
            "steps": step,
            "stopped_early": (not failed) and ended and step < planned,
            "status": "ERROR" if failed else "TERMINATED" if ended else "UNFINISHED",
        }
        if objective["kind"] in ("probe_auroc", "cindex"):  # the labelled ones: how many carried it
            row["objective_samples"] = int(m.get("objective_samples") or 0)
        if failed:
            row["error"] = (
                str(result.error).strip().splitlines()[-1][:200] if str(result.error).strip() else "error"
            )
        rows.append(row)
    rows.sort(key=lambda r: str(r["trial"]))
    return rows


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Highest objective among the trials that ran the most steps (and did not fail)."""
    ok = [r for r in rows if r["status"] != "ERROR" and r["objective"] is not None]
    if not ok:
        return None
    longest = max(r["steps"] for r in ok)
    return max((r for r in ok if r["steps"] == longest), key=lambda r: r["objective"])


def runner_up_gap(rows: list[dict[str, Any]], best: dict[str, Any] | None) -> dict[str, Any] | None:
    """The best trial against the runner-up among the trials that ran as long: {"runner_up", "gap",
    "se" (of the gap: both SEs combined), "beyond_noise" (gap > 2 se)}; None without a runner-up."""
    if best is None:
        return None
    peers = [
        r
        for r in rows
        if r["status"] != "ERROR" and r["objective"] is not None and r["steps"] == best["steps"]
        and r["trial"] != best["trial"]
    ]  # fmt: skip
    if not peers:
        return None
    second = max(peers, key=lambda r: r["objective"])
    gap = best["objective"] - second["objective"]
    ses = [best.get("objective_se"), second.get("objective_se")]
    se = math.sqrt(sum(x * x for x in ses)) if all(x is not None for x in ses) else None
    return {
        "runner_up": second["trial"],
        "gap": gap,
        "se": se,
        "beyond_noise": None if se is None else bool(gap > 2 * se),
    }


def history(grid: Any, key: str = "rankme") -> dict[str, list[tuple[int, float | None, float | None]]]:
    """trial -> [(step, objective, key's value)] of every report Tune received."""
    out = {}
    for result in grid:
        df = result.metrics_dataframe
        m = result.metrics or {}
        trial = m.get("trial_id") or Path(result.path).name
        if df is None or "step" not in df:
            out[trial] = []
            continue
        cols = [df[c] if c in df else [None] * len(df) for c in ("step", "objective", key)]
        out[trial] = [(int(s), _finite(o), _finite(r)) for s, o, r in zip(*cols, strict=True)]
    return out


def candidate_keys(grid: Any) -> list[str]:
    """The label-free objectives the trials measured beside theirs (tune.measure_all)."""
    keys = set()
    for result in grid:
        df = result.metrics_dataframe
        if df is not None:
            keys |= {c for c in df.columns if c.startswith("lf_") and not c.endswith("_se")}
    return sorted(keys)


def spearman(
    hist: dict[str, list[tuple[int, float | None, float | None]]], at: int | None = None
) -> dict[str, Any] | None:
    """Spearman correlation of RankMe (or another score: the third item) with the objective across
    trials, both taken at the last step every trial reached (trials stopped early would otherwise
    be compared at another point of training: RankMe falls and probes improve as training goes
    on); `at`: at that step instead, among the trials that reached it. None with fewer than 3
    trials that have both there, or no spread."""
    from scipy.stats import spearmanr

    reached = [max((h[0] for h in hs), default=0) for hs in hist.values()]
    if not reached or max(reached) == 0:
        return None
    if at is None:
        step = min(reached)
        if step == 0:
            return None
    else:
        step = at
        hist = {t: hs for t, hs, r in zip(hist, hist.values(), reached, strict=True) if r >= at}
    pairs = []
    for hs in hist.values():
        seen = [h for h in hs if h[0] <= step]
        if seen and seen[-1][1] is not None and seen[-1][2] is not None:
            pairs.append((seen[-1][2], seen[-1][1]))
    if len(pairs) < 3 or len({p[0] for p in pairs}) < 2 or len({p[1] for p in pairs}) < 2:
        return None
    rho = _finite(spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic)
    return None if rho is None else {"rho": rho, "step": step, "trials": len(pairs)}


def best_config(cfg: Config, best: dict[str, Any]) -> dict[str, Any]:
    """The sweep's config with the best trial's parameters, without the sweep section: what
    `jepa-ray pretrain --config best.yaml` runs as is."""
    data = with_params(cfg.model_dump(mode="json", exclude={"tune"}), {k: best[k] for k in cfg.tune.space})
    data["train"]["name"] = None
    Config.model_validate(data)  # best.yaml must load as it is written
    return data


def _csv(rows: list[dict[str, Any]]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r.get(k) is None else r[k] for k in cols})
    return buf.getvalue()


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def candidate_spearman(grid: Any, at: int | None = None) -> dict[str, dict[str, Any] | None]:
    """Label-free objective (measured with tune.measure_all) -> its Spearman correlation with the
    sweep's objective across trials (see `spearman`)."""
    return {k[3:]: spearman(history(grid, k), at) for k in candidate_keys(grid)}


def noise_line(gap: dict | None) -> str:
    if gap is None:
        return "Best beyond noise: no runner-up that ran as long."
    if gap["se"] is None:
        return f"Best beyond noise: unknown (no standard error; gap to {gap['runner_up']} {gap['gap']:.4g})."
    return (
        f"Best beyond noise: {'yes' if gap['beyond_noise'] else 'no'} (gap to the runner-up "
        f"{gap['runner_up']} {gap['gap']:.4g}, twice its standard error {2 * gap['se']:.4g})."
    )


def _markdown(
    cfg: Config,
    rows: list[dict[str, Any]],
    best: dict | None,
    rho: dict | None,
    objective: dict,
    gap: dict | None = None,
    candidates: dict[str, dict | None] | None = None,
) -> str:
    cols = [c for c in dict.fromkeys(k for r in rows for k in r) if c != "error"]
    label = f" ({objective['label']})" if objective.get("label") else ""
    lines = [
        f"# Sweep: {len(rows)} trials, objective {objective['kind']}{label}, searcher {cfg.tune.searcher}",
        "",
        "| " + " | ".join(cols) + " |",
        "| " + " | ".join("---" for _ in cols) + " |",
    ]
    for r in rows:
        mark = " **(best)**" if best is not None and r["trial"] == best["trial"] else ""
        lines.append("| " + " | ".join(_fmt(r.get(c)) + (mark if c == "trial" else "") for c in cols) + " |")
    lines.append("")
    stopped = sum(1 for r in rows if r["stopped_early"])
    lines.append(f"Stopped early by ASHA: {stopped} of {len(rows)}.")
    failed = [r for r in rows if r["status"] == "ERROR"]
    for r in failed:
        lines.append(f"Failed: {r['trial']}: {r.get('error', '')}")
    unfinished = [str(r["trial"]) for r in rows if r["status"] == "UNFINISHED"]
    if unfinished:
        lines.append(
            f"Unfinished (the sweep was interrupted; `jepa-ray tune --resume` runs them on): {', '.join(unfinished)}."
        )
    collapsed = [r["trial"] for r in rows if r.get("collapsed")]
    if collapsed:
        lines.append(
            f"Collapsed (below half the starting encoder's RankMe or spread; ranked last, whatever "
            f"{objective['kind']} said): {', '.join(map(str, collapsed))}."
        )
    lines.append("objective_se: bootstrap standard error of the objective on the validation samples.")
    lines.append(noise_line(gap))
    for name, c in (candidates or {}).items():
        lines.append(
            f"Spearman correlation of {name} with the objective across trials: "
            + (f"{c['rho']:+.2f} ({c['trials']} trials, at step {c['step']})" if c else "not enough trials")
        )
    if objective["kind"] != "rankme" and not candidates:
        lines.append(
            "Spearman correlation of RankMe with the objective across trials: "
            + (
                f"{rho['rho']:+.2f} ({rho['trials']} trials, at step {rho['step']}, the last every trial reached)"
                if rho is not None
                else "not enough trials with both"
            )
        )
    lines.append("")
    return "\n".join(lines)


def heatmap(cfg: Config, rows: list[dict[str, Any]], path: Path) -> Path:
    """Mean objective over the two swept axes (mask ratio x predictor depth when both are swept,
    else the first two keys of the space); with one swept key, the objective per value."""
    keys = list(cfg.tune.space)
    axes = [k for k in HEATMAP_AXES if k in keys] if all(k in keys for k in HEATMAP_AXES) else keys[:2]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if len(axes) == 1:
        return _objective_per_value(cfg, rows, axes[0], path)

    def levels(key: str) -> list[Any]:  # values may be lists (e.g. a target scale range)
        seen = {json.dumps(r[key]): r[key] for r in rows if r[key] is not None}
        return [seen[k] for k in sorted(seen, key=lambda k: (str(type(seen[k])), str(seen[k])))]

    xs, ys = levels(axes[0]), levels(axes[1])
    grid = np.full((len(ys), len(xs)), np.nan)
    steps = np.zeros((len(ys), len(xs)), int)
    for j, y in enumerate(ys):
        for i, x in enumerate(xs):
            cell = [r for r in rows if r[axes[0]] == x and r[axes[1]] == y and r["objective"] is not None]
            if cell:
                grid[j, i] = float(np.mean([r["objective"] for r in cell]))
                steps[j, i] = max(r["steps"] for r in cell)
    fig, ax = plt.subplots(figsize=(1.2 * len(xs) + 2.5, 0.8 * len(ys) + 2), dpi=110)
    im = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(xs)), [_fmt(x) for x in xs], rotation=45 if len(xs) > 6 else 0)
    ax.set_yticks(range(len(ys)), [_fmt(y) for y in ys])
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    mid = np.nanmean(grid) if np.isfinite(grid).any() else 0.0
    for j in range(len(ys)):
        for i in range(len(xs)):
            if not np.isnan(grid[j, i]):
                color = "k" if grid[j, i] > mid else "w"
                ax.text(
                    i,
                    j,
                    f"{grid[j, i]:.3g}\n{steps[j, i]} steps",
                    ha="center",
                    va="center",
                    color=color,
                    fontsize=8,
                )
    fig.colorbar(im, ax=ax, label=cfg.tune.objective)
    ax.set_title(f"{cfg.tune.objective}, last reported (ASHA stops trials at different steps)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _objective_per_value(cfg: Config, rows: list[dict[str, Any]], key: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    done = sorted(
        ((r[key], r["objective"], r["steps"]) for r in rows if r["objective"] is not None),
        key=lambda t: (str(type(t[0])), str(t[0])),
    )
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(done) + 2), 3.5), dpi=110)
    ax.bar(range(len(done)), [d[1] for d in done], color="tab:blue")
    ax.set_xticks(range(len(done)), [_fmt(d[0]) for d in done], rotation=45 if len(done) > 6 else 0)
    for i, d in enumerate(done):
        ax.text(i, d[1], f"{d[1]:.3g}\n{d[2]} steps", ha="center", va="bottom", fontsize=8)
    ax.margins(y=0.25)  # room for the labels above the bars
    ax.set_xlabel(key)
    ax.set_ylabel(cfg.tune.objective)
    ax.set_title(f"{cfg.tune.objective}, last reported per trial", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_outputs(cfg: Config, name: str, url: str, grid: Any, objective: dict[str, Any]):
    """Write the sweep's outputs beside its Tune state (local or s3://); returns a SweepInfo."""
    from jepa_ray.storage import Store

    rows = trial_rows(cfg, grid, objective)
    best = best_row(rows)
    hist = history(grid)
    rho = spearman(hist) if objective["kind"] != "rankme" else None
    labelled = objective["kind"] in ("probe_auroc", "cindex")
    candidates = candidate_spearman(grid) if labelled else {}
    gap = runner_up_gap(rows, best)
    store = Store(url, cfg.train.storage)
    store.makedirs()
    files: dict[str, bytes] = {
        "results.csv": _csv(rows).encode(),
        "results.md": _markdown(cfg, rows, best, rho, objective, gap, candidates).encode(),
    }
    if best is not None:
        files["best.yaml"] = (
            f"# best trial of sweep {name}: {best['trial']}, {objective['kind']} {best['objective']:.4g}\n"
            + yaml.safe_dump(best_config(cfg, best), sort_keys=False)
        ).encode()
    with tempfile.TemporaryDirectory(prefix="jepa-tune-") as d:
        png = heatmap(cfg, rows, Path(d) / "heatmap.png")
        files["heatmap.png"] = png.read_bytes()
    summary = {
        "name": name,
        "objective": objective,
        "searcher": cfg.tune.searcher,
        "space": {k: v.model_dump(exclude_none=True) for k, v in cfg.tune.space.items()},
        "steps": cfg.train.steps,
        "trials": rows,
        "best": best,
        "best_vs_runner_up": gap,
        "spearman_rankme_objective": rho,
        "spearman_label_free_objective": candidates,
    }
    files["sweep.json"] = (json.dumps(summary, indent=2) + "\n").encode()
    for fname, data in files.items():
        store.write_bytes(fname, data)
    return SweepInfo(
        name=name,
        url=url,
        rows=rows,
        best=best,
        spearman=rho,
        history=hist,
        candidates=candidates,
        gap=gap,
        grid=grid,
        outputs={fname: store.uri(fname) for fname in files},
    )
