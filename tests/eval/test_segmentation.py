"""The segmentation probe: Dice as defined, a planted mask recovered from tokens that carry it (and
not from tokens that do not), and annotated shards read into tokens and aligned masks."""

from __future__ import annotations

import numpy as np
import pytest

from jepa_ray.eval.segmentation import SegSplit, dice, segmentation_probe


def test_dice_is_overlap_over_size_and_one_when_both_are_empty():
    a = np.zeros((1, 2, 4, 4), bool)
    b = np.zeros((1, 2, 4, 4), bool)
    a[0, 0, :2], b[0, 0, 1:3] = True, True  # 8 and 8 pixels, 4 shared
    assert dice(a, b).tolist() == [[0.5, 1.0]]
    assert dice(b, b)[0, 0] == 1.0


def _planted(n: int, informative: bool, seed: int) -> SegSplit:
    """Masks made of whole 4 x 4 patches on a 4 x 4 token grid; a token's first channel says
    whether its patch is inside when `informative`, else every channel is noise."""
    rng = np.random.default_rng(seed)
    inside = rng.random((n, 4, 4)) < 0.4
    tokens = rng.normal(size=(n, 4, 4, 8)).astype(np.float32)
    if informative:
        tokens[..., 0] = np.where(inside, 2.0, -2.0) + 0.3 * tokens[..., 0]
    masks = np.repeat(np.repeat(inside, 4, axis=1), 4, axis=2)[:, None]
    return SegSplit([str(i) for i in range(n)], tokens, masks, ["planted"])


@pytest.mark.parametrize(("informative", "lo", "hi"), [(True, 0.95, 1.0), (False, 0.0, 0.75)])
def test_the_probe_recovers_a_planted_mask_only_from_tokens_that_carry_it(informative, lo, hi):
    splits = {"train": _planted(96, informative, 0), "test": _planted(48, informative, 1)}
    result = segmentation_probe(splits, "train", ["test"], patch=4, bootstrap=50)
    for head in ("linear", "conv"):
        row = result[head]["test"]["planted"]
        assert lo <= row["dice"] <= hi, (head, row)
        assert row["ci"][0] <= row["dice"] <= row["ci"][1]
        assert result[head]["test"]["mean"]["dice"] == pytest.approx(row["dice"])


def test_annotated_shards_become_tokens_and_masks_in_the_encoders_grid(
    ray_session, small_cohort, cohort_inputs, tmp_path
):
    import torch

    from jepa_ray.config import ModelConfig, load_config
    from jepa_ray.eval.segmentation import load_split
    from jepa_ray.ingest.prepare import prepare
    from jepa_ray.model.jepa import JEPA
    from jepa_ray.stream.pipeline import open_split
    from jepa_ray.synth.phantom import STRUCTURES

    prep = load_config(overrides=["prepare.image.size=64", "prepare.shards.max_samples=16"]).prepare
    prepare(str(tmp_path), prep, **cohort_inputs(small_cohort), masks=str(small_cohort / "masks"))
    cfg = load_config(overrides=["pipeline.image_size=32", "pipeline.patch_size=8", "pipeline.max_events=12"])
    split = open_split(str(tmp_path), "train")
    torch.manual_seed(0)
    model = JEPA(split.spec.model_dims(cfg.pipeline), ModelConfig(width=32, depth=1, heads=2)).eval()
    s = load_split(model, split, cfg.pipeline)
    n_images = sum(1 for _ in s.keys)
    assert n_images == split.manifest["splits"]["train"]["masks"] > 0
    assert s.tokens.shape == (n_images, 4, 4, 32) and s.masks.shape == (n_images, len(STRUCTURES), 32, 32)
    assert s.names == sorted(STRUCTURES)
    heart = s.names.index("heart")
    lungs = [s.names.index("right_lung"), s.names.index("left_lung")]
    assert all(s.masks[i, heart].any() and s.masks[i, lungs].any() for i in range(n_images))
