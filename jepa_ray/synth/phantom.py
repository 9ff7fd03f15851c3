"""Chest-radiograph phantoms: anatomy in millimetres, a site's detector response, the DICOM file.

`draw_chest` returns an attenuation map (0 = air outside the body, about 1 = soft tissue, bone adds
to it); `expose` turns it into stored pixel values the way a site's detector and post-processing
would, brighter meaning more attenuation (the MONOCHROME2 sense); `write_radiograph` draws one
`Radiograph` and writes it as a DICOM Part-10 file (CR or DX, raw, RLE or JPEG 2000 lossless).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_encoder
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

UID_ROOT = "1.2.999.73."  # fake, unregistered root of every UID written here
_CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
_DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


@dataclass(frozen=True)
class SiteProfile:
    """One acquisition site: its detector response and the header habits of its modality."""

    institution: str
    modality: str  # "CR" or "DX"
    monochrome1: float  # probability of MONOCHROME1
    bits: tuple[float, float, float]  # probabilities of BitsStored 12, 14, 16
    gain: float  # attenuation → exposure compression, 1 - exp(-gain * A)
    gamma: float
    low: float  # fraction of the stored range used by air
    high: float  # fraction of the stored range used by dense bone
    noise: float  # standard deviation, in fractions of the used range
    collimation: float  # probability of visible collimator borders
    rescale: tuple[float, float]  # (slope, intercept) when the header carries a rescale
    window: float  # probability of a WindowCenter / WindowWidth in a CR header


SITES: tuple[SiteProfile, ...] = (
    SiteProfile("Saint Brennan Memorial Hospital", "DX", 0.15, (0.2, 0.5, 0.3),
                1.6, 1.00, 0.05, 0.90, 0.010, 0.2, (1.0, 0.0), 1.0),
    SiteProfile("Harrowgate Valley Medical Center", "CR", 0.70, (0.6, 0.3, 0.1),
                1.1, 1.35, 0.18, 0.75, 0.022, 0.6, (1.0, -1024.0), 0.5),
    SiteProfile("Quenby Lakes General Hospital", "DX", 0.40, (0.1, 0.3, 0.6),
                2.2, 0.75, 0.02, 0.60, 0.015, 0.1, (0.5, 0.0), 1.0),
    SiteProfile("Oristell University Hospital", "CR", 0.30, (0.5, 0.4, 0.1),
                1.3, 1.15, 0.10, 0.95, 0.030, 0.4, (2.0, 0.0), 0.3),
    SiteProfile("Marrowby County Infirmary", "DX", 0.55, (0.3, 0.3, 0.4),
                1.9, 0.90, 0.25, 0.85, 0.008, 0.3, (1.0, 0.0), 1.0),
    SiteProfile("Tolvane Heights Clinic", "CR", 0.20, (0.7, 0.2, 0.1),
                1.0, 1.25, 0.06, 0.70, 0.026, 0.5, (1.0, 100.0), 0.7),
    SiteProfile("Wyncliffe Regional Hospital", "DX", 0.80, (0.1, 0.6, 0.3),
                1.7, 0.80, 0.12, 0.98, 0.012, 0.2, (1.0, 0.0), 1.0),
    SiteProfile("Ashgrove Yardley Medical Center", "CR", 0.50, (0.4, 0.2, 0.4),
                1.45, 1.05, 0.03, 0.80, 0.018, 0.6, (0.25, 0.0), 0.6),
)  # fmt: skip


@dataclass(frozen=True)
class Mass:
    """A solitary pulmonary mass of one subject, the same on each of their studies: its diameter in
    mm, the lung it lies in (-1: the patient's right, on the image's left; 1: left) and its centre
    as fractions (-1..1) of that lung's half-width and half-height."""

    diameter: float
    side: int
    u: float
    v: float
    contrast: float = 0.45  # attenuation added over what lies behind it (soft tissue)


