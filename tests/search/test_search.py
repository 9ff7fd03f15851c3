"""`jepa-ray index` / `search`: the vectors are the evaluation's, search matches brute force, filters,
incremental reruns (added, changed, dropped shards), IVF, S3, and a query DICOM that leaks nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from jepa_ray.cli import app
from jepa_ray.config import ModelConfig, load_config
from jepa_ray.errors import ConfigError
from jepa_ray.model.io import save_jepa
from jepa_ray.model.jepa import JEPA
from jepa_ray.search.index import build_index, part_vectors, read_part
from jepa_ray.search.query import open_index, search_vectors, vector_of_dicom, vector_of_key
from jepa_ray.stream.pipeline import open_split

PIPELINE = ["pipeline.image_size=32", "pipeline.patch_size=8", "pipeline.max_events=12", "eval.batch_size=16"]


def _encoder(shards: Path, path: Path, seed: int = 0) -> Path:
    """A tiny random-init JEPA of the shards' shape, in the export format."""
    import torch

    cfg = load_config(overrides=PIPELINE)
    torch.manual_seed(seed)
    model = JEPA(
        open_split(str(shards), "train").spec.model_dims(cfg.pipeline),
        ModelConfig(width=32, depth=1, heads=2),
    )
    pipeline = {
        k: getattr(cfg.pipeline, k)
        for k in ("image_size", "patch_size", "normalize", "max_events", "max_static_codes")
    }
    return save_jepa(model.eval(), path, pipeline)


@pytest.fixture(scope="module")
def archive(small_shards, tmp_path_factory):
    """A copy of the small shard set (the tests drop a shard from it) and an encoder for it."""
    root = tmp_path_factory.mktemp("archive")
    shutil.copytree(small_shards, root / "shards")
    return root / "shards", _encoder(small_shards, root / "enc" / "encoder.safetensors")


def _all(store_url: str, storage=None) -> tuple[list[str], np.ndarray, list[dict]]:
    idx = open_index(store_url, storage)
    keys, vecs, rows = [], [], []
    for shard in idx.state["shards"]:
        t = read_part(idx.store, shard)
        keys += t["key"].to_pylist()
        vecs.append(part_vectors(t))
        rows += t.drop(["vector"]).to_pylist()
    return keys, np.concatenate(vecs), rows


def test_an_index_is_the_evaluations_embeddings_searched_exactly_and_grows_by_new_shards(
    archive, tmp_path, ray_session
):
    from jepa_ray.eval.embed import extract, read_embeddings
    from jepa_ray.eval.evaluate import resolve_encoder

    shards, enc = archive
    out = str(tmp_path / "index")
    # as embedded (index.centre=none): search must be brute force over the evaluation's vectors
    cfg = load_config(overrides=[*PIPELINE, "index.centre=none", "index.splits=[train]"])
    first = build_index(str(enc), str(shards), out, cfg)
    train = open_split(str(shards), "train")
    assert first.kind == "exact" and first.added == first.vectors == train.samples
    assert first.shards_embedded == sorted(train.expected)

    # every split now: only the shards not indexed yet are embedded, in groups of at most 10 samples
    # (whole shards of 8: one execution per shard), which must not change ids or vectors
    cfg = load_config(overrides=[*PIPELINE, "index.centre=none", "index.group_samples=10"])
    second = build_index(str(enc), str(shards), out, cfg)
    manifest = json.loads((shards / "manifest.json").read_text())
    assert second.shards_embedded == sorted(s["name"] for s in manifest["shards"] if s["split"] != "train")
    assert second.vectors == manifest["counts"]["samples"] and second.removed == 0
    assert build_index(str(enc), str(shards), out, cfg).added == 0  # nothing new: nothing embedded

    # the vectors are the evaluation's embeddings of the same samples, L2-normalised
    keys, vecs, rows = _all(out)
    assert len(set(keys)) == len(keys) == second.vectors
    emb = read_embeddings(
        extract(resolve_encoder(str(enc), cfg, tmp_path), str(shards), ["test"], cfg, tmp_path)["test"]
    )
    ref = emb["emb_image"] / np.linalg.norm(emb["emb_image"], axis=1, keepdims=True)
    where = {k: i for i, k in enumerate(keys)}
    np.testing.assert_allclose(vecs[[where[k] for k in emb["key"]]], ref, atol=1e-5)

    # search returns what brute force over the same vectors returns, the query itself left out
    idx = open_index(out)
    for qi in (0, 7, len(keys) - 1):
        sims = vecs @ vecs[qi]
        order = [keys[i] for i in np.argsort(-sims, kind="stable") if i != qi][:5]
        [hits] = search_vectors(idx, vecs[qi][None], 5, exclude=[keys[qi]])
        assert [h["key"] for h in hits] == order
        np.testing.assert_allclose([h["distance"] for h in hits], 1 - np.sort(sims)[::-1][1:6], atol=1e-5)
        assert np.allclose(vector_of_key(idx, keys[qi]), vecs[qi])

    # filters: on split, site, booleans and labels, combined with and
    site = rows[0]["site"]
    [hits] = search_vectors(idx, vecs[0][None], 100, where=f"split = test and site != {site}")
    expected = sum(r["split"] == "test" and r["site"] != site for r in rows) - (
        rows[0]["split"] == "test" and rows[0]["site"] != site
    )
    assert len(hits) == expected > 0 and all(h["split"] == "test" and h["site"] != site for h in hits)
    [hits] = search_vectors(idx, vecs[0][None], 100, where="has_image = false")
    assert hits and all(not h["has_image"] for h in hits)
    label = next(c for c in rows[0] if c.startswith("label_"))
    [hits] = search_vectors(idx, vecs[0][None], 100, where=f"{label} in (1)")
    assert len(hits) == sum(r[label] == 1 for r in rows) and all(h[label] == 1 for h in hits)
    with pytest.raises(ConfigError, match="no column 'hospital'"):
        search_vectors(idx, vecs[0][None], 5, where="hospital = x")
    with pytest.raises(ConfigError, match="cannot read"):
        search_vectors(idx, vecs[0][None], 5, where="split ~ test")


