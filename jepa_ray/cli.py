"""`jepa-ray` command line: thin wrappers over the library."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from jepa_ray.config import Config, load_config
from jepa_ray.console import log_file, plain_output, record, setup_logging
from jepa_ray.errors import JepaRayError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Multimodal JEPA pretraining on Ray.")
console = Console(stderr=False)
err = Console(stderr=True, soft_wrap=True)  # error messages carry paths: never wrap them

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")]
Overrides = Annotated[list[str] | None, typer.Argument(help="Config overrides: section.key=value ...")]
VerboseOpt = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        help="Also show Ray's own progress: Ray Data's dataset bars and Ray Train's per-report worker "
        "lines (always in Ray's log files).",
    ),
]


def _setup(config: Path | None, overrides: list[str] | None) -> Config:
    cfg = load_config(config, overrides or [])
    setup_logging(cfg.log_level)
    plain_output()
    return cfg


def _log_to(cfg: Config, out: str | Path, command: str) -> Path:
    """From now on the driver's log also goes, whole, to `jepa-ray.log` in `out` (`log_file`).
    Called once Ray is connected: a command that cannot reach its cluster leaves nothing behind."""
    path = log_file(out, command)
    setup_logging(cfg.log_level, path)
    logging.getLogger("jepa_ray.cli").info("jepa-ray %s started", command)
    return path


def _fail(e: Exception) -> typer.Exit:
    err.print(f"[bold red]error:[/] {e}", highlight=False)
    record(f"error: {e}", logging.ERROR)
    return typer.Exit(2)


def init_ray(address: str | None, verbose: bool = False) -> None:
    """Connect to the configured cluster, or start a local Ray (reused when already running) with
    its dashboard on 127.0.0.1: Ray Train uses its state API to release the resources of a run
    whose driver is gone (a sweep's stopped trial). An address that does not answer is an error
    within seconds (`jepa_ray.connect`). A local Ray's processes, and this one, log Ray Data's
    per-execution lines to its files only, unless `verbose` (`jepa_ray.console.quiet_ray_data`)."""
    import os

    import ray

    from jepa_ray.console import quiet_ray_data

    if ray.is_initialized():
        return
    env = os.environ.get("RAY_ADDRESS", "")
    if not address and env.startswith(("http://", "https://")):
        raise JepaRayError(
            f"RAY_ADDRESS={env} is a job API address: this command runs its driver here. Submit it "
            "to that cluster with `jepa-ray submit -- <command> ...`, or unset RAY_ADDRESS to run locally"
        )
    from jepa_ray.connect import ray_init_address

    target = ray_init_address(address)  # a dead address: an error or a fresh local Ray, never a hang
    if target not in (None, "local"):  # a Ray job's driver finds its cluster in RAY_ADDRESS
        ray.init(address=target, logging_level=logging.WARNING)
    else:
        env = quiet_ray_data(verbose)
        ray.init(
            address=target,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            logging_level=logging.WARNING,
            runtime_env={"env_vars": env} if env else None,
        )


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="Output directory of the cohort.")],
    subjects: Annotated[int | None, typer.Option(help="Number of subjects.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Write a synthetic cohort: DICOM files, MEDS parquet, static, outcome and latent tables."""
    from jepa_ray.synth.cohort import write_cohort

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
    masks: Annotated[
        str | None,
        typer.Option(
            help="Ground-truth structure masks of the images (DIR/<image path under --dicom, no .dcm>/<structure>.png), "
            "kept in the shards for evaluation only."
        ),
    ] = None,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Ingest DICOM + MEDS into de-identified webdataset shards and a manifest (resumable)."""
    from jepa_ray.ingest.prepare import prepare as run_prepare

    try:
        cfg = _setup(config, overrides)
        init_ray(cfg.ray_address)
        logs = _log_to(cfg, out, "prepare")
        result = run_prepare(
            out,
            cfg.prepare,
            dicom=dicom,
            meds=meds,
            static=static,
            outcomes=outcomes,
            masks=masks,
            show_progress=True,
        )
    except JepaRayError as e:
        raise _fail(e) from None
    console.print(f"shards written: {result.written}, already complete: {result.skipped}")
    _print_summary(result.manifest)
    console.print(f"log: {logs}", highlight=False, soft_wrap=True)
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
    from jepa_ray.shards.manifest import read_manifest, verify_shards
    from jepa_ray.storage import Store

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


def _run_pretrain(cfg: Config, name: str, verbose: bool, what: str = "pretrain"):
    """A pretraining run with its progress display on the driver (`jepa_ray.console`); Ray is
    already connected (`init_ray`)."""
    from jepa_ray.console import TrainingProgress
    from jepa_ray.train.reports import ForwardReports
    from jepa_ray.train.trainer import pretrain as run_pretrain

    with TrainingProgress(f"{what} {name}", cfg.train.steps) as display:
        return run_pretrain(cfg, name=name, callbacks=[ForwardReports(display.sink())], verbose=verbose)


@app.command()
def pretrain(
    name: Annotated[
        str | None, typer.Option(help="Run name (default train.name, else a timestamp); reuse it to resume.")
    ] = None,
    verbose: VerboseOpt = False,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Pretrain the JEPA on Ray Train workers under DeepSpeed ZeRO (resumes a run of the same name)."""
    from jepa_ray.train.trainer import run_name, run_url

    try:
        cfg = _setup(config, overrides)
        name = run_name(cfg, name)
        init_ray(cfg.ray_address, verbose)
        logs = _log_to(cfg, run_url(cfg, name), "pretrain")
        info = _run_pretrain(cfg, name, verbose)
    except JepaRayError as e:
        raise _fail(e) from None
    _print_run(info)
    console.print(f"  log: {logs}", highlight=False, soft_wrap=True)


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
        str | None,
        typer.Option(
            help="val_loss | lidar_context | lidar | rankme | probe_auroc | cindex (tune.objective; default: val_loss, see docs/sweeps.md)."
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted sweep: finished trials are not rerun.")
    ] = False,
    verbose: VerboseOpt = False,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Sweep masking and predictor settings with Ray Tune: each trial a pretraining run, ASHA
    stopping the poor ones early; writes a results table, best.yaml and a heat map."""
    from jepa_ray.train.trainer import run_url
    from jepa_ray.tune.space import check_space
    from jepa_ray.tune.sweep import sweep, sweep_name

    extra = [f"tune.num_samples={num_samples}"] if num_samples is not None else []
    extra += [f"tune.objective={objective}"] if objective is not None else []
    try:
        cfg = _setup(config, [*(overrides or []), *extra])
        check_space(cfg)  # before Ray starts: a bad value fails in a second
        name = sweep_name(cfg, name)
        init_ray(cfg.ray_address, verbose)
        logs = _log_to(cfg, run_url(cfg, name), "tune")
        info = sweep(cfg, name=name, resume=resume, verbose=verbose)
    except JepaRayError as e:
        raise _fail(e) from None
    _print_sweep(info)
    console.print(f"  log: {logs}", highlight=False, soft_wrap=True)


def _print_sweep(info) -> None:
    from rich import box

    rows = info.rows
    keys = [k for k in rows[0] if "." in k] if rows else []
    table = Table(title=f"sweep {info.name}", box=box.SIMPLE_HEAD)
    for name in ("trial", *(k.rsplit(".", 1)[-1] for k in keys)):
        table.add_column(name, no_wrap=True)
    for name, width in (("objective", 9), ("± SE", 6), ("steps", 5)):
        table.add_column(name, justify="right", no_wrap=True, min_width=width)
    table.add_column("status", no_wrap=True)

    def number(v: float | None, digits: int) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    for r in rows:
        best = info.best is not None and r["trial"] == info.best["trial"]
        status = {"ERROR": "error", "UNFINISHED": "unfinished"}.get(r["status"])
        status = status or ("early" if r["stopped_early"] else "done")
        table.add_row(
            ("* " if best else "  ") + str(r["trial"]),
            *(f"{r[k]:.4g}" if isinstance(r[k], float) else "-" if r[k] is None else str(r[k]) for k in keys),
            "collapsed" if r.get("collapsed") else number(r["objective"], 4),
            number(r.get("objective_se"), 4),
            str(r["steps"]),
            status,
        )
    console.print(table)
    console.print(
        "* best: the highest objective among the trials that ran the most steps; ± SE: its bootstrap "
        "standard error; early: stopped by ASHA; unfinished: the sweep was interrupted (--resume runs it on)"
    )
    if info.best is not None:
        from jepa_ray.tune.results import noise_line

        console.print(noise_line(info.gap))
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
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="jepa-ray (safetensors + JSON: context, target, predictor), hf (the target encoder as a "
            "transformers ViTModel directory) or timm (a directory timm.create_model('local-dir:<out>', "
            "pretrained=True) loads); for hf and timm --out is the directory.",
        ),
    ] = "jepa-ray",
    overrides: Overrides = None,
) -> None:
    """Consolidated fp32 context and target encoder weights from any ZeRO stage (safetensors + JSON),
    or the target encoder in Hugging Face transformers' (--format hf) or timm's (--format timm) ViT
    format."""
    import tempfile

    from jepa_ray.train.export import export as run_export

    try:
        if fmt not in ("jepa-ray", "hf", "timm"):
            raise JepaRayError(f"--format {fmt}: jepa-ray, hf or timm")
        cfg = _setup(config, overrides)
        if fmt in ("hf", "timm"):
            from jepa_ray.model.interop import export_hf, export_timm

            with tempfile.TemporaryDirectory(prefix="jepa-export-") as tmp:
                weights, _ = run_export(run, Path(tmp) / "encoder.safetensors", cfg.train.storage)
                (export_hf if fmt == "hf" else export_timm)(str(weights), str(out))
            if fmt == "hf":
                console.print(f"transformers ViTModel: {out} (ViTModel.from_pretrained)")
            else:
                console.print(
                    f"timm VisionTransformer: {out} (timm.create_model('local-dir:{out}', pretrained=True))"
                )
            return
        weights, info = run_export(run, out, cfg.train.storage)
        tracked = _log_export(run, cfg, [Path(weights), Path(info)])
    except JepaRayError as e:
        raise _fail(e) from None
    console.print(f"encoder weights: {weights}\nmodel description: {info}")
    if tracked:
        console.print(f"logged to MLflow run {tracked}")


def _log_export(run: str, cfg: Config, files: list[Path]) -> str | None:
    """The export's files into the run's MLflow run, when it was tracked (the run directory, or
    the checkpoint's run directory, records one)."""
    from jepa_ray.train.tracking import log_export

    for url in (run.rstrip("/"), run.rstrip("/").rsplit("/", 1)[0]):
        tracked = log_export(url, cfg.train.storage, files)
        if tracked:
            return tracked
    return None


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
    baseline: Annotated[
        list[str] | None,
        typer.Option(
            help="Another encoder (export, run or checkpoint) to compare with, e.g. an MAE trained on the "
            "same data (model.objective=mae); repeatable."
        ),
    ] = None,
    verbose: VerboseOpt = False,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Probes, kNN, cross-modal retrieval and time-to-event heads (four fusion strategies) on frozen
    embeddings, beside a random-init encoder, any --baseline encoder and a classical Cox model on
    raw EHR features; paired differences say which gaps are beyond noise."""
    from jepa_ray.eval.evaluate import evaluate as run_evaluate

    try:
        cfg = _setup(config, overrides)
        init_ray(cfg.ray_address, verbose)
        logs = _log_to(cfg, out, "evaluate")
        metrics = run_evaluate(
            encoder, data, cfg, out, latents=latents, baselines=baseline or [], verbose=verbose
        )
    except JepaRayError as e:
        raise _fail(e) from None
    _print_evaluation(metrics, out)
    console.print(f"log: {logs}", highlight=False, soft_wrap=True)


def _print_evaluation(metrics: dict, out: Path) -> None:
    from jepa_ray.eval.report import comparison, few_labels, summary

    for make, title in (
        (summary, "evaluation"),
        (comparison, "pretrained minus each other encoder (paired, 95% CI)"),
        (few_labels, "few labels: read-outs refit on a fraction of the labels (paired, 95% CI)"),
    ):
        header, rows = make(metrics)
        if not rows:
            continue
        table = Table(*header, title=title)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    console.print(f"report: {out / 'report.md'}  metrics: {out / 'metrics.json'}")


@app.command()
def index(
    encoder: Annotated[
        str,
        typer.Option(
            help="Exported encoder (.safetensors), or a run / checkpoint directory (local or s3://)."
        ),
    ],
    data: Annotated[str, typer.Option(help="Prepared shards (local or s3://) to index.")],
    out: Annotated[str, typer.Option(help="Index directory (local or s3://); a rerun adds what is new.")],
    modality: Annotated[
        str | None, typer.Option(help="image, ehr or joint (index.modality; default image).")
    ] = None,
    rebuild: Annotated[
        bool, typer.Option(help="Replace the index's vectors instead of adding to them.")
    ] = False,
    verbose: VerboseOpt = False,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Embed an archive's shards (Ray Data batch inference) into a similar-case index: FAISS,
    exact up to index.exact_max vectors, IVF above; each vector with its sample's safe metadata.
    A rerun embeds only the shards not indexed yet (or changed) and drops those the data lost."""
    from jepa_ray.search.index import build_index

    try:
        cfg = _setup(config, [*(overrides or []), *([f"index.modality={modality}"] if modality else [])])
        init_ray(cfg.ray_address, verbose)
        logs = _log_to(cfg, out, "index")
        r = build_index(encoder, data, out, cfg, rebuild=rebuild, verbose=verbose)
    except JepaRayError as e:
        raise _fail(e) from None
    console.print(
        f"index {r.url}: {r.vectors} vectors ({r.kind}); added {r.added} from {len(r.shards_embedded)} "
        f"shard(s), removed {r.removed}; {r.seconds:.1f} s\nlog: {logs}",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def search(
    index_url: Annotated[str, typer.Option("--index", help="Index directory (local or s3://).")],
    dicom: Annotated[Path | None, typer.Option(help="A DICOM file to find similar cases to.")] = None,
    key: Annotated[
        str | None, typer.Option(help="A sample of the index (its key) to find similar cases to.")
    ] = None,
    k: Annotated[int | None, typer.Option(help="Neighbours to return (index.k; default 10).")] = None,
    where: Annotated[
        str | None,
        typer.Option(
            help='Metadata filter: column = value, !=, in (a, b), joined by and; e.g. "split = test".'
        ),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the result as JSON here.")
    ] = None,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """The k nearest cases of an index to a DICOM file (decoded as `prepare` decodes, embedded by
    the index's encoder) or to one of its samples, with cosine distances and safe metadata."""
    from jepa_ray.search.query import open_index, search_vectors, site_of_key, vector_of_dicom, vector_of_key

    try:
        cfg = _setup(config, overrides)
        if (dicom is None) == (key is None):
            raise JepaRayError("give one query: --dicom FILE or --key KEY")
        idx = open_index(index_url, cfg.train.storage, cfg.index.nprobe)
        if key is not None:
            vector, query = vector_of_key(idx, key), {"key": key, "site": site_of_key(idx, key)}
        else:
            vector, safe = vector_of_dicom(idx, str(dicom), cfg)
            query = {"dicom": dicom.name, **safe}
        [hits] = search_vectors(
            idx, vector[None], k or cfg.index.k, where, exclude=[key] if key else None, sites=[query["site"]]
        )
    except JepaRayError as e:
        raise _fail(e) from None
    doc = {"index": index_url, "query": query, "where": where, "neighbours": hits}
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(doc, indent=1) + "\n")
    columns = ["key", "distance", "subject", "split", "site", "modality", "view"]
    labels = sorted({c for h in hits for c in h if c.startswith("label_")})
    table = Table(*columns, *labels, title=f"{len(hits)} nearest to {query.get('key') or query.get('dicom')}")
    for h in hits:
        table.add_row(
            *[f"{h[c]:.4f}" if c == "distance" else str(h.get(c, "")) for c in columns],
            *[str(h.get(c, "")) for c in labels],
        )
    console.print(table)
    if json_out is not None:
        console.print(f"json: {json_out}", highlight=False, soft_wrap=True)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Directory for the cohort, shards, run and export.")] = Path(
        "demo"
    ),
    config: Annotated[
        Path,
        typer.Option(
            "--config",
            "-c",
            help="YAML config: a path, or the name of one shipped with jepa-ray (demo-cpu.yaml, "
            "ct-demo.yaml, mixed-demo.yaml).",
        ),
    ] = Path("demo-cpu.yaml"),
    mae: Annotated[
        bool,
        typer.Option(help="Also pretrain the reconstruction baseline (model.objective=mae) and compare."),
    ] = True,
    verbose: VerboseOpt = False,
    overrides: Overrides = None,
) -> None:
    """synth -> prepare -> pretrain the JEPA (2 workers, ZeRO-2, tiny model) and, with the same data,
    masks and steps, the MAE baseline -> export -> evaluate both beside a random init, on a local Ray."""
    import os

    from jepa_ray.eval.evaluate import evaluate as run_evaluate
    from jepa_ray.ingest.deid import write_salt
    from jepa_ray.ingest.prepare import prepare as run_prepare
    from jepa_ray.synth.cohort import cohort_inputs, write_cohort
    from jepa_ray.train.export import export as run_export

    try:
        if not os.environ.get("JEPA_RAY_SALT"):  # the demo's own random salt, beside its shards
            salt_file = out / "salt"
            if not salt_file.exists():
                out.mkdir(parents=True, exist_ok=True)
                write_salt(salt_file)
            os.environ["JEPA_RAY_SALT"] = salt_file.read_text().strip()
        cfg = _setup(config, [f"train.storage_path={out / 'runs'}", *(overrides or [])])
        logs = _log_to(cfg, out, "demo")
        cohort, shards = out / "cohort", out / "shards"
        steps = 6 if mae else 5
        if not (cohort / "latents.parquet").exists():
            console.print(f"[bold]1/{steps} synth[/] {cfg.synth.subjects} subjects -> {cohort}")
            write_cohort(cohort, cfg.synth)
        init_ray(cfg.ray_address, verbose)
        console.print(f"[bold]2/{steps} prepare[/] -> {shards}")
        masks = cohort / "masks"  # the phantoms' ground truth: the evaluation's segmentation heads
        result = run_prepare(
            str(shards),
            cfg.prepare,
            **cohort_inputs(cohort),
            masks=str(masks) if masks.is_dir() else None,
            show_progress=True,
        )
        if not result.ok:
            raise JepaRayError("prepare failed: " + "; ".join(result.problems))
        cfg.train.shards = str(shards)
        name = time.strftime("demo-%Y%m%d-%H%M%S")
        console.print(
            f"[bold]3/{steps} pretrain[/] the JEPA: {cfg.train.num_workers} workers, "
            f"ZeRO-{cfg.train.zero_stage}, {cfg.train.steps} steps"
        )
        info = _run_pretrain(cfg, name, verbose, "JEPA")
        runs = {"encoder": info}
        if mae:
            console.print(f"[bold]4/{steps} pretrain[/] the MAE baseline: the same data, masks and steps")
            runs["mae"] = _run_pretrain(_with_objective(cfg, "mae"), name + "-mae", verbose, "MAE")
        console.print(f"[bold]{steps - 1}/{steps} export[/]")
        exports = {k: run_export(r.run_url, out / f"{k}.safetensors") for k, r in runs.items()}
        console.print(f"[bold]{steps}/{steps} evaluate[/] -> {out / 'eval'}")
        metrics = run_evaluate(
            str(exports["encoder"][0]),
            str(shards),
            cfg,
            out / "eval",
            latents=str(cohort / "latents.parquet"),
            baselines=[str(exports["mae"][0])] if mae else [],
            verbose=verbose,
        )
    except JepaRayError as e:
        raise _fail(e) from None
    console.print(f"shards: {shards}")
    for kind, run in runs.items():
        _print_run(run)
        console.print(f"  {kind}: {exports[kind][0]} ({exports[kind][1]})")
    _print_evaluation(metrics, out / "eval")
    console.print(f"log: {logs}", highlight=False, soft_wrap=True)


def _with_objective(cfg: Config, objective: str) -> Config:
    """The same run config with another model.objective."""
    copy = cfg.model_copy(deep=True)
    copy.model.objective = objective
    return copy


# --- Ray Jobs: submit to a cluster, follow, list, stop ---------------------------------------

AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="The cluster's job API, e.g. http://127.0.0.1:8265 (default: RAY_ADDRESS, else that).",
    ),
]
InsecureOpt = Annotated[
    bool,
    typer.Option(
        "--insecure-http",
        help="Send the Ray token over plain http to another machine (in clear text); by default only "
        "https or a loopback address such as a tunnel's http://127.0.0.1:8265 get it.",
    ),
]