@dataclass(frozen=True)
class Radiograph:
    """Everything needed to draw and write one radiograph file, independent of any other."""

    path: str  # relative to the cohort root
    entropy: tuple[int, ...]  # seeds the pixel noise and the per-image anatomy
    z: tuple[float, float, float]  # cardiac, lung, frailty
    thorax: float  # half-width of the bony thorax, mm
    site: int
    rows: int
    cols: int
    spacing: float
    bits: int
    monochrome1: bool
    ap: bool
    collimate: bool
    rescale: bool
    window: bool
    compression: str  # "", "rle" or "j2k"
    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    age: str
    physician: str
    accession: str
    study_date: str
    study_time: str
    study_uid: str
    series_uid: str
    sop_uid: str
    masks: bool = False  # also write its ground-truth structure masks (write_masks)
    mass: Mass | None = None


def _lerp_index(n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Left knot and weight to interpolate m evenly spaced knots linearly onto n points."""
    p = np.linspace(0.0, m - 1.0, n)
    i0 = np.minimum(p.astype(np.intp), m - 2)
    return i0, (p - i0).astype(np.float32)


def _smooth_noise(rows: int, cols: int, cell: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth, roughly unit-variance random field with correlation length ~`cell` pixels."""
    h, w = rows // cell + 2, cols // cell + 2
    coarse = rng.standard_normal((h, w), dtype=np.float32)
    c0, cw = _lerp_index(cols, w)
    r0, rw = _lerp_index(rows, h)
    wide = coarse[:, c0] * (1 - cw) + coarse[:, c0 + 1] * cw  # (h, cols)
    return wide[r0] * (1 - rw)[:, None] + wide[r0 + 1] * rw[:, None]


def _window(axis: np.ndarray, lo: float, hi: float) -> slice:
    """Index range of an ascending coordinate axis falling within [lo, hi]."""
    return slice(int(np.searchsorted(axis, lo)), int(np.searchsorted(axis, hi, side="right")))


def _ellipse(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float, edge: float
) -> tuple[slice, slice, np.ndarray]:
    """Soft-edged ellipse mask (edge width in mm), on its bounding window of the grid."""
    rs, cs = _window(y, cy - ay, cy + ay), _window(x, cx - ax, cx + ax)
    r2 = ((y[rs] - cy) / ay)[:, None] ** 2 + (((x[cs] - cx) / ax) ** 2)[None, :]
    return rs, cs, np.clip((1 - r2) * (min(ax, ay) / (2 * edge)), 0, 1)


def _add_blob(
    img: np.ndarray, x: np.ndarray, y: np.ndarray, cx: float, cy: float, sx: float, sy: float, amp: float
) -> None:
    """Add a separable Gaussian blob in place, on its 3-sigma window only."""
    rs, cs = _window(y, cy - 3 * sy, cy + 3 * sy), _window(x, cx - 3 * sx, cx + 3 * sx)
    gy = np.exp(-0.5 * ((y[rs] - cy) / sy) ** 2)
    gx = np.exp(-0.5 * ((x[cs] - cx) / sx) ** 2)
    img[rs, cs] += amp * np.outer(gy, gx)


def _add_band(
    img: np.ndarray, x: np.ndarray, y: np.ndarray, p0: tuple[float, float], p1: tuple[float, float], half: float,
    amp: float,
) -> None:  # fmt: skip
    """Add a bone-like bar (a thick line segment from p0 to p1, in mm) in place."""
    rs = _window(y, min(p0[1], p1[1]) - half, max(p0[1], p1[1]) + half)
    cs = _window(x, min(p0[0], p1[0]) - half, max(p0[0], p1[0]) + half)
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    t = ((x[cs] - p0[0])[None, :] * dx + (y[rs] - p0[1])[:, None] * dy) / (dx * dx + dy * dy)
    t = np.clip(t, 0, 1)
    d2 = (x[cs][None, :] - p0[0] - t * dx) ** 2 + (y[rs][:, None] - p0[1] - t * dy) ** 2
    img[rs, cs] += amp * np.clip(1.5 - 1.5 * d2 / (half * half), 0, 1)


def draw_chest(
    shape: tuple[int, int],
    spacing: float,
    cardiac: float,
    lung: float,
    frailty: float,
    *,
    thorax: float,
    ap: bool,
    rng: np.random.Generator,
    masks: dict[str, np.ndarray] | None = None,
    mass: Mass | None = None,
) -> np.ndarray:
    """Attenuation map (float32, `shape`) of a frontal chest radiograph at `spacing` mm per pixel.

    `thorax` is the half-width of the bony thorax in mm. The heart's width follows `cardiac`
    (cardiothoracic ratio ~0.44 + 0.07 * cardiac), the amount of patchy airspace opacity and of
    pleural fluid follows `lung`, and bone density falls with `frailty`. A `mass` is a round opacity
    of its diameter where it says (it takes nothing from `rng`).

    `masks`, when given, receives the ground truth of what was drawn (bool, `shape`): STRUCTURES.
    Drawing them takes nothing from `rng`: the image is the same with or without.
    """
    rows, cols = shape
    tw = thorax
    length = tw * rng.uniform(1.63, 1.77) * (0.93 if ap else 1.0)  # apex to diaphragm, in mm
    top = rng.uniform(30, 50)  # image top to lung apex
    shift = rng.normal(0, 4)
    x = ((np.arange(cols, dtype=np.float32) - cols / 2 + 0.5) * spacing - shift).astype(np.float32)
    y = ((np.arange(rows, dtype=np.float32) + 0.5) * spacing - top).astype(np.float32)

    # soft tissue: torso below the shoulders, neck above
    body_half = tw * rng.uniform(1.12, 1.3)
    torso_x = np.sqrt(np.clip(1 - (x / body_half) ** 2, 0, 1))
    neck_x = np.sqrt(np.clip(1 - (x / 55) ** 2, 0, 1))
    torso_y = 1 / (1 + np.exp(-(y + 20) / 8))
    soft = torso_y[:, None] * torso_x[None, :] + (1 - torso_y)[:, None] * neck_x[None, :]

    # lung fields, each cut by its diaphragm dome; the left hemidiaphragm sits a little lower
    air = np.zeros((rows, cols), np.float32)
    lungs = []
    for side in (-1, 1):
        cx, ax = side * 0.53 * tw, 0.41 * tw
        cy, ay = 0.55 * length, 0.62 * length
        rs, cs, m = _ellipse(x, y, cx, cy, ax, ay, 4.0)
        base = length * (1.04 if side > 0 else 1.0)
        dome = base - 0.13 * length * np.clip(1 - ((x[cs] - cx) / ax) ** 2, 0, 1)
        m *= np.clip((dome[None, :] - y[rs][:, None]) / 4.0, 0, 1)
        air[rs, cs] = np.maximum(air[rs, cs], m)
        lungs.append((cx, ax, cy, ay, base))
        if masks is not None:  # the patient's right lung is on the image's left (side -1)
            _lung_masks(masks, "right" if side < 0 else "left", shape, rs, cs, m > 0.5)

    # airspace opacities: patchy blobs, more of them and larger with `lung`, lower zones favoured
    opac = np.zeros((rows, cols), np.float32)
    n_blobs = min(int(rng.poisson(2.0 * np.exp(1.0 * lung))), 40)
    for _ in range(n_blobs):
        cx, ax, cy, ay, _base = lungs[int(rng.integers(2))]
        u, v = rng.uniform(-0.8, 0.8), rng.beta(2.2, 1.4) * 1.6 - 0.8
        s = rng.uniform(7, 22) * (1 + 0.15 * max(lung, 0))
        _add_blob(opac, x, y, cx + u * ax, cy + v * ay, s * rng.uniform(0.7, 1.4), s, rng.uniform(0.25, 0.6))
    # pleural fluid: a basal meniscus, likelier with lung and cardiac disease
    p_fluid = 1 / (1 + np.exp(-(1.4 * lung + 0.8 * cardiac - 2.6)))
    for cx, ax, _cy, _ay, base in lungs:
        if rng.random() < p_fluid:
            h = rng.uniform(15, 55)
            rs, cs = _window(y, base - 2 * h, base + 10), _window(x, cx - ax, cx + ax)
            level = base - h - 0.4 * h * np.abs((x[cs] - cx) / ax)
            opac[rs, cs] += 0.9 * np.clip((y[rs][:, None] - level[None, :]) / 10, 0, 1)
    # diffuse, patchy haze
    haze = 0.32 / (1 + np.exp(-1.2 * lung))
    opac += haze * np.clip(1 + _smooth_noise(rows, cols, max(3, int(40 / spacing)), rng), 0, 2)
    # vascular markings, a little heavier with congestion
    vessels = _smooth_noise(rows, cols, max(3, int(9 / spacing)), rng)
    np.clip(opac, 0, 0.92, out=opac)
    opac += (0.07 + 0.02 * np.clip(cardiac, -1, 3)) * np.abs(vessels)
    air *= 1 - opac

    # heart: width from the cardiothoracic ratio, a third right of the midline, resting on the diaphragm
    ctr = np.clip(0.44 + 0.07 * cardiac + rng.normal(0, 0.012), 0.3, 0.75) * (1.08 if ap else 1.0)
    hw = ctr * 0.94 * tw
    hh = np.clip(0.8 * hw, 45, 95)
    rs, cs, heart = _ellipse(x, y, hw / 3 - 4, lungs[0][4] - 0.72 * hh, hw, hh, 3.0)
    air[rs, cs] *= 1 - 0.95 * heart
    if masks is not None:
        masks["heart"] = np.zeros(shape, bool)
        masks["heart"][rs, cs] = heart > 0.5
    # aortic knob and gastric bubble
    rs, cs, knob = _ellipse(x, y, 0.16 * tw, 0.3 * length, 17, 15, 3.0)
    air[rs, cs] *= 1 - 0.9 * knob
    rs, cs, bubble = _ellipse(x, y, 0.42 * tw, lungs[1][4] + 22, 22, 12, 3.0)
    air[rs, cs] = np.maximum(air[rs, cs], 0.5 * bubble)
    # trachea
    rs, cs = _window(y, -np.inf, 0.38 * length), _window(x, -9, 9)
    tr_y = np.clip(-(y[rs] - 0.38 * length) / 10, 0, 1) * torso_y[rs].clip(0.3, 1)
    air[rs, cs] += 0.6 * np.outer(tr_y, np.clip(1 - (x[cs] / 9) ** 2, 0, 1))

    # bones: posterior ribs, clavicles, spine; thinner with frailty
    bone = np.zeros((rows, cols), np.float32)
    rs = _window(y, -0.05 * length, 1.05 * length)
    s = np.abs(x) / tw
    turns = 2 * np.pi / (length / 10.5)  # radians per mm: ~10 ribs from apex to diaphragm
    ribs = np.cos((y[rs] * turns)[:, None] - (length * (-0.28 * s + 0.42 * s**2) * turns)[None, :])
    ribs -= 0.35
    np.maximum(ribs, 0, out=ribs)
    rib_x = np.clip((np.abs(x) - 18) / 6, 0, 1) * np.clip((1.02 * tw - np.abs(x)) / 8, 0, 1)
    rib_y = np.clip((y[rs] + 0.05 * length) / 10, 0, 1) * np.clip(
        (1.05 * length - y[rs]) / (0.3 * length), 0, 1
    )
    ribs *= np.outer(rib_y * (0.7 / 0.65), rib_x)
    bone[rs] += ribs
    for side in (-1, 1):
        _add_band(bone, x, y, (side * 22.0, -12.0), (side * 0.95 * tw, -0.12 * length), 7.0, 1.0)
    cs = _window(x, -22, 22)
    vert = 0.65 + 0.35 * np.cos(2 * np.pi * (y + rng.uniform(0, 25)) / 25.0) ** 2
    bone[:, cs] += 0.8 * np.outer(vert, np.clip(1 - (x[cs] / 22) ** 4, 0, 1))

    if masks is not None:  # ribs, clavicles and spine where the bone is at least a quarter dense
        masks["bone"] = bone > 0.25
    bone *= 0.28 * float(np.clip(1 - 0.15 * frailty, 0.55, 1.3))
    att = 0.95 * soft
    att -= 0.62 * air
    att += bone
    if mass is not None:  # a solid, round soft-tissue opacity with a soft edge, over whatever lies behind it
        cx, ax, cy, ay, _base = lungs[0 if mass.side < 0 else 1]
        r = mass.diameter / 2
        rs, cs, m = _ellipse(x, y, cx + mass.u * ax, cy + mass.v * ay, r, r, 1.5)
        att[rs, cs] += mass.contrast * m
    # a lead side marker in the upper corner
    r0, c0 = int(rows * 0.05), int(cols * (0.06 if rng.random() < 0.5 else 0.9))
    att[r0 : r0 + max(4, rows // 40), c0 : c0 + max(3, cols // 60)] = 1.8
    return att


STRUCTURES = {
    "right_lung": "the patient's right lung field (the image's left), cut by its hemidiaphragm",
    "left_lung": "the patient's left lung field",
    "heart": "the cardiac silhouette",
    "bone": "posterior ribs, clavicles and thoracic spine",
    **{
        f"{side}_{zone}": f"the {zone} third of the {side} lung, by height from apex to diaphragm"
        for side in ("right", "left")
        for zone in ("upper", "middle", "lower")
    },
}


def _lung_masks(
    masks: dict, side: str, shape: tuple[int, int], rs: slice, cs: slice, inside: np.ndarray
) -> None:
    """A lung's mask and its three zones: thirds of its height (rows) from apex to diaphragm."""
    lung = np.zeros(shape, bool)
    lung[rs, cs] = inside
    masks[f"{side}_lung"] = lung
    rows = np.flatnonzero(lung.any(axis=1))
    edges = (np.linspace(rows[0], rows[-1] + 1, 4) if len(rows) else np.zeros(4)).round().astype(int)
    for k, zone in enumerate(("upper", "middle", "lower")):
        band = np.zeros(shape, bool)
        band[edges[k] : edges[k + 1]] = True
        masks[f"{side}_{zone}"] = lung & band


def mask_dir(image_path: str) -> str:
    """Where an image's masks go, relative to the cohort root: masks/<its path under dicom/, no suffix>/."""
    return "masks/" + image_path.removeprefix("dicom/").removesuffix(".dcm")


def write_masks(
    masks: dict[str, np.ndarray], root: str | Path, image_path: str, structures: dict[str, str] | None = None
) -> int:
    """One 8-bit PNG per structure (255 inside, 0 outside; the image's rows x columns); bytes written."""
    from PIL import Image

    folder = Path(root) / mask_dir(image_path)
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for name in structures or STRUCTURES:
        path = folder / f"{name}.png"
        Image.fromarray(masks[name].astype(np.uint8) * 255).save(path, optimize=True)
        written += path.stat().st_size
    return written


def expose(
    att: np.ndarray, site: SiteProfile, bits: int, rng: np.random.Generator, *, collimate: bool
) -> np.ndarray:
    """Stored pixel values (uint16, < 2**bits) of an attenuation map through a site's detector."""
    # the detector response as a lookup table over attenuation 0..2 in 4096 steps
    a = np.linspace(0, 2, 4096)
    lut = np.clip((1 - np.exp(-site.gain * a)) / (1 - np.exp(-site.gain * 1.6)), 0, 1) ** site.gamma
    lut = (site.low + (site.high - site.low) * lut).astype(np.float32)
    d = lut[np.clip(att * (4095 / 2), 0, 4095).astype(np.intp)]
    noise = rng.random(att.shape, dtype=np.float32)  # uniform noise: cheaper than normal, same std
    noise -= 0.5
    noise *= site.noise * (site.high - site.low) * np.sqrt(12)
    d += noise
    if collimate:
        rows, cols = att.shape
        r, c = int(rng.uniform(0.01, 0.06) * rows), int(rng.uniform(0.01, 0.06) * cols)
        d[:r] = d[rows - r :] = d[:, :c] = d[:, cols - c :] = site.low + 0.97 * (site.high - site.low)
    np.clip(d, 0, 1, out=d)
    d *= 2**bits - 1
    d += 0.5
    return d.astype(np.uint16)


def _dataset(job: Radiograph, stored: np.ndarray) -> Dataset:
    """The DICOM dataset of one radiograph, with its fake PHI, pixel module and file meta."""
    site = SITES[job.site]
    dx = site.modality == "DX"
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = _DX_STORAGE if dx else _CR_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = job.sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = f"{UID_ROOT}0.1"
    ds.file_meta.ImplementationVersionName = "JEPARAY_SYNTH"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = job.sop_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = job.study_date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = job.study_time
    ds.AccessionNumber = job.accession
    ds.Modality = site.modality
    if dx:
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "Synthetic Radiography Co."
    ds.InstitutionName = site.institution
    ds.ReferringPhysicianName = job.physician
    ds.StudyDescription = "XR CHEST 1 VIEW"
    ds.SeriesDescription = f"CHEST {'AP' if job.ap else 'PA'}"
    ds.PatientName = job.patient_name
    ds.PatientID = job.patient_id
    ds.PatientBirthDate = job.birth_date
    ds.PatientSex = job.sex
    ds.PatientAge = job.age
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "AP" if job.ap else "PA"
    ds.StudyInstanceUID = job.study_uid
    ds.SeriesInstanceUID = job.series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]
    ds.BurnedInAnnotation = "NO"
    spacing = [f"{job.spacing:.4f}"] * 2
    ds.ImagerPixelSpacing = spacing
    if not dx or job.site % 4 == 0:  # other DX sites give only the detector-plane spacing
        ds.PixelSpacing = spacing
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if job.monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = job.rows, job.cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, job.bits, job.bits - 1
    ds.PixelRepresentation = 0
    slope, intercept = site.rescale if job.rescale else (1.0, 0.0)
    if job.rescale:
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = f"{intercept:g}", f"{slope:g}", "US"
    if job.window:
        lo, hi = np.percentile(stored[::8, ::8], [2, 98]) * slope + intercept
        ds.WindowCenter, ds.WindowWidth = f"{(lo + hi) / 2:.1f}", f"{max(hi - lo, 1.0) * 1.1:.1f}"
        ds.VOILUTFunction = "LINEAR"
    if dx:
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1 if job.monochrome1 else -1
        ds.DetectorType = "SCINTILLATOR"
    ds.LossyImageCompression = "00"
    return ds


def write_radiograph(job: Radiograph, root: str | Path) -> int:
    """Draw, expose and write one radiograph; returns the bytes written."""
    rng = np.random.default_rng(np.random.SeedSequence(job.entropy))
    shape = (job.rows, job.cols)
    masks: dict[str, np.ndarray] | None = {} if job.masks else None
    att = draw_chest(
        shape, job.spacing, *job.z, thorax=job.thorax, ap=job.ap, rng=rng, masks=masks, mass=job.mass
    )
    stored = expose(att, SITES[job.site], job.bits, rng, collimate=job.collimate)
    if job.monochrome1:
        stored = (2**job.bits - 1) - stored
    ds = _dataset(job, stored)
    if job.compression:
        syntax = RLELossless if job.compression == "rle" else JPEG2000Lossless
        # pin the encoder: gdcm's RLE is valid too, but its bytes differ from pylibjpeg's and pydicom's
        plugin = "pylibjpeg" if "pylibjpeg" in get_encoder(syntax).available_plugins else ""
        plugin = plugin or ("pydicom" if syntax == RLELossless else "")
        ds.compress(syntax, stored, encoding_plugin=plugin, generate_instance_uid=False)
    else:
        ds.PixelData = stored.astype("<u2").tobytes()
    path = Path(root) / job.path
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path.stat().st_size + (write_masks(masks, root, job.path) if masks is not None else 0)
