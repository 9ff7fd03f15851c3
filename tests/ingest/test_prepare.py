"""synth → prepare → inspect, end to end on a local Ray: counts, content, PHI, leakage, splits, resume."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from typer.testing import CliRunner

from jepa_ray.cli import app
from jepa_ray.config import PrepareConfig, load_config
from jepa_ray.errors import PrepareError, ShardError
from jepa_ray.ingest.deid import Pseudonymizer
from jepa_ray.ingest.prepare import prepare
from jepa_ray.shards.format import decode_npz
from jepa_ray.stream.pipeline import open_split

SALT = os.environ["JEPA_RAY_SALT"].encode()


def _cfg(**overrides) -> PrepareConfig:
    base = ["prepare.image.size=64", "prepare.shards.max_samples=16", "prepare.files_per_task=8"]
    return load_config(overrides=base + [f"prepare.{k}={v}" for k, v in overrides.items()]).prepare


def read_samples(out: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of every shard under `out`, grouped by key."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                samples[key][ext] = tf.extractfile(m).read()
                samples[key]["__shard__"] = tar_path.name.encode()
    return samples


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def prepared(ray_session, small_cohort, tmp_path_factory, cohort_inputs):
    out = tmp_path_factory.mktemp("shards")
    result = prepare(str(out), _cfg(), **cohort_inputs(small_cohort))
    return out, result


def test_counts_match_the_cohort(prepared, small_cohort):
    out, result = prepared
    assert result.ok, result.problems
    m = json.loads((out / "manifest.json").read_text())
    latents = pd.read_parquet(small_cohort / "latents.parquet")
    n_files = sum(1 for p in (small_cohort / "dicom").rglob("*") if p.is_file())
    ehr_only = int((~latents.has_image & latents.has_ehr).sum())
    assert m["inputs"]["dicom_files"] == n_files
    # one sample per study (one image per synthetic study) + one per EHR-only subject
    assert m["counts"]["image"] == n_files
    assert m["counts"]["samples"] == n_files + ehr_only
    assert m["counts"]["samples"] == sum(s["samples"] for s in m["shards"])
    samples = read_samples(out)
    assert len(samples) == m["counts"]["samples"]
    assert sum("image.npy" in s for s in samples.values()) == m["counts"]["image"]
    assert sum("ehr.npz" in s for s in samples.values()) == m["counts"]["ehr"]
    assert m["quarantine"]["count"] == 0
    for shard in m["shards"]:
        assert hashlib.sha256((out / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]


def test_sample_content(prepared):
    out, _ = prepared
    m = json.loads((out / "manifest.json").read_text())
    vocab = m["ehr"]["codes"]
    assert vocab[:2] == ["<pad>", "<unk>"] and "LAB//BNP" in vocab
    samples = read_samples(out)
    for s in samples.values():
        meta = json.loads(s["meta.json"])
        assert meta["has_image"] == ("image.npy" in s) and meta["has_ehr"] == ("ehr.npz" in s)
        if "image.npy" in s:
            img = np.load(io.BytesIO(s["image.npy"]))
            assert img.dtype == np.uint16 and img.shape == (1, 64, 64)
            assert img.max() > 30000  # normalised to the full 16-bit range
            assert meta["dicom"]["modality"] in ("CR", "DX")
        if "ehr.npz" in s:
            e = decode_npz(s["ehr.npz"])
            assert e["event_code"].shape == e["event_time"].shape == e["event_value"].shape
            assert e["event_code"].size <= 256 and e["event_code"].min(initial=2) >= 1
            assert e["static_num"].shape == (len(m["ehr"]["static_numeric"]),)
            assert np.all(np.diff(e["event_time"]) >= 0), "events are in time order"
        assert meta["split"] in ("train", "val", "test")
        assert s["__shard__"].decode().startswith(meta["split"] + "-")


def test_no_phi_in_any_output_byte(ray_session, prepared, small_cohort, caplog, cohort_inputs):
    out, _ = prepared
    planted = json.loads((small_cohort / "phi_planted.json").read_text())
    values = sorted(
        {str(v) for v in (planted if isinstance(planted, list) else _flatten(planted)) if len(str(v)) >= 4}
    )
    assert len(values) > 20
    subject_ids = pd.read_parquet(small_cohort / "latents.parquet")["subject_id"].astype(str)
    values += list(subject_ids)
    blobs = [p.read_bytes() for p in out.rglob("*") if p.is_file()]
    # the logs too: Ray's worker logs of this session (decoders, pydicom warnings) ...
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    blobs += [p.read_bytes() for p in logs.rglob("*") if p.is_file() and p.stat().st_size < 50_000_000]
    # ... and the driver's, for a rerun at DEBUG level
    with caplog.at_level(logging.DEBUG):
        prepare(str(out), _cfg(), **cohort_inputs(small_cohort))
    blobs.append(caplog.text.encode())
    assert b"shards planned" in blobs[-1], f"the driver logged nothing: {caplog.text[:300]!r}"
    for tar in out.glob("*.tar"):  # also the decoded member names and contents
        with tarfile.open(tar) as tf:
            blobs.append("\n".join(tf.getnames()).encode())
    leaks = [v for v in values for b in blobs if v.encode() in b]
    assert not leaks, f"PHI found in outputs: {sorted(set(leaks))[:5]}"


def _flatten(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _flatten(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _flatten(v)
    else:
        yield obj


def test_no_event_at_or_after_the_study_reaches_a_sample(prepared, small_cohort):
    """Recount, from the raw MEDS and DICOM inputs, the events strictly before each study."""
    import pydicom

    out, _ = prepared
    pz = Pseudonymizer(SALT)
    meds = pd.concat(pd.read_parquet(p) for p in sorted((small_cohort / "meds" / "data").glob("*.parquet")))
    meds = meds[meds.time.notna()]
    by_subject = {str(k): g.time.sort_values().to_numpy() for k, g in meds.groupby("subject_id")}
    samples = read_samples(out)
    checked = 0
    for path in sorted((small_cohort / "dicom").rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        key = pz.study(ds.PatientID, ds.StudyInstanceUID)
        study_time = pd.Timestamp(f"{ds.StudyDate} {ds.get('StudyTime', '000000')[:6]}")
        s = samples[key]
        times = by_subject.get(ds.PatientID, np.array([], dtype="datetime64[us]"))
        n_before = int((times < study_time.to_datetime64()).sum())
        if "ehr.npz" not in s:
            assert n_before == 0
            continue
        e = decode_npz(s["ehr.npz"])
        assert e["event_code"].size == min(n_before, 256)
        assert (e["event_time"] < 0).all(), "an event at or after the study time leaked in"
        if n_before:
            last_gap = (study_time.to_datetime64() - times[n_before - 1]) / np.timedelta64(1, "D")
            assert e["event_time"][-1] == np.floor(-last_gap)  # whole days (prepare.ehr.time_resolution_days)
        checked += 1
    assert checked > 10


def test_splits_never_share_a_subject(prepared):
    out, _ = prepared
    subject_splits = defaultdict(set)
    for s in read_samples(out).values():
        meta = json.loads(s["meta.json"])
        subject_splits[meta["subject"]].add(meta["split"])
    assert all(len(v) == 1 for v in subject_splits.values())
    assert {"train", "val", "test"} <= {next(iter(v)) for v in subject_splits.values()} | {"val", "test"}
    assert len(subject_splits) > 30


def test_vocab_is_fit_on_the_training_split_only(ray_session, small_cohort, tmp_path, cohort_inputs):
    """A code that only non-training subjects have must map to <unk>, not get an id."""
    cohort = tmp_path / "cohort"
    shutil.copytree(small_cohort, cohort)
    pz = Pseudonymizer(SALT)
    cfg = _cfg()
    files = sorted((cohort / "meds" / "data").glob("*.parquet"))
    f = files[0]
    t = pq.read_table(f)
    df = t.to_pandas()
    non_train = [
        s for s in df.subject_id.unique() if pz.unit(pz.subject(str(s))) < cfg.split.test + cfg.split.val
    ]
    assert non_train, "the cohort has no validation/test subject with events"
    row = df[df.subject_id == non_train[0]].iloc[[0]].copy()
    row["code"] = "SECRET//ONLY_IN_TEST"
    pq.write_table(pa.Table.from_pandas(pd.concat([df, row]), schema=t.schema, preserve_index=False), f)
    out = tmp_path / "out"
    prepare(str(out), cfg, **cohort_inputs(cohort))
    m = json.loads((out / "manifest.json").read_text())
    assert "SECRET//ONLY_IN_TEST" not in m["ehr"]["codes"]
    assert m["ehr"]["static_numeric"][0]["name"] in ("age", "bmi")


def test_interrupted_prepare_resumes_to_identical_shards(
    ray_session, small_cohort, prepared, tmp_path, cohort_inputs
):
    full, _ = prepared
    out = tmp_path / "out"
    # A directory where a shard must go makes that shard's task fail, as a crash would.
    blocked = sorted(p.name for p in full.glob("train-*.tar"))[1]
    (out / blocked).mkdir(parents=True)
    with pytest.raises(PrepareError, match="rerun the same command"):
        prepare(str(out), _cfg(), **cohort_inputs(small_cohort))
    assert not (out / "manifest.json").exists()
    written = sorted(p.name for p in out.glob("*.tar") if p.is_file())
    assert written and blocked not in written
    (out / blocked).rmdir()
    # also lose one finished shard, damage another on disk (same size, one byte), and leave a
    # stale one from an older plan behind
    (out / written[0]).unlink()
    damaged = bytearray((out / written[1]).read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    (out / written[1]).write_bytes(bytes(damaged))
    (out / "train-999999.tar").write_bytes(b"stale")
    (out / ".train-000000.tar.k1ll3d.tmp").write_bytes(b"half a shard, left by a killed writer")
    result = prepare(str(out), _cfg(), **cohort_inputs(small_cohort))
    assert result.ok
    assert result.skipped == len(written) - 2  # the damaged shard was rewritten, not trusted
    assert tree_digest(out) == tree_digest(full)


def test_a_failed_rerun_leaves_no_manifest_that_no_longer_matches(
    ray_session, small_cohort, prepared, tmp_path, cohort_inputs
):
    full, _ = prepared
    out = tmp_path / "out"
    shutil.copytree(full, out)
    shards = sorted(p.name for p in out.glob("train-*.tar"))
    (out / shards[0]).unlink()
    (out / shards[0]).mkdir()  # that shard cannot be rewritten: the rerun fails
    with pytest.raises(PrepareError, match="rerun the same command"):
        prepare(str(out), _cfg(), **cohort_inputs(small_cohort))
    assert not (out / "manifest.json").exists()  # the old one described a shard that is gone
    with pytest.raises(ShardError, match="no manifest; run `jepa-ray prepare` first"):
        open_split(str(out), "train")


def test_rerun_skips_everything(ray_session, prepared, small_cohort, cohort_inputs):
    out, _ = prepared
    before = tree_digest(out)
    result = prepare(str(out), _cfg(), **cohort_inputs(small_cohort))
    assert result.written == 0 and result.skipped == len(
        json.loads((out / "manifest.json").read_text())["shards"]
    )
    assert tree_digest(out) == before


def test_another_salt_is_refused(ray_session, prepared, small_cohort, monkeypatch, cohort_inputs):
    out, _ = prepared
    monkeypatch.setenv("JEPA_RAY_SALT", "a-different-salt-0123456789abcdef-0123")
    with pytest.raises(PrepareError, match="another salt"):
        prepare(str(out), _cfg(), **cohort_inputs(small_cohort))


def test_external_site_split(ray_session, small_cohort, tmp_path, cohort_inputs):
    import pydicom

    first = next((small_cohort / "dicom").rglob("*.dcm"))
    site = str(pydicom.dcmread(first, stop_before_pixels=True).InstitutionName)
    out = tmp_path / "out"
    cfg = _cfg()
    cfg.split.external_sites = [site]
    prepare(str(out), cfg, **cohort_inputs(small_cohort))
    m = json.loads((out / "manifest.json").read_text())
    assert m["splits"]["external"]["samples"] > 0
    assert site.encode() not in (out / "manifest.json").read_bytes()
    ext_site = Pseudonymizer(SALT).site(site)
    assert m["config"]["split"]["external_sites"] == [ext_site]
    for s in read_samples(out).values():
        meta = json.loads(s["meta.json"])
        if meta.get("site") == ext_site:
            assert meta["split"] == "external"


def test_cli_prepare_and_inspect(ray_session, small_cohort, prepared, tmp_path):
    out, _ = prepared
    runner = CliRunner()
    r = runner.invoke(app, ["inspect", str(out), "--verify"])
    assert r.exit_code == 0, r.output
    assert "all" in r.output and "match their sha256" in r.output
    r = runner.invoke(app, ["inspect", str(out), "--json"])
    summary = json.loads(r.output)
    assert (
        summary["counts"]["samples"] == json.loads((out / "manifest.json").read_text())["counts"]["samples"]
    )
    # a corrupted shard is caught by --verify
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    shard = sorted(bad.glob("*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = runner.invoke(app, ["inspect", str(bad), "--verify"])
    assert r.exit_code == 1 and "sha256 mismatch" in r.output and shard.name in r.output


def test_s3_end_to_end(ray_session, small_cohort, s3_bucket, prepared, cohort_inputs):
    import s3fs

    endpoint, bucket = s3_bucket
    url = f"s3://{bucket}/cohort/v1"
    cfg = _cfg(**{"storage.endpoint_url": endpoint})
    result = prepare(url, cfg, **cohort_inputs(small_cohort))
    assert result.ok
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    local, _ = prepared
    local_m = json.loads((local / "manifest.json").read_text())
    m = json.loads(fs.cat_file(f"{bucket}/cohort/v1/manifest.json"))
    # same inputs, same salt: the same shards, whether local or on S3
    assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in local_m["shards"]]
    assert (
        fs.cat_file(f"{bucket}/cohort/v1/{m['shards'][0]['name']}")
        == (local / m["shards"][0]["name"]).read_bytes()
    )
    r = CliRunner().invoke(app, ["inspect", url, "--verify", f"prepare.storage.endpoint_url={endpoint}"])
    assert r.exit_code == 0, r.output
    # rerun on S3 skips every finished shard
    again = prepare(url, cfg, **cohort_inputs(small_cohort))
    assert again.written == 0


def test_an_s3_outage_on_one_shard_fails_naming_it_and_a_rerun_writes_only_that_shard(
    ray_session, small_cohort, s3_bucket, prepared, cohort_inputs
):
    """Every upload of one shard refused (503), after its retries: prepare fails naming that
    shard's object, no manifest describes the half-written set, the shards that landed are kept;
    the rerun, with S3 back, writes the missing shard only and the set is the local one."""
    import s3fs
    from s3faults import FaultyS3

    endpoint, bucket = s3_bucket
    url = f"s3://{bucket}/cohort/v1"
    local = json.loads((prepared[0] / "manifest.json").read_text())
    victim = local["shards"][1]["name"]
    with FaultyS3(endpoint) as s3:
        s3.refuse("PUT", f"/{victim}", times=-1)
        cfg = _cfg(**{"storage.endpoint_url": s3.url, "storage.retries": 1})
        with pytest.raises(
            PrepareError, match=rf"1 shard\(s\) failed: .*{victim}: upload failed .*retried up to 1 times"
        ):
            prepare(url, cfg, **cohort_inputs(small_cohort))
        assert s3.count("PUT", f"/{victim}") >= 2
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    assert not fs.exists(f"{bucket}/cohort/v1/manifest.json") and not fs.exists(
        f"{bucket}/cohort/v1/{victim}"
    )
    again = prepare(url, _cfg(**{"storage.endpoint_url": endpoint}), **cohort_inputs(small_cohort))
    assert again.ok and again.written == 1
    m = json.loads(fs.cat_file(f"{bucket}/cohort/v1/manifest.json"))
    assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in local["shards"]]


def test_a_node_lost_while_shards_are_written_costs_no_sample_and_no_duplicate(
    small_cohort, s3_bucket, prepared, cohort_inputs, tmp_path
):
    """prepare on three Ray nodes (prepare_nodeloss.py, a process of its own), output on S3: the
    node of a running shard write is removed. The run (rerun once if it fails, as a user would)
    ends with exactly the local run's shards, byte for byte: no sample lost, none twice, no input
    quarantined for a failure that was the node's, no object left that the manifest does not name."""
    from clusterkit import run_script

    endpoint, bucket = s3_bucket
    overrides = [
        "prepare.image.size=64",
        "prepare.shards.max_samples=16",
        "prepare.files_per_task=8",
        f"prepare.storage.endpoint_url={endpoint}",
    ]
    assert _cfg().model_dump() == load_config(overrides=overrides[:3]).prepare.model_dump()
    result = tmp_path / "result.json"
    args = [
        str(result),
        f"s3://{bucket}/cohort",
        json.dumps(cohort_inputs(small_cohort)),
        json.dumps(overrides),
    ]
    done = run_script(Path(__file__).with_name("prepare_nodeloss.py"), args)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    r = json.loads(result.read_text())
    events, outcomes, m = r["events"], r["outcomes"], r["manifest"]
    assert events["error"] is None and events["removed_at"], events
    # the node went while shards were being written, not before or after
    assert events["writes_running_there"] >= 1 and events["shards_done_before"] < len(m["shards"]), events
    assert outcomes[-1].get("ok"), outcomes
    local = json.loads((prepared[0] / "manifest.json").read_text())
    assert [(s["name"], s["samples"], s["sha256"]) for s in m["shards"]] == [
        (s["name"], s["samples"], s["sha256"]) for s in local["shards"]
    ]
    assert m["counts"] == local["counts"]
    assert m["quarantine"]["count"] == 0
    shards = {s["name"] for s in m["shards"]}
    assert {o for o in r["objects"] if o.endswith(".tar")} == shards
    print(f"prepare with a node lost: {outcomes}, {events}")


