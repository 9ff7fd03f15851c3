"""`jepa-ray evaluate`: what a pretrained encoder is worth downstream, beside a random-init one.

    encoder (export, run or checkpoint) ─> embeddings per split (Ray Data actor pool, parquet cache)
      ─> linear and kNN probes on the binary labels (AUROC, bootstrap 95% CI), and an attentive
         probe on the image tokens
      ─> latent-factor R² (synthetic cohorts: the ground truth the images were drawn from), ridge on
         pooled embeddings and attentive probe on image tokens, held out and out of fold over
         every split; out of fold also a ridge on the image tokens in grid order (a weight per
         position)
      ─> cross-modal retrieval (recall@k, chance beside it)
      ─> time-to-event heads under four fusion strategies (Harrell's and Uno's c-index)
      ─> metrics.json, report.md, plots

One sample per subject is evaluated: its first study (the one with the longest follow-up), so
that no subject counts twice in a split; the later studies are counted in the report.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from jepa_ray.config import Config
from jepa_ray.errors import ConfigError
from jepa_ray.eval import attentive, probes
from jepa_ray.eval.compare import align
from jepa_ray.eval.embed import EncoderSource, eval_pipeline, extract_many, read_embeddings, read_encoder
from jepa_ray.eval.features import raw_ehr_features
from jepa_ray.eval.samples import Split

log = logging.getLogger("jepa_ray.eval")

INPUTS = {"image": "emb_image", "ehr": "emb_ehr", "joint": "emb_joint"}
CV_FOLDS = 5  # folds of the out-of-fold latent read-out (grouped by subject)
OUT_OF_FOLD = "out-of-fold"  # its name where a split's would be, in the comparison
# the synthetic cohort's latent factors; `mass` (a finding only its images show) is absent from
# cohorts written before it, which evaluate without it
LATENTS = ("cardiac", "lung", "frailty", "mass")
REQUIRED_LATENTS = LATENTS[:3]


def resolve_encoder(encoder: str, cfg: Config, out: Path, name: str = "pretrained") -> EncoderSource:
    """An exported `.safetensors`, or a run / checkpoint (local or s3://) exported into `out`
    (as encoder.safetensors, or <name>.safetensors for a baseline)."""
    if encoder.endswith(".safetensors"):
        weights = Path(encoder)
        if not weights.exists() or not weights.with_suffix(".json").exists():
            raise ConfigError(f"{encoder}: no such exported encoder (need it and its .json beside)")
    else:
        from jepa_ray.train.export import export

        target = out / ("encoder.safetensors" if name == "pretrained" else f"{name}.safetensors")
        weights, _ = export(encoder, target, cfg.train.storage)
    info = json.loads(weights.with_suffix(".json").read_text())
    return EncoderSource(name, str(weights), info)


def baseline_sources(baselines: list[str], cfg: Config, out: Path) -> list[EncoderSource]:
    """Each --baseline encoder, named by its objective ("mae", "jepa"; "mae_2" for a second one)."""
    sources: list[EncoderSource] = []
    taken = {"pretrained", "random_init"}
    for path in baselines:
        probe = resolve_encoder(path, cfg, out, name="baseline") if path.endswith(".safetensors") else None
        kind = (probe.info if probe else {}).get("model", {}).get("objective", "baseline")
        name, i = kind, 2
        while name in taken:
            name, i = f"{kind}_{i}", i + 1
        taken.add(name)
        sources.append(resolve_encoder(path, cfg, out, name=name))
    return sources


def first_studies(meta: list[dict[str, Any]], keys: list[str]) -> np.ndarray:
    """Indices of one sample per subject: its earliest study, i.e. the longest follow-up of any
    endpoint; ties by key. Returned in key order, so what is read from them (folds, probes) depends
    on the samples alone, not on the order an embedding pass wrote them in."""
    order = sorted(
        range(len(meta)),
        key=lambda i: (-max([t["days"] for t in meta[i].get("tte", {}).values()] or [0]), keys[i]),
    )
    seen, keep = set(), []
    for i in order:
        if meta[i]["subject"] not in seen:
            seen.add(meta[i]["subject"])
            keep.append(i)
    return np.array(sorted(keep, key=lambda i: keys[i]), dtype=np.intp)


def one_per_subject(cols: dict[str, np.ndarray]) -> Split:
    """Columns of embedded samples (with "meta" as JSON and "key"), reduced to one sample per
    subject (its earliest study)."""
    meta = [json.loads(m) if isinstance(m, str | bytes) else m for m in cols["meta"]]
    idx = first_studies(meta, list(cols["key"]))
    return Split({k: v[idx] for k, v in cols.items()}, [meta[i] for i in idx], len(meta) - len(idx))


def load_split(path: Path) -> Split:
    """A cached split, reduced to one sample per subject (its earliest study)."""
    return one_per_subject(read_embeddings(path))


def random_init_source(pretrained: EncoderSource, seed: int) -> EncoderSource:
    """The random-init baseline of `pretrained`: the very weights its run started from where the
    export records their seed (`init_seed`: then "pretrained vs random init" is what pretraining
    did to one start, paired), else a random init of its shape drawn from `seed` (eval.seed)."""
    return EncoderSource("random_init", None, pretrained.info, seed=pretrained.info.get("init_seed", seed))


def random_start_sources(pretrained: EncoderSource, seed: int, starts: int) -> list[EncoderSource]:
    """`starts` random inits of `pretrained`'s shape: its own start (`random_init_source`), then
    random_init_2, random_init_3, ... drawn from the seeds after it."""
    own = random_init_source(pretrained, seed)
    others = [
        EncoderSource(f"random_init_{i + 1}", None, pretrained.info, seed=own.seed + i)
        for i in range(1, starts)
    ]
    return [own, *others]


def random_start_names(names: list[str]) -> list[str]:
    """The random-init encoders among evaluated encoder names, own start first."""
    return [n for n in names if n == "random_init" or re.fullmatch(r"random_init_\d+", n)]


def evaluate(
    encoder: str,
    data: str,
    cfg: Config,
    out: Path,
    latents: str | None = None,
    baselines: list[str] | tuple[str, ...] = (),
    verbose: bool = False,
) -> dict[str, Any]:
    """Run every evaluation of the encoder, beside a random init and each baseline encoder (e.g.
    an MAE on the same data); writes metrics.json, report.md and plots into `out`; the metrics.
    `verbose`: Ray Data's progress bars while embedding (off: one log line per split)."""
    from jepa_ray.eval.report import write_report
    from jepa_ray.shards.manifest import read_manifest
    from jepa_ray.storage import Store

    manifest = read_manifest(Store(data, cfg.train.storage))
    # eval.encoder=auto settled once for this data, so the embeddings and the segmentation heads
    # read the same encoder
    read = read_encoder(cfg.eval.encoder, manifest)
    log.info("evaluate: reading each export's %s encoder (eval.encoder=%s)", read, cfg.eval.encoder)
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"encoder": read})})
    ec = cfg.eval
    out.mkdir(parents=True, exist_ok=True)
    pretrained = resolve_encoder(encoder, cfg, out)
    sources = [pretrained]
    if ec.random_baseline:
        sources += random_start_sources(pretrained, ec.seed, ec.random_starts)
    sources += baseline_sources(list(baselines), cfg, out)
    factors, z = _latents(latents, cfg) if latents else ((), None)  # a bad file fails before any embedding
    wanted = list(dict.fromkeys([ec.fit_split, ec.val_split, *ec.report_splits]))
    label_names = list(manifest["ehr"].get("labels", []))
    embedded = extract_many(sources, data, wanted, cfg, out, verbose=verbose)  # one pass for all
    tables = {name: {s: load_split(p) for s, p in paths.items()} for name, paths in embedded.items()}
    splits = tables["pretrained"]
    if ec.fit_split not in splits:
        raise ConfigError(f"{data}: no {ec.fit_split!r} split to fit the probes on")
    reports = [s for s in ec.report_splits if s in splits]
    width = splits[ec.fit_split].cols["emb_image"].shape[1]
    if ec.attentive and width % ec.attentive_heads:
        raise ConfigError(
            f"eval.attentive_heads={ec.attentive_heads} does not divide the encoder width {width}; "
            "pick a divisor, or eval.attentive=false"
        )
    metrics: dict[str, Any] = {
        "encoder": {"weights": pretrained.weights, "step": pretrained.info.get("step"), "read": read},
        "data": data,
        "counts": _counts(splits),
        "probe": {},
        "retrieval": {},
        "latent_r2": {},
        "latent_r2_attentive": {},
        "encoders": [s.name for s in sources],
    }
    if z is not None and not any(subject in z for s in splits.values() for subject in s.subjects):
        raise ConfigError(
            f"--latents {latents}: no subject matches the shards; is {cfg.prepare.deid.salt_env} the salt "
            "the shards were prepared with?"
        )
    # the raw EHR features, once (every encoder's tables hold the same samples, perhaps in another
    # order): the linear retrieval's gallery and the classical Cox model's input
    raw = raw_ehr_features(splits, manifest, ec.fit_split)
    fitted: dict[tuple[str, str, str], Any] = {}  # (encoder, task, read-out) -> probe: the comparison's
    for name, by_split in tables.items():
        metrics["probe"][name] = _probes(by_split, label_names, reports, cfg, fitted, name)
        ordered = {k: raw[k][align(by_split[k].cols["key"], s.cols["key"])] for k, s in splits.items()}
        metrics["retrieval"][name] = _retrieval(by_split, reports, ordered, cfg)
        if z is not None:
            metrics["latent_r2"][name] = _latent_r2(by_split, factors, z, reports, cfg)
            if ec.attentive:
                metrics["latent_r2_attentive"][name] = _latent_r2_attentive(
                    by_split, factors, z, reports, cfg, fitted, name
                )
    if any(v.get("masks") for v in manifest.get("splits", {}).values()):
        metrics["segmentation"] = _segmentation(sources, data, reports, cfg)
    survival = _survival(tables, raw, reports, cfg)
    cindex_pairs = survival.pop("comparison", {})
    metrics.update(survival)
    if ec.label_fractions:
        metrics["few_labels"] = _few_labels(tables, raw, factors, z, label_names, reports, cfg)
    metrics["comparison"] = _compare(tables, factors, z, label_names, reports, cfg, fitted)
    for other, by_task in cindex_pairs.items():
        metrics["comparison"].setdefault(other, {}).update(by_task)
    if z is not None:
        metrics["latent_r2_cv"], paired = _latent_oof(tables, factors, z, reports, cfg)
        for other, by_task in paired.items():
            for task, by_readout in by_task.items():
                for readout, d in by_readout.items():
                    metrics["comparison"].setdefault(other, {}).setdefault(task, {}).setdefault(readout, {})[
                        OUT_OF_FOLD
                    ] = d
    write_report(metrics, out)
    return metrics


