"""The evaluation's outputs: metrics.json, report.md, PNG plots, and a one-screen console summary."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

PLOTS = ("cindex.png", "probe.png", "retrieval.png")


def write_report(metrics: dict[str, Any], out: Path) -> None:
    """metrics.json, report.md and the plots into `out`."""
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_jsonable))
    _plots(metrics, out)
    (out / "report.md").write_text(report_markdown(metrics))


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _fmt(v: float | None, ci: list[float] | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def summary(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The headline numbers as (header, rows): one row per metric, one column per reported split,
    each cell "pretrained / random init" (/ each baseline encoder: the console summary)."""
    splits = list(metrics.get("counts", {}))
    splits = [s for s in ("test", "external") if s in splits] or splits
    encoders = metrics.get("encoders", ["pretrained", "random_init"])
    names = " / ".join("random" if e == "random_init" else e for e in encoders)
    header = ["metric", *(f"{s} ({names})" for s in splits)]

    def pair(get) -> list[str]:
        return [" / ".join(_short(get(e, split)) for e in encoders) for split in splits]

    rows: list[list[str]] = []
    r2, r2_att = metrics.get("latent_r2", {}), metrics.get("latent_r2_attentive", {})
    for factor in _factors(r2):
        # the attentive probe's row right under the ridge one, short enough not to wrap
        shown = [(f"latent R² {factor}", r2)] + ([("  attentive", r2_att)] if r2_att else [])
        for name, table in shown:

            def latent(e, s, factor=factor, table=table):
                return table.get(e, {}).get(s, {}).get("r2", {}).get(factor)

            rows.append([name, *pair(latent)])
    probe = metrics.get("probe", {})
    attentive = any("attentive" in res for res in probe.get("pretrained", {}).get("image", {}).values())
    for label in probe.get("pretrained", {}).get("joint", {}):
        shown = [("joint", "linear", f"AUROC {label}")]
        if attentive:  # the attentive probe reads image tokens: beside the image linear probe
            shown += [("image", "linear", "  image linear"), ("image", "attentive", "  image attentive")]
        for inp, method, name in shown:

            def auroc(e, s, label=label, inp=inp, method=method):
                return probe.get(e, {}).get(inp, {}).get(label, {}).get(method, {}).get(s, {}).get("auroc")

            rows.append([name, *pair(auroc)])
    cindex = metrics.get("cindex", {})
    for strategy in cindex:
        if ":" in strategy or strategy == "raw_ehr_cox":
            continue

        def harrell(e, s, strategy=strategy):
            name = strategy if e == "pretrained" else f"{e}:{strategy}"
            return cindex.get(name, {}).get(s, {}).get("harrell")

        rows.append([f"c-index {strategy}", *pair(harrell)])
    if "raw_ehr_cox" in cindex:
        rows.append(
            [
                "c-index raw EHR Cox",
                *(_short(cindex["raw_ehr_cox"].get(s, {}).get("harrell")) for s in splits),
            ]
        )
    retrieval = metrics.get("retrieval", {})
    for direction in ("image_to_ehr", "image_to_ehr_linear", "ehr_to_image"):

        def r5(e, s, direction=direction):
            return retrieval.get(e, {}).get(s, {}).get(direction, {}).get("recall@5")

        chance = [
            retrieval.get("pretrained", {}).get(s, {}).get(direction, {}).get("chance@5") for s in splits
        ]
        if any(c is not None for c in chance):
            rows.append([f"R@5 {direction} (chance {'/'.join(_short(c) for c in chance)})", *pair(r5)])
    return header, rows