def _centred(vecs: np.ndarray, sites: list[str], centres: dict[str, np.ndarray]) -> np.ndarray:
    """Each vector minus its site's centre, normalised; zero vectors (no image) stay zero."""
    out = np.array(vecs, np.float64)
    for i, site in enumerate(sites):
        if np.linalg.norm(out[i]) > 0:
            out[i] = out[i] - centres[site]
            out[i] /= np.linalg.norm(out[i])
    return out


def test_region_vectors_are_the_evaluations_region_tokens_and_each_site_keeps_the_centre_it_was_given(
    archive, tmp_path, ray_session
):
    from jepa_ray.eval.embed import extract, read_embeddings
    from jepa_ray.eval.evaluate import resolve_encoder
    from jepa_ray.search.index import normalise

    shards, enc = archive
    out = str(tmp_path / "index")
    base = [*PIPELINE, "index.vectors=regions"]  # index.centre=site is the default
    build_index(str(enc), str(shards), out, load_config(overrides=[*base, "index.splits=[train]"]))
    _, vecs1, rows1 = _all(out)
    first = open_index(out).centres
    present = np.linalg.norm(vecs1, axis=1) > 0
    for site in {r["site"] for r in rows1}:
        mine = present & np.array([r["site"] == site for r in rows1])
        np.testing.assert_allclose(first[site], vecs1[mine].mean(0), atol=1e-5)

    # every split now: the sites centred by the first run keep their centres (the vectors already
    # in FAISS stay comparable with the new ones)
    cfg = load_config(overrides=base)
    build_index(str(enc), str(shards), out, cfg)
    idx = open_index(out)
    assert all(np.array_equal(idx.centres[site], c) for site, c in first.items())

    # the vectors: the evaluation's region tokens, each region layer-normed, then L2-normalised
    keys, vecs, rows = _all(out)
    emb = read_embeddings(
        extract(resolve_encoder(str(enc), cfg, tmp_path), str(shards), ["test"], cfg, tmp_path)["test"]
    )
    width = emb["emb_image"].shape[1]
    t = np.asarray(emb["img_tokens"], np.float32).reshape(len(emb["key"]), -1, width)
    assert t.shape[1] == cfg.eval.regions**2
    t = (t - t.mean(-1, keepdims=True)) / (t.std(-1, keepdims=True) + 1e-6)
    where = {k: i for i, k in enumerate(keys)}
    np.testing.assert_allclose(
        vecs[[where[k] for k in emb["key"]]], normalise(t.reshape(len(t), -1)), atol=1e-3
    )

    # search ranks by the site-centred vectors, from a key (its own site) or a vector and a site
    sites = [r["site"] for r in rows]
    centred = _centred(vecs, sites, idx.centres)
    for qi in (0, 9, len(keys) - 1):
        order = [keys[i] for i in np.argsort(-(centred @ centred[qi]), kind="stable") if i != qi][:5]
        [hits] = search_vectors(idx, vecs[qi][None], 5, exclude=[keys[qi]], sites=[sites[qi]])
        assert [h["key"] for h in hits] == order
    r = CliRunner().invoke(
        app, ["search", "--index", out, "--key", keys[9], "--k", "5", "--json", str(tmp_path / "r.json")]
    )
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [h["key"] for h in doc["neighbours"]] == [
        keys[i] for i in np.argsort(-(centred @ centred[9]), kind="stable") if i != 9
    ][:5]

    # centres that are not the recorded ones (lost, or rewritten): refitted, every vector re-added
    (Path(out) / "centres.npz").unlink()
    with pytest.raises(ConfigError, match=r"not the site centres index\.json records"):
        open_index(out)
    build_index(str(enc), str(shards), out, cfg)
    idx = open_index(out)
    refit = _centred(vecs, sites, idx.centres)
    assert not np.array_equal(idx.centres[rows[0]["site"]], first[rows[0]["site"]])  # now over every split
    order = [keys[i] for i in np.argsort(-(refit @ refit[9]), kind="stable") if i != 9][:5]
    [hits] = search_vectors(idx, vecs[9][None], 5, exclude=[keys[9]], sites=[sites[9]])
    assert [h["key"] for h in hits] == order

    with pytest.raises(ConfigError, match=r"built with index\.centre=site, not none"):
        build_index(str(enc), str(shards), out, load_config(overrides=[*base, "index.centre=none"]))
    with pytest.raises(ConfigError, match=r"index\.vectors=regions"):
        build_index(
            str(enc), str(shards), str(tmp_path / "ehr"), load_config(overrides=[*base, "index.modality=ehr"])
        )