def _segmentation(sources: list[EncoderSource], data: str, reports: list[str], cfg: Config) -> dict:
    """Dice of the segmentation heads on each encoder's frozen patch tokens, for shards with
    ground-truth masks (`prepare --masks`): radiographs (pipeline.dims=2) or CT volumes (3)."""
    from jepa_ray.errors import ShardError
    from jepa_ray.eval.segmentation import annotated, encode, segmentation_probe
    from jepa_ray.stream.pipeline import open_split

    ec, out = cfg.eval, {}
    read: dict[tuple[str, str], Any] = {}  # (split, pipeline) -> its annotated samples, for every encoder
    for source in sources:
        pcfg = eval_pipeline(cfg, source.info)
        if pcfg.dims == "mixed":
            log.info("segmentation: one kind of image at a time; skipped for pipeline.dims=mixed")
            return {}
        model = source.build()
        splits = {}
        for split in dict.fromkeys([ec.fit_split, *reports]):
            cached = (split, pcfg.model_dump_json())
            if cached not in read:
                try:
                    read[cached] = annotated(open_split(data, split, cfg.train.storage), pcfg)
                except ShardError:
                    read[cached] = None
            if read[cached] is not None:
                splits[split] = encode(model, read[cached], pcfg, ec.encoder)
        if ec.fit_split not in splits or len(splits) < 2:
            log.info("segmentation: too few annotated samples (splits with masks: %s)", sorted(splits))
            return {}
        out[source.name] = segmentation_probe(
            splits,
            ec.fit_split,
            [s for s in reports if s in splits],
            tuple(pcfg.tubelet) if pcfg.dims == 3 else pcfg.patch_size,
            ec.bootstrap,
            ec.seed,
            ec.segmentation_steps,
        )
        log.info(
            "segmentation (%s): mean Dice %s",
            source.name,
            ", ".join(
                f"{h}/{sp} {r['mean']['dice']:.3f}"
                for h, v in out[source.name].items()
                for sp, r in v.items()
            ),
        )
    return out