def comparison(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The pretrained encoder against each other one, as (header, rows): per task, read-out and
    split the paired difference with its 95% interval and whether it is beyond noise."""
    from jepa_ray.eval.compare import verdict

    comp = metrics.get("comparison") or {}
    others = list(comp)
    header = ["pretrained minus", *(("random init" if o == "random_init" else o) for o in others)]
    keys: list[tuple[str, str, str]] = []
    for other in others:
        for task, by_readout in comp[other].items():
            for readout, by_split in by_readout.items():
                for split in by_split:
                    if (task, readout, split) not in keys:
                        keys.append((task, readout, split))
    rows = []
    for task, readout, split in keys:
        cells = []
        for other in others:
            d = comp[other].get(task, {}).get(readout, {}).get(split)
            if d is None:
                cells.append("–")
                continue
            ci = d.get("ci95")
            interval = f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else ""
            cells.append(f"{d['difference']:+.3f}{interval} {verdict(d)}")
        rows.append([f"{task}, {readout}, {split}", *cells])
    return header, rows


def few_labels(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The few-label read-outs as (header, rows): per task, input, fraction and split the
    pretrained encoder's draw-mean score, and for each other encoder (and the raw-EHR Cox) its
    score and the paired difference with its 95% interval and whether it is beyond noise."""
    from jepa_ray.eval.compare import verdict

    few = metrics.get("few_labels") or {}
    header = [
        "task",
        "input",
        "labelled",
        "split",
        "pretrained",
        "versus",
        "its score",
        "pretrained minus it",
    ]
    rows = []
    for task, by_input in few.get("tasks", {}).items():
        for inp, by_fraction in by_input.items():
            if "note" in by_fraction:
                rows.append([task, inp, "–", "–", by_fraction["note"], "", "", ""])
                continue
            for fraction, r in by_fraction.items():
                if "note" in r:
                    rows.append([task, inp, f"{float(fraction):.0%}", "–", r["note"], "", "", ""])
                    continue
                labelled = f"{float(fraction):.0%}: {r['labelled']} of {r['of']}"
                for other, by_split in r["versus"].items():
                    for split, d in by_split.items():
                        ci = d.get("ci95")
                        interval = f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""
                        name = {
                            "random_init": "random init",
                            "raw_ehr_cox": "raw EHR Cox",
                            "random_starts_mean": f"mean of {d.get('of')} random starts",
                        }.get(other, other)
                        rows.append(
                            [task, inp, labelled, split, f"{d['a']:.3f}", name, f"{d['b']:.3f}",
                             f"{d['difference']:+.3f}{interval} {verdict(d)}"]
                        )  # fmt: skip
    return header, rows


def _factors(r2: dict[str, Any]) -> list[str]:
    """The latent factors of a latent_r2 table ({encoder: {split: {"r2": {factor: R²}}}}), in order."""
    for by_split in r2.values():
        for res in by_split.values():
            return list(res["r2"])
    return []


def _short(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def report_markdown(metrics: dict[str, Any]) -> str:
    from jepa_ray.eval.probes import GRID_DIMS

    lines = ["# jepa-ray evaluation", ""]
    enc = metrics.get("encoder", {})
    lines += [f"Encoder: `{enc.get('weights')}` (step {enc.get('step')}); data: `{metrics.get('data')}`.", ""]
    lines += [
        "## Samples",
        "",
        "| split | subjects | with image | with EHR | both | later studies not evaluated |",
    ]
    lines += ["|---|---|---|---|---|---|"]
    for split, c in metrics.get("counts", {}).items():
        lines.append(
            f"| {split} | {c['subjects']} | {c['with_image']} | {c['with_ehr']} | {c['both']} "
            f"| {c['later_studies_not_evaluated']} |"
        )
    lines += ["", "## Time-to-event (c-index, bootstrap 95% CI)", ""]
    surv = metrics.get("survival", {})
    if surv.get("endpoint"):
        lines += [f"Endpoint: `{surv['endpoint']}`.", ""]
    heads = surv.get("heads")
    if heads:
        stops = (
            f"committees of {heads['fits']} members, each stopped early on its own part of the fit and "
            "validation splits"
            if heads["stopping"] == "committee"
            else f"the mean of {heads['fits']} fit(s), stopped early on the validation split"
        )
        lines += [f"Trained heads: {stops}; at most {heads['steps']} steps.", ""]
    lines += ["| strategy | split | n | events | Harrell | Uno |", "|---|---|---|---|---|---|"]
    for strategy, by_split in metrics.get("cindex", {}).items():
        for split, r in by_split.items():
            if "harrell" not in r:
                lines.append(f"| {strategy} | {split} | – | – | {r.get('note', '–')} | |")
                continue
            ci = r.get("ci95") or {}
            lines.append(
                f"| {strategy} | {split} | {r.get('n')} | {r.get('events')} | {_fmt(r['harrell'], ci.get('harrell'))} "
                f"| {_fmt(r.get('uno'), ci.get('uno'))} |"
            )
    lines += ["", "## Probes (AUROC, bootstrap 95% CI)", ""]
    lines += [
        "| encoder | input | label | method | split | n | positives | AUROC |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, inputs in metrics.get("probe", {}).items():
        for inp, labels in inputs.items():
            for label, res in labels.items():
                for method in ("linear", "knn", "attentive"):
                    for split, r in res.get(method, {}).items():
                        lines.append(
                            f"| {name} | {inp} | {label} | {method} | {split} | {r['n']} | {r['positives']} "
                            f"| {_fmt(r.get('auroc'), r.get('ci95'))} |"
                        )
    if metrics.get("latent_r2"):
        lines += ["", "## Ground truth: latent factors from the image (R²)", ""]
        lines += [
            "ridge: on the pooled image embedding; attentive: the attentive probe on the image tokens; "
            "grid (out of fold only): a ridge on the image tokens concatenated in grid order, a weight for "
            f"every position (past {GRID_DIMS:,} features, their principal components within each fold); "
            "out-of-fold: every subject of the named splits scored by a probe fit on the other folds "
            "(5, grouped by subject), for cohorts whose test split is too small to tell encoders apart, "
            "with its bootstrap 95% interval.",
            "",
        ]
        factors = _factors(metrics["latent_r2"])
        lines += [
            "| encoder | probe | split | n | " + " | ".join(factors) + " |",
            "|---|---|---|---|" + "---|" * len(factors),
        ]
        for name, by_split in metrics["latent_r2"].items():
            att = metrics.get("latent_r2_attentive", {}).get(name, {})
            for split, r in by_split.items():
                for probe, res in (("ridge", r), ("attentive", att.get(split))):
                    if res is None:
                        continue
                    vals = " | ".join(f"{res['r2'][k]:.3f}" for k in factors)
                    lines.append(f"| {name} | {probe} | {split} | {res['n']} | {vals} |")
        for name, cv in metrics.get("latent_r2_cv", {}).items():
            for probe, label in (("linear", "ridge"), ("grid", "grid"), ("attentive", "attentive")):
                if probe in cv:
                    ci = cv.get("ci95", {}).get(probe, {})
                    vals = " | ".join(_fmt(cv[probe][k], ci.get(k)) for k in factors)
                    lines.append(
                        f"| {name} | {label} | out-of-fold ({', '.join(cv['splits'])}) | {cv['n']} | {vals} |"
                    )
    lines += ["", "## Cross-modal retrieval (recall@k; chance = k/n)", ""]
    lines += ["| encoder | split | direction | n | recall@k (chance) |", "|---|---|---|---|---|"]
    for name, by_split in metrics.get("retrieval", {}).items():
        for split, r in by_split.items():
            for direction, v in r.items():
                ks = sorted(int(k.split("@")[1]) for k in v if k.startswith("recall@"))
                vals = ", ".join(f"@{k} {_fmt(v[f'recall@{k}'])} ({_fmt(v[f'chance@{k}'])})" for k in ks)
                lines.append(f"| {name} | {split} | {direction} | {v['n']} | {vals} |")
    seg = metrics.get("segmentation") or {}
    if seg:
        lines += ["", "## Segmentation from frozen patch tokens (Dice, bootstrap 95% CI)", ""]
        lines += ["| encoder | head | split | structure | Dice |", "|---|---|---|---|---|"]
        for name, heads in seg.items():
            for head, by_split in heads.items():
                for split, row in by_split.items():
                    for structure, v in row.items():
                        lines.append(
                            f"| {name} | {head} | {split} | {structure} | {_fmt(v['dice'], v['ci'])} |"
                        )
    header, rows = comparison(metrics)
    if rows:
        lines += ["", "## Pretrained against the other encoders (paired bootstrap 95% CI, same samples)", ""]
        lines += [
            "A difference is beyond noise when its interval excludes zero: both encoders' probes are",
            "scored on the same held-out samples, resampled together.",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    header, rows = few_labels(metrics)
    if rows:
        few = metrics["few_labels"]
        lines += ["", "## Few labels (linear read-outs refit on a fraction of the fit split's labels)", ""]
        lines += [
            f"Each score is the mean over {few['draws']} draws of the labelled subjects (the same rows for",
            "every encoder); the interval is the paired bootstrap over the held-out samples of the mean",
            "difference. Time-to-event: Harrell's c-index of a ridge Cox model; labels: AUROC of a logistic",
            "probe; latent factors: R² of a ridge probe.",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "Plots: " + ", ".join(f"[{p}]({p})" for p in PLOTS), ""]
    return "\n".join(lines)


def _plots(metrics: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # c-index per strategy with CIs, one marker per split
    fig, ax = plt.subplots(figsize=(8, 4.5))
    strategies = list(metrics.get("cindex", {}))
    splits = sorted({s for v in metrics.get("cindex", {}).values() for s in v})
    for j, split in enumerate(splits):
        xs, ys, err = [], [], [[], []]
        for i, strategy in enumerate(strategies):
            r = metrics["cindex"][strategy].get(split, {})
            if r.get("harrell") is None:
                continue
            ci = (r.get("ci95") or {}).get("harrell") or [r["harrell"], r["harrell"]]
            xs.append(i + 0.15 * (j - (len(splits) - 1) / 2))
            ys.append(r["harrell"])
            err[0].append(r["harrell"] - ci[0])
            err[1].append(ci[1] - r["harrell"])
        ax.errorbar(xs, ys, yerr=err, fmt="o", capsize=3, label=split)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(strategies)), strategies, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("Harrell's c-index (95% CI)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "cindex.png", dpi=100)
    plt.close(fig)

    # linear-probe AUROC per encoder/input/label on each split
    fig, ax = plt.subplots(figsize=(8, 4.5))
    names, vals, errs = [], [], [[], []]
    for enc, inputs in metrics.get("probe", {}).items():
        for inp, labels in inputs.items():
            for label, res in labels.items():
                for split, r in res.get("linear", {}).items():
                    if r.get("auroc") is None:
                        continue
                    ci = r.get("ci95") or [r["auroc"], r["auroc"]]
                    names.append(f"{enc} {inp} {label} {split}")
                    vals.append(r["auroc"])
                    errs[0].append(r["auroc"] - ci[0])
                    errs[1].append(ci[1] - r["auroc"])
    ax.barh(range(len(vals)), vals, xerr=errs, capsize=2)
    ax.set_yticks(range(len(vals)), names, fontsize=6)
    ax.axvline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("linear-probe AUROC (95% CI)")
    fig.tight_layout()
    fig.savefig(out / "probe.png", dpi=100)
    plt.close(fig)

    # retrieval recall@k against chance
    fig, ax = plt.subplots(figsize=(7, 4))
    chance: dict[int, float] = {}
    for enc, by_split in metrics.get("retrieval", {}).items():
        for split, r in by_split.items():
            for direction, v in r.items():
                ks = sorted(int(k.split("@")[1]) for k in v if k.startswith("recall@") and v[k] is not None)
                ax.plot(ks, [v[f"recall@{k}"] for k in ks], marker="o", label=f"{enc} {direction} {split}")
                for k in ks:
                    chance[k] = max(chance.get(k, 0.0), v[f"chance@{k}"])
    if chance:
        ax.plot(
            sorted(chance),
            [chance[k] for k in sorted(chance)],
            color="grey",
            ls="--",
            label="chance (smallest split)",
        )
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "retrieval.png", dpi=100)
    plt.close(fig)