def test_shards_are_embedded_in_groups_of_whole_shards_up_to_the_sample_bound():
    from jepa_ray.search.index import _groups

    shards = {"a": {"samples": 4}, "b": {"samples": 4}, "c": {"samples": 9}, "d": {"samples": 1}}
    assert _groups(["a", "b", "c", "d"], shards, 8) == [["a", "b"], ["c"], ["d"]]
    assert _groups(["a", "b", "c", "d"], shards, 100) == [["a", "b", "c", "d"]]
    assert _groups([], shards, 8) == []


def test_a_dropped_shard_leaves_the_index_and_another_encoder_is_refused(archive, tmp_path, ray_session):
    shards, enc = archive
    work = tmp_path / "shards"
    shutil.copytree(shards, work)
    out = str(tmp_path / "index")
    cfg = load_config(overrides=PIPELINE)
    built = build_index(str(enc), str(work), out, cfg)
    keys_before, _, rows = _all(out)

    manifest = json.loads((work / "manifest.json").read_text())
    victim = manifest["shards"][0]["name"]
    manifest["shards"] = manifest["shards"][1:]
    for split in manifest["splits"].values():
        split["shards"] = [n for n in split["shards"] if n != victim]
    (work / "manifest.json").write_text(json.dumps(manifest))
    again = build_index(str(enc), str(work), out, cfg)
    gone = {r["key"] for r in rows if r["shard"] == victim}
    assert again.removed == len(gone) > 0 and again.added == 0
    assert again.vectors == built.vectors - len(gone)
    keys_after, _, _ = _all(out)
    assert set(keys_after) == set(keys_before) - gone
    assert not (Path(out) / "parts" / victim.replace(".tar", ".parquet")).exists()
    with pytest.raises(ConfigError, match="--key"):
        vector_of_key(open_index(out), sorted(gone)[0])

    other = _encoder(shards, tmp_path / "other" / "encoder.safetensors", seed=1)
    with pytest.raises(ConfigError, match="indexed with another encoder"):
        build_index(str(other), str(work), out, cfg)
    rebuilt = build_index(str(other), str(work), out, cfg, rebuild=True)
    assert rebuilt.vectors == again.vectors and rebuilt.added == again.vectors

    # an index file that is not the one index.json records (an interrupted run) is rebuilt
    (Path(out) / "vectors.faiss").write_bytes(b"not an index")
    with pytest.raises(ConfigError, match="not the index file"):
        open_index(out)
    assert build_index(str(other), str(work), out, cfg).added == 0
    assert open_index(out).faiss_index.ntotal == rebuilt.vectors


def test_an_ivf_index_on_s3_finds_what_exact_search_finds(archive, s3_bucket, tmp_path, ray_session):
    shards, enc = archive
    endpoint, bucket = s3_bucket
    url = f"s3://{bucket}/index"
    cfg = load_config(overrides=[*PIPELINE, "index.exact_max=10", f"train.storage.endpoint_url={endpoint}"])
    built = build_index(str(enc), str(shards), url, cfg)
    assert built.kind == "ivf"
    state = open_index(url, cfg.train.storage).state
    assert state["recall_at_10"] >= 0.95 and state["nprobe"] >= 1  # chosen against exact search
    keys, vecs, _ = _all(url, cfg.train.storage)
    idx = open_index(url, cfg.train.storage, nprobe=1000)  # every list: exact
    sites = [r["site"] for r in _all(url, cfg.train.storage)[2]]
    centred = _centred(vecs, sites, idx.centres)
    for qi in (1, 5):
        [hits] = search_vectors(idx, vecs[qi][None], 5, exclude=[keys[qi]], sites=[sites[qi]])
        order = [keys[i] for i in np.argsort(-(centred @ centred[qi]), kind="stable") if i != qi][:5]
        assert [h["key"] for h in hits] == order
    r = CliRunner().invoke(
        app,
        ["search", "--index", url, "--key", keys[3], "--k", "4", f"train.storage.endpoint_url={endpoint}"],
    )
    assert r.exit_code == 0, r.output
    assert "4 nearest to" in r.output