def _counts(splits: dict[str, Split]) -> dict[str, Any]:
    out = {}
    for name, s in splits.items():
        img, ehr = s.cols["has_image"].astype(bool), s.cols["has_ehr"].astype(bool)
        out[name] = {
            "subjects": len(s),
            "with_image": int(img.sum()),
            "with_ehr": int(ehr.sum()),
            "both": int((img & ehr).sum()),
            "later_studies_not_evaluated": s.dropped_later_studies,
        }
    return out


def _available(s: Split, inp: str) -> np.ndarray:
    img, ehr = s.cols["has_image"].astype(bool), s.cols["has_ehr"].astype(bool)
    return {"image": img, "ehr": ehr, "joint": img | ehr}[inp]


def attentive_settings(cfg: Config) -> attentive.AttentiveSettings:
    """The attentive probe's training settings from eval.attentive_* and eval.seed."""
    ec = cfg.eval
    return attentive.AttentiveSettings(
        epochs=ec.attentive_epochs,
        lr=ec.attentive_lr,
        weight_decay=ec.attentive_weight_decay,
        heads=ec.attentive_heads,
        seed=ec.seed,
    )


def _probes(
    splits: dict[str, Split], labels: list[str], reports: list[str], cfg: Config,
    fitted: dict | None = None, name: str = "pretrained",
) -> dict:  # fmt: skip
    """{input: {label: {"linear"|"knn"|"attentive": {split: auroc dict}, "excluded": {split: n}}}}:
    samples lacking the input's modality or the label are excluded and counted; "attentive" (image
    input, eval.attentive) reads the image tokens. The image input's probes go into `fitted` under
    (name, "AUROC <label>", read-out), for the comparison to score rather than fit again."""
    ec = cfg.eval
    fit = splits[cfg.eval.fit_split]
    out: dict[str, Any] = {}
    for inp, col in INPUTS.items():
        out[inp] = {}
        for label in labels:

            def rows(s: Split) -> np.ndarray:
                return _available(s, inp) & ~np.isnan(s.label(label))  # noqa: B023

            f = rows(fit)
            y = fit.label(label)[f].astype(int)
            if not probes.two_classes(y):
                out[inp][label] = {"note": f"one class only in {ec.fit_split}"}
                continue
            score = probes.logistic_probe(fit.cols[col][f], y)
            res: dict[str, Any] = {"linear": {}, "knn": {}, "excluded": {}}
            att = None
            if inp == "image" and fitted is not None:
                fitted[name, f"AUROC {label}", "linear"] = score
            if inp == "image" and ec.attentive:
                if len(y) >= attentive.MIN_SAMPLES:
                    tokens = fit.image_tokens()[f]  # (n_fit, r*r, D)
                    att = attentive.fit_attentive(tokens, y, task="binary", settings=attentive_settings(cfg))
                    res["attentive"] = {}
                    if fitted is not None:
                        fitted[name, f"AUROC {label}", "attentive"] = att.predict
                else:
                    res["attentive_note"] = (
                        f"{len(y)} samples in {ec.fit_split}: too few for the attentive probe"
                    )
            for split in reports:
                s = splits[split]
                r = rows(s)
                ys, x = s.label(label)[r], s.cols[col][r]
                res["excluded"][split] = int((~r).sum())
                res["linear"][split] = probes.auroc(ys, score(x), ec.bootstrap, ec.seed)
                knn = probes.knn_scores(fit.cols[col][f], y, x, ec.knn_k)
                res["knn"][split] = probes.auroc(ys, knn, ec.bootstrap, ec.seed)
                if att is not None:
                    logits = att.predict(s.image_tokens()[r])
                    res["attentive"][split] = probes.auroc(ys, logits, ec.bootstrap, ec.seed)
            out[inp][label] = res
    return out