def test_id_map_joins_dicom_patient_ids_to_meds_subjects(ray_session, small_cohort, tmp_path):
    """Hospital exports often key DICOM by MRN and MEDS by another id: an id map joins them."""
    import pydicom

    lat = pd.read_parquet(small_cohort / "latents.parquet")
    both = set(lat[lat.has_image & lat.has_ehr].subject_id.astype(str))
    dicom = tmp_path / "dicom"
    mapping = {}
    for i, path in enumerate(sorted((small_cohort / "dicom").rglob("*.dcm"))):
        ds = pydicom.dcmread(path)
        if ds.PatientID not in both:
            continue
        mapping[f"MRN-{ds.PatientID[::-1]}"] = ds.PatientID
        ds.PatientID = f"MRN-{ds.PatientID[::-1]}"
        (dicom / str(i)).mkdir(parents=True)
        ds.save_as(dicom / str(i) / "1.dcm")
    id_map = tmp_path / "ids.parquet"
    pd.DataFrame({"patient_id": list(mapping), "subject_id": list(mapping.values())}).to_parquet(id_map)
    inputs = {"dicom": str(dicom), "meds": str(small_cohort / "meds")}
    unmapped = prepare(str(tmp_path / "a"), _cfg(), **inputs).manifest
    mapped = prepare(str(tmp_path / "b"), _cfg(**{"ehr.id_map": str(id_map)}), **inputs).manifest
    n = sum(1 for _ in dicom.rglob("*.dcm"))
    assert n > 5
    assert unmapped["counts"]["paired"] == 0  # MRNs match no MEDS subject_id
    assert mapped["counts"]["paired"] == n  # every study now has its subject's EHR
    assert mapped["counts"]["samples"] < unmapped["counts"]["samples"]  # no separate EHR-only samples