PLANTED = {
    "PatientName": "Quixote^Dulcinea",
    "PatientID": "MRN-99817723",
    "PatientBirthDate": "19470312",
    "InstitutionName": "Saint Elsewhere Hospital",
    "ReferringPhysicianName": "Zhivago^Yuri",
    "AccessionNumber": "ACC-5550173",
    "StudyDescription": "CHEST Quixote follow-up",
}


def test_a_query_dicom_finds_its_own_study_and_its_identifiers_go_nowhere(
    archive, small_cohort, tmp_path, ray_session
):
    shards, enc = archive
    out = str(tmp_path / "index")
    cfg = load_config(overrides=PIPELINE)
    build_index(str(enc), str(shards), out, cfg)
    src = sorted((small_cohort / "dicom").rglob("*.dcm"))[0]
    ds = pydicom.dcmread(src)
    for name, value in PLANTED.items():
        setattr(ds, name, value)
    ds.add_new((0x0011, 0x0010), "LO", "ACME PRIVATE")
    ds.add_new((0x0011, 0x1001), "LO", "Quixote private note")
    query = tmp_path / "query.dcm"
    ds.save_as(query)

    # the same pixels and site as an archive sample: that sample is the nearest, at distance ~0
    idx = open_index(out)
    vector, safe = vector_of_dicom(idx, str(src), cfg)
    [hits] = search_vectors(idx, vector[None], 3, sites=[safe["site"]])
    assert hits[0]["distance"] < 1e-4 and hits[1]["distance"] > 1e-3
    assert set(safe) == {"modality", "view", "site"} and safe["site"] == hits[0]["site"]
    # the planted identifiers change nothing but the site: a pseudonym the archive lacks
    planted_vector, planted = vector_of_dicom(idx, str(query), cfg)
    np.testing.assert_allclose(planted_vector, vector, atol=1e-6)
    assert planted["site"].startswith("site-") and planted["site"] not in set(idx.meta["site"])

    result = tmp_path / "result.json"
    r = CliRunner().invoke(
        app, ["search", "--index", out, "--dicom", str(query), "--k", "5", "--json", str(result), *PIPELINE]
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(result.read_text())
    assert len(doc["neighbours"]) == 5 and doc["neighbours"][0]["key"] == hits[0]["key"]
    written = (
        r.output
        + result.read_text()
        + "".join(p.read_text(errors="ignore") for p in Path(out).rglob("*.json"))
    )
    for value in [*PLANTED.values(), "Quixote", "ACME"]:
        assert value.split("^")[0] not in written

    # a file that is not a usable DICOM, and an EHR index, are refused naming the input
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\0" * 200)
    r = CliRunner().invoke(app, ["search", "--index", out, "--dicom", str(bad), *PIPELINE])
    assert r.exit_code != 0 and "bad.dcm" in r.output and "cannot be used as a query" in r.output
    r = CliRunner().invoke(app, ["search", "--index", out, *PIPELINE])
    assert r.exit_code != 0 and "--dicom FILE or --key KEY" in r.output


def test_an_ivf_index_searches_as_many_lists_as_its_recall_target_needs():
    """Unclustered vectors (IVF's worst case): nprobe rises until recall@10 against brute force
    reaches the target, and exact_top is brute force."""
    from jepa_ray.search.index import exact_top, new_faiss_index, normalise, tune_nprobe

    rng = np.random.default_rng(0)
    x = normalise(rng.standard_normal((6000, 32)))
    q = x[rng.choice(6000, 64, replace=False)]
    sims = q @ x.T
    truth = np.argsort(-sims, axis=1, kind="stable")[:, :10]
    chunks = [(np.arange(i, i + 1000), x[i : i + 1000]) for i in range(0, 6000, 1000)]
    assert (exact_top(chunks, q, 10) == truth).all()

    index = new_faiss_index("ivf", 32, 6000, 64, lambda most: x[:most])
    index.add_with_ids(x, np.arange(6000, dtype=np.int64))
    nprobe, recall = tune_nprobe(index, chunks, q, 1, 0.95)
    assert recall >= 0.95 and 1 < nprobe <= 64 and index.nprobe == nprobe
    index.nprobe = max(nprobe // 2, 1)
    _, found = index.search(q, 10)
    assert np.mean([len(set(found[i]) & set(truth[i])) / 10 for i in range(64)]) < 0.95  # the smallest
