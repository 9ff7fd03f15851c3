"""`prepare`: DICOM studies + MEDS EHR → de-identified, paired webdataset shards and a manifest.

Steps: read the EHR tables (driver) · scan DICOM headers (Ray tasks) · link images to subjects and
group them into studies · assign subject-level splits · fit the EHR vocabulary on the training
split · plan shards · decode images and write shards (Ray tasks, skipping finished shards) ·
write `manifest.json`. Every rejected input is recorded with its reason; nothing is dropped silently.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from jepa_ray.config import PrepareConfig
from jepa_ray.errors import PrepareError
from jepa_ray.ingest import ehr as ehrlib
from jepa_ray.ingest.deid import Pseudonymizer
from jepa_ray.ingest.listing import Listing, Unread, entry_kind, list_files, printable_path
from jepa_ray.ingest.quarantine import dicom_record
from jepa_ray.ingest.tasks import TaskMap, crashed_scan, scan_headers, write_shards
from jepa_ray.ingest.vocab import fit_vocab, subject_ehr
from jepa_ray.ingest.write import PARTS_DIR, SampleSpec, read_sidecar, shard_fingerprint
from jepa_ray.shards.format import dumps
from jepa_ray.shards.manifest import MANIFEST, build_manifest, read_manifest
from jepa_ray.storage import Store

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "external")
_FRONTAL = {"PA": 0, "AP": 1}
_EST_EHR_BYTES = 8_192


@dataclass
class PrepareResult:
    """What `prepare` did: the manifest it wrote and whether the run counts as a success."""

    manifest: dict[str, Any]
    written: int
    skipped: int
    ok: bool
    problems: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per phase


class _Clock:
    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self._t
        self._t = now


def _to_us(t: datetime | None) -> int | None:
    return None if t is None else int(np.datetime64(t, "us").astype(np.int64))


def _drop_pixel_text_risks(headers: list[Any], cfg: PrepareConfig, quarantine: list, name) -> list[Any]:
    """Quarantine images that may carry identifying text in their pixels (deid.burned_in,
    deid.secondary_capture); return the rest."""
    kept = []
    for h in headers:
        reason = None
        if cfg.deid.burned_in == "quarantine" and h.safe.get("burned_in") == "YES":
            reason = ("burned_in_annotation", "BurnedInAnnotation is YES: text is drawn into the pixels")
        elif cfg.deid.secondary_capture == "quarantine" and "Secondary Capture" in (
            h.safe.get("sop_class") or ""
        ):
            reason = ("secondary_capture", f"{h.safe['sop_class']}: screenshots and scans often show text")
        if reason is None:
            kept.append(h)
        else:
            quarantine.append(dicom_record(name(h), *reason))
    return kept


def _rank_images(headers: list[Any]) -> list[Any]:
    """A study's images in order of preference: frontal (PA, then AP), then by path."""
    return sorted(headers, key=lambda h: (_FRONTAL.get(h.safe.get("view") or "", 9), h.path))


@dataclass
class _Records:
    """The quarantine and skip records of one run, and how an input file is named in them."""

    name_input: Any  # relative path -> the name written (a salted hash, or the path as text)
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)


