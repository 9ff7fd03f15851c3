"""Typed configuration: YAML in, `key.path=value` overrides on the command line, clear errors.

Every key a user can set is a field of one of the models below; its docstring-style
`description` is the documentation. Unknown keys are errors, never silently ignored.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from jepa_ray.errors import ConfigError

ReadEncoder = Literal["target", "context"]  # which of an export's two encoders a read uses

MIN_SALT_CHARS = 32  # shorter salts are refused: see jepa_ray.ingest.deid


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SynthConfig(_Strict):
    """The synthetic cohort written by `jepa-ray synth`."""

    subjects: int = Field(200, ge=1, description="Number of subjects.")
    seed: int = Field(0, description="Random seed; the same seed writes the same cohort.")
    sites: int = Field(3, ge=1, le=8, description="Acquisition sites, each with its own intensity profile.")
    image_only_fraction: float = Field(
        0.15, ge=0, le=1, description="Fraction of subjects with DICOM studies but no EHR."
    )
    ehr_only_fraction: float = Field(
        0.15, ge=0, le=1, description="Fraction of subjects with EHR but no DICOM study."
    )
    max_studies: int = Field(3, ge=1, le=10, description="Studies per imaged subject: 1..max_studies.")
    compressed_fraction: float = Field(
        0.2, ge=0, le=1, description="Fraction of images stored with a compressed transfer syntax."
    )
    min_size: int = Field(320, ge=64, description="Smallest image side in pixels.")
    max_size: int = Field(640, ge=64, description="Largest image side in pixels.")
    ct_fraction: float = Field(
        0.0, ge=0, le=1, description="Fraction of imaging studies that are chest CT series, not radiographs."
    )
    ct_size: int = Field(96, ge=16, le=512, description="Rows and columns of each CT slice.")
    ct_slices: int = Field(32, ge=2, le=512, description="Slices per CT series (the chest, apex to base).")
    masks: bool = Field(
        True,
        description="Write each radiograph's ground-truth structure masks (lungs, heart, bone, lung zones) as "
        "PNGs under masks/, as an annotation export would (masks/structures.json says how).",
    )
    mass_contrast: float = Field(
        0.45,
        gt=0,
        le=2,
        description="Attenuation the radiographs' lung mass adds over what lies behind it (0.45: soft "
        "tissue); higher draws a more conspicuous finding, whose size the images show more plainly.",
    )

    @model_validator(mode="after")
    def _check(self) -> SynthConfig:
        if self.image_only_fraction + self.ehr_only_fraction > 1:
            raise ValueError("image_only_fraction + ehr_only_fraction must be at most 1")
        if self.min_size > self.max_size:
            raise ValueError("min_size must not exceed max_size")
        return self


class ImageConfig(_Strict):
    """How DICOM pixels become the fixed-size, single-channel image stored in a shard."""

    size: int = Field(224, ge=16, le=4096, description="Output side length; aspect is kept, rest padded.")
    clip_percentiles: tuple[float, float] = Field(
        (0.5, 99.5), description="Robust intensity range mapped to [0, 1] after the LUTs."
    )
    use_voi_lut: bool = Field(True, description="Apply the VOI LUT / window from the header when present.")
    j2k_reduce: bool = Field(
        True,
        description="Decode JPEG 2000 at the coarsest wavelet resolution level still at least `size` "
        "pixels on the longer side, instead of at full resolution (3-35x faster on those files; the "
        "level used is recorded per sample as image.j2k_reduction).",
    )

    @field_validator("clip_percentiles")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not 0 <= lo < hi <= 100:
            raise ValueError("need 0 <= low < high <= 100")
        return v


class VolumeConfig(_Strict):
    """How a CT series (one file per slice, or one enhanced multi-frame file) becomes the fixed-size
    volume stored in a shard: Hounsfield units, resampled, cropped or padded, windowed into channels."""

    enabled: bool = Field(
        False,
        description="Ingest a study's CT series as one 3-D volume. Off: CT series are skipped (with "
        "the reason ct_series_not_ingested), never read as single slices.",
    )
    spacing: tuple[float, float, float] = Field(
        (2.0, 1.5, 1.5), description="Voxel spacing in mm after resampling, (slice, row, column)."
    )
    size: tuple[int, int, int] = Field(
        (64, 128, 128), description="Volume size in voxels after resampling: centre-cropped or padded."
    )
    windows: dict[str, tuple[float, float]] = Field(
        default_factory=lambda: {"lung": (-600.0, 1500.0), "mediastinum": (40.0, 400.0)},
        description="CT windows as channels: name -> (centre, width) in HU, each mapped to [0, 1].",
    )
    pad_hu: float = Field(-1024.0, description="Value of padding voxels, in HU (air).")
    min_slices: int = Field(8, ge=2, description="Fewer slices than this: the series is quarantined.")
    gap_tolerance: float = Field(
        0.5,
        gt=0,
        description="A step between neighbouring slices beyond (1 + this) x the series' median step is "
        "a gap (missing slices); below (1 - this) x, inconsistent spacing. Either quarantines it.",
    )
    orientation_tolerance: float = Field(
        1e-3, gt=0, description="Largest difference of direction cosines still one orientation."
    )

    @field_validator("spacing")
    @classmethod
    def _positive(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(v) <= 0:
            raise ValueError("every spacing must be > 0 mm")
        return v

    @field_validator("size")
    @classmethod
    def _size(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if min(v) < 1:
            raise ValueError("every size must be >= 1 voxel")
        return v

    @field_validator("windows")
    @classmethod
    def _windows(cls, v: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        if not v:
            raise ValueError("at least one window is needed")
        for name, (_centre, width) in v.items():
            if width <= 0:
                raise ValueError(f"window {name}: width must be > 0 HU")
        return v


class EhrConfig(_Strict):
    """How MEDS events and static tables become a sample's EHR arrays."""

    max_events: int = Field(256, ge=1, description="Keep the last K events strictly before the index time.")
    min_code_count: int = Field(
        1, ge=1, description="Codes seen fewer times in the training split map to the unknown id."
    )
    min_subjects: int = Field(
        10,
        ge=1,
        description="A code, or a value of a categorical static column, enters the vocabulary (and "
        "the manifest) only when at least this many training subjects have it; rarer ones share the "
        "unknown id, so a value unique to one person is never written out.",
    )
    time_resolution_days: float = Field(
        1.0,
        gt=0,
        description="Event times (days before the index) are rounded down to this resolution (an "
        "event before the index stays before it); the birth event to whole years.",
    )
    max_age_years: float = Field(
        90.0,
        gt=0,
        description="Ages above this are written as this (HIPAA Safe Harbor: over 89 is one group): "
        "the birth event's time, static columns named age* (text ages too) and the values of MEDS age codes "
        "(AGE..., LOINC//30525-0, ... in their unit).",
    )
    static_numeric: list[str] | None = Field(
        None,
        description="Static-table columns to ingest as numbers. Set this or static_categorical to "
        "ingest declared columns only (every other column is dropped, with the reason `undeclared` "
        "in the manifest); unset, every column is typed from its values. Either way a column that "
        "looks like an identifier or free text is dropped.",
    )
    static_categorical: list[str] | None = Field(
        None, description="Static-table columns to ingest as categories (see static_numeric)."
    )
    id_map: str | None = Field(
        None,
        description="Parquet with columns patient_id (DICOM PatientID) and subject_id (MEDS); "
        "default: PatientID equals str(subject_id).",
    )


