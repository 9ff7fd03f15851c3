"""`jepa-ray` command line: thin wrappers over the library."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from jepa_ray.config import Config, load_config
from jepa_ray.errors import JepaRayError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Multimodal JEPA pretraining on Ray.")
console = Console(stderr=False)
err = Console(stderr=True, soft_wrap=True)  # error messages carry paths: never wrap them

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")]
Overrides = Annotated[list[str] | None, typer.Argument(help="Config overrides: section.key=value ...")]


def _setup(config: Path | None, overrides: list[str] | None) -> Config:
    cfg = load_config(config, overrides or [])
    logging.basicConfig(
        level=cfg.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    return cfg


def _fail(e: Exception) -> typer.Exit:
    err.print(f"[bold red]error:[/] {e}", highlight=False)
    return typer.Exit(2)


def init_ray(address: str | None) -> None:
    """Connect to the configured cluster, or start a local Ray (reused when already running) with
    its dashboard on 127.0.0.1: Ray Train uses its state API to release the resources of a run
    whose driver is gone (a sweep's stopped trial)."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", logging_level=logging.WARNING)


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="Output directory of the cohort.")],
    subjects: Annotated[int | None, typer.Option(help="Number of subjects.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Write a synthetic cohort: DICOM files, MEDS parquet, static, outcome and latent tables."""
    from jepa_ray.data.synth import write_cohort

    try:
        cfg = _setup(config, overrides)
        scfg = cfg.synth.model_copy(
            update={k: v for k, v in {"subjects": subjects, "seed": seed}.items() if v is not None}
        )
        scfg = type(scfg).model_validate(scfg.model_dump())
        summary = write_cohort(out, scfg)
    except (JepaRayError, ValueError, FileExistsError) as e:
        raise _fail(e) from None
    console.print(f"cohort written to {out}: " + ", ".join(f"{k}={v}" for k, v in summary.items()))


@app.command()
def prepare(
    out: Annotated[str, typer.Option(help="Output: a local directory or s3://bucket/prefix.")],
    dicom: Annotated[
        str | None, typer.Option(help="Directory of DICOM files (searched recursively).")
    ] = None,
    meds: Annotated[
        str | None, typer.Option(help="MEDS root (with data/*.parquet) or a parquet file.")
    ] = None,
    static: Annotated[
        str | None, typer.Option(help="Static table (parquet or CSV) keyed by subject_id.")
    ] = None,
    outcomes: Annotated[str | None, typer.Option(help="Outcome table (labels, time-to-event).")] = None,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Ingest DICOM + MEDS into de-identified webdataset shards and a manifest (resumable)."""
    from jepa_ray.data.prepare import prepare as run_prepare

    try:
        cfg = _setup(config, overrides)
        init_ray(cfg.ray_address)
        result = run_prepare(
            out, cfg.prepare, dicom=dicom, meds=meds, static=static, outcomes=outcomes, show_progress=True
        )
    except JepaRayError as e:
        raise _fail(e) from None
    console.print(f"shards written: {result.written}, already complete: {result.skipped}")
    _print_summary(result.manifest)
    if not result.ok:
        for p in result.problems:
            err.print(f"[bold red]prepare failed:[/] {p}")
        raise typer.Exit(1)


@app.command()
def inspect(
    url: Annotated[str, typer.Argument(help="Shard set: local directory or s3://bucket/prefix.")],
    verify: Annotated[bool, typer.Option("--verify", help="Re-check every shard's sha256.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Summarise a shard set (splits, modality pairing, quarantine); --verify checks sha256."""
    from jepa_ray.data.manifest import read_manifest, verify_shards
    from jepa_ray.data.storage import Store

    try:
        cfg = _setup(config, overrides)
        store = Store(url, cfg.prepare.storage)
        manifest = read_manifest(store)
        problems = verify_shards(store, manifest) if verify else []
    except JepaRayError as e:
        raise _fail(e) from None
    if as_json:
        keys = ("counts", "splits", "sites", "quarantine")
        summary = {k: manifest[k] for k in keys}
        summary["quarantine"] = {k: v for k, v in manifest["quarantine"].items() if k != "items"}
        console.print_json(json.dumps(summary))
    else:
        _print_summary(manifest)
    if verify:
        if problems:
            for p in problems:
                err.print(f"[bold red]verify:[/] {p}")
            raise typer.Exit(1)
        console.print(f"verify: all {len(manifest['shards'])} shards match their sha256")


def _print_summary(manifest: dict) -> None:
    table = Table(title="samples per split")
    for col in ("split", "shards", "samples", "image+ehr", "image only", "ehr only"):
        table.add_column(col, justify="right" if col != "split" else "left")
    order = ["train", "val", "test", "external"]
    splits = sorted(
        manifest["splits"].items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else 9, kv[0])
    )
    for split, s in splits:
        table.add_row(
            split,
            str(len(s["shards"])),
            str(s["samples"]),
            str(s["paired"]),
            str(s["image_only"]),
            str(s["ehr_only"]),
        )
    console.print(table)
    q = manifest["quarantine"]
    if q["count"]:
        qt = Table(title=f"quarantined inputs: {q['count']}")
        qt.add_column("reason")
        qt.add_column("count", justify="right")
        for reason, n in q["by_reason"].items():
            qt.add_row(reason, str(n))
        console.print(qt)
    else:
        console.print("quarantined inputs: 0")


def _run_pretrain(cfg: Config, name: str | None):
    from jepa_ray.train.trainer import pretrain as run_pretrain

    init_ray(cfg.ray_address)
    return run_pretrain(cfg, name=name)


@app.command()
def pretrain(
    name: Annotated[
        str | None, typer.Option(help="Run name (default train.name, else a timestamp); reuse it to resume.")
    ] = None,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Pretrain the JEPA on Ray Train workers under DeepSpeed ZeRO (resumes a run of the same name)."""
    try:
        cfg = _setup(config, overrides)
        info = _run_pretrain(cfg, name)
    except JepaRayError as e:
        raise _fail(e) from None
    _print_run(info)


def _print_run(info) -> None:
    m = info.metrics
    console.print(
        f"run {info.name}: step {m.get('step')}, loss {m.get('loss', float('nan')):.4f}, "
        f"val loss {m.get('val_loss', float('nan')):.4f}, RankMe {m.get('val_rankme', float('nan')):.1f}"
    )
    console.print(f"  run directory: {info.run_url}")
    console.print(f"  last checkpoint: {info.checkpoint}")
    console.print(
        f"  metrics: {info.run_url}/metrics/metrics.csv (TensorBoard: {info.run_url}/metrics/tensorboard)"
    )
    console.print(f"  loss curve: {info.run_url}/metrics/loss.png")


@app.command()
def tune(
    name: Annotated[
        str | None,
        typer.Option(help="Sweep name (default tune.name, else a timestamp); reuse it with --resume."),
    ] = None,
    num_samples: Annotated[
        int | None,
        typer.Option("--num-samples", help="Trials (random, optuna) or grid repeats (tune.num_samples)."),
    ] = None,
    objective: Annotated[
        str | None, typer.Option(help="rankme | probe_auroc | cindex (tune.objective).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted sweep: finished trials are not rerun.")
    ] = False,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Sweep masking and predictor settings with Ray Tune: each trial a pretraining run, ASHA
    stopping the poor ones early; writes a results table, best.yaml and a heat map."""
    from jepa_ray.tune.space import check_space
    from jepa_ray.tune.sweep import sweep

    extra = [f"tune.num_samples={num_samples}"] if num_samples is not None else []
    extra += [f"tune.objective={objective}"] if objective is not None else []
    try:
        cfg = _setup(config, [*(overrides or []), *extra])
        check_space(cfg)  # before Ray starts: a bad value fails in a second
        init_ray(cfg.ray_address)
        info = sweep(cfg, name=name, resume=resume)
    except JepaRayError as e:
        raise _fail(e) from None
    _print_sweep(info)


def _print_sweep(info) -> None:
    rows = info.rows
    keys = [k for k in rows[0] if "." in k] if rows else []
    short = [k.rsplit(".", 1)[-1] for k in keys]
    table = Table(
        "best", "trial", *short, "objective", "rankme", "steps", "early", "status", title=f"sweep {info.name}"
    )
    for r in rows:
        best = info.best is not None and r["trial"] == info.best["trial"]
        fmt = [f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys]
        table.add_row(
            "*" if best else "",
            r["trial"],
            *fmt,
            "-" if r["objective"] is None else f"{r['objective']:.4f}",
            "-" if r["rankme"] is None else f"{r['rankme']:.2f}",
            str(r["steps"]),
            "yes" if r["stopped_early"] else "",
            r["status"],
        )
    console.print(table)
    console.print("* best: the highest objective among the trials that ran the most steps")
    if info.spearman is not None:
        sp = info.spearman
        console.print(
            f"Spearman(RankMe, objective) across {sp['trials']} trials at step {sp['step']}: {sp['rho']:+.2f}"
        )
    for fname, uri in info.outputs.items():
        console.print(f"  {fname}: {uri}")
    if "best.yaml" in info.outputs:
        console.print(f"run the best: jepa-ray pretrain --config {info.outputs['best.yaml']}")


@app.command()
def export(
    run: Annotated[
        str, typer.Argument(help="A run directory (its newest checkpoint) or a checkpoint directory.")
    ],
    out: Annotated[Path, typer.Option(help="Output weights, e.g. encoder.safetensors (+ a .json beside).")],
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML config (train.storage reaches an s3:// run).")
    ] = None,
    overrides: Overrides = None,
) -> None:
    """Consolidated fp32 context and target encoder weights from any ZeRO stage (safetensors + JSON)."""
    from jepa_ray.train.export import export as run_export

    try:
        cfg = _setup(config, overrides)
        weights, info = run_export(run, out, cfg.train.storage)
    except JepaRayError as e:
        raise _fail(e) from None
    console.print(f"encoder weights: {weights}\nmodel description: {info}")


@app.command()
def evaluate(
    encoder: Annotated[
        str,
        typer.Option(
            help="Exported encoder (.safetensors), or a run / checkpoint directory (local or s3://)."
        ),
    ],
    data: Annotated[str, typer.Option(help="Prepared shards (local or s3://) with the evaluation splits.")],
    out: Annotated[Path, typer.Option(help="Output directory: metrics.json, report.md, plots, embeddings.")],
    latents: Annotated[
        str | None,
        typer.Option(help="Ground-truth latents.parquet of a synthetic cohort (latent-factor R²)."),
    ] = None,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Probes, kNN, cross-modal retrieval and time-to-event heads (four fusion strategies) on frozen
    embeddings, beside a random-init encoder and a classical Cox model on raw EHR features."""
    from jepa_ray.eval.evaluate import evaluate as run_evaluate

    try:
        cfg = _setup(config, overrides)
        init_ray(cfg.ray_address)
        metrics = run_evaluate(encoder, data, cfg, out, latents=latents)
    except JepaRayError as e:
        raise _fail(e) from None
    _print_evaluation(metrics, out)


def _print_evaluation(metrics: dict, out: Path) -> None:
    from jepa_ray.eval.report import summary

    header, rows = summary(metrics)
    table = Table(*header, title="evaluation")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(f"report: {out / 'report.md'}  metrics: {out / 'metrics.json'}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Directory for the cohort, shards, run and export.")] = Path(
        "demo"
    ),
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML config.")] = Path(
        "jobs/configs/demo-cpu.yaml"
    ),
    overrides: Overrides = None,
) -> None:
    """synth -> prepare -> pretrain (2 workers, ZeRO-2, tiny model) -> export -> evaluate, on a local Ray."""
    import os
    import time

    from jepa_ray.data.prepare import prepare as run_prepare
    from jepa_ray.data.synth import cohort_inputs, write_cohort
    from jepa_ray.eval.evaluate import evaluate as run_evaluate
    from jepa_ray.train.export import export as run_export

    try:
        os.environ.setdefault("JEPA_RAY_SALT", "demo-salt-change-me")
        cfg = _setup(config, [f"train.storage_path={out / 'runs'}", *(overrides or [])])
        cohort, shards = out / "cohort", out / "shards"
        if not (cohort / "latents.parquet").exists():
            console.print(f"[bold]1/5 synth[/] {cfg.synth.subjects} subjects -> {cohort}")
            write_cohort(cohort, cfg.synth)
        init_ray(cfg.ray_address)
        console.print(f"[bold]2/5 prepare[/] -> {shards}")
        result = run_prepare(str(shards), cfg.prepare, **cohort_inputs(cohort))
        if not result.ok:
            raise JepaRayError("prepare failed: " + "; ".join(result.problems))
        cfg.train.shards = str(shards)
        console.print(
            f"[bold]3/5 pretrain[/] {cfg.train.num_workers} workers, ZeRO-{cfg.train.zero_stage}, {cfg.train.steps} steps"
        )
        info = _run_pretrain(cfg, time.strftime("demo-%Y%m%d-%H%M%S"))
        console.print("[bold]4/5 export[/]")
        weights, meta = run_export(info.run_url, out / "encoder.safetensors")
        console.print(f"[bold]5/5 evaluate[/] -> {out / 'eval'}")
        metrics = run_evaluate(
            str(weights), str(shards), cfg, out / "eval", latents=str(cohort / "latents.parquet")
        )
    except JepaRayError as e:
        raise _fail(e) from None
    console.print(f"shards: {shards}")
    _print_run(info)
    console.print(f"  encoder: {weights} ({meta})")
    _print_evaluation(metrics, out / "eval")