def prepare(
    out: str,
    cfg: PrepareConfig,
    *,
    dicom: str | None = None,
    meds: str | None = None,
    static: str | None = None,
    outcomes: str | None = None,
    masks: str | None = None,
    show_progress: bool = False,
) -> PrepareResult:
    """Ingest DICOM + MEDS into shards under `out` (local dir or s3://); resumable and idempotent.
    `masks`: an annotation export's structure masks (`jepa_ray.ingest.masks`), kept for evaluation."""
    _check_inputs(cfg.ehr.id_map, dicom=dicom, meds=meds, static=static, outcomes=outcomes, masks=masks)
    pz = Pseudonymizer(cfg.deid.resolve_salt())
    store = _open_output(out, cfg, pz)
    records = _Records(pz.path if cfg.deid.input_paths == "hashed" else printable_path)
    clock = _Clock()

    # the header scan runs as Ray tasks while the driver reads the EHR
    dicom_root = Path(dicom).resolve() if dicom else None
    listing = _dicom_files(dicom_root, dicom)
    files = listing.files
    n_files = len(files) + _record_unread(listing.unread, dicom_root, records)
    scan = _start_scan(files, cfg, show_progress)
    tables, id_map = _read_ehr(cfg, meds=meds, static=static, outcomes=outcomes)
    clock.lap("ehr")
    headers = _collect_headers(scan, dicom_root, records)
    clock.lap("scan")

    # a static table alone (a registry: one row per patient) is the cohort; beside DICOM or MEDS,
    # its rows of subjects found in neither are orphans (a mistyped id), as outcome rows are
    cohort = set(tables.static) if dicom is None and meds is None else set()
    samples, vocab, stats, ehr_info = _link_and_split(
        pz, cfg, headers, tables, id_map, dicom_root, records, cohort
    )
    del tables, headers  # raw identifiers stay in memory no longer than needed
    allowed = _attach_masks(samples, masks, dicom_root, files)

    plan = _plan_shards(samples, cfg)
    todo, written = _shards_to_write(store, plan, cfg, vocab, pz)
    clock.lap("plan")
    # the writers are Ray tasks, whose working directory is not this process's: an absolute location
    _write(store, todo, written, plan, cfg, store.uri("").rstrip("/"), show_progress, allowed)
    clock.lap("write")

    manifest = _write_manifest(store, plan, written, vocab, cfg, pz, records, n_files, ehr_info, stats)
    clock.lap("manifest")
    logger.info("prepare phases (s): %s", ", ".join(f"{k} {v:.2f}" for k, v in clock.laps.items()))
    result = _judge(manifest, cfg, written=len(todo), skipped=len(plan) - len(todo))
    result.seconds = clock.laps
    return result


def _attach_masks(samples: list[SampleSpec], masks: str | None, dicom_root: Path | None, files: list[str]):
    """Each sample's DICOM paths that have a mask folder under `masks`; the structures allowed."""
    if masks is None or dicom_root is None:
        return None
    from jepa_ray.ingest.masks import allowed_names, mask_dirs

    root = Path(masks).resolve()
    found = mask_dirs(dicom_root, root, files)
    for s in samples:
        s.masks = {p: found[p] for p, _ in s.dicoms if p in found} or None
    logger.info("masks: %d of %d DICOM files have a mask folder under %s", len(found), len(files), masks)
    return allowed_names(root)


def _check_inputs(id_map: str | None = None, **inputs: str | None) -> None:
    """Each input given exists and is a file or folder: a named pipe (or a link to one) is refused
    unopened, since opening it for reading waits for a writer, maybe forever."""
    if inputs["dicom"] is None and inputs["meds"] is None and inputs["static"] is None:
        raise PrepareError("nothing to ingest: give --dicom, --meds and/or --static")
    for label, path in [*((f"--{k}", v) for k, v in inputs.items()), ("prepare.ehr.id_map", id_map)]:
        if path is not None and not Path(path).exists():
            raise PrepareError(f"{label} {path}: no such file or directory")
        if path is not None and not (Path(path).is_file() or Path(path).is_dir()):
            what = entry_kind(os.stat(path).st_mode)
            raise PrepareError(f"{label} {printable_path(path)}: {what}, not a file or folder: never opened")


def _open_output(out: str, cfg: PrepareConfig, pz: Pseudonymizer) -> Store:
    """The output store; refused when it holds shards pseudonymised with another salt."""
    store = Store(out, cfg.storage)
    store.makedirs()
    previous = read_manifest(store, missing_ok=True)
    if previous is not None and not pz.matches(previous.get("salt_fingerprint")):
        raise PrepareError(
            f"{out}: holds shards pseudonymised with another salt; use a new output location "
            "(mixing salts would give one subject two ids)"
        )
    return store