class SplitConfig(_Strict):
    """Subject-level splits: deterministic from the pseudonymous subject id."""

    val: float = Field(0.1, ge=0, lt=1, description="Fraction of subjects in the validation split.")
    test: float = Field(0.1, ge=0, lt=1, description="Fraction of subjects in the test split.")
    external_sites: list[str] = Field(
        default_factory=list,
        description="Sites held out as the `external` split, named by InstitutionName (or by the "
        "site pseudonym shown by `jepa-ray inspect`). Only pseudonyms are written out.",
    )

    @model_validator(mode="after")
    def _check(self) -> SplitConfig:
        if self.val + self.test >= 1:
            raise ValueError("val + test must leave room for a training split")
        return self


class ShardConfig(_Strict):
    """Size of the webdataset shards."""

    max_samples: int = Field(1000, ge=1, description="Samples per shard at most.")
    max_bytes: int = Field(256 * 2**20, ge=2**16, description="Bytes per shard at most (estimated).")


class DeidConfig(_Strict):
    """De-identification. The salt keys the HMAC pseudonyms and is never written out."""

    salt_env: str = Field("JEPA_RAY_SALT", description="Environment variable holding the salt.")
    salt_file: str | None = Field(
        None, description="File holding the salt (first line); `jepa-ray salt new FILE` writes one."
    )
    input_paths: Literal["relative", "hashed"] = Field(
        "hashed",
        description="How rejected inputs are named in the manifest, quarantine and logs: a salted hash "
        "of their path relative to the input root (PACS exports often name folders after the "
        "patient), or the path itself (`relative`, on a machine where the names are not identifying).",
    )
    burned_in: Literal["quarantine", "keep"] = Field(
        "quarantine",
        description="Images whose header says BurnedInAnnotation=YES (text such as names or dates "
        "drawn into the pixels): quarantined, or kept after your own pixel review.",
    )
    secondary_capture: Literal["quarantine", "keep"] = Field(
        "quarantine",
        description="Secondary-capture images (screenshots, scanned documents: often carry text in "
        "the pixels): quarantined, or kept.",
    )

    def resolve_salt(self) -> bytes:
        """The salt from the file or the environment; a clear error when there is none."""
        if self.salt_file:
            path = Path(self.salt_file).expanduser()
            try:
                salt = path.read_text().strip()
            except OSError as e:
                raise ConfigError(f"deid.salt_file {path}: cannot read the salt: {e.strerror}") from e
        else:
            salt = os.environ.get(self.salt_env, "").strip()
        where = f"deid.salt_file {self.salt_file}" if self.salt_file else f"${self.salt_env}"
        if not salt:
            raise ConfigError(
                f"no de-identification salt: set the environment variable {self.salt_env} or "
                "deid.salt_file to a random secret kept outside the output (`jepa-ray salt new FILE` "
                "writes one); the same salt gives the same pseudonyms on every run"
            )
        if len(salt) < MIN_SALT_CHARS:
            raise ConfigError(
                f"{where}: the salt has {len(salt)} characters, fewer than {MIN_SALT_CHARS}: a short "
                "salt can be guessed and every pseudonym reversed from a list of ids; `jepa-ray salt "
                "new FILE` writes 32 random bytes"
            )
        return salt.encode()


class LimitsConfig(_Strict):
    """Resource caps checked before anything is decoded: a file over a cap is quarantined with the
    reason `over_limit`, so one hostile or broken file cannot exhaust a worker's memory."""

    max_file_bytes: int = Field(
        2 * 2**30, ge=2**10, description="A DICOM file larger than this is not read (bytes on disk)."
    )
    max_inflated_bytes: int = Field(
        256 * 2**20,
        ge=2**16,
        description="A deflate-compressed DICOM whose dataset inflates beyond this many bytes is not "
        "read (counted in bounded steps before pydicom inflates it whole).",
    )
    max_pixels: int = Field(
        2**25,
        ge=2**10,
        description="Rows x Columns of a 2-D image or of one CT slice, at most (the default, ~33.5 M, "
        "is ~2.5x the largest mammograms; decoding costs a few bytes per pixel).",
    )
    max_voxels: int = Field(
        2**28,
        ge=2**12,
        description="Slices x Rows x Columns of a CT series before resampling, at most (~268 M: "
        "1,024 slices of 512x512; the series is held as float32, 4 bytes per voxel).",
    )


class StorageConfig(_Strict):
    """Where shards go when the output is `s3://...` (credentials come from the usual AWS env)."""

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. a MinIO URL.")
    region: str | None = Field(None, description="S3 region.")
    anon: bool = Field(False, description="Anonymous access (public buckets).")
    retries: int = Field(
        5,
        ge=0,
        le=20,
        description="Retries of one S3 request that the store refuses (5xx, throttling), drops or lets "
        "time out, with exponential backoff; then the read or upload fails naming the object.",
    )
    timeout_s: float = Field(
        60.0,
        gt=0,
        description="Connect and read timeout of one S3 request: a request that stalls longer is "
        "abandoned and retried.",
    )


