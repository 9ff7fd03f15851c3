"""Shard writing: the tar bytes webdataset writes, and a writer light enough for every Ray worker."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np

from jepa_ray.ingest.write import TarWriter
from jepa_ray.shards.format import dumps, encode_npz


def test_tar_writer_writes_what_webdataset_writes_and_reads(tmp_path):
    import webdataset as wds

    samples = [
        {"__key__": f"s{i:03d}", "meta.json": dumps({"i": i}), "image.npy": bytes([i]) * (700 + i)}
        for i in range(5)
    ]
    samples[2]["ehr.npz"] = encode_npz({"codes": np.arange(3, dtype=np.int32)})
    ours, theirs = io.BytesIO(), io.BytesIO()
    writer = TarWriter(ours)
    reference = wds.TarWriter(theirs, user="jepa-ray", group="jepa-ray", mode=0o444, encoder=False, mtime=0.0)
    for sample in samples:
        writer.write(dict(sample))
        reference.write(dict(sample))
    writer.close()
    reference.close()
    assert ours.getvalue() == theirs.getvalue()  # same bytes: shard hashes in manifests stay valid
    (tmp_path / "a.tar").write_bytes(ours.getvalue())
    read = list(wds.WebDataset(str(tmp_path / "a.tar"), shardshuffle=False))
    assert [s["__key__"] for s in read] == [s["__key__"] for s in samples]
    assert read[2]["ehr.npz"] == samples[2]["ehr.npz"] and read[4]["image.npy"] == samples[4]["image.npy"]


def test_decoding_and_writing_a_shard_imports_neither_torch_nor_webdataset(tmp_path):
    # Each fresh Ray worker of `prepare` would pay ~1 s to import torch (webdataset imports it too).
    script = f"""
import sys
from pathlib import Path
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid
from jepa_ray.config import ImageConfig, StorageConfig
from jepa_ray.ingest.tasks import _write_from_chunks, decode_images
from jepa_ray.ingest.write import SampleSpec

paths = []
for i, syntax in enumerate([None, JPEG2000Lossless]):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality, ds.PatientID, ds.StudyInstanceUID = "CT", "P1", generate_uid()
    ds.Rows = ds.Columns = 600
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(600 * 600) % 4000).astype(np.uint16).tobytes()
    if syntax:
        ds.compress(syntax, generate_instance_uid=False)
    path = Path(r"{tmp_path}") / f"{{i}}.dcm"
    ds.save_as(path, enforce_file_format=True)
    paths.append([(str(path), f"{{i}}.dcm")])
decoded = decode_images(paths, ImageConfig())
assert all(d["image"] is not None for d in decoded), decoded
assert decoded[1]["meta"]["image"]["j2k_reduction"] == 1, decoded[1]["meta"]
specs = [SampleSpec(key=f"k{{i}}", split="train", dicoms=paths[i], ehr=None) for i in range(2)]
record = _write_from_chunks("shard-000000", "train", "fp", specs, r"{tmp_path / "out"}", StorageConfig(), decoded)
assert record["image"] == 2, record
print(sorted(m for m in ("torch", "webdataset") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
    assert (tmp_path / "out" / "shard-000000.tar").exists()