def _dicom_files(root: Path | None, given: str | None) -> Listing:
    """The files under --dicom (`jepa_ray.ingest.listing`: regular files, links followed once),
    and the entries not read; --dicom may also name one file."""
    if root is None:
        return Listing()
    if not root.is_dir():
        return Listing(files=[str(root)])  # the header scan refuses anything but a regular file
    try:
        return list_files(root)
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise PrepareError(
            f"--dicom {printable_path(given or str(root))}: cannot list the folder ({why})"
        ) from None


def _record_unread(unread: list[Unread], root: Path | None, records: _Records) -> int:
    """Record the entries under --dicom that are not read: quarantined (kind `dicom` for a file,
    `dicom_folder` for a folder that cannot be listed), or skipped when read under another path.
    Returns how many files were quarantined (they count among the DICOM inputs)."""
    files = 0
    for u in unread:
        name = records.name_input(_rel(u.path, root))
        if not u.quarantined:
            first = records.name_input(_rel(u.same_as, root)) if u.same_as else None
            detail = f"{u.detail} ({first})" if first else u.detail
            records.skipped.append({"input": name, "reason": u.reason, "detail": detail})
            continue
        kind = "dicom" if u.what == "file" else "dicom_folder"
        records.quarantine.append({"input": name, "kind": kind, "reason": u.reason, "detail": u.detail})
        files += u.what == "file"
    quarantined = Counter(u.reason for u in unread if u.quarantined)
    if quarantined:
        logger.warning(
            "under --dicom, not read: %s (recorded in the manifest's quarantine)",
            ", ".join(f"{n} {reason}" for reason, n in sorted(quarantined.items())),
        )
    return files


def _start_scan(files: list[str], cfg: PrepareConfig, show_progress: bool) -> TaskMap:
    step = cfg.files_per_task
    return TaskMap(
        scan_headers,
        [files[i : i + step] for i in range(0, len(files), step)],
        "scan DICOM",
        show_progress,
        args=(cfg.limits,),
        on_failure=crashed_scan,
    )


def _read_ehr(
    cfg: PrepareConfig, *, meds: str | None, static: str | None, outcomes: str | None
) -> tuple[ehrlib.EhrTables, dict | None]:
    e = cfg.ehr
    tables = ehrlib.read_meds(meds, e.max_age_years) if meds is not None else ehrlib.EhrTables()
    if static is not None:
        ehrlib.read_static(static, tables, e.static_numeric, e.static_categorical, e.max_age_years)
    if outcomes is not None:
        ehrlib.read_outcomes(outcomes, tables)
    id_map = ehrlib.read_id_map(cfg.ehr.id_map) if cfg.ehr.id_map else None
    return tables, id_map


def _collect_headers(scan: TaskMap, dicom_root: Path | None, records: _Records) -> list[Any]:
    """The scanned headers; the files that could not be read go to quarantine, named as inputs are."""
    headers: list[Any] = []
    for item in (x for chunk in scan.results() for x in chunk):
        if isinstance(item, dict):  # a quarantine record whose input is the file's path
            records.quarantine.append({**item, "input": records.name_input(_rel(item["input"], dicom_root))})
        else:
            headers.append(item)
    return headers