def _retrieval(
    by_split: dict[str, Split], reports: list[str], raw: dict[str, np.ndarray], cfg: Config
) -> dict:
    """Recall@k per report split: the predictor's cross-modal predictions against the other
    modality's target embeddings (image_to_ehr, ehr_to_image), and a ridge map fit on the fit split
    from the image's region tokens (the eval.regions grid, flattened) to the raw EHR features `raw`
    (image_to_ehr_linear: one gallery for every encoder; the mean-pooled embedding averages away
    where a finding is)."""
    ks, fit = cfg.eval.recall_at, cfg.eval.fit_split
    both = {k: s.cols["has_image"].astype(bool) & s.cols["has_ehr"].astype(bool) for k, s in by_split.items()}
    out = {}
    for name in reports:
        c, b = by_split[name].cols, both[name]
        out[name] = {
            "image_to_ehr": probes.recall_at(c["q_img2ehr"][b], c["g_ehr"][b], ks),
            "ehr_to_image": probes.recall_at(c["q_ehr2img"][b], c["g_img"][b], ks),
        }
    splits = dict.fromkeys([fit, *reports])

    def flat(t: np.ndarray) -> np.ndarray:  # (n, r*r, D) -> (n, r*r*D), also for n = 0 (no image)
        return t.reshape(len(t), int(np.prod(t.shape[1:])))

    linear = probes.linear_map_recall(
        {k: flat(by_split[k].image_tokens()[both[k]]) for k in splits},
        {k: raw[k][both[k]] for k in splits},
        fit,
        reports,
        ks,
    )
    for name in reports:
        out[name]["image_to_ehr_linear"] = linear[name]
    return out


