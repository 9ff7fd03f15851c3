"""Chest-CT phantoms: a volume in Hounsfield units drawn from the same latent state as the
radiographs (heart size, lung opacities and effusion, bone density, a mass), written as a series of
single-slice CT files with the headers a scanner writes (orientation, positions, spacing, rescale).

Coordinates are millimetres in the patient frame (DICOM LPS): x from the patient's right to left,
y from anterior to posterior, z from feet to head; slice k lies at z = top - k * step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from jepa_ray.synth.phantom import SITES, UID_ROOT, Mass, write_masks

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@dataclass(frozen=True)
class CTStudy:
    """Everything needed to draw and write one chest-CT series, independent of any other."""

    path: str  # the series' directory, relative to the cohort root; slices are NNN.dcm in it
    entropy: tuple[int, ...]
    z: tuple[float, float, float]  # cardiac, lung, frailty
    thorax: float  # half-width of the bony thorax, mm
    site: int
    size: int  # rows = columns
    slices: int
    spacing: float  # in-plane, mm
    step: float  # between slices, mm
    noise: float  # HU
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
    frame_uid: str  # FrameOfReferenceUID
    sop_uids: tuple[str, ...]  # one per slice, from the top
    masks: bool = False  # also write each slice's ground-truth structure masks (as for radiographs)
    mass: Mass | None = None


def _ellipsoid(x, y, z, cx, cy, cz, rx, ry, rz) -> np.ndarray:
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1


CT_STRUCTURES = {
    "right_lung": "the patient's right lung (negative x, LPS)",
    "left_lung": "the patient's left lung",
    "heart": "the heart",
    "bone": "the vertebral body and the ribs",
}


def draw_ct(job: CTStudy, rng: np.random.Generator, masks: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """(slices, size, size) float32 HU of one chest CT; `masks`, when given, receives the ground
    truth of CT_STRUCTURES (bool, the same shape), at no cost to `rng`."""
    cardiac, lung, frailty = job.z
    half = job.size * job.spacing / 2
    axis = (np.arange(job.size) + 0.5) * job.spacing - half
    zs = -np.arange(job.slices) * job.step  # from the apex down
    z, y, x = np.meshgrid(zs, axis, axis, indexing="ij")
    t = job.thorax
    hu = np.full(z.shape, -1000.0, np.float32)  # air
    body = (x / (t + 28)) ** 2 + (y / (0.72 * (t + 28))) ** 2 <= 1
    hu[body] = -100  # subcutaneous fat
    hu[(x / (t + 12)) ** 2 + (y / (0.72 * (t + 12))) ** 2 <= 1] = 40  # chest wall, mediastinum
    height = -zs[-1]
    lungs = np.zeros(z.shape, bool)
    for side in (-1, 1):
        one = _ellipsoid(x, y, z, side * 0.48 * t, 4, -0.45 * height, 0.4 * t, 0.55 * t, 0.5 * height)
        lungs |= one
        if masks is not None:
            masks["right_lung" if side < 0 else "left_lung"] = one
    hu[lungs] = -860 + 25 * rng.standard_normal(lungs.sum())  # parenchyma and small vessels
    # heart: its transverse size follows the cardiothoracic ratio, as on the radiographs
    ctr = float(np.clip(0.44 + 0.07 * cardiac + rng.normal(0, 0.012), 0.3, 0.75))
    rx = ctr * t
    heart = _ellipsoid(x, y, z, 0.22 * rx, -0.18 * t, -0.72 * height, rx, 0.62 * rx, 0.32 * height)
    hu[heart] = 45
    if masks is not None:
        masks["heart"] = heart
    # airspace opacities: blobs in the lungs, more and larger with `lung`
    for _ in range(min(int(rng.poisson(2.0 * np.exp(lung))), 30)):
        side = rng.choice([-1, 1])
        c = (
            side * 0.48 * t + rng.uniform(-0.25, 0.25) * t,
            rng.uniform(-0.3, 0.4) * t,
            -rng.uniform(0.2, 0.9) * height,
        )
        r = rng.uniform(6, 18) * (1 + 0.15 * max(lung, 0))
        blob = _ellipsoid(x, y, z, *c, r, r * rng.uniform(0.7, 1.3), r) & lungs
        hu[blob] = rng.uniform(-150, 20)
    lesion = np.zeros(z.shape, bool)
    if job.mass is not None:  # the radiographs' mass: a soft-tissue sphere where they show it
        m = job.mass
        c = (m.side * 0.48 * t + m.u * 0.4 * t, 0.0, -0.45 * height - m.v * 0.5 * height)  # v > 0: lower
        lesion = _ellipsoid(x, y, z, *c, m.diameter / 2, m.diameter / 2, m.diameter / 2) & lungs
        hu[lesion] = 35
    # pleural fluid: a dependent (posterior) layer at the bases
    if rng.random() < 1 / (1 + np.exp(-(1.4 * lung + 0.8 * cardiac - 2.6))):
        level = 0.55 * t - rng.uniform(5, 25)
        hu[lungs & (y > level) & (z < -0.6 * height)] = 15
    # bones: vertebral body and ribs, denser with less frailty
    bone = 250 + 450 * float(np.clip(1 - 0.15 * frailty, 0.55, 1.3))
    hu[(x / 16) ** 2 + ((y - 0.62 * t) / 14) ** 2 <= 1] = bone
    ring = (x / (t + 6)) ** 2 + (y / (0.72 * (t + 6))) ** 2
    ribs = (ring >= 0.93) & (ring <= 1.0) & (np.mod(-z, 24) < 9)
    hu[ribs] = bone * 0.8
    if masks is not None:
        masks["bone"] = ((x / 16) ** 2 + ((y - 0.62 * t) / 14) ** 2 <= 1) | ribs
        for name in ("right_lung", "left_lung"):  # the heart, the spine and a mass displace lung
            masks[name] = masks[name] & ~heart & ~masks["bone"] & ~lesion
    hu += job.noise * rng.standard_normal(hu.shape).astype(np.float32)
    return np.clip(hu, -1024, 3071)


def _dataset(job: CTStudy, k: int, top: float) -> Dataset:
    site = SITES[job.site]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = job.sop_uids[k]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = f"{UID_ROOT}0.1"
    ds.file_meta.ImplementationVersionName = "JEPARAY_SYNTH"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = job.study_date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = job.study_time
    ds.AccessionNumber = job.accession
    ds.Modality = "CT"
    ds.Manufacturer = "Synthetic Tomography Co."
    ds.InstitutionName = site.institution
    ds.ReferringPhysicianName = job.physician
    ds.StudyDescription = "CT CHEST WITHOUT CONTRAST"
    ds.SeriesDescription = "AXIAL 5MM"
    ds.PatientName = job.patient_name
    ds.PatientID = job.patient_id
    ds.PatientBirthDate = job.birth_date
    ds.PatientSex = job.sex
    ds.PatientAge = job.age
    ds.BodyPartExamined = "CHEST"
    ds.StudyInstanceUID = job.study_uid
    ds.SeriesInstanceUID = job.series_uid
    ds.FrameOfReferenceUID = job.frame_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.InstanceNumber = k + 1
    ds.PatientPosition = "HFS"
    half = job.size * job.spacing / 2
    ds.ImageOrientationPatient = [f"{v:g}" for v in AXIAL]
    ds.ImagePositionPatient = [
        f"{-half + job.spacing / 2:.3f}",
        f"{-half + job.spacing / 2:.3f}",
        f"{top - k * job.step:.3f}",
    ]
    ds.SliceLocation = f"{top - k * job.step:.3f}"
    ds.SliceThickness = f"{job.step:g}"
    ds.PixelSpacing = [f"{job.spacing:.4f}"] * 2
    ds.KVP = "120"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = job.size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
    ds.WindowCenter, ds.WindowWidth = "-600", "1500"
    return ds


def write_ct_series(job: CTStudy, root: str | Path) -> int:
    """Draw one chest CT and write it as one file per slice; returns the bytes written."""
    rng = np.random.default_rng(np.random.SeedSequence(job.entropy))
    masks: dict[str, np.ndarray] | None = {} if job.masks else None
    hu = draw_ct(job, rng, masks)
    stored = np.clip(np.round(hu + 1024), 0, 4095).astype("<u2")
    folder = Path(root) / job.path
    folder.mkdir(parents=True, exist_ok=True)
    top = float(rng.uniform(-40, 40))  # table height differs per study
    names = rng.permutation(job.slices)  # archives seldom keep files in spatial order
    total = 0
    for k in range(job.slices):
        ds = _dataset(job, k, top)
        ds.PixelData = stored[k].tobytes()
        path = folder / f"{names[k] + 1:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
        if masks is not None:  # one PNG per structure and slice, beside the slice's own path
            total += write_masks(
                {n: m[k] for n, m in masks.items()}, root, str(path.relative_to(root)), CT_STRUCTURES
            )
    return total