def _link_and_split(
    pz: Pseudonymizer,
    cfg: PrepareConfig,
    headers: list[Any],
    tables: ehrlib.EhrTables,
    id_map: dict | None,
    dicom_root: Path | None,
    records: _Records,
    cohort: set[str] = frozenset(),
) -> tuple[list[SampleSpec], Any, dict[str, int], dict[str, Any]]:
    """Link images to subjects, group them into studies, split by subject, fit the vocabulary on
    the training split, and describe every sample: (samples, vocab, stats, the manifest's EHR info).
    `cohort`: subjects known without images or MEDS events (a static table given alone)."""

    def name_of(h: Any) -> str:
        return records.name_input(_rel(h.path, dicom_root))

    headers = _drop_pixel_text_risks(headers, cfg, records.quarantine, name_of)
    for h in (h for h in headers if not h.patient_id):
        records.quarantine.append(
            dicom_record(
                name_of(h),
                "no_patient_id",
                "PatientID is empty: the image cannot be given a subject-level split",
            )
        )
    chosen = _group_studies([h for h in headers if h.patient_id], id_map)
    imaged_subjects = {sk[0] for sk in chosen}
    _quarantine_unknown(tables, imaged_subjects | set(tables.events) | cohort, records.quarantine)
    ehr_subjects = tables.subjects()
    subject_split = _assign_splits(pz, cfg, chosen, imaged_subjects | ehr_subjects)
    train = {s for s, sp in subject_split.items() if sp == "train"}
    vocab = fit_vocab(tables, train, cfg.ehr.min_code_count, cfg.ehr.min_subjects, cfg.ehr.max_age_years)
    stats: dict[str, int] = defaultdict(int)
    ctx = _SampleContext(pz, cfg, tables, vocab, subject_split, stats)
    samples = [
        _study_sample(ctx, subject, hs, name_of)
        for (subject, _), hs in sorted(chosen.items(), key=lambda kv: kv[1][0].path)
    ]
    for subject in sorted(ehr_subjects - {s for s, _ in chosen}):
        sample = _ehr_only_sample(ctx, subject)
        if sample is None:
            records.skipped.append(
                {
                    "input": "ehr",
                    "reason": "no_ehr_before_index",
                    "detail": "an EHR-only subject with no event before its index time",
                }
            )
        else:
            samples.append(sample)
    ehr_info = {
        "event_files": tables.event_files,
        "event_rows": tables.event_rows,
        "subjects": len(ehr_subjects),
        "labels": tables.label_names,
        "time_to_event": tables.tte_names,
        "ignored_columns": tables.ignored_columns,
        "dropped_columns": tables.dropped_columns,  # identifiers / free text: never copied
        "dropped_codes": tables.dropped_codes,  # free-text, personal, over-cap age codes, by reason: counts only
    }
    for q in tables.quarantine:
        record = q.to_json()
        record["input"] = records.name_input(record["input"])
        records.quarantine.append(record)
    for u in tables.skipped:  # a second path to a MEDS file: read once, under the first
        detail = f"{u.detail} ({records.name_input(u.same_as)})"
        records.skipped.append({"input": records.name_input(u.path), "reason": u.reason, "detail": detail})
    return samples, vocab, dict(stats), ehr_info


@dataclass
class _SampleContext:
    """What describing a sample needs: pseudonyms, settings, the EHR and its vocabulary, the splits."""

    pz: Pseudonymizer
    cfg: PrepareConfig
    tables: ehrlib.EhrTables
    vocab: Any
    split: dict[str, str]
    stats: dict[str, int]

    def ehr(self, subject: str, t: int | None) -> dict[str, Any] | None:
        e = self.cfg.ehr
        return subject_ehr(
            self.tables,
            self.vocab,
            subject,
            t,
            max_events=e.max_events,
            time_resolution_days=e.time_resolution_days,
            max_age_years=e.max_age_years,
        )

    def meta(self, subject: str, t: int | None, how: str) -> dict[str, Any]:
        outcome = self.tables.outcomes.get(subject)
        return _sample_meta(self.pz, subject, self.split[subject], outcome, t, how, self.stats)


def _study_sample(ctx: _SampleContext, subject: str, hs: list[Any], name_of: Any) -> SampleSpec:
    """A study's sample: its images (best first), the subject's EHR before the study time."""
    h = hs[0]
    t = _to_us(h.study_time)
    ctx.stats["undated_studies"] += t is None
    meta = ctx.meta(subject, t, "study")
    meta["site"] = ctx.pz.site(h.institution)
    return SampleSpec(
        key=ctx.pz.study(subject, h.study_uid or h.sop_uid or h.path),
        split=ctx.split[subject],
        dicoms=[(x.path, name_of(x)) for x in hs],
        ehr=ctx.ehr(subject, t),
        meta=meta,
        kind=_study_kind(hs),
    )


