"""A synthetic multimodal cohort written as a hospital export: DICOM radiographs plus MEDS EHR.

Three latent factors per subject (`cardiac`, `lung`, `frailty`) drive the images, the EHR and the
outcomes. A fourth, `mass`, is an imaging finding the EHR does not record (a lung mass not yet
diagnosed): its diameter on the images grows with it, and so does the hazard of death, so that
survival depends on something only the images show (as it does in practice). Layout under `out`:

    dicom/site<k>/<study:06d>/1.dcm   chest radiographs (CR/DX), fake PHI in the headers
    dicom/site<k>/<study:06d>/NNN.dcm chest CT series, one file per slice (`ct_fraction` of the
                                      studies; file names not in spatial order)
    meds/data/<i>.parquet             MEDS events: subject_id, time, code, numeric_value
    meds/metadata/dataset.json        MEDS dataset metadata
    meds/metadata/codes.parquet       code, description, parent_codes
    static.parquet                    subject_id, age, sex, bmi, smoking (subjects with EHR)
    outcomes.parquet                  subject_id, index_time, cardiomegaly, abnormal_lung,
                                      death_time, death_event (every subject)
    latents.parquet                   ground truth: subject_id, cardiac, lung, frailty, mass,
                                      site, has_image, has_ehr
    phi_planted.json                  ground truth: every fake PHI string written into a header
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import meds
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydicom.pixels import get_encoder
from pydicom.uid import JPEG2000Lossless, generate_uid

import jepa_ray
from jepa_ray.config import SynthConfig
from jepa_ray.synth.ct_phantom import CTStudy, write_ct_series
from jepa_ray.synth.phantom import SITES, UID_ROOT, Mass, Radiograph, write_radiograph

logger = logging.getLogger(__name__)
logging.getLogger("openjpeg.encode").setLevel(logging.WARNING)  # one INFO line per encoded tile

_US_DAY = 86_400_000_000
_US_YEAR = int(365.25 * _US_DAY)
_EPOCH = np.datetime64("1970-01-01T00:00:00", "us")
_WINDOW_START = int((np.datetime64("2017-01-01T00:00:00", "us") - _EPOCH).astype(np.int64))
_DATA_END = int((np.datetime64("2023-01-01T00:00:00", "us") - _EPOCH).astype(np.int64))
_SUBJECTS_PER_MEDS_FILE = 500
_STATIC = np.iinfo(np.int64).min  # time of static MEDS rows (written as null)
_MEDS_SCHEMA = pa.schema(
    [
        pa.field("subject_id", pa.int64(), nullable=False),
        pa.field("time", pa.timestamp("us")),
        pa.field("code", pa.string(), nullable=False),
        pa.field("numeric_value", pa.float32()),
    ]
)

_FAMILY_HEADS = ("Quill", "Brack", "Thorn", "Vand", "Marrow", "Pell", "Hask", "Wick", "Fenn", "Crom",
                 "Ashby", "Dorr", "Gall", "Yarr", "Ormund", "Strad", "Lumm", "Kess", "Tarr", "Beck")  # fmt: skip
_FAMILY_TAILS = ("feather", "wick", "holt", "ersby", "ington", "combe", "ridge", "stone", "worth", "mere",
                 "field", "gate")  # fmt: skip
_GIVEN = ("Aurelio", "Philippa", "Thaddeus", "Ottoline", "Cassius", "Leontyne", "Evander", "Marisol",
          "Ignatius", "Rosalind", "Lucanor", "Seraphine", "Barnaby", "Isoldine", "Florian", "Henrietta",
          "Octavian", "Clementine", "Percival", "Winifred", "Caspian", "Delphine", "Ambrose", "Gwendolyn")  # fmt: skip
_DOCTOR_GIVEN = ("Evadne", "Lysander", "Perpetua", "Horatio", "Imogen", "Leopold", "Ottilie", "Cyprian")

_CODES = {
    "MEDS_BIRTH": "Birth",
    "MEDS_DEATH": "Death",
    "GENDER//F": "Sex: female",
    "GENDER//M": "Sex: male",
    "VISIT//OUTPATIENT": "Outpatient visit",
    "VISIT//ED": "Emergency department visit",
    "VISIT//INPATIENT": "Inpatient admission",
    "PROCEDURE//XR_CHEST": "Chest radiograph",
    "VITAL//HR": "Heart rate (/min)",
    "VITAL//SPO2": "Peripheral oxygen saturation (%)",
    "VITAL//SBP": "Systolic blood pressure (mmHg)",
    "LAB//BNP": "B-type natriuretic peptide (pg/mL)",
    "LAB//CRP": "C-reactive protein (mg/L)",
    "LAB//HGB": "Haemoglobin (g/dL)",
    "LAB//CREATININE": "Creatinine (mg/dL)",
    "ICD10//I50": "Heart failure",
    "ICD10//I10": "Essential (primary) hypertension",
    "ICD10//J18": "Pneumonia, organism unspecified",
    "ICD10//J44": "Other chronic obstructive pulmonary disease",
    "ICD10//R53": "Malaise and fatigue",
    "ICD10//E11": "Type 2 diabetes mellitus",
    "RX//FUROSEMIDE": "Furosemide",
    "RX//LISINOPRIL": "Lisinopril",
    "RX//ALBUTEROL": "Albuterol",
    "RX//AMOXICILLIN": "Amoxicillin",
    "RX//METFORMIN": "Metformin",
}
_CODE_ID = {c: i for i, c in enumerate(_CODES)}
# per-visit log-odds: intercept + weights on (cardiac, lung, frailty) + a persistent subject effect
_CODED = (
    ("ICD10//I50", -2.6, (1.6, 0.0, 0.3)),
    ("ICD10//I10", -1.2, (0.6, 0.0, 0.3)),
    ("ICD10//J18", -3.0, (0.0, 1.4, 0.3)),
    ("ICD10//J44", -2.8, (0.0, 1.1, 0.2)),
    ("ICD10//R53", -2.6, (0.0, 0.0, 1.4)),
    ("ICD10//E11", -1.9, (0.3, 0.0, 0.4)),
    ("RX//FUROSEMIDE", -3.0, (1.9, 0.0, 0.2)),
    ("RX//LISINOPRIL", -1.9, (0.8, 0.0, 0.0)),
    ("RX//ALBUTEROL", -2.6, (0.0, 1.3, 0.0)),
    ("RX//AMOXICILLIN", -3.0, (0.0, 1.0, 0.2)),
    ("RX//METFORMIN", -2.3, (0.2, 0.0, 0.4)),
)
# measurement: probability per visit, minutes after the visit start (low, high)
_MEASURED = (
    ("VITAL//HR", 0.95, (5, 30)),
    ("VITAL//SPO2", 0.9, (5, 30)),
    ("VITAL//SBP", 0.85, (5, 30)),
    ("LAB//BNP", 0.45, (30, 150)),
    ("LAB//CRP", 0.5, (30, 150)),
    ("LAB//HGB", 0.7, (30, 150)),
    ("LAB//CREATININE", 0.7, (30, 150)),
)


@dataclass
class _Cohort:
    """Per-subject arrays of the whole cohort (index i is the subject's row everywhere)."""

    ids: np.ndarray  # (n,) int64 MEDS subject_id
    z: np.ndarray  # (n, 3) cardiac, lung, frailty
    mass: list[Mass]  # per subject
    mass_z: np.ndarray  # (n,) the latent the mass's diameter follows
    site: np.ndarray  # (n,) int64
    has_image: np.ndarray  # (n,) bool
    has_ehr: np.ndarray  # (n,) bool
    male: np.ndarray  # (n,) bool
    birth: np.ndarray  # (n,) int64 µs since the epoch, midnight
    index: np.ndarray  # (n,) int64 µs: first study, or the virtual index date without images
    studies: list[np.ndarray]  # per subject, study times (µs), sorted; empty without images
    death: np.ndarray  # (n,) int64 µs: death or censoring time
    death_event: np.ndarray  # (n,) bool
    thorax: np.ndarray  # (n,) float, half-width of the bony thorax in mm


def _us_to_dicom(us: int) -> tuple[str, str]:
    """(YYYYMMDD, HHMMSS) of a time in µs since the epoch."""
    s = str(_EPOCH + np.timedelta64(int(us), "us"))  # 2018-03-05T14:07:09.000000
    return s[0:10].replace("-", ""), s[11:19].replace(":", "")


def _distinct_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """n distinct random 10-digit int64 subject ids."""
    ids = np.empty(0, np.int64)
    while len(ids) < n:
        draw = np.concatenate([ids, rng.integers(1_000_000_000, 10_000_000_000, size=n, dtype=np.int64)])
        _, first = np.unique(draw, return_index=True)
        ids = draw[np.sort(first)]
    return ids[:n]


def _draw_cohort(cfg: SynthConfig, rng: np.random.Generator) -> _Cohort:
    """Latents, pairing, demographics, study times and survival of every subject."""
    n = cfg.subjects
    ids = _distinct_ids(rng, n)
    corr = np.array([[1.0, 0.25, 0.3], [0.25, 1.0, 0.3], [0.3, 0.3, 1.0]])
    z = rng.standard_normal((n, 3)) @ np.linalg.cholesky(corr).T
    site = rng.integers(0, cfg.sites, n)
    perm = rng.permutation(n)
    n_img_only = round(n * cfg.image_only_fraction)
    n_ehr_only = min(round(n * cfg.ehr_only_fraction), n - n_img_only)
    has_image, has_ehr = np.ones(n, bool), np.ones(n, bool)
    has_ehr[perm[:n_img_only]] = False
    has_image[perm[n_img_only : n_img_only + n_ehr_only]] = False
    male = rng.random(n) < 0.5
    age = np.clip(60 + 8 * z[:, 2] + 11 * rng.standard_normal(n), 19, 96)
    window = 3 * _US_YEAR
    day = (rng.uniform(0, 2.5 * _US_YEAR, n) // _US_DAY).astype(np.int64) * _US_DAY
    index = _WINDOW_START + day + rng.integers(7 * 3600, 22 * 3600, n) * 1_000_000
    birth = ((index - (age * _US_YEAR).astype(np.int64)) // _US_DAY) * _US_DAY

    # the mass, from a stream of its own (the other draws do not depend on it): independent of the
    # other latents, 40 mm across at the mean, 18 mm 2 sd below it and 89 mm 2 sd above
    draw = np.random.default_rng(np.random.SeedSequence([cfg.seed % 2**64, 0x3A55]))
    mass_z = draw.standard_normal(n)
    # in an upper lung zone (where most lung cancers arise), either side
    side, u, v = draw.choice([-1, 1], n), draw.uniform(-0.3, 0.3, n), draw.uniform(-0.5, -0.2, n)
    mass = [
        Mass(round(40 * float(np.exp(0.4 * m)), 2), int(s), float(a), float(b), cfg.mass_contrast)
        for m, s, a, b in zip(mass_z, side, u, v, strict=True)
    ]

    # survival from the index: Weibull, log-hazard linear in the latents; censored at the data
    # extraction date and by loss to follow-up
    lp = 0.5 * z[:, 0] + 0.5 * z[:, 1] + 0.7 * z[:, 2] + 0.6 * mass_z
    t_event = _US_DAY + 2700 * _US_DAY * (rng.exponential(size=n) / np.exp(lp)) ** (1 / 1.2)
    t_lost = _US_DAY + rng.exponential(12 * _US_YEAR, n)
    t_end = index + np.minimum(t_event, t_lost).astype(np.int64)
    death_event = (t_event <= t_lost) & (t_end <= _DATA_END)
    death = np.minimum(t_end, _DATA_END) // 1_000_000 * 1_000_000

    p_more = 1 / (1 + np.exp(-(0.4 * z.sum(1) - 0.3)))
    studies = []
    for i in range(n):
        if not has_image[i]:
            studies.append(np.empty(0, np.int64))
            continue
        k = 1 + rng.binomial(cfg.max_studies - 1, p_more[i])
        later = index[i] + rng.uniform(_US_DAY, _WINDOW_START + window - index[i] + _US_DAY, k - 1)
        later = (later // 1_000_000 * 1_000_000).astype(np.int64)
        st = np.sort(np.concatenate([[index[i]], later]))
        studies.append(st[st < death[i]])  # nobody is imaged after death or loss to follow-up
    thorax = 148 + 9 * rng.standard_normal(n) + np.where(male, 7, -5) - 2 * z[:, 2]
    return _Cohort(
        ids,
        z,
        mass,
        mass_z,
        site,
        has_image,
        has_ehr,
        male,
        birth,
        index,
        studies,
        death,
        death_event,
        thorax,
    )


def _fake_name(rng: np.random.Generator, given: tuple[str, ...]) -> str:
    """A distinctive DICOM person name, Family^Given."""
    family = _FAMILY_HEADS[rng.integers(len(_FAMILY_HEADS))] + _FAMILY_TAILS[rng.integers(len(_FAMILY_TAILS))]
    return f"{family}^{given[rng.integers(len(given))]}"


def _plan_images(
    cfg: SynthConfig, seed: int, co: _Cohort, rng: np.random.Generator
) -> tuple[list[Radiograph | CTStudy], list[str]]:
    """One `Radiograph` (or, for `ct_fraction` of them, a `CTStudy`) per study (paths numbered in a
    shuffled order) and the PHI strings they carry."""
    j2k = get_encoder(JPEG2000Lossless).is_available
    if not j2k:
        logger.warning("no JPEG 2000 encoder available: compressed images all use RLE Lossless")
    doctors = [[_fake_name(rng, _DOCTOR_GIVEN) for _ in range(4)] for _ in range(cfg.sites)]
    subjects = [(i, j) for i in np.flatnonzero(co.has_image) for j in range(len(co.studies[i]))]
    n_img = len(subjects)
    number = rng.permutation(n_img)
    compression = np.full(n_img, "", dtype=object)
    chosen = rng.choice(n_img, round(cfg.compressed_fraction * n_img), replace=False)
    for k, c in enumerate(chosen):
        compression[c] = "j2k" if j2k and k % 4 == 1 else "rle"  # JPEG 2000 encodes ~10x slower
    accessions: set[str] = set()
    alphabet = np.array(list("ABCDEFGHJKLMNPQRSTUVWXYZ23456789"))
    names: dict[int, str] = {}
    jobs, phi = [], []
    ct_draw = np.random.default_rng([seed, 7])
    for k, (i, j) in enumerate(subjects):
        s = SITES[co.site[i]]
        if i not in names:
            names[i] = _fake_name(rng, _GIVEN)
        while (acc := "ACC" + "".join(rng.choice(alphabet, 7))) in accessions:
            pass
        accessions.add(acc)
        rows = int(rng.integers(cfg.min_size, cfg.max_size + 1))
        cols = int(np.clip(round(rows * rng.uniform(0.8, 1.25)), cfg.min_size, cfg.max_size))
        fov_rows, fov_cols = rng.uniform(360, 430), rng.uniform(340, 400)  # mm
        spacing = round(max(fov_rows / rows, fov_cols / cols), 4)
        study_us = int(co.studies[i][j])
        date, tm = _us_to_dicom(study_us)
        uids = [
            str(generate_uid(f"{UID_ROOT}{kind}.", [f"seed={cfg.seed}|subject={i}|study={j}|uid={kind}"]))
            for kind in (1, 2, 3)
        ]
        cardiac, lung, frailty = (float(v) for v in co.z[i])
        job = Radiograph(
            path=f"dicom/site{co.site[i]}/{number[k]:06d}/1.dcm",
            entropy=(seed, int(i), j),
            z=(cardiac, lung, frailty),
            thorax=float(co.thorax[i]),
            site=int(co.site[i]),
            rows=rows,
            cols=cols,
            spacing=spacing,
            bits=int(rng.choice([12, 14, 16], p=s.bits)),
            monochrome1=bool(rng.random() < s.monochrome1),
            ap=bool(rng.random() < 1 / (1 + np.exp(-(0.8 * frailty + 0.5 * lung - 1.2)))),
            collimate=bool(rng.random() < s.collimation),
            rescale=s.modality == "DX" or bool(rng.random() < 0.5),
            window=s.modality == "DX" or bool(rng.random() < s.window),
            compression=str(compression[k]),
            patient_name=names[i],
            patient_id=str(co.ids[i]),
            birth_date=_us_to_dicom(int(co.birth[i]))[0],
            sex="M" if co.male[i] else "F",
            age=f"{int((study_us - co.birth[i]) // _US_YEAR):03d}Y",
            physician=doctors[co.site[i]][rng.integers(4)],
            accession=acc,
            study_date=date,
            study_time=tm,
            study_uid=uids[0],
            series_uid=uids[1],
            sop_uid=uids[2],
            masks=cfg.masks,
            mass=co.mass[i],
        )
        if ct_draw.random() < cfg.ct_fraction:  # its own stream: radiographs do not depend on it
            job = _as_ct(job, cfg, ct_draw)
            uids += [job.frame_uid, *job.sop_uids]
        jobs.append(job)
        phi += [job.patient_name, *job.patient_name.split("^"), job.physician, *job.physician.split("^")]
        phi += [job.patient_id, job.birth_date, s.institution, acc, date, *uids]
    return jobs, sorted(set(phi))


def _as_ct(job: Radiograph, cfg: SynthConfig, rng: np.random.Generator) -> CTStudy:
    """The same study as a chest CT series: the same subject, site, time and identifiers."""
    fov = rng.uniform(330, 400)  # mm, the reconstruction field of view
    uids = [str(generate_uid(f"{UID_ROOT}4.", [job.sop_uid, str(k)])) for k in range(cfg.ct_slices + 1)]
    return CTStudy(
        path=job.path.rsplit("/", 1)[0],
        entropy=(*job.entropy, 7),
        z=job.z,
        thorax=job.thorax,
        site=job.site,
        size=cfg.ct_size,
        slices=cfg.ct_slices,
        spacing=round(fov / cfg.ct_size, 4),
        step=round(rng.uniform(270, 320) / cfg.ct_slices, 3),  # apex to base
        noise=float(rng.uniform(8, 25)),
        patient_name=job.patient_name,
        patient_id=job.patient_id,
        birth_date=job.birth_date,
        sex=job.sex,
        age=job.age,
        physician=job.physician,
        accession=job.accession,
        study_date=job.study_date,
        study_time=job.study_time,
        study_uid=job.study_uid,
        series_uid=job.series_uid,
        frame_uid=uids[0],
        sop_uids=tuple(uids[1:]),
        masks=job.masks,
        mass=job.mass,
    )


def _write_mask_legend(out: Path) -> None:
    """masks/structures.json: the masks' convention and what each structure is."""
    from jepa_ray.synth.ct_phantom import CT_STRUCTURES
    from jepa_ray.synth.phantom import STRUCTURES

    legend = {
        "convention": "one 8-bit PNG per structure and radiograph, 255 inside and 0 outside, with the "
        "DICOM image's rows and columns (its stored pixel grid): masks/<the image's path under dicom/, "
        "without .dcm>/<structure>.png",
        "structures": STRUCTURES,
        "ct_structures": CT_STRUCTURES,  # a CT series: masks per slice, at each slice file's path
    }
    (out / "masks").mkdir(exist_ok=True)
    (out / "masks" / "structures.json").write_text(json.dumps(legend, indent=1) + "\n")


def write_study(job: Radiograph | CTStudy, root: str) -> int:
    """Write one study's files (a radiograph, or a CT series); returns the bytes written."""
    return write_ct_series(job, root) if isinstance(job, CTStudy) else write_radiograph(job, root)


def _write_images(jobs: list[Radiograph | CTStudy], out: Path, workers: int) -> None:
    """Write every image, in this process or in a pool; the bytes do not depend on which."""
    if workers <= 1:
        for k, job in enumerate(jobs):
            write_study(job, str(out))
            if (k + 1) % 500 == 0:
                logger.info("wrote %d / %d images", k + 1, len(jobs))
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = [pool.submit(write_study, job, str(out)) for job in jobs]
        for k, f in enumerate(futures):
            f.result()
            if (k + 1) % 500 == 0:
                logger.info("wrote %d / %d images", k + 1, len(jobs))


def _lab_value(code: str, z: np.ndarray, male: bool, u: float, e: np.ndarray) -> np.ndarray:
    """Measured values of one code for one subject: latent effect + subject effect u + noise e."""
    c, lung, f = z
    if code == "LAB//BNP":
        return np.maximum(np.exp(np.log(60) + 0.95 * c + 0.25 * f + 0.4 * u + 0.35 * e), 5.0).round(1)
    if code == "LAB//CRP":
        return np.maximum(np.exp(np.log(4) + 0.9 * lung + 0.2 * f + 0.4 * u + 0.6 * e), 0.2).round(1)
    if code == "LAB//HGB":
        value = 14.0 + (0.9 if male else -0.5) - 0.8 * f - 0.2 * lung + 0.6 * u + 0.6 * e
        return np.clip(value, 5, 20).round(1)
    if code == "LAB//CREATININE":
        log_value = np.log(0.9) + (0.12 if male else 0) + 0.12 * c + 0.15 * f + 0.15 * u + 0.12 * e
        return np.exp(log_value).round(2)
    if code == "VITAL//HR":
        return np.clip(74 + 5 * c + 3.5 * lung + 4 * u + 7 * e, 35, 170).round()
    if code == "VITAL//SPO2":
        return np.clip(97.5 - 1.8 * lung - 0.3 * c + 0.8 * u + 1.0 * e, 70, 100).round()
    return np.clip(128 + 4 * c + 3 * f + 8 * u + 12 * e, 75, 220).round()  # VITAL//SBP


def _subject_events(co: _Cohort, i: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """(times in µs or _STATIC, code ids, values or NaN) of one subject's MEDS events."""
    z, male = co.z[i], bool(co.male[i])
    first = co.studies[i][0] if len(co.studies[i]) else co.index[i]
    last = co.studies[i][-1] if len(co.studies[i]) else co.index[i]
    start = first - int(rng.uniform(1.7, 2.3) * _US_YEAR)
    end = min(last + int(rng.uniform(1.2, 1.8) * _US_YEAR), int(co.death[i]))
    sick = max(float(z.sum()) / 1.9, 0.0)
    n_free = min(2 + int(rng.poisson(2.0 + 1.0 * sick)), 8)
    visits = rng.uniform(start, end, n_free).astype(np.int64) // 1_000_000 * 1_000_000
    at_study = co.studies[i] - rng.integers(1800, 3 * 3600, len(co.studies[i])) * 1_000_000
    visits = np.sort(np.concatenate([visits, at_study]))
    nv = len(visits)
    times: list[np.ndarray] = []
    codes: list[np.ndarray] = []
    values: list[np.ndarray] = []

    def add(t: np.ndarray | list[int], code: str | np.ndarray, v: np.ndarray | None = None) -> None:
        t = np.asarray(t, np.int64)
        times.append(t)
        codes.append(
            np.broadcast_to(np.asarray([_CODE_ID[code]]) if isinstance(code, str) else code, t.shape)
        )
        values.append(np.full(t.shape, np.nan) if v is None else v)

    add([co.birth[i]], "MEDS_BIRTH")
    add([_STATIC], f"GENDER//{'M' if male else 'F'}")
    inpatient = rng.random(nv) < 1 / (1 + np.exp(-(0.8 * sick - 2.0)))
    ed = rng.random(nv) < 0.3
    kind = np.where(inpatient, _CODE_ID["VISIT//INPATIENT"], _CODE_ID["VISIT//ED"])
    kind = np.where(~inpatient & ~ed, _CODE_ID["VISIT//OUTPATIENT"], kind)
    add(visits, kind)
    add(co.studies[i], "PROCEDURE//XR_CHEST")
    for code, p, (lo, hi) in _MEASURED:
        hit = rng.random(nv) < p
        t = visits[hit] + rng.integers(lo * 60, hi * 60, hit.sum()) * 1_000_000
        add(t, code, _lab_value(code, z, male, rng.standard_normal(), rng.standard_normal(len(t))))
    for code, a, w in _CODED:
        logit = a + float(np.dot(w, z)) + 0.8 * rng.standard_normal()
        hit = rng.random(nv) < 1 / (1 + np.exp(-logit))
        add(visits[hit] + rng.integers(2 * 3600, 8 * 3600, hit.sum()) * 1_000_000, code)
    if co.death_event[i]:
        add([co.death[i]], "MEDS_DEATH")
    t, c, v = np.concatenate(times), np.concatenate(codes).astype(np.int32), np.concatenate(values)
    keep = t <= co.death[i]
    return t[keep], c[keep], v[keep].astype(np.float32)


def _meds_tables(co: _Cohort, rng: np.random.Generator) -> list[pa.Table]:
    """MEDS event tables, subjects sorted by id and split across files, events sorted by time."""
    order = [i for i in np.argsort(co.ids) if co.has_ehr[i]]
    code_names = np.array(list(_CODES), dtype=object)
    tables = []
    for s in range(0, max(len(order), 1), _SUBJECTS_PER_MEDS_FILE):
        chunk = order[s : s + _SUBJECTS_PER_MEDS_FILE]
        parts = [_subject_events(co, i, rng) for i in chunk]
        sid = np.concatenate(
            [np.empty(0, np.int64)]
            + [np.full(len(p[0]), co.ids[i]) for i, p in zip(chunk, parts, strict=True)]
        )
        t = np.concatenate([np.empty(0, np.int64)] + [p[0] for p in parts])
        c = np.concatenate([np.empty(0, np.int32)] + [p[1] for p in parts])
        v = np.concatenate([np.empty(0, np.float32)] + [p[2] for p in parts])
        srt = np.lexsort((np.arange(len(t)), t, sid))  # static rows first
        sid, t, c, v = sid[srt], t[srt], c[srt], v[srt]
        tables.append(
            pa.table(
                {
                    "subject_id": pa.array(sid, pa.int64()),
                    "time": pa.array(t, pa.timestamp("us"), mask=t == _STATIC),
                    "code": pa.array(code_names[c], pa.string()),
                    "numeric_value": pa.array(v, pa.float32(), mask=np.isnan(v)),
                },
                schema=_MEDS_SCHEMA,
            )
        )
    return tables


def _write_ehr(out: Path, cfg: SynthConfig, co: _Cohort, rng: np.random.Generator) -> int:
    """Write the MEDS root and the static table; returns the number of events."""
    tables = _meds_tables(co, rng)
    (out / "meds/data").mkdir(parents=True)
    (out / "meds/metadata").mkdir(parents=True)
    for k, table in enumerate(tables):
        meds.DataSchema.validate(table)
        pq.write_table(table, out / f"meds/data/{k}.parquet")
    used = sorted(set().union(*(t.column("code").unique().to_pylist() for t in tables)))
    codes = pa.table(
        {
            "code": pa.array(used, pa.string()),
            "description": pa.array([_CODES[c] for c in used], pa.string()),
            "parent_codes": pa.array([None] * len(used), pa.list_(pa.string())),
        },
        schema=meds.CodeMetadataSchema.schema(),
    )
    pq.write_table(codes, out / "meds/metadata/codes.parquet")
    metadata = {
        "dataset_name": "jepa-ray-synthetic",
        "dataset_version": f"seed-{cfg.seed}",
        "etl_name": __name__,
        "etl_version": jepa_ray.__version__,
        "meds_version": meds.__version__,
    }
    meds.DatasetMetadataSchema.validate(metadata)
    (out / "meds/metadata/dataset.json").write_text(json.dumps(metadata, indent=2) + "\n")

    idx = np.flatnonzero(co.has_ehr)
    idx = idx[np.argsort(co.ids[idx])]
    n = len(idx)
    age = (co.index[idx] - co.birth[idx]) / _US_YEAR
    bmi = np.clip(27 + 4.5 * rng.standard_normal(n) - 1.5 * co.z[idx, 2], 15, 55).round(1)
    p_current = 1 / (1 + np.exp(-(0.6 * co.z[idx, 1] - 1.5)))
    u = rng.random(n)
    smoking = np.where(u < p_current, "current", np.where(u < p_current + 0.3, "former", "never"))
    static = pa.table(
        {
            "subject_id": pa.array(co.ids[idx], pa.int64()),
            "age": pa.array(age.round(2), pa.float64(), mask=rng.random(n) < 0.05),
            "sex": pa.array(np.where(co.male[idx], "M", "F"), pa.string()),
            "bmi": pa.array(bmi, pa.float64(), mask=rng.random(n) < 0.10),
            "smoking": pa.array(smoking, pa.string(), mask=rng.random(n) < 0.15),
        }
    )
    pq.write_table(static, out / "static.parquet")
    return sum(t.num_rows for t in tables)


def _write_truth(out: Path, co: _Cohort, rng: np.random.Generator) -> None:
    """Write the outcome table (all subjects) and the latent ground truth."""
    o = np.argsort(co.ids)
    n = len(o)
    z = co.z[o]
    ts = pa.timestamp("us")
    outcomes = pa.table(
        {
            "subject_id": pa.array(co.ids[o], pa.int64()),
            "index_time": pa.array(co.index[o], ts),
            "cardiomegaly": pa.array(z[:, 0] + 0.45 * rng.standard_normal(n) > 0.6, pa.bool_()),
            "abnormal_lung": pa.array(z[:, 1] + 0.45 * rng.standard_normal(n) > 0.55, pa.bool_()),
            "death_time": pa.array(co.death[o], ts),
            "death_event": pa.array(co.death_event[o], pa.bool_()),
        }
    )
    pq.write_table(outcomes, out / "outcomes.parquet")
    latents = pa.table(
        {
            "subject_id": pa.array(co.ids[o], pa.int64()),
            "cardiac": pa.array(z[:, 0], pa.float64()),
            "lung": pa.array(z[:, 1], pa.float64()),
            "frailty": pa.array(z[:, 2], pa.float64()),
            "mass": pa.array(co.mass_z[o], pa.float64()),
            "site": pa.array(co.site[o], pa.int64()),
            "has_image": pa.array(co.has_image[o], pa.bool_()),
            "has_ehr": pa.array(co.has_ehr[o], pa.bool_()),
        }
    )
    pq.write_table(latents, out / "latents.parquet")


def cohort_inputs(root: Path) -> dict[str, str]:
    """A cohort written by `write_cohort` as the keyword arguments `prepare` takes for it."""
    return {
        "dicom": str(root / "dicom"),
        "meds": str(root / "meds"),
        "static": str(root / "static.parquet"),
        "outcomes": str(root / "outcomes.parquet"),
    }


def write_cohort(out: Path, cfg: SynthConfig, *, workers: int = 1) -> dict[str, float]:
    """Write a synthetic cohort under `out` (which must be empty or absent); returns a summary.

    When `out` already holds a complete cohort written with the same config, nothing is written
    and its summary is returned, so that a demo script can be rerun.

    With `workers` > 1 the images are drawn in that many spawned processes (the caller's main
    module must then be import-safe, as for any `multiprocessing` use); the files are
    byte-identical for any number of workers.
    """
    t0 = time.perf_counter()
    out = Path(out)
    record = out / "synth.json"
    if out.exists() and any(out.iterdir()):
        if record.exists():
            done = json.loads(record.read_text())
            if done.get("config") == cfg.model_dump(mode="json"):
                logger.info("synthetic cohort already complete in %s (same config): nothing to do", out)
                return done["summary"]
        raise FileExistsError(
            f"synthetic cohort output {out}: directory is not empty (and holds no cohort of this config); "
            "choose a new one"
        )
    out.mkdir(parents=True, exist_ok=True)
    seed = cfg.seed % 2**64  # SeedSequence wants non-negative entropy; negative seeds stay distinct
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED]))
    co = _draw_cohort(cfg, rng)
    jobs, phi = _plan_images(cfg, seed, co, rng)
    logger.info("synthetic cohort: %d subjects, %d images, writing to %s", cfg.subjects, len(jobs), out)
    (out / "dicom").mkdir()
    _write_images(jobs, out, workers)
    if cfg.masks:
        _write_mask_legend(out)
    n_events = _write_ehr(out, cfg, co, rng)
    _write_truth(out, co, rng)
    (out / "phi_planted.json").write_text(json.dumps(phi, indent=1) + "\n")
    summary = {
        "subjects": cfg.subjects,
        "studies": len(jobs),
        "images": len(jobs),
        "ct_series": sum(isinstance(j, CTStudy) for j in jobs),
        "events": n_events,
        "compressed_images": sum(bool(getattr(j, "compression", "")) for j in jobs),
        "image_only": int((co.has_image & ~co.has_ehr).sum()),
        "ehr_only": int((co.has_ehr & ~co.has_image).sum()),
        "both": int((co.has_image & co.has_ehr).sum()),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    # written last: its presence marks a complete cohort
    stable = {k: v for k, v in summary.items() if k != "seconds"}  # the cohort's bytes stay deterministic
    record.write_text(json.dumps({"config": cfg.model_dump(mode="json"), "summary": stable}, indent=1) + "\n")
    logger.info("synthetic cohort written: %s", summary)
    return summary