def _jobs(address: str | None, insecure_http: bool = False):
    from jepa_ray.submit import Jobs

    return Jobs(address, insecure_http=insecure_http)


@app.command(context_settings={"allow_interspersed_args": False})
def submit(
    command: Annotated[
        list[str],
        typer.Argument(help="After --: the entrypoint (pretrain|tune|evaluate|prepare|bench) and its args."),
    ],
    address: AddressOpt = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Stream the job's logs until it ends; exit with its status.")
    ] = False,
    working_dir: Annotated[
        Path | None,
        typer.Option(help="Checkout to upload as the job's working directory (default: this checkout)."),
    ] = None,
    installed: Annotated[
        bool,
        typer.Option(
            "--installed", help="Upload nothing: run the jepa-ray installed on the cluster (or image)."
        ),
    ] = False,
    pip: Annotated[
        Path | None,
        typer.Option(help="Pinned requirements file (name==version lines) installed for the job."),
    ] = None,
    image: Annotated[str | None, typer.Option(help="Container image the job runs in (image_uri).")] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", help="NAME=value for the job's environment (repeatable).")
    ] = None,
    submission_id: Annotated[
        str | None, typer.Option(help="Submission id (default: jepa-ray-<command>-<time>-<random>).")
    ] = None,
    insecure_http: InsecureOpt = False,
) -> None:
    """Submit a jepa-ray entrypoint as a Ray job: `jepa-ray submit [--wait] -- pretrain --config F`.
    Prints what it uploads and the submission id; with --wait, streams the logs and exits 0 only when
    the job SUCCEEDED."""
    from jepa_ray.redact import redact_text
    from jepa_ray.submit import job_spec
    from jepa_ray.upload import checkout_root

    try:
        if installed and working_dir is not None:
            raise JepaRayError("--installed and --working-dir exclude each other")
        wd = None if installed else (working_dir or checkout_root())
        if wd is None and not installed:
            raise JepaRayError(
                "jepa-ray runs from an installed package, not a checkout: pass --working-dir <checkout> "
                "to upload one, or --installed to run the jepa-ray installed on the cluster"
            )
        spec = job_spec(
            command[0], command[1:], wd, pip=pip, image=image, env=env or [], submission_id=submission_id
        )
        if spec.upload is not None:
            err.print(spec.upload.summary(), highlight=False, markup=False)
            for warning in spec.upload.warnings():
                err.print(f"[bold yellow]warning:[/] {warning}", highlight=False)
        jobs = _jobs(address, insecure_http)
        sid = jobs.submit(spec)
    except JepaRayError as e:
        raise _fail(e) from None
    console.print(
        f"submitted {sid} to {jobs.url}: {redact_text(spec.entrypoint)}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    if not wait:
        console.print(f"follow it with: jepa-ray jobs logs {sid} --follow", highlight=False, soft_wrap=True)
        return
    raise typer.Exit(_follow(jobs, sid))


def _follow(jobs, sid: str) -> int:
    """Stream a job's logs to stdout until it ends; 0 when it SUCCEEDED, 1 when not."""
    from jepa_ray.redact import redact_text
    from jepa_ray.submit import log_tail, status_name

    try:
        info = jobs.follow(sid, lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    except KeyboardInterrupt:
        err.print(f"stopped following; the job goes on: jepa-ray jobs stop {sid}", highlight=False)
        return 130
    except JepaRayError as e:
        raise _fail(e) from None
    status = status_name(info)
    if status == "SUCCEEDED":
        console.print(f"job {sid} SUCCEEDED", highlight=False, soft_wrap=True)
        return 0
    # Ray's message repeats the logs after its first line; the tail below is enough
    reason = redact_text(info.message or "").split(", last available logs", 1)[0].splitlines()[:1]
    err.print(f"[bold red]job {sid} {status}:[/] {' '.join(reason)}", highlight=False)
    tail = log_tail(jobs.logs(sid))
    if tail:
        err.print(f"last lines of its logs:\n{tail}", highlight=False, markup=False)
    return 1


bench_app = typer.Typer(
    no_args_is_help=True, help="Measure this cluster with a config: training scaling, the input pipeline."
)
app.add_typer(bench_app, name="bench")
BenchOut = Annotated[Path, typer.Option("--out", help="Directory for the table, JSON and PNG.")]


@bench_app.command("train")
def bench_train(
    workers: Annotated[str, typer.Option(help="Worker counts to run, comma-separated: 1,2,4,8.")] = "1,2",
    steps: Annotated[
        int, typer.Option(help="Optimizer steps per run (the first interval is start-up).")
    ] = 30,
    out: BenchOut = Path("bench"),
    verbose: VerboseOpt = False,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Short pretraining runs of the config at each worker count on the current Ray cluster:
    samples/s, per worker, scaling efficiency, data wait, time per step in each phase, peak memory
    per rank, MFU on GPUs; writes bench-train.{txt,json,png} to --out."""
    from jepa_ray.bench import bench_train as run
    from jepa_ray.bench import parse_workers

    try:
        cfg = _setup(config, overrides)
        sizes = parse_workers(workers)
        init_ray(cfg.ray_address, verbose)
        logs = _log_to(cfg, out, "bench-train")
        doc = run(cfg, sizes, steps, out, verbose)
    except JepaRayError as e:
        raise _fail(e) from None
    console.print(doc["table"], highlight=False, markup=False)
    console.print(
        f"  written: {out}/bench-train.txt, .json, .png; log: {logs}", highlight=False, soft_wrap=True
    )


@bench_app.command("stream")
def bench_stream(
    samples: Annotated[int, typer.Option(help="Samples to read after the first batch.")] = 2000,
    out: BenchOut = Path("bench"),
    verbose: VerboseOpt = False,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """The training input pipeline alone on the current Ray cluster: samples/s, per CPU, and the
    share of the decode limit (one process decoding the same samples); writes bench-stream.*."""
    from jepa_ray.bench import bench_stream as run

    try:
        cfg = _setup(config, overrides)
        init_ray(cfg.ray_address, verbose)
        logs = _log_to(cfg, out, "bench-stream")
        doc = run(cfg, samples, out, verbose)
    except JepaRayError as e:
        raise _fail(e) from None
    console.print(doc["table"], highlight=False, markup=False)
    console.print(
        f"  written: {out}/bench-stream.txt, .json, .png; log: {logs}", highlight=False, soft_wrap=True
    )


salt_app = typer.Typer(no_args_is_help=True, help="The de-identification salt.")
app.add_typer(salt_app, name="salt")


@salt_app.command("new")
def salt_new(
    path: Annotated[Path, typer.Argument(help="File to create (never overwritten), readable by you only.")],
) -> None:
    """Write a new random salt (32 bytes, hex) to FILE with mode 0600. Keep it outside the shards and
    the checkout; `prepare` reads it with deid.salt_file=FILE (or its content in $JEPA_RAY_SALT)."""
    from jepa_ray.ingest.deid import write_salt

    try:
        written = write_salt(path)
    except FileExistsError:
        raise _fail(
            JepaRayError(f"{path}: exists; a salt is never overwritten (its pseudonyms would change)")
        ) from None
    except OSError as e:
        raise _fail(JepaRayError(f"{path}: cannot write the salt: {e.strerror}")) from None
    console.print(f"wrote a new salt to {written} (mode 0600): prepare.deid.salt_file={written}")


jobs_app = typer.Typer(no_args_is_help=True, help="Ray jobs on a cluster: list, status, logs, stop.")
app.add_typer(jobs_app, name="jobs")


@jobs_app.command("list")
def jobs_list(address: AddressOpt = None, insecure_http: InsecureOpt = False) -> None:
    """Every job the cluster knows, newest first (secrets in entrypoints masked)."""
    from jepa_ray.redact import redact_text
    from jepa_ray.submit import status_name

    try:
        jobs = _jobs(address, insecure_http)
        rows = jobs.list()
    except JepaRayError as e:
        raise _fail(e) from None
    rows = sorted(rows, key=lambda i: i.start_time or 0, reverse=True)
    ids = [info.submission_id or info.job_id or "-" for info in rows]
    width = max([len("submission id"), *map(len, ids)])
    console.print(f"jobs at {jobs.url}: {len(rows)}", highlight=False)
    console.print(
        f"{'submission id':<{width}}  {'status':<9}  {'started':<19}  entrypoint",
        highlight=False,
        soft_wrap=True,
    )
    for sid, info in zip(ids, rows, strict=True):
        started = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.start_time / 1000))
            if info.start_time
            else "-"
        )
        line = f"{sid:<{width}}  {status_name(info):<9}  {started:<19}  {redact_text(info.entrypoint or '')}"
        console.print(line, highlight=False, markup=False, soft_wrap=True)


@jobs_app.command("status")
def jobs_status(
    job: Annotated[str, typer.Argument(help="Submission id.")],
    address: AddressOpt = None,
    insecure_http: InsecureOpt = False,
) -> None:
    """A job's status, message, times, runtime environment and metadata, with environment variable
    values and secret-looking arguments masked; exit 1 when it FAILED or was STOPPED."""
    from jepa_ray.submit import describe_job, status_name

    try:
        info = _jobs(address, insecure_http).info(job)
    except JepaRayError as e:
        raise _fail(e) from None
    for line in describe_job(job, info):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    if status_name(info) in ("FAILED", "STOPPED"):
        raise typer.Exit(1)


@jobs_app.command("logs")
def jobs_logs(
    job: Annotated[str, typer.Argument(help="Submission id.")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep streaming until the job ends.")
    ] = False,
    address: AddressOpt = None,
    insecure_http: InsecureOpt = False,
) -> None:
    """A job's logs (stdout and stderr of its driver); --follow streams them and exits with its status."""
    try:
        jobs = _jobs(address, insecure_http)
        if not follow:
            sys.stdout.write(jobs.logs(job))
            return
    except JepaRayError as e:
        raise _fail(e) from None
    raise typer.Exit(_follow(jobs, job))


@jobs_app.command("stop")
def jobs_stop(
    job: Annotated[str, typer.Argument(help="Submission id.")],
    wait_s: Annotated[float, typer.Option("--wait-s", help="Seconds to wait for it to stop.")] = 60.0,
    address: AddressOpt = None,
    insecure_http: InsecureOpt = False,
) -> None:
    """Stop a running job (its driver, and with it its Ray Train workers) and wait until it has."""
    from jepa_ray.submit import TERMINAL, status_name

    try:
        jobs = _jobs(address, insecure_http)
        jobs.stop(job)
        deadline = time.monotonic() + wait_s
        while (status := status_name(jobs.info(job))) not in TERMINAL and time.monotonic() < deadline:
            time.sleep(0.5)
    except JepaRayError as e:
        raise _fail(e) from None
    console.print(f"{job}: {status}", highlight=False)
    if status not in TERMINAL:
        err.print(f"[bold red]error:[/] {job} is still {status} after {wait_s:.0f} s")
        raise typer.Exit(1)