def _ehr_only_sample(ctx: _SampleContext, subject: str) -> SampleSpec | None:
    """A subject without images, indexed by `_ehr_only_index`; None when no event precedes it."""
    t, how = _ehr_only_index(ctx.tables, subject)
    arrays = ctx.ehr(subject, t)
    if arrays is None:
        return None
    meta = ctx.meta(subject, t, how)
    meta["site"] = "site-unknown"
    return SampleSpec(
        key="x" + ctx.pz.subject(subject)[1:], split=ctx.split[subject], dicoms=[], ehr=arrays, meta=meta
    )


def _shards_to_write(
    store: Store,
    plan: list[tuple[str, str, list[SampleSpec]]],
    cfg: PrepareConfig,
    vocab: Any,
    pz: Pseudonymizer,
) -> tuple[list[tuple[str, str, str, list[SampleSpec]]], dict[str, dict[str, Any]]]:
    """(shards still to write, sidecars of those a previous run finished and that are intact)."""
    context = {
        "image": cfg.image.model_dump(mode="json"),
        "limits": cfg.limits.model_dump(mode="json"),
        "max_events": cfg.ehr.max_events,
        "vocab": vocab.to_json(),
        "salt": pz.fingerprint(),
        **({"volume": cfg.volume.model_dump(mode="json")} if cfg.volume.enabled else {}),
    }
    todo, written = [], {}
    for name, split, specs in plan:
        fp = shard_fingerprint(name, specs, context)
        side = read_sidecar(store, name)
        if side is not None and side.get("fingerprint") == fp and _intact(store, side):
            written[name] = side
        else:
            todo.append((name, split, fp, specs))
    logger.info("%d shards planned, %d already written, %d to write", len(plan), len(written), len(todo))
    return todo, written


def _write(
    store: Store,
    todo: list[tuple[str, str, str, list[SampleSpec]]],
    written: dict[str, dict[str, Any]],
    plan: list[tuple[str, str, list[SampleSpec]]],
    cfg: PrepareConfig,
    out: str,
    show_progress: bool,
    allowed_masks: set[str] | None = None,
) -> None:
    """Decode and write the shards to do (Ray tasks), then remove shards no longer planned. From
    here until the new manifest is written the old one no longer describes the shards: it is
    removed first, so nothing reads a half-rewritten set as if it were the old one."""
    store.remove(MANIFEST)
    failures = write_shards(todo, cfg, out, written, show_progress, allowed_masks=allowed_masks)
    _remove_stale(store, {name for name, _, _ in plan})
    if failures:
        raise PrepareError(
            f"{len(failures)} shard(s) failed: "
            + "; ".join(f"{n}: {e}" for n, e in failures[:5])
            + f". The other shards are kept: rerun the same command to resume ({out})."
        )


def _write_manifest(
    store: Store,
    plan: list[tuple[str, str, list[SampleSpec]]],
    written: dict[str, dict[str, Any]],
    vocab: Any,
    cfg: PrepareConfig,
    pz: Pseudonymizer,
    records: _Records,
    n_files: int,
    ehr_info: dict[str, Any],
    stats: dict[str, int],
) -> dict[str, Any]:
    """The manifest, written last: it describes the shards only once they are all there."""
    ordered = [written[name] for name, _, _ in plan]
    for r in ordered:
        records.quarantine.extend(r["quarantine"])
        records.skipped.extend(r["skipped"])
    # external sites may be given by institution name: only their pseudonyms are written out
    safe_cfg = cfg.model_copy(deep=True)
    safe_cfg.split.external_sites = sorted(_external_sites(pz, cfg))
    manifest = build_manifest(
        shards=ordered,
        vocab=vocab,
        cfg=safe_cfg,
        salt_fingerprint=pz.fingerprint(),
        quarantine=records.quarantine,
        skipped=records.skipped,
        inputs={"dicom_files": n_files, "ehr": ehr_info},
        extra=stats,
    )
    store.write_bytes(MANIFEST, dumps(manifest))
    return manifest


