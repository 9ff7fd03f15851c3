"""A tiny 3-D pretraining run on CT volumes: 2 CPU Ray Train workers under ZeRO-2, with activation
checkpointing, then the evaluation on the same shards, with nothing changed but the config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from safetensors.torch import load_file

from jepa_ray.config import load_config
from jepa_ray.eval.evaluate import evaluate
from jepa_ray.train.export import export
from jepa_ray.train.trainer import pretrain

CT_RUN = [
    "pipeline.dims=3",
    "pipeline.volume_size=[8,32,32]",
    "pipeline.tubelet=[4,8,8]",
    "pipeline.mask.min_context_patches=4",
    "pipeline.max_events=12",
    "pipeline.batch_size=4",
    "model.activation_checkpointing=-1",
    "train.num_workers=2",
    "train.zero_stage=2",
    "train.cpus_per_worker=0.5",
    "train.steps=4",
    "train.warmup_steps=1",
    "train.log_every=2",
    "train.checkpoint_every=4",
    "train.val_batches=1",
    "eval.bootstrap=20",
    "eval.survival_epochs=30",
    "eval.survival_head_seeds=1",  # what is read here is that every image reaches the heads, not their c-index
    "eval.attentive_epochs=5",
]


def test_a_tiny_3d_run_trains_on_2_workers_with_zero2_and_evaluates(
    ct_cohort, ct_shards, tmp_path, ray_session
):
    cfg = load_config(
        overrides=[f"train.shards={ct_shards}", f"train.storage_path={tmp_path / 'runs'}", *CT_RUN]
    )
    info = pretrain(cfg, name="ct")
    assert info.metrics["step"] == 4 and np.isfinite(info.metrics["loss"])
    assert np.isfinite(info.metrics["val_loss"]) and info.metrics["val_rankme"] > 1
    weights, meta = export(info.run_url, tmp_path / "ct.safetensors")
    saved = json.loads(Path(meta).read_text())
    assert saved["dims"]["volume_size"] == [8, 32, 32] and saved["dims"]["channels"] == 2
    assert saved["pipeline"]["dims"] == 3 and saved["pipeline"]["tubelet"] == [4, 8, 8]
    out = tmp_path / "eval"
    metrics = evaluate(str(weights), str(ct_shards), cfg, out, latents=str(ct_cohort[0] / "latents.parquet"))
    assert (out / "report.md").exists() and (out / "metrics.json").exists()
    assert metrics["counts"]  # every split the shards have was embedded through the 3-D encoder
    assert "cindex" in metrics and "latent_r2" in metrics


MIXED_RUN = [
    "pipeline.dims=mixed",
    "pipeline.image_size=48",
    "pipeline.patch_size=8",  # 6x6 = 36 patches: here the radiographs' grid is the larger
    *[o for o in CT_RUN if not o.startswith(("pipeline.dims", "train.zero_stage"))],
    "train.zero_stage=3",
]


def test_one_model_over_radiographs_and_ct_trains_under_zero3_and_evaluates(ct_cohort, ct_shards, tmp_path):
    cfg = load_config(
        overrides=[f"train.shards={ct_shards}", f"train.storage_path={tmp_path / 'runs'}", *MIXED_RUN]
    )
    info = pretrain(cfg, name="mixed")
    assert (
        info.metrics["step"] == 4
        and np.isfinite(info.metrics["loss"])
        and np.isfinite(info.metrics["val_loss"])
    )
    weights, meta = export(info.run_url, tmp_path / "mixed.safetensors")
    saved = json.loads(Path(meta).read_text())
    assert saved["dims"]["mixed"] and saved["pipeline"]["dims"] == "mixed"
    tensors = load_file(str(weights))
    assert tensors["target.image.patch.weight"].shape[1:] == (1, 8, 8)  # radiographs: 1 channel
    assert tensors["target.image.patch3.weight"].shape[1:] == (2, 4, 8, 8)  # CT: 2 windows
    out = tmp_path / "eval"
    metrics = evaluate(str(weights), str(ct_shards), cfg, out, latents=str(ct_cohort[0] / "latents.parquet"))
    kinds = {"ct_volume": 0, "radiograph": 0}
    for split in ("train", "test"):  # every image of either kind was embedded, none left out
        table = pq.read_table(out / "embeddings" / "pretrained" / f"{split}.parquet").to_pydict()
        for has_image, meta in zip(table["has_image"], table["meta"], strict=True):
            m = json.loads(meta)
            assert has_image == m["has_image"]
            if has_image:
                kinds["ct_volume" if m["image"].get("kind") == "ct_volume" else "radiograph"] += 1
    assert kinds["ct_volume"] >= 3 and kinds["radiograph"] >= 3, kinds
    assert "cindex" in metrics and "latent_r2" in metrics