def _latents(path: str, cfg: Config) -> tuple[tuple[str, ...], dict[str, np.ndarray]]:
    """The factors of LATENTS the file has, and their values per pseudonymous subject (the cohort's
    latents.parquet, raw ids pseudonymised with the data's salt, which must be the one `prepare`
    used)."""
    import pandas as pd

    from jepa_ray.ingest.deid import Pseudonymizer

    try:
        table = pd.read_parquet(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--latents {path}: cannot read it as parquet ({e})") from e
    missing = [c for c in ("subject_id", *REQUIRED_LATENTS) if c not in table.columns]
    if missing:
        raise ConfigError(f"--latents {path}: missing column(s) {', '.join(missing)}")
    factors = tuple(f for f in LATENTS if f in table.columns)
    pz = Pseudonymizer(cfg.prepare.deid.resolve_salt())
    z = {
        pz.subject(r.subject_id): np.array([getattr(r, f) for f in factors], float)
        for r in table.itertuples()
    }
    return factors, z


def _with_latents(s: Split, z: dict[str, np.ndarray]) -> np.ndarray:
    """(n,) bool: the split's samples with an image whose subject has latent factors."""
    return s.cols["has_image"].astype(bool) & np.array([subj in z for subj in s.subjects], dtype=bool)


def _latent_r2(
    splits: dict[str, Split],
    factors: tuple[str, ...],
    z: dict[str, np.ndarray],
    reports: list[str],
    cfg: Config,
) -> dict:
    def xz(s: Split) -> tuple[np.ndarray, np.ndarray]:
        keep = _with_latents(s, z)
        return s.cols["emb_image"][keep], np.stack([z[subj] for subj in s.subjects[keep]])

    res = probes.latent_r2(*xz(splits[cfg.eval.fit_split]), {s: xz(splits[s]) for s in reports})
    return {
        split: {
            "r2": dict(zip(factors, r["r2"], strict=True)),
            "n": r["n"],
            "alpha": dict(zip(factors, r["alpha"], strict=True)),
        }
        for split, r in res.items()
    }


def _latent_r2_attentive(
    splits: dict[str, Split],
    factors: tuple[str, ...],
    z: dict[str, np.ndarray],
    reports: list[str],
    cfg: Config,
    fitted: dict | None = None,
    name: str = "pretrained",
) -> dict:
    """{split: {"r2": {factor: R²}, "n", "epochs"}}: the attentive probe from image tokens to the
    latent factors, fit on the fit split's imaged subjects with latents; each factor's column of
    it goes into `fitted` under (name, "latent R² <factor>", "attentive")."""

    def xz(s: Split) -> tuple[np.ndarray, np.ndarray]:
        keep = _with_latents(s, z)
        return s.image_tokens()[keep], np.stack([z[subj] for subj in s.subjects[keep]])

    tokens, targets = xz(splits[cfg.eval.fit_split])
    probe = attentive.fit_attentive(tokens, targets, settings=attentive_settings(cfg))
    for j, factor in enumerate(factors if fitted is not None else ()):
        fitted[name, f"latent R² {factor}", "attentive"] = lambda x, j=j: probe.predict(x).reshape(
            len(x), -1
        )[:, j]
    res = attentive.attentive_r2(
        tokens, targets, {s: xz(splits[s]) for s in reports}, attentive_settings(cfg), probe=probe
    )
    return {
        split: {"r2": dict(zip(factors, r["r2"], strict=True)), "n": r["n"], "epochs": r["epochs"]}
        for split, r in res.items()
    }


def _latent_oof(
    tables: dict[str, dict[str, Split]],
    factors: tuple[str, ...],
    z: dict[str, np.ndarray],
    reports: list[str],
    cfg: Config,
) -> tuple[dict, dict]:
    """Out-of-fold latent R² over every imaged subject with latents in the fit, validation and
    reported splits together (CV_FOLDS folds grouped by subject), per encoder and read-out (linear:
    ridge on the pooled embedding; grid: ridge on the image tokens concatenated in grid order, past
    probes.GRID_DIMS features through their principal components within each fold; attentive):
    {encoder: {readout: {factor: R²}, "n", "splits"}}; and the pretrained encoder's paired
    differences against each other one on those predictions: {other: {"latent R² <factor>":
    {readout: paired_difference}}}. On a cohort too small for its test split to tell encoders
    apart (the demo's ~50 subjects), every sample is scored once, by a probe that never saw it.
    Each encoder's R² has its bootstrap 95% interval ("ci95"), as the differences do (one study per
    subject: the samples are independent)."""
    from sklearn.metrics import r2_score

    from jepa_ray.eval.compare import paired_difference

    ec = cfg.eval
    ref = tables["pretrained"]
    rows = {
        k: _with_latents(ref[k], z) for k in dict.fromkeys([ec.fit_split, ec.val_split, *reports]) if k in ref
    }
    groups = np.concatenate([ref[k].subjects[r] for k, r in rows.items()])
    if len(np.unique(groups)) < 2 * CV_FOLDS:
        return {}, {}
    y = np.stack([z[subj] for subj in groups]).astype(float)
    preds: dict[str, dict[str, np.ndarray]] = {}
    for name, by_split in tables.items():
        # every encoder's rows in the pretrained encoder's order: the same sample in every fold
        order = {k: align(ref[k].cols["key"], by_split[k].cols["key"]) for k in rows}
        pooled = np.concatenate([by_split[k].cols["emb_image"][order[k]][r] for k, r in rows.items()])
        preds[name] = {"linear": probes.oof_latent(pooled, y, groups, CV_FOLDS)}
        if not (ec.grid or ec.attentive):
            continue
        tokens = stack_tokens({k: by_split[k].image_tokens()[order[k]][r] for k, r in rows.items()}, name)
        if ec.grid:  # a weight for every position: what pooling and one shared value map average away
            grid = tokens.reshape(len(tokens), -1)  # (N, T*D), tokens in grid order
            preds[name]["grid"] = probes.oof_latent(grid, y, groups, CV_FOLDS, max_dims=probes.GRID_DIMS)
        if ec.attentive:
            preds[name]["attentive"] = attentive.oof_attentive(
                tokens, y, groups, CV_FOLDS, ec.seed, settings=attentive_settings(cfg)
            )
    r2 = {
        name: {
            readout: {f: float(r2_score(y[:, j], p[:, j])) for j, f in enumerate(factors)}
            for readout, p in per.items()
        }
        | {
            "n": len(y),
            "splits": list(rows),
            "ci95": {
                readout: {
                    f: probes.bootstrap_ci(r2_score, (y[:, j], p[:, j]), ec.bootstrap, ec.seed)
                    for j, f in enumerate(factors)
                }
                for readout, p in per.items()
            },
        }
        for name, per in preds.items()
    }
    paired = {
        other: {
            f"latent R² {f}": {
                readout: paired_difference(
                    r2_score, y[:, j], preds["pretrained"][readout][:, j], p[:, j], ec.bootstrap, ec.seed
                )
                for readout, p in per.items()
            }
            for j, f in enumerate(factors)
        }
        for other, per in preds.items()
        if other != "pretrained"
    }
    return r2, paired


def stack_tokens(parts: dict[str, np.ndarray], encoder: str) -> np.ndarray:
    """The image tokens of several splits, each (n_k, T, D), as one (N, T, D) array; ValueError
    naming the splits if their token counts differ (samples of another image size), which the grid
    read-out, a weight per position, cannot line up."""
    counts = {k: t.shape[1:] for k, t in parts.items()}
    if len(set(counts.values())) > 1:
        shown = ", ".join(f"{k}: {c[0]} tokens of width {c[1]}" for k, c in counts.items())
        raise ValueError(
            f"{encoder}: image token counts differ between splits ({shown}); the grid read-out needs "
            "one image size (pipeline.image_size, eval.regions) for every sample"
        )
    return np.concatenate(list(parts.values()))


def _endpoint(splits: dict[str, Split], cfg: Config) -> str | None:
    """The time-to-event outcome the heads read: eval.endpoint, else death, else the first the
    shards carry; None when they carry none."""
    endpoints = sorted({k for s in splits.values() for m in s.meta for k in m.get("tte", {})})
    if not endpoints:
        return None
    endpoint = cfg.eval.endpoint or ("death" if "death" in endpoints else endpoints[0])
    if endpoint not in endpoints:
        raise ConfigError(f"eval.endpoint {endpoint!r}: the shards carry {', '.join(endpoints)}")
    return endpoint


def _few_labels(
    tables: dict[str, dict[str, Split]], raw: dict[str, np.ndarray], factors: tuple[str, ...],
    z: dict[str, np.ndarray] | None, labels: list[str], reports: list[str], cfg: Config,
) -> dict:  # fmt: skip
    """The read-outs refit on eval.label_fractions of the fit split's labelled subjects, for every
    encoder on the same draws, paired with the pretrained one (`jepa_ray.eval.fewlabel`)."""
    from jepa_ray.eval import fewlabel

    ec = cfg.eval
    tasks = fewlabel.tasks_of(tables["pretrained"], _endpoint(tables["pretrained"], cfg), labels, factors, z)
    starts = random_start_names(list(tables))
    return fewlabel.few_label_reads(
        tables, raw, tasks, ec.fit_split, reports, ec.label_fractions, ec.label_draws, ec.bootstrap, ec.seed,
        groups={fewlabel.STARTS_MEAN: starts},
    )  # fmt: skip


def _survival(
    tables: dict[str, dict[str, Split]], raw: dict[str, np.ndarray], reports: list[str], cfg: Config
) -> dict:
    """Time-to-event heads on every encoder's embeddings (random init under a `random_init:` prefix)
    and the classical Cox model on the raw EHR features `raw`, on each reported split and again on
    its samples with both modalities ("<split>_paired"), where every strategy scores the same
    samples; and under "comparison", the pretrained encoder's c-index against each other one's,
    strategy by strategy, on the samples both scored of each reported split: {other: {"c-index
    <endpoint>": {strategy: {split: paired_cindex}}}}, the paired bootstrap saying which differences
    are beyond noise."""
    from jepa_ray.eval.features import fusion_inputs
    from jepa_ray.eval.survival import evaluate_survival, with_paired

    endpoint = _endpoint(tables["pretrained"], cfg)
    if endpoint is None:
        return {"cindex": {}, "survival": {"note": "no time-to-event outcome in the shards"}}
    ec = cfg.eval
    kwargs = dict(
        fit_split=ec.fit_split,
        val_split=ec.val_split,
        bootstrap=ec.bootstrap,
        seed=ec.seed,
        epochs=ec.survival_epochs,
        head_seeds=ec.survival_head_seeds,
        stopping=ec.survival_stopping,
        keep_risks=True,
    )
    splits = tables["pretrained"]
    raw_all = raw  # rows of the pretrained tables; another encoder's are the same samples in key order
    inputs, raw = with_paired({k: fusion_inputs(s, endpoint) for k, s in splits.items()}, raw, reports)
    kwargs["report_splits"] = (*reports, *(f"{s}_paired" for s in reports if f"{s}_paired" in inputs))
    res = evaluate_survival(inputs, raw=raw, **kwargs)
    ref = (inputs, _keys(splits), res.pop("risks"))
    cindex, counts, comparison = res["cindex"], {"pretrained": res["counts"]}, {}
    for name, by_split in tables.items():
        if name == "pretrained":
            continue
        same = all(np.array_equal(by_split[k].cols["key"], splits[k].cols["key"]) for k in by_split)
        inputs, other_raw = with_paired(
            {k: fusion_inputs(s, endpoint) for k, s in by_split.items()}, raw_all if same else None, reports
        )
        other = evaluate_survival(inputs, raw=other_raw, prefix=f"{name}:", **kwargs)
        cindex.update(other["cindex"])
        counts[name] = other["counts"]
        theirs = (_keys(by_split), other["risks"])
        pairs = _paired_cindex(ref, theirs, f"{name}:", ec.bootstrap, ec.seed)
        comparison[name] = {f"c-index {endpoint}": pairs}
    heads = {"stopping": ec.survival_stopping, "fits": ec.survival_head_seeds, "steps": ec.survival_epochs}
    survival = {"endpoint": endpoint, "heads": heads, "counts": counts}
    return {"cindex": cindex, "survival": survival, "comparison": comparison}


def _keys(tables: dict[str, Split]) -> dict[str, np.ndarray]:
    """Each split's sample keys, row by row."""
    return {k: np.asarray(t.cols["key"]) for k, t in tables.items()}


def _paired_cindex(ref: tuple, other: tuple, prefix: str, bootstrap: int, seed: int) -> dict:
    """{strategy: {split: paired_cindex}} of the pretrained encoder's risks against another's on the
    samples both scored (matched by key), on the whole splits (a "<split>_paired" split is a subset
    of the same samples): ref (inputs, keys, risks), other (keys, risks), the risks as
    `evaluate_survival(keep_risks=True)` returns them."""
    from jepa_ray.eval.survival import cindex_defined, paired_cindex

    inputs, keys, risks = ref
    other_keys, other_risks = other
    out: dict = {}
    for name, by_split in risks.items():
        theirs = other_risks.get(prefix + name, {})
        for split, (rows, risk) in by_split.items():
            if split not in theirs or split.endswith("_paired"):  # a subset of the same samples
                continue
            rows_b, risk_b = theirs[split]
            at = {k: j for j, k in enumerate(other_keys[split][rows_b])}
            mine = [i for i, k in enumerate(keys[split][rows]) if k in at]
            if not mine:
                continue
            a = np.asarray(mine)
            b = np.array([at[k] for k in keys[split][rows][a]])
            time, event = inputs[split].time[rows[a]], inputs[split].event[rows[a]]
            if not cindex_defined(time, event):
                continue
            out.setdefault(name, {})[split] = paired_cindex(time, event, risk[a], risk_b[b], bootstrap, seed)
    return out


def _compare(
    tables: dict[str, dict[str, Split]],
    factors: tuple[str, ...],
    z: dict[str, np.ndarray] | None,
    labels: list[str],
    reports: list[str],
    cfg,
    fitted: dict | None = None,
) -> dict:
    """The pretrained encoder against each other one (random init, baselines) on the image input:
    paired bootstrap differences of latent-factor R² and label AUROC, linear and attentive
    read-outs, per reported split (`jepa_ray.eval.compare`), with the probes already `fitted`
    (those behind `probe` and `latent_r2_attentive`: the same numbers on both sides)."""
    from jepa_ray.eval.compare import compare_encoders

    ec = cfg.eval
    tasks: dict = {}
    for j, factor in enumerate(factors if z is not None else ()):

        def latent(s: Split, j=j) -> tuple[np.ndarray, np.ndarray]:
            rows = _with_latents(s, z)
            return rows, np.array([z[subj][j] for subj in s.subjects[rows]])

        tasks[f"latent R² {factor}"] = ("regression", latent)
    for label in labels:

        def binary(s: Split, label=label) -> tuple[np.ndarray, np.ndarray]:
            y = s.label(label)
            rows = s.cols["has_image"].astype(bool) & ~np.isnan(y)
            return rows, y[rows].astype(int)

        tasks[f"AUROC {label}"] = ("binary", binary)
    readouts = ("linear", "attentive") if ec.attentive else ("linear",)
    return compare_encoders(
        tables,
        "pretrained",
        tasks,
        ec.fit_split,
        reports,
        readouts,
        ec.bootstrap,
        ec.seed,
        attentive_settings(cfg),
        fitted,
    )