def _intact(store: Store, side: dict[str, Any]) -> bool:
    """Whether a finished shard is on disk exactly as its sidecar recorded (size, then sha256): a
    shard damaged since is rewritten, not trusted."""
    name = side.get("name", "")
    try:
        if not store.exists(name) or store.fs.size(store.path(name)) != side.get("bytes"):
            return False
        digest = store.sha256(name)
    except OSError:
        return False
    if digest != side.get("sha256"):
        logger.warning("%s: differs from what was written (sha256): rewriting it", store.uri(name))
        return False
    return True


def _study_kind(headers: list[Any]) -> str:
    """ "ct" for a study holding a CT series (several CT slices, or an enhanced multi-frame CT),
    else "image" (one 2-D image is kept)."""
    ct = [h for h in headers if h.safe.get("modality") == "CT"]
    multi = any((h.safe.get("number_of_frames") or 1) > 1 for h in ct)
    return "ct" if multi or len(ct) >= 2 else "image"


def _group_studies(headers: list[Any], id_map: dict[str, str] | None) -> dict[tuple[str, str], list[Any]]:
    """(subject, study) → the study's images, preferred first (the shard task uses the first that
    decodes). The subject is the MEDS subject_id a PatientID maps to, or the PatientID itself."""
    studies: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for h in headers:
        subject = id_map.get(h.patient_id, h.patient_id) if id_map is not None else h.patient_id
        studies[(subject, h.study_uid or h.sop_uid or h.path)].append(h)
    return {sk: _rank_images(hs) for sk, hs in studies.items()}


def _assign_splits(
    pz: Pseudonymizer, cfg: PrepareConfig, studies: dict[tuple[str, str], list[Any]], subjects: set[str]
) -> dict[str, str]:
    """Subject → split: `external` if any of its studies is at a held-out site, else by a uniform
    number drawn from the subject's pseudonym (deterministic for a salt)."""
    external = _external_sites(pz, cfg)
    subject_sites: dict[str, set[str]] = defaultdict(set)
    for (subject, _), hs in studies.items():
        subject_sites[subject].add(pz.site(hs[0].institution))
    splits = {}
    for subject in sorted(subjects):
        u = pz.unit(pz.subject(subject))
        if subject_sites.get(subject, set()) & external:
            splits[subject] = "external"
        elif u < cfg.split.test:
            splits[subject] = "test"
        elif u < cfg.split.test + cfg.split.val:
            splits[subject] = "val"
        else:
            splits[subject] = "train"
    return splits


def _external_sites(pz: Pseudonymizer, cfg: PrepareConfig) -> set[str]:
    """The held-out sites as pseudonyms (they may be configured by InstitutionName or pseudonym)."""
    return {s if s.startswith("site-") else pz.site(s) for s in cfg.split.external_sites}


