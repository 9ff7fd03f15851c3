"""Identifiers planted in every input channel never reach any output byte of a whole run:
prepare -> pretrain (2 Ray Train workers, ZeRO-2, checkpoints) -> export -> evaluate, via `jepa-ray
demo` on a synthetic cohort that a careless export and an attacker have both touched.

Channels: DICOM headers (standard tags, a private tag, allowlisted fields holding free text, image
type values, a burned-in flag), folder and file names, static-table text columns (names, record
numbers, e-mail, birth dates, notes), free-text MEDS codes shared by every subject, and the dates of
all of these. Outputs: shard members, manifest, `_parts/`, checkpoints, run state and metrics,
exports, evaluation outputs, the command's own output, the driver's log and Ray's worker logs.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import ray
from typer.testing import CliRunner

from jepa_ray.cli import app
from jepa_ray.config import SynthConfig, load_config
from jepa_ray.synth.cohort import write_cohort

DEMO_CONFIG = str(Path(__file__).resolve().parents[1] / "jepa_ray" / "configs" / "demo-cpu.yaml")
FIRST, LAST = "Zebulon", "Quillfeather"
PLANTED = {
    "folder": f"{LAST}^{FIRST}_MRN7654321",
    "file": f"{FIRST}_{LAST}_19610203",
    "private": "Xanthippe Vorlauf-Ostermann",
    "manufacturer": "Dr Ignatz Wobbleton Imaging Suite",
    "view": "PA per Dr Wobbleton",
    "body_part": "CHEST of Quillfeather",
    "image_type": "ZEBULONSCAN",
    "comments": "called Quillfeather at home 555-867-5309",
    "burned": "BURNEDINZQ",
    "note_code": f"NOTE//{FIRST} {LAST} phoned about results, call back 555-867-5309",
    "email_code": "CONTACT//zebulon.quillfeather@example.org",
    "name_column": "Quillfeather-Ostrowski",
    "email_column": "quillfeather@example.net",
    "mrn_prefix": "MRN-88",
    "dob": "1961-02-03",
}
OVERRIDES = [
    "synth.subjects=60",
    "synth.sites=2",
    "prepare.image.size=32",
    "prepare.shards.max_samples=16",
    "prepare.split.external_sites=[]",
    "train.steps=4",
    "train.warmup_steps=1",
    "train.checkpoint_every=2",
    "eval.bootstrap=20",
    "eval.attentive_epochs=3",
    "eval.survival_epochs=3",
    "eval.survival_head_seeds=1",
    "eval.segmentation_steps=10",  # the heads' quality is not what this test reads
]


def _plant(cohort: Path) -> list[str]:
    """Plant identifiers in every channel of a written cohort; return every planted string."""
    files = sorted((cohort / "dicom").rglob("*.dcm"))
    for k, path in enumerate(files[:6]):
        ds = pydicom.dcmread(path)
        block = ds.private_block(0x0011, "ACME PACS", create=True)
        block.add_new(0x01, "LO", PLANTED["private"])
        ds.Manufacturer = PLANTED["manufacturer"]
        ds.ViewPosition = PLANTED["view"]
        ds.BodyPartExamined = PLANTED["body_part"]
        ds.ImageType = ["ORIGINAL", "PRIMARY", PLANTED["image_type"]]
        ds.ImageComments = PLANTED["comments"]
        if k == 0:
            ds.BurnedInAnnotation = "YES"
            ds.ImageComments = PLANTED["burned"]
        ds.save_as(path)
    # a patient's folder and a file named after them, as PACS exports often write them
    folder = files[6].parent
    named = folder.parent / PLANTED["folder"]
    folder.rename(named)
    first = sorted(named.glob("*.dcm"))[0]
    first.rename(named / f"{PLANTED['file']}.dcm")

    static = pd.read_parquet(cohort / "static.parquet")
    n = len(static)
    static["patient_name"] = [f"{PLANTED['name_column']}{i:03d}" for i in range(n)]
    static["mrn"] = [f"{PLANTED['mrn_prefix']}{i:05d}" for i in range(n)]
    static["email"] = [f"{i}{PLANTED['email_column']}" for i in range(n)]
    static["date_of_birth"] = PLANTED["dob"]
    static["notes"] = [f"seen by Dr {LAST} on {PLANTED['dob']}, stable" for _ in range(n)]
    static.to_parquet(cohort / "static.parquet", index=False)

    meds = sorted((cohort / "meds" / "data").glob("*.parquet"))
    first_meds = pd.read_parquet(meds[0])
    subjects = pd.read_parquet(cohort / "latents.parquet")["subject_id"].to_numpy()
    extra = pd.DataFrame(
        {
            "subject_id": np.repeat(subjects, 2),
            "time": pd.Timestamp("2019-01-02 03:04:05"),
            "code": [PLANTED["note_code"], PLANTED["email_code"]] * len(subjects),
            "numeric_value": np.float32(np.nan),
        }
    ).astype(first_meds.dtypes.to_dict())
    extra.to_parquet(cohort / "meds" / "data" / "zz_notes.parquet", index=False)

    planted = json.loads((cohort / "phi_planted.json").read_text())
    values = {str(v) for v in planted if len(str(v)) >= 4} | set(PLANTED.values())
    values |= {FIRST, LAST, "Wobbleton", "Vorlauf", "555-867-5309", "19610203", "MRN7654321"}
    return sorted(values)


def _blobs(root: Path) -> dict[str, bytes]:
    out = {}
    for p in root.rglob("*"):
        if p.is_file():
            out[str(p.relative_to(root))] = p.read_bytes()
            out[f"name of {p.relative_to(root)}"] = str(p.relative_to(root)).encode()
    return out


def test_no_planted_identifier_reaches_any_output_of_a_whole_run(ray_session, tmp_path, caplog):
    out = tmp_path / "demo"
    cfg = load_config(DEMO_CONFIG, [o for o in OVERRIDES if o.startswith("synth.")])
    write_cohort(out / "cohort", SynthConfig(**cfg.synth.model_dump()))
    values = _plant(out / "cohort")
    subject_ids = pd.read_parquet(out / "cohort" / "latents.parquet")["subject_id"].astype(str).tolist()
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    before = {p for p in logs.rglob("*") if p.is_file()}

    caplog.clear()  # pydicom's warnings about the planted values, while planting them
    with caplog.at_level(logging.DEBUG):
        r = CliRunner().invoke(
            app, ["demo", "--out", str(out), "--config", DEMO_CONFIG, "--no-mae", *OVERRIDES]
        )
    assert r.exit_code == 0, r.output[-3000:]
    # the console a person reads, here not a terminal: no escape codes, one line per training report
    assert "\x1b[" not in r.output, r.output[-3000:]
    assert re.search(r"^JEPA demo-\S+: step 4/4 \(100%\)  loss \d", r.output, re.M), r.output[-3000:]
    assert (out / "jepa-ray.log").is_file()  # searched below with every other output

    shutil.rmtree(out / "cohort")  # the inputs: everything left was written by the run
    blobs = _blobs(out)
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    # every kind of output is there to be searched
    kinds = {
        "shard": any(k.endswith(".tar") for k in blobs),
        "manifest": "shards/manifest.json" in blobs,
        "checkpoint": any("checkpoint" in k for k in blobs),
        "export": "encoder.safetensors" in blobs,
        "evaluation": any(k.startswith("eval/") for k in blobs),
    }
    assert all(kinds.values()), kinds
    # ... and the planted inputs were read, then dropped or coarsened, not missed
    reasons = {q["reason"] for q in manifest["quarantine"]["items"]}
    assert "burned_in_annotation" in reasons, reasons
    dropped = {c["column"] for c in manifest["ehr"]["dropped_columns"]}
    assert {"patient_name", "mrn", "email", "date_of_birth", "notes"} <= dropped, dropped
    assert sum(manifest["ehr"]["dropped_codes"].values()) == 2

    blobs["command output"] = r.output.encode()
    blobs["driver log"] = caplog.text.encode()
    for p in logs.rglob("*"):
        if p.is_file() and p not in before and p.stat().st_size < 50_000_000:
            blobs[f"ray log {p.name}"] = p.read_bytes()
    leaks = sorted({(v, where) for v in values for where, b in blobs.items() if v.encode() in b})
    assert not leaks, f"planted identifiers found in outputs: {leaks[:8]}"
    # raw subject ids as whole numbers (never inside a longer number, e.g. a float's digits)
    ids = re.compile(rb"(?<![\d.])(" + "|".join(subject_ids).encode() + rb")(?!\d)")
    hits = sorted({(m.group().decode(), where) for where, b in blobs.items() for m in ids.finditer(b)})
    assert not hits, f"raw subject ids found in outputs: {hits[:8]}"