class PrepareConfig(_Strict):
    """`jepa-ray prepare`: DICOM + MEDS into de-identified webdataset shards."""

    image: ImageConfig = Field(default_factory=ImageConfig)
    volume: VolumeConfig = Field(default_factory=VolumeConfig)
    ehr: EhrConfig = Field(default_factory=EhrConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    shards: ShardConfig = Field(default_factory=ShardConfig)
    deid: DeidConfig = Field(default_factory=DeidConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    max_quarantine_fraction: float = Field(
        0.2, ge=0, le=1, description="Exit non-zero when more than this fraction of inputs is quarantined."
    )
    files_per_task: int = Field(16, ge=1, description="DICOM files read per Ray task during the scan.")


class PolicyConfig(_Strict):
    """Weights of the masking policies (renormalised over those a sample allows)."""

    image_intra: float = Field(
        0.5, ge=0, description="Context: an image block (+ EHR); predict image blocks."
    )
    ehr_intra: float = Field(0.25, ge=0, description="Context: image + some EHR tokens; predict the others.")
    cross_modal: float = Field(
        0.25, ge=0, description="Context: one whole modality; predict the other (paired samples only)."
    )
    hide_image: float = Field(
        0.5, ge=0, le=1, description="Within cross_modal: probability that the image is the hidden modality."
    )


class MaskConfig(_Strict):
    """What the predictor must predict. `mask_ratio` is the one knob to sweep; the rest is for experts."""

    mask_ratio: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="Fraction of a modality's tokens to predict, under every policy: the image target "
        "blocks cover ~mask_ratio of the patches, mask_ratio of the EHR tokens are targets.",
    )
    ehr_mask_ratio: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Fraction of the EHR tokens to predict, when it should differ from mask_ratio "
        "(default: mask_ratio).",
    )
    num_target_blocks: int = Field(4, ge=1, le=16, description="Image target blocks per sample (M).")
    target_scale: tuple[float, float] | None = Field(
        None,
        description="Per-block scale range (fraction of the patches); default: derived from mask_ratio "
        "(about 0.16-0.21 of a 14x14 grid at 0.5 with 4 blocks, as in I-JEPA).",
    )
    target_aspect: tuple[float, float] = Field((0.75, 1.5), description="Target block aspect range (h/w).")
    context_scale: tuple[float, float] = Field(
        (0.85, 1.0), description="Context block scale range, before the targets are removed from it."
    )
    min_context_patches: int = Field(10, ge=1, description="Fewest patches the image context may keep.")
    through_depth: bool = Field(
        True,
        description="3-D: blocks span every slice (drawn on the in-plane grid, as V-JEPA masks through "
        "time); off: 3-D blocks.",
    )
    policy: PolicyConfig = Field(default_factory=PolicyConfig)

    @field_validator("target_scale", "context_scale")
    @classmethod
    def _scale(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0 < v[0] <= v[1] <= 1:
            raise ValueError("need 0 < low <= high <= 1")
        return v

    @field_validator("target_aspect")
    @classmethod
    def _aspect(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError("need 0 < low <= high")
        return v


class PipelineConfig(_Strict):
    """The Ray Data pipeline from shards to masked, batched training inputs."""

    dims: Literal[2, 3, "mixed"] = Field(
        2,
        description="2: radiographs (image_size, patch_size); 3: CT volumes from shards prepared with "
        "prepare.volume.enabled (volume_size, tubelet); with 2 or 3 the samples' images of the other "
        "kind are left out (their EHR is kept). mixed: both kinds in one model, each through its own "
        "patch embedder (2-D patches, 3-D tubelets) into the shared trunk.",
    )
    image_size: int = Field(224, ge=16, description="Side of the model's input image (a crop resized).")
    patch_size: int = Field(16, ge=1, description="ViT patch side; image_size must be a multiple.")
    volume_size: tuple[int, int, int] = Field(
        (32, 96, 96),
        description="3-D: the model's input volume (slices, rows, columns), resized from the shards'.",
    )
    tubelet: tuple[int, int, int] = Field(
        (4, 16, 16), description="3-D: patch size (slices, rows, columns); volume_size must be a multiple."
    )
    crop_scale: tuple[float, float] = Field(
        (0.3, 1.0),
        description="Random resized crop: area range, as a fraction of the stored image (I-JEPA's "
        "0.3-1.0: the same anatomy at other scales and offsets to the patch grid; at 0.8-1.0 the "
        "learning benchmark's JEPA lost a one-patch finding to its random init in one seed).",
    )
    crop_aspect: tuple[float, float] = Field((0.9, 1.1), description="Random resized crop: aspect range.")
    contrast: float = Field(0.1, ge=0, lt=1, description="Contrast jitter: factor in [1-c, 1+c].")
    brightness: float = Field(0.05, ge=0, lt=1, description="Brightness jitter: offset in [-b, b].")
    gamma: float = Field(0.1, ge=0, lt=1, description="Gamma jitter: exponent in [1/(1+g), 1+g].")
    hflip: bool = Field(False, description="Random horizontal flips (off: anatomy is lateralised).")
    normalize: tuple[float, float] = Field(
        (0.5, 0.25), description="(mean, std) applied to the [0, 1] image."
    )
    max_events: int = Field(64, ge=1, description="EHR events per sample (the last K before the index).")
    max_static_codes: int = Field(8, ge=0, description="Static (time-less) EHR codes kept per sample.")
    batch_size: int = Field(32, ge=1, description="Samples per batch, per training worker.")
    prefetch_batches: int = Field(2, ge=0, description="Batches prepared ahead of the trainer.")
    shuffle_buffer: int = Field(
        0,
        ge=0,
        description="Training: samples shuffled together. Every epoch the shard order is shuffled and "
        "each shard's samples are permuted; with a buffer, consecutive shards holding at least this "
        "many samples are read and permuted as one (more mixing, more memory per read task).",
    )
    max_bad_samples: int = Field(
        100,
        ge=0,
        description="Samples that may be skipped (truncated or corrupt shards, missing fields) per "
        "epoch before the epoch fails.",
    )
    seed: int = Field(0, description="Seed of the file order, crops and masks (combined with the epoch).")
    mask: MaskConfig = Field(default_factory=MaskConfig)

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.dims != 2 and any(
            t < 1 or v % t for v, t in zip(self.volume_size, self.tubelet, strict=True)
        ):
            raise ValueError(f"volume_size {self.volume_size} is not a multiple of tubelet {self.tubelet}")
        for grid in self.grids:
            kind = "volume" if len(grid) == 3 else "image"
            # blocks through depth: a volume's context is counted on one slice of the grid
            patches = grid[1] * grid[2] if kind == "volume" and self.mask.through_depth else math.prod(grid)
            if self.mask.min_context_patches >= patches:
                raise ValueError(
                    f"mask.min_context_patches must be below the {patches} patches of the {kind}"
                )
        for name in ("crop_scale", "crop_aspect"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi or (name == "crop_scale" and hi > 1):
                raise ValueError(f"{name}: need 0 < low <= high" + (" <= 1" if name == "crop_scale" else ""))
        return self

    @property
    def grids(self) -> list[tuple[int, ...]]:
        """The patch grids of the run: [2-D], [3-D], or both for dims=mixed (in that order, which
        is also `is_volume`'s: 0 radiograph, 1 CT)."""
        out = []
        if self.dims != 3:
            g = self.image_size // self.patch_size
            out.append((g, g))
        if self.dims != 2:
            out.append(tuple(v // t for v, t in zip(self.volume_size, self.tubelet, strict=True)))
        return out


# name: (width, depth, heads); the predictor defaults to half the width and a third of the depth
PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (64, 2, 4),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}


class ModelConfig(_Strict):
    """The multimodal JEPA: a shared encoder trunk over image patches and EHR tokens, a predictor."""

    preset: Literal["tiny", "small", "base", "large", "huge"] = Field(
        "tiny", description="Encoder size: tiny (CPU tests, 64 wide, 2 deep) or ViT-S/B/L/H."
    )
    width: int | None = Field(None, ge=8, description="Encoder width; default from the preset.")
    depth: int | None = Field(None, ge=1, description="Encoder depth; default from the preset.")
    heads: int | None = Field(None, ge=1, description="Attention heads; default from the preset.")
    predictor_width: int | None = Field(
        None, ge=8, description="Predictor width; default: half the encoder's."
    )
    predictor_depth: int | None = Field(
        None,
        ge=1,
        description="Predictor depth (swept by Ray Tune); default: a third of the encoder's, at least 2.",
    )
    predictor_heads: int | None = Field(None, ge=1, description="Predictor heads; default: the encoder's.")
    mlp_ratio: float = Field(4.0, gt=0, description="Hidden width of the MLPs, as a multiple of the width.")
    objective: Literal["jepa", "mae"] = Field(
        "jepa",
        description="jepa: predict the EMA target encoder's latents of what is hidden; mae: the same "
        "context encoder, masks and budget, with a light decoder reconstructing the hidden content "
        "(per-patch normalised pixels, EHR values and categories): the reconstruction baseline. An "
        "mae run has no EMA target: the exported target encoder is the context encoder.",
    )
    loss: Literal["l2", "smooth_l1"] = Field(
        "l2", description="Distance between predicted and target latents (jepa) or pixels and values (mae)."
    )
    numeric_embedding: Literal["linear", "periodic", "piecewise"] = Field(
        "periodic",
        description="How a standardised EHR value (static numeric feature, event value) enters its "
        "token: periodic (cos/sin at learned frequencies, then a linear map and ReLU, per feature), "
        "piecewise (piecewise-linear over fixed bins, then a linear map, per feature) or linear (value "
        "x one learned direction: the hidden value barely moves its token, which pretraining on GBSG2 "
        "then learns to predict from the slot alone); Gorishniy et al. 2022. An export written before "
        "this field existed loads as linear.",
    )
    event_values: Literal["per_code", "shared"] = Field(
        "per_code",
        description="per_code: an EHR event's value also moves its token along a learned direction "
        "of its own code, besides the embedding every event value shares, so that a mean over the "
        "tokens keeps each code's values apart (a lab's level, not only how often it was measured); "
        "shared: the shared embedding only, where a BNP and a CRP of the same standardised value "
        "differ only by their codes' small embeddings. An export written before this field existed "
        "loads as shared.",
    )
    sigreg: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Weight lambda of SIGReg (Balestriero & LeCun 2025, LeJEPA) in the JEPA loss, "
        "(1 - lambda) * prediction + lambda * SIGReg: random 1-D projections of the context encoder's "
        "image-patch tokens are pulled toward a standard normal (Epps-Pulley), so pretraining keeps "
        "what the tokens carry instead of shrinking them onto what is easiest to predict. SIGReg here "
        "is the Epps-Pulley distance, not the test statistic (N x the distance, LeJEPA's form, whose "
        "weight 0.05 is ~0.94 here at 310 tokens a step): like the prediction loss it does not grow "
        "with the tokens a rank sees, so the weight means the same on 2 CPUs and on a GPU rank. From "
        "about 0.25 up SIGReg's gradient trains the image encoder alone and the predictor's shape no "
        "longer matters; 0.1 lets both train it (benchmarks/README.md, learning). The visible EHR tokens "
        "get a term of their own (model.sigreg_ehr); an mae run trains on its own loss alone. 0: the "
        "plain JEPA loss.",
    )
    sigreg_ehr: bool = Field(
        True,
        description="SIGReg also over the context encoder's visible EHR tokens, a term of its own beside "
        "the image patches' (lambda * (SIGReg(patches) + SIGReg(EHR tokens))), so that an EHR-only run "
        "is regularised too: (1 - lambda) * prediction + lambda * SIGReg(EHR tokens). With it, on "
        "GBSG2 pretraining reads slightly higher (+0.003 Harrell over six seeds, at the edge of "
        "noise), and on the learning benchmark's images lung and bone density gain "
        "(benchmarks/README.md). false: image-patch tokens only (the former default; a batch without "
        "images then trains on the prediction alone).",
    )
    target_layers: int = Field(
        1,
        ge=1,
        description="JEPA targets from the last K encoder blocks: each block's output layer-normed, "
        "then averaged (data2vec, Baevski et al. 2022); 1: the encoder's final output (I-JEPA). At "
        "most the encoder's depth; unused by an mae run.",
    )
    activation_checkpointing: int = Field(
        0,
        ge=-1,
        description="Encoder blocks, from the first, whose activations are recomputed in the backward "
        "pass instead of kept (-1: every block): memory for compute, for 3-D token counts.",
    )
    ema: tuple[float, float] = Field(
        (0.996, 1.0),
        description="EMA momentum of the target encoder: linear from the first to the second. A short "
        "run leaves the final target behind its context encoder (at 600 steps, 0.996 -> 1 makes it an "
        "average centred a third of the way in); starting lower helped the tiny image model's target "
        "encoder and hurt the GBSG2 table's (benchmarks/README.md, learning benchmark), so the default "
        "is I-JEPA's.",
    )

    init_from: str | None = Field(
        None,
        description="Start the context and target encoders from a ViT checkpoint file (safetensors, local or "
        "s3://): a timm or Hugging Face ViT / DINOv2 state dict, or a jepa-ray export. Patch embedding, "
        "positions (resized to the run's grid), blocks and final norm are mapped by name; what does not "
        "map is listed in the log. Nothing is downloaded: point at a file (docs/interop.md).",
    )
    init_normalize: tuple[list[float], list[float]] | None = Field(
        None,
        description="Per-channel (mean, std) of [0, 1] pixels the model.init_from checkpoint was trained with, "
        "folded into its patch embedding when its channels (RGB) differ from the run's (gray). Default: "
        "ImageNet's, what timm and Hugging Face ViTs use.",
    )
    positions: Literal["auto", "sincos", "learned"] = Field(
        "auto",
        description="Image patch positions: fixed sin-cos, or a learned table (initialised to sin-cos, or to "
        "a checkpoint's positions). auto: learned with model.init_from, else sin-cos.",
    )
    norm_eps: float = Field(
        1e-5,
        gt=0,
        description="LayerNorm epsilon of the encoders. To reproduce a checkpoint's features exactly, its own: "
        "1e-6 for timm ViTs and DINOv2, 1e-12 for Hugging Face ViT.",
    )

    @property
    def learned_positions(self) -> bool:
        return self.positions == "learned" or (self.positions == "auto" and self.init_from is not None)

    @field_validator("ema")
    @classmethod
    def _ema(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] <= v[1] <= 1:
            raise ValueError("need 0 <= start <= end <= 1")
        return v

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        depth = self.depth or PRESETS[self.preset][1]
        if self.target_layers > depth:
            raise ValueError(f"model.target_layers={self.target_layers} exceeds the encoder's {depth} blocks")
        return self


class TrainConfig(_Strict):
    """`jepa-ray pretrain`: Ray Train workers running the JEPA step under DeepSpeed ZeRO."""

    shards: str | None = Field(
        None, description="Prepared shards (local path or s3://...); its train and val splits are read."
    )
    storage: StorageConfig = Field(default_factory=StorageConfig)
    name: str | None = Field(
        None, description="Run name; rerunning with the same name and storage_path resumes the run."
    )
    storage_path: str = Field(
        "./runs", description="Where runs (checkpoints, metrics, plots) are kept: a directory or s3://..."
    )
    num_workers: int | tuple[int, int] = Field(
        2,
        description="Ray Train workers (one process per GPU, or per CPU slot); [min, max]: elastic, the "
        "run starts with as many as the cluster holds (at least min), shrinks when a node goes and grows "
        "when one joins, resuming from the last checkpoint each time.",
    )
    use_gpu: bool = Field(False, description="One GPU per worker; bf16 then.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved by each worker.")
    worker_resources: dict[str, float] = Field(
        {},
        description="Other Ray resources each worker needs, e.g. {trainer: 1} with nodes started as "
        "`ray start --resources='{\"trainer\": 1}'`: keeps workers to those nodes, so that an elastic "
        "or restarted group never takes the CPUs the data pipeline runs on.",
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(
        2,
        description="DeepSpeed ZeRO stage: 0 data parallel, 1 optimizer state, 2 + gradients, 3 + parameters.",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU.")
    offload_optimizer: bool = Field(False, description="ZeRO-Offload: optimizer state and step on the CPU.")
    offload_params: bool = Field(False, description="ZeRO-3 only: parameters kept on the CPU.")
    steps: int = Field(1000, ge=1, description="Optimizer steps of the whole run (the schedules' length).")
    warmup_steps: int = Field(100, ge=0, description="Linear learning-rate warm-up steps.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (per global batch as configured).")
    final_lr: float = Field(1e-6, ge=0, description="Learning rate at the end of the cosine decay.")
    weight_decay: tuple[float, float] = Field(
        (0.04, 0.4), description="Weight decay, cosine from the first to the second (none on biases/1-D)."
    )
    grad_clip: float = Field(1.0, ge=0, description="Gradient-norm clipping (0: off).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    global_batch: int | None = Field(
        None,
        ge=1,
        description="Samples per optimizer step over all workers; set, it replaces grad_accum, which "
        "becomes global_batch / (pipeline.batch_size x workers) at whatever number of workers the run "
        "has (it must divide for every number of workers num_workers allows).",
    )
    resize_check_s: float = Field(
        60.0, gt=0, description="Elastic runs: seconds between checks of the cluster for a new size."
    )
    log_every: int = Field(10, ge=1, description="Steps between metric reports.")
    checkpoint_every: int = Field(200, ge=1, description="Steps between checkpoints (and one at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept (the newest).")
    max_failures: int = Field(
        1, ge=-1, description="Worker-group restarts from the last checkpoint (-1: no limit)."
    )
    val_batches: int = Field(2, ge=0, description="Validation batches per report (fixed masks; 0: none).")
    tracker: Literal["none", "mlflow", "wandb"] = Field(
        "none",
        description="Also log the run to an experiment tracker: mlflow or wandb (parameters, metrics, "
        "loss plot, the exported encoder; docs/interop.md). The CSV and TensorBoard files are always written.",
    )
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking server (http://host:5000, sqlite:///file); default $MLFLOW_TRACKING_URI.",
    )
    experiment: str = Field("jepa-ray", description="MLflow experiment, or W&B project, the runs go to.")
    wandb_mode: Literal["offline", "online"] = Field(
        "offline",
        description="W&B: offline writes the run under <run>/wandb/ (upload later with `wandb sync`); "
        "online sends it to the W&B server ($WANDB_API_KEY, $WANDB_BASE_URL for a self-hosted one).",
    )
    tracker_parent: str | None = Field(
        None,
        description="What the run belongs to (set by `jepa-ray tune` for its trials): MLflow, the "
        "parent run's id; W&B, the run group.",
    )
    time_phases: bool = Field(
        False,
        description="On GPUs, wait for the device between the phases of a step so that the reported "
        "ms_forward / ms_backward / ms_step are true (`jepa-ray bench train` sets it); off, they time "
        "the launches.",
    )

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (v, v) if isinstance(v, int) else v
        if not 1 <= low <= high:
            raise ValueError("need a number of workers >= 1, or [min, max] with 1 <= min <= max")
        return v if isinstance(v, int) or low < high else low

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def elastic(self) -> bool:
        return not isinstance(self.num_workers, int)

    def accumulation(self, micro_batch: int, world: int) -> int:
        """Micro-batches per optimizer step at `world` workers: grad_accum, or what keeps global_batch."""
        if self.global_batch is None:
            return self.grad_accum
        return self.global_batch // (micro_batch * world)

    def rows(self, steps: int, micro_batch: int, world: int) -> int:
        """Samples `steps` optimizer steps read at `world` workers (every rank's micro-batches)."""
        return steps * self.accumulation(micro_batch, world) * micro_batch * world

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps})")
        return self


class EvalConfig(_Strict):
    """`jepa-ray evaluate`: frozen embeddings -> probes, kNN, retrieval, time-to-event heads."""

    fit_split: str = Field("train", description="Split the probes and heads are fit on.")
    val_split: str = Field("val", description="Split that stops the training of the time-to-event heads.")
    report_splits: list[str] = Field(
        ["test", "external"], description="Splits reported: internal test and held-out sites."
    )
    batch_size: int = Field(64, ge=1, description="Samples per embedding batch.")
    actors: int = Field(
        1, ge=1, description="Embedding actors (each holds one encoder; one GPU each with use_gpu)."
    )
    use_gpu: bool = Field(False, description="Embed on GPUs.")
    regions: int = Field(
        4,
        ge=1,
        description="Image tokens kept for fusion heads: patch tokens average-pooled to a regions x regions grid.",
    )
    encoder: Literal["auto", "target", "context"] = Field(
        "auto",
        description="Which of the export's encoders is read: target (the EMA encoder, what I-JEPA "
        "evaluates), context (the encoder the gradient trained), or auto: context where the data hold "
        "no images (an EHR-only evaluation), else target. On EHR tables read with few labels the "
        "context encoder reads better (10% labelled: GBSG2 +0.008 Harrell over six seeds, WHAS500 "
        "+0.012 to +0.024 over three; alike with every label), on the images the target does (attentive "
        "R² -0.028 on two of four factors under context); benchmarks/README.md, real EHR. A random "
        "init's two encoders are the same; an mae export's too.",
    )
    bootstrap: int = Field(200, ge=0, description="Bootstrap resamples for the 95% intervals (0: none).")
    segmentation_steps: int = Field(
        400,
        ge=1,
        description="AdamW steps (mini-batches of 32) of each segmentation head, for shards with masks.",
    )
    knn_k: int = Field(10, ge=1, description="Neighbours of the kNN probe (cosine).")
    recall_at: list[int] = Field([1, 5, 10], description="k of the retrieval recall@k.")
    random_baseline: bool = Field(
        True,
        description="Also evaluate a random-init encoder of the same shape: the run's own initial weights "
        "(drawn from its pipeline.seed, as the export records), or drawn from eval.seed.",
    )
    random_starts: int = Field(
        1,
        ge=1,
        le=32,
        description="Random-init encoders evaluated (with eval.random_baseline): the run's own start "
        "(random_init) and random_starts - 1 others of its shape drawn from the next seeds "
        "(random_init_2, ...). On a small table one start's read-out can sit far from a typical "
        "start's, so 'beats random init' is better judged against several.",
    )
    endpoint: str | None = Field(
        None, description="Time-to-event outcome of the survival heads; default: death, else the first."
    )
    survival_epochs: int = Field(300, ge=1, description="Training steps of each time-to-event head.")
    survival_head_seeds: int = Field(
        5,
        ge=1,
        le=16,
        description="Fits of each trained time-to-event head (seeds eval.seed, eval.seed + 1, ...), scored by "
        "their mean risk (with eval.survival_stopping=committee: its members); late fusion combines the mean risks. One attentive image head's c-index moves "
        "with its initialisation alone (sd 0.007-0.022, range up to 0.064 over ten fits on "
        "bench_learning's cohort), more than the effects it is read for; the mean of 5 fits moves about "
        "half as much (sd 0.006) and reads about 0.01 higher, at about 4.5 times the heads' time "
        "(benchmarks/README.md, learning).",
    )
    survival_stopping: Literal["val", "committee"] = Field(
        "val",
        description="How the trained time-to-event heads stop early. val: on eval.val_split, every fit "
        "stopped on the same ~100 subjects, so which subjects those are moves an attentive image head's "
        "c-index by about 0.02. committee: the heads (and the raw-EHR Cox model) learn from "
        "eval.fit_split and eval.val_split together; each head is eval.survival_head_seeds members "
        "(at least 2), member i fit on all but the i-th part of those subjects and stopped on that part, "
        "scored by their mean risk: steadier at the same cost (benchmarks/README.md, learning).",
    )
    attentive: bool = Field(
        True,
        description="Also fit an attentive probe on the image tokens (one learned query attends to the "
        "eval.regions² tokens, then a linear layer), beside the linear probe: image labels and latent R².",
    )
    attentive_epochs: int = Field(
        100, ge=1, description="Most epochs of the attentive probe; a fifth of the fit split picks how many."
    )
    attentive_lr: float = Field(3e-3, gt=0, description="AdamW learning rate of the attentive probe.")
    attentive_weight_decay: float = Field(
        0.05, ge=0, description="AdamW weight decay of the attentive probe."
    )
    attentive_heads: int = Field(
        4, ge=1, description="Attention heads of the attentive probe; must divide the encoder width."
    )
    grid: bool = Field(
        True,
        description="Also read the latent factors out of fold with a ridge on the eval.regions² image tokens "
        "concatenated in grid order (a weight for every position: a factor spread thinly over many "
        "positions, which pooling and the attentive probe miss); past 4,096 features through their "
        "principal components, fit within each training fold.",
    )
    label_fractions: list[float] = Field(
        [],
        description="Few-label read-outs: each a fraction (0-1, exclusive) of the fit split's labelled "
        "subjects that the linear read-outs (ridge Cox on the time-to-event outcome, logistic on each "
        "label, ridge on each latent factor; the raw-EHR Cox beside them) are refit on, for every "
        "encoder on the same rows, e.g. [0.05, 0.1, 0.2]: where pretraining should pay, and the "
        "paired difference with each other encoder says whether it does beyond noise. Empty: none.",
    )
    label_draws: int = Field(
        5,
        ge=1,
        le=100,
        description="Draws of the labelled subset per few-label fraction; each encoder's score is the mean "
        "over them (one draw of a few dozen subjects moves a c-index by hundredths).",
    )
    seed: int = Field(0, description="Seed of heads, probes and bootstrap.")

    @field_validator("label_fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        bad = [f for f in v if not 0 < f < 1]
        if bad:
            raise ValueError(
                f"each fraction must lie strictly between 0 and 1 (1 is every label, read already): got {bad}"
            )
        return sorted(set(v))

    @model_validator(mode="after")
    def _committee(self) -> EvalConfig:
        if self.survival_stopping == "committee" and self.survival_head_seeds < 2:
            raise ValueError(
                "survival_stopping=committee needs survival_head_seeds of at least 2 (its members), "
                f"got {self.survival_head_seeds}"
            )
        return self


class SearchDim(_Strict):
    """One dimension of a sweep's search space: exactly one of the keys."""

    values: list[Any] | None = Field(
        None,
        description="Discrete values: every one (grid searcher) or one drawn per trial (random, optuna).",
    )
    uniform: tuple[float, float] | None = Field(None, description="A float drawn uniformly from [low, high].")
    loguniform: tuple[float, float] | None = Field(
        None, description="A float drawn log-uniformly from [low, high] (both > 0), e.g. a learning rate."
    )
    randint: tuple[int, int] | None = Field(
        None, description="An integer drawn from low..high, both included."
    )

    @model_validator(mode="after")
    def _one(self) -> SearchDim:
        given = [k for k in ("values", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of values, uniform, loguniform, randint"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.values is not None and not self.values:
            raise ValueError("values: empty list")
        for k in ("uniform", "loguniform", "randint"):
            lo_hi = getattr(self, k)
            if lo_hi is not None and not lo_hi[0] <= lo_hi[1]:
                raise ValueError(f"{k}: need low <= high")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform: need low > 0")
        return self

    def candidates(self) -> list[Any]:
        """The values that bound this dimension (the list, or a range's ends): what validation checks."""
        if self.values is not None:
            return list(self.values)
        lo, hi = self.uniform or self.loguniform or self.randint
        return [lo, hi]


class AshaConfig(_Strict):
    """Asynchronous successive halving: trials behind at a rung of steps are stopped early."""

    enabled: bool = Field(True, description="Stop poor trials early (off: every trial runs train.steps).")
    grace_period: int = Field(
        40, ge=1, description="Optimizer steps every trial runs before it may be stopped."
    )
    reduction_factor: float = Field(
        2.0, gt=1, description="At each rung only the best 1/reduction_factor of the trials continue."
    )


# sweep keys across which the model's own loss (tune.objective=val_loss) is not one quantity: losses
# of different kinds; never measured there
VAL_LOSS_KINDS = {
    "model.objective": "losses of different kinds do not compare",
    "model.loss": "losses of different kinds do not compare",
}
# sweep keys across which it is one quantity but ranks nothing: they weigh another term into it, or
# change the predictor whose error it is (on the learning benchmark's cohort val_loss ordered
# predictor depths 4 > 1 > 2 in one seed and 2 > 4 > 1 in the next: bench_labelfree.py), or the
# target it predicts (the EMA average: how far it lags the context encoder). Refused as the
# objective; still measured beside another one (tune.measure_all), to be seen doing so
VAL_LOSS_CONFOUNDED = {
    "model.sigreg": "it weighs a second term into the loss",
    "model.sigreg_ehr": "it adds a term over the EHR tokens to the loss",
    "model.ema": "it changes the target encoder whose latents the loss predicts",
    "model.predictor_depth": "the loss measures the predictor as much as the encoder",
    "model.predictor_width": "the loss measures the predictor as much as the encoder",
    "model.predictor_heads": "the loss measures the predictor as much as the encoder",
}


class TuneConfig(_Strict):
    """`jepa-ray tune`: a Ray Tune sweep whose trials are `pretrain` runs, ranked by a label-free or
    labelled objective measured on the validation split during training."""

    name: str | None = Field(
        None, description="Sweep name: its directory is train.storage_path/<name>; reuse it with --resume."
    )
    space: dict[str, SearchDim] = Field(
        default_factory=dict,
        description="Config key -> dimension, e.g. pipeline.mask.mask_ratio: {values: [0.4, 0.6]}, "
        "model.predictor_depth: {randint: [1, 4]}. Any config key may be swept; every value is checked "
        "against the key's own limits before a trial starts.",
    )
    searcher: Literal["grid", "random", "optuna"] = Field(
        "grid",
        description="grid: every combination of the `values` lists (num_samples times); random: "
        "num_samples trials drawn at random; optuna: num_samples trials proposed by Optuna's TPE.",
    )
    num_samples: int = Field(1, ge=1, description="Trials (random, optuna) or repeats of the grid (grid).")
    objective: Literal["rankme", "lidar", "lidar_context", "val_loss", "probe_auroc", "cindex"] = Field(
        "val_loss",
        description="What ranks trials (higher is better), measured on the validation split. Label-free: "
        "rankme (effective rank of the target encoder's pooled embeddings), lidar / lidar_context "
        "(LiDAR: rank of the LDA matrix whose classes are samples and whose members are masked views of "
        "them, embedded by the target / context encoder), val_loss (the model's loss with masks drawn "
        "from the base config's mask setting for every trial, negated: the trial's own loss is not "
        "comparable across mask ratios). A label-free objective ranks a trial last when its encoder "
        "collapsed (below half the starting encoder's RankMe or spread). Labelled: probe_auroc "
        "(cross-validated logistic probe on a binary label) or cindex (cross-validated ridge Cox on a "
        "time-to-event outcome). Each trial reports it with a bootstrap standard error (objective_se). "
        "Default val_loss: against the attentive probe's R² of the learning cohort's ground-truth "
        "factors it ranked mask ratios x learning rates best (Spearman +0.87 / +0.80 over two seeds; "
        "lidar_context +0.38 / +0.87), see benchmarks/README.md. A sweep that names none and varies "
        "the predictor, the loss, model.sigreg or model.ema (which val_loss cannot compare) uses lidar_context; a "
        "ZeRO-3 one uses lidar (lidar_context and val_loss need the whole context encoder on one worker).",
    )
    measure_all: bool = Field(
        False,
        description="Also measure every label-free objective at each report (lf_<name>, lf_<name>_se) "
        "and, beside a labelled objective, each one's Spearman correlation with it across trials: "
        "which label-free objective to trust on this data. A few seconds per report on a CPU.",
    )
    label: str | None = Field(
        None,
        description="probe_auroc: the binary label; cindex: the time-to-event outcome (default: the "
        "first the validation split carries; death for cindex when present).",
    )
    eval_every: int = Field(
        20, ge=1, description="Steps between objective measurements (each one is a report to Tune)."
    )
    eval_batches: int = Field(
        8, ge=1, description="Validation batches (on the first worker) the objective is measured on."
    )
    asha: AshaConfig = Field(default_factory=AshaConfig)
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="Trials at once; default: as many as the cluster's CPUs and GPUs hold."
    )
    max_failures: int = Field(
        1, ge=0, description="Retries of a failed trial (on top of train.max_failures)."
    )
    seed: int = Field(0, description="Seed of the random and optuna searchers.")


class IndexConfig(_Strict):
    """`jepa-ray index` and `search`: a similar-case index of an archive's embeddings (FAISS).
    The data and the index are reached with train.storage (S3 endpoint and credentials)."""

    modality: Literal["image", "ehr", "joint"] = Field(
        "image",
        description="Which embedding is indexed: the target encoder on the image alone, the EHR alone, "
        "or both. A DICOM query needs image or joint.",
    )
    vectors: Literal["pooled", "regions"] = Field(
        "pooled",
        description="What stands for an image: `pooled`, the mean of its patch tokens (width numbers), or "
        "`regions`, its eval.regions x eval.regions grid of pooled patch tokens, each layer-normed, "
        "concatenated (regions² x width numbers: where things are is kept). index.modality=image only.",
    )
    centre: Literal["none", "site"] = Field(
        "site",
        description="`site`: each vector minus the mean of its site's vectors before comparison (a "
        "site's detector and protocol otherwise decide the nearest cases); `none`: as embedded.",
    )
    splits: list[str] | None = Field(None, description="Splits indexed; default: every split of the shards.")
    exact_max: int = Field(
        200_000,
        ge=1,
        description="Up to this many vectors the index is exact (every vector compared); above, an IVF "
        "index (inverted lists, index.nprobe of them searched per query).",
    )
    nlist: int | None = Field(
        None,
        ge=1,
        description="IVF lists; default 4 x sqrt(vectors), at least 64 (set when the IVF index is built).",
    )
    nprobe: int | None = Field(
        None,
        ge=1,
        description="IVF lists searched per query (more is slower and closer to exact). Default: what "
        "`index` chose, the fewest (from 8, doubling) whose recall@10 against exact search reached "
        "index.recall_target on 256 of the archive's own vectors.",
    )
    recall_target: float = Field(
        0.95,
        gt=0,
        le=1,
        description="recall@10 against exact search that an IVF index's nprobe is chosen for.",
    )
    k: int = Field(10, ge=1, description="Neighbours returned by search (--k overrides).")
    group_samples: int = Field(
        65_536,
        ge=1,
        description="Shards are embedded in groups of about this many samples (whole shards), one Ray Data "
        "execution each; a group's vectors are held until its parts are written, so this bounds "
        "`index`'s memory (~1.6 KB per sample at width 384).",
    )


class Config(_Strict):
    """Root of a jepa-ray config file; each command reads its own section."""

    synth: SynthConfig = Field(default_factory=SynthConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    ray_address: str | None = Field(None, description="Ray cluster address; default: start a local Ray.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @model_validator(mode="after")
    def _global_batch(self) -> Config:
        tc, b = self.train, self.pipeline.batch_size
        if tc.global_batch is not None:
            bad = [w for w in range(tc.min_workers, tc.max_workers + 1) if tc.global_batch % (b * w)]
            if bad:
                raise ValueError(
                    f"train.global_batch={tc.global_batch} is not a multiple of pipeline.batch_size={b} x "
                    f"{bad[0]} worker(s) (train.num_workers={tc.num_workers}): choose a global batch every "
                    "allowed number of workers divides"
                )
        return self

    @model_validator(mode="after")
    def _default_tune_objective(self) -> Config:
        # val_loss and lidar_context run the context encoder on the first worker alone, which ZeRO-3
        # shards across workers; val_loss does not compare settings of its own loss, predictor or
        # target (VAL_LOSS_KINDS, VAL_LOSS_CONFOUNDED)
        if "objective" in self.tune.model_fields_set:
            return self
        if self.train.zero_stage == 3:
            self.tune.objective = "lidar"
        elif any(k in self.tune.space for k in VAL_LOSS_KINDS | VAL_LOSS_CONFOUNDED):
            self.tune.objective = "lidar_context"
        else:
            self.tune.objective = "val_loss"
        return self


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for i, k in enumerate(keys[:-1]):
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {'.'.join(keys[: i + 1])} is not a section")
        node = child
    node[keys[-1]] = value


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading numbers as YAML 1.2 does: PyYAML follows YAML 1.1, where an
    exponent without a dot (`1e-05`, `3e4`) is a string, so a sweep's `values: [1e-05]` reached the
    trials, Tune's state and the trackers as the string '1e-05'."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(text: str) -> Any:
    """YAML text as jepa-ray reads every config and override (`YamlLoader`)."""
    return yaml.load(text, Loader=YamlLoader)  # a SafeLoader


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse `a.b=value` strings; values are read as YAML scalars/lists (`x=3`, `y=[a, b]`)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key.path=value")
        try:
            value = read_yaml(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from e
        parsed.append((key.strip(), value))
    return parsed


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        else:
            msg = e["msg"]
            if "input" in e and not isinstance(e["input"], dict):
                msg += f" (got {e['input']!r})"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"  # the demos' configs, installed with jepa-ray


def config_path(path: str | Path) -> Path:
    """A config file as given, else (a bare name such as `ct-demo.yaml` that is not a file here) the
    config of that name shipped with the package, so the demos run from any directory."""
    given = Path(path)
    if not given.exists() and given.parent == Path(".") and (PACKAGED_CONFIGS / given.name).is_file():
        return PACKAGED_CONFIGS / given.name
    return given


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults), apply overrides, validate; `ConfigError` on any problem.
    A bare file name that is not a file here names a config shipped with the package (`config_path`)."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = config_path(path)
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            shipped = ", ".join(sorted(p.name for p in PACKAGED_CONFIGS.glob("*.yaml")))
            raise ConfigError(
                f"config file {path}: cannot read it: {e.strerror} (configs shipped with jepa-ray, usable "
                f"by name from any directory: {shipped})"
            ) from e
        try:
            loaded = read_yaml(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path}: not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
        data = loaded
    for key, value in parse_overrides(overrides or []):
        set_path(data, key, value)
        source += f" + {key}={value!r}"
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None