def _plan_shards(samples: list[SampleSpec], cfg: PrepareConfig) -> list[tuple[str, str, list[SampleSpec]]]:
    """Shards per split, at most `max_samples` and about `max_bytes` each.

    Samples are ordered by the hash part of their key, ignoring the kind prefix (`s` study, `x`
    EHR-only), so EHR-only samples spread over every shard instead of filling the last ones:
    a shuffle of shard order alone then gives batches with the cohort's mix of modalities.
    """
    per_sample = 2 * cfg.image.size**2 + _EST_EHR_BYTES
    per_shard = max(1, min(cfg.shards.max_samples, cfg.shards.max_bytes // per_sample))
    plan = []
    for split in SPLITS:
        part = sorted((s for s in samples if s.split == split), key=lambda s: (s.key[1:], s.key))
        for i in range(0, len(part), per_shard):
            plan.append((f"{split}-{i // per_shard:06d}", split, part[i : i + per_shard]))
    return plan


def _rel(path: str, root: Path | None) -> str:
    """Path relative to the input root (what manifests record; never an absolute path)."""
    if root is not None:
        prefix = f"{root}{os.sep}"
        if path.startswith(prefix):  # the usual case: listed under the resolved root
            return path[len(prefix) :]
        try:
            return str(Path(path).resolve().relative_to(root))
        except ValueError:
            pass
    return Path(path).name


def _quarantine_unknown(tables: ehrlib.EhrTables, known: set[str], quarantine: list[dict[str, Any]]) -> None:
    """Static and outcome rows of subjects with neither MEDS events nor images are quarantined."""
    for name, rows, row_of in (
        ("static", tables.static, lambda r: r["_row"]),
        ("outcome", tables.outcomes, lambda r: r.row),
    ):
        orphans = sorted(k for k in rows if k not in known)
        if not orphans:
            continue
        quarantine.append(
            {
                "input": name,
                "kind": f"{name}_rows",
                "reason": "unknown_subject",
                "detail": f"{name} rows of subjects found in neither the DICOM nor the MEDS input",
                "rows": sorted(row_of(rows[k]) for k in orphans),
                "count": len(orphans),
            }
        )
        for k in orphans:
            del rows[k]


def _ehr_only_index(tables: ehrlib.EhrTables, subject: str) -> tuple[int | None, str]:
    """Index time of a subject without an image: the outcome table's `index_time`, else just after the
    subject's last event (so the whole record is context)."""
    oc = tables.outcomes.get(subject)
    if oc is not None and oc.index_time is not None:
        return oc.index_time, "outcome_index_time"
    ev = tables.events.get(subject)
    if ev is not None and ev.times.size:
        return int(ev.times[-1]) + 1_000_000, "after_last_event"
    return 0, "static_only"


def _sample_meta(
    pz: Pseudonymizer,
    subject: str,
    split: str,
    oc: ehrlib.Outcome | None,
    t: int | None,
    how: str,
    stats: dict[str, int],
) -> dict[str, Any]:
    """Safe per-sample metadata: pseudonyms, split, labels, time-to-event in days from the index."""
    meta: dict[str, Any] = {"subject": pz.subject(subject), "split": split, "index": how}
    if oc is None:
        return meta
    meta["labels"] = {k: v for k, v in oc.labels.items() if v is not None}
    tte = {}
    for name, (when, event) in oc.tte.items():
        if when is None or event is None or t is None:
            continue
        days = (when - t) / ehrlib.US_PER_DAY
        if days < 0:
            stats["tte_before_index"] += 1
            continue
        tte[name] = {"days": round(days, 4), "event": event}
    meta["tte"] = tte
    return meta


def _remove_stale(store: Store, planned: set[str]) -> None:
    """Delete shards and sidecars that a previous run wrote but the current plan does not contain,
    and half-written files that a killed run left behind."""
    for name in store.list():
        stale_shard = name.endswith(".tar") and name[: -len(".tar")] not in planned
        half_written = name.startswith(".") and name.endswith(".tmp")
        if (stale_shard and name.split("-")[0] in SPLITS) or half_written:
            store.remove(name)
    for name in store.list(PARTS_DIR):
        stem = name.rsplit("/", 1)[-1][: -len(".json")]
        if stem not in planned:
            store.remove(name)


def _judge(manifest: dict[str, Any], cfg: PrepareConfig, written: int, skipped: int) -> PrepareResult:
    """Success unless nothing usable remains or too much was quarantined."""
    problems = []
    total = manifest["counts"]["samples"]
    if total == 0:
        problems.append("no usable sample remains")
    for kind, frac in manifest["quarantine"]["fractions"].items():
        if frac > cfg.max_quarantine_fraction:
            problems.append(
                f"{frac:.1%} of {kind} inputs quarantined (limit max_quarantine_fraction="
                f"{cfg.max_quarantine_fraction:.0%})"
            )
    return PrepareResult(manifest, written, skipped, ok=not problems, problems=problems)
