"""The JEPA model on real pipeline batches: shapes per policy, stop-gradient, EMA, no leakage."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from shardkit import raw_batch, raw_samples, train_in_memory

from jepa_ray.config import ModelConfig, load_config
from jepa_ray.model.jepa import JEPA, embedding_stats, momentum_at, sigreg, target_ema
from jepa_ray.stream.pipeline import collate, open_split
from jepa_ray.stream.transform import transform_batch


def _pipeline_cfg(*overrides: str):
    return load_config(
        overrides=["pipeline.image_size=32", "pipeline.patch_size=8", "pipeline.max_events=12", *overrides]
    ).pipeline


@pytest.fixture(scope="module")
def split(small_shards):
    return open_split(str(small_shards), "train")


@pytest.fixture(scope="module")
def samples(split):
    out = {}
    for p in split.paths[:3]:
        out.update(raw_samples(p))
    return out


def make_batch(split, samples, *overrides: str, drop: str | None = None, epoch: int = 0) -> dict:
    """A collated batch; drop="image" or "ehr" turns every sample into a one-modality one."""
    chosen = {}
    for key, fields in samples.items():
        if drop and drop not in fields:
            continue
        if drop:
            meta = json.loads(fields["meta"])
            meta[f"has_{drop}"] = False
            other = "ehr" if drop == "image" else "image"
            if other not in fields:
                continue
            fields = {k: v for k, v in fields.items() if k != drop} | {"meta": json.dumps(meta).encode()}
        chosen[key] = fields
    cfg = _pipeline_cfg(*overrides)
    return collate(transform_batch(raw_batch(chosen), split.spec, cfg, train=True, epoch=epoch))


def _model(split, **model):
    torch.manual_seed(0)
    return JEPA(split.spec.model_dims(_pipeline_cfg()), ModelConfig(**model))


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ("image_intra=1 ehr_intra=0 cross_modal=0", {"image_intra", "ehr_intra"}),
        ("image_intra=0 ehr_intra=1 cross_modal=0", {"ehr_intra", "image_intra"}),
        ("image_intra=0 ehr_intra=0 cross_modal=1", {"hide_image", "hide_ehr", "image_intra", "ehr_intra"}),
    ],
)
def test_loss_for_every_policy(split, samples, weights, expected):
    overrides = [f"pipeline.mask.policy.{w}" for w in weights.split()]
    batch = make_batch(split, samples, *overrides)
    out = _model(split)(batch)
    assert out["loss"].shape == () and torch.isfinite(out["loss"]) and out["loss"] > 0
    parts = {k.removeprefix("loss_") for k in out if k.startswith("loss_")}
    assert parts and parts <= expected  # samples lacking a modality fall back to what they allow
    assert out["targets"] == batch["img_tgt_keep"].sum() + batch["ehr_tgt"].sum()


@pytest.mark.parametrize("drop", ["image", "ehr"])
def test_one_modality_batches(split, samples, drop):
    batch = make_batch(split, samples, drop=drop)
    assert not batch[f"has_{drop}"].any() and len(batch["key"]) >= 3
    model = _model(split)
    out = model(batch)
    assert torch.isfinite(out["loss"])
    assert set(k for k in out if k.startswith("loss_")) == {
        "loss_ehr_intra" if drop == "image" else "loss_image_intra"
    }
    enc = model.encode(batch, "ehr" if drop == "image" else "image")
    assert enc["pooled"].shape == (len(batch["key"]), model.width) and torch.isfinite(enc["pooled"]).all()


def test_encode_modalities_and_shapes(split, samples):
    batch = make_batch(split, samples)
    model = _model(split)
    b, n, L = len(batch["key"]), model.dims.patches, model.dims.ehr_tokens
    both, image, ehr = (model.encode(batch, m) for m in ("both", "image", "ehr"))
    assert both["tokens"].shape[0] == b and both["pooled"].shape == (b, model.width)
    assert image["keep"][:, 1 + n :].sum() == 0 and ehr["keep"][:, 1 : 1 + n].sum() == 0
    assert image["keep"][:, 1 : 1 + n].sum() == n * batch["has_image"].sum()
    assert both["keep"][:, 1 + n :].sum() == batch["ehr_valid"].sum() and both["tokens"].shape[1] <= 1 + n + L
    paired = batch["has_image"] & batch["has_ehr"]
    assert not torch.allclose(image["pooled"][paired], both["pooled"][paired])
    with pytest.raises(ValueError, match="modality"):
        model.encode(batch, "text")
    with pytest.raises(ValueError, match="encoder must be target or context, not 'auto'"):
        model.encode(batch, "both", "auto")  # eval.encoder=auto is settled before any encoder reads


def test_no_gradient_reaches_the_target_and_ema_follows_the_rule(split, samples):
    batch = make_batch(split, samples)
    model = _model(split)
    model(batch)["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in model.target.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.context.parameters())
    with torch.no_grad():
        for p in model.context.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    before_t = [p.clone() for p in model.target.parameters()]
    ctx = [p.clone() for p in model.context.parameters()]
    model.update_target(0.9)
    for t0, c, t1 in zip(before_t, ctx, model.target.parameters(), strict=True):
        torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * c)
    assert momentum_at(0, 100, (0.996, 1.0)) == 0.996 and momentum_at(50, 100, (0.996, 1.0)) == pytest.approx(
        0.998
    )
    assert momentum_at(500, 100, (0.996, 1.0)) == 1.0


def test_hidden_content_does_not_reach_the_context_encoder(split, samples):
    batch = make_batch(split, samples, "pipeline.mask.policy.cross_modal=0.5")
    model = _model(split)
    model.eval()
    args = (batch["img_ctx_idx"], batch["img_ctx_keep"], batch["ehr_ctx"])
    before = model.context(batch, *args)
    changed = dict(batch)
    p, g = model.dims.patch_size, model.dims.grid
    hidden = ~batch["img_ctx"].reshape(-1, *g)  # (B, gh, gw) patches not in the context
    pixel_hidden = hidden.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1)
    changed["image"] = torch.where(pixel_hidden, torch.randn_like(batch["image"]) * 5, batch["image"])
    ehr_hidden = ~batch["ehr_ctx"]
    new_codes = torch.randint_like(batch["ehr_code"], 2, model.dims.vocab_size)
    n_static = model.dims.n_num + len(model.dims.cat_sizes)
    new_codes[:, :n_static] = 1  # a categorical slot takes ids below its feature's size; 1 = unknown
    changed["ehr_code"] = torch.where(ehr_hidden, new_codes, batch["ehr_code"])
    changed["ehr_value"] = torch.where(ehr_hidden, torch.randn_like(batch["ehr_value"]), batch["ehr_value"])
    changed["ehr_time"] = torch.where(ehr_hidden, batch["ehr_time"] + 100, batch["ehr_time"])
    after = model.context(changed, *args)
    keep = before["keep"]
    assert pixel_hidden.any() and ehr_hidden.any() and (changed["image"] != batch["image"]).any()
    torch.testing.assert_close(after["tokens"][keep], before["tokens"][keep])
    # ...while the same change does move the target encoder, which sees everything
    assert not torch.allclose(model.targets(changed)[0], model.targets(batch)[0])


def test_a_fresh_encoder_already_sees_values_and_tells_slots_apart(split, samples):
    # Zero-initialised value/slot/feature vectors made every numeric EHR token identical at
    # initialisation: the EMA targets ignored lab values and the mask tokens of different features
    # asked for the same thing, a symmetry training barely broke.
    batch = make_batch(split, samples)
    model = _model(split)
    model.eval()
    n_num = model.dims.n_num
    present = batch["ehr_value_present"][:, :n_num]
    assert n_num > 1 and present.any()
    changed = dict(batch)
    changed["ehr_value"] = batch["ehr_value"].clone()
    changed["ehr_value"][:, :n_num] += 2.0 * present  # two standard deviations on every present value
    before = model.encode(batch, "ehr")["pooled"]
    after = model.encode(changed, "ehr")["pooled"]
    moved = (after - before).norm(dim=1)
    rows = present.any(1)
    assert (moved[rows] > 1e-3 * before[rows].norm(dim=1)).all()
    assert torch.allclose(moved[~rows], torch.zeros_like(moved[~rows]))
    pos = model.context.ehr.positions(batch["ehr_time"])[0]  # (L, D) what a mask token carries per slot
    n_static = n_num + len(model.dims.cat_sizes)
    distance = torch.cdist(pos[:n_static], pos[:n_static])
    assert (distance + torch.eye(n_static) * 1e9).min() > 1e-3


def test_smooth_l1_option_and_predictor_depth(split, samples):
    batch = make_batch(split, samples)
    l2 = _model(split, sigreg=0)(batch)["loss"]
    sl1 = _model(split, loss="smooth_l1", sigreg=0)(batch)["loss"]
    assert torch.isfinite(sl1) and sl1 < l2  # smooth-L1 is below L2/2*2 for small errors
    deep = _model(split, predictor_depth=5)
    assert len(deep.predictor.trunk.blocks) == 5


def test_the_encoder_a_seed_starts_from_does_not_depend_on_the_predictor(split):
    """A sweep over predictor depth or width (and JEPA vs MAE) must compare one initial encoder:
    otherwise it ranks random starts, which on a narrow table spread more than pretraining moves
    one. The predictor itself is drawn anew with its shape, and differs between seeds."""
    shapes = [{}, {"predictor_depth": 6}, {"predictor_width": 96, "predictor_heads": 3}, {"objective": "mae"}]
    built = [_model(split, **shape) for shape in shapes]
    first = built[0].context.state_dict()
    for model, shape in zip(built[1:], shapes[1:], strict=True):
        for name, w in model.context.state_dict().items():
            torch.testing.assert_close(w, first[name], rtol=0, atol=0, msg=f"{shape}: {name}")
        # the target encoder starts as a copy of the context encoder
        torch.testing.assert_close(model.target.state_dict(), model.context.state_dict(), rtol=0, atol=0)
    assert len(built[1].predictor.trunk.blocks) == 6
    torch.manual_seed(1)
    other = JEPA(split.spec.model_dims(_pipeline_cfg()), ModelConfig())
    assert not torch.equal(
        other.context.trunk.blocks[0].mlp[0].weight, built[0].context.trunk.blocks[0].mlp[0].weight
    )
    assert not torch.equal(
        other.predictor.trunk.blocks[0].mlp[0].weight, built[0].predictor.trunk.blocks[0].mlp[0].weight
    )
    # every linear layer was drawn (std 0.02), none left at PyTorch's default init
    for model in built:
        for name, m in model.student.named_modules():
            if isinstance(m, torch.nn.Linear):
                assert 0.01 < float(m.weight.std()) < 0.03, name


def test_sigreg_measures_distance_from_a_standard_normal():
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(4000, 32, generator=g)
    worse = {
        "collapsed to a line": torch.randn(4000, 1, generator=g) * torch.ones(1, 32),
        "shrunk": 0.2 * normal,
        "shifted": normal + 1.0,
    }

    def dist(x: torch.Tensor) -> float:
        return float(sigreg(x, generator=torch.Generator().manual_seed(1)))

    for n in (100, 4000):
        # a standard normal sample: only the sampling noise of a mean over n rows, ~1.06 / n
        assert 0.5 < n * dist(normal[:n]) < 2
    for name, x in worse.items():
        # a distribution's distance, not a test statistic: it does not grow with the rows, so its
        # weight against the prediction loss (a mean) holds at any tokens per rank
        small, large = dist(x[:100]), dist(x[:4000])
        assert 0.1 < small < 1 and 0.1 < large < 1, (name, small, large)
        assert small == pytest.approx(large, rel=0.1), name
    # a gradient step on the distance spreads a shrunk sample back out (a row's gradient is ~1 / N)
    x = (0.2 * normal).requires_grad_()
    sigreg(x).backward()
    assert float((x.detach() - 0.1 * len(x) * x.grad).std()) > float(x.detach().std())


def test_sigreg_joins_the_jepa_loss_only(split, samples):
    batch = make_batch(split, samples)
    plain = _model(split, sigreg=0).eval()
    out = _model(split, sigreg=0.05).eval()(batch)
    assert float(out["prediction_loss"]) == pytest.approx(float(plain(batch)["loss"]))
    total = 0.95 * float(out["prediction_loss"]) + 0.05 * float(out["sigreg"])
    assert float(out["loss"]) == pytest.approx(total)
    assert float(out["sigreg"]) > 0
    again = _model(split, sigreg=0.05).eval()(batch)  # eval mode: fixed directions, a deterministic loss
    assert float(again["loss"]) == float(out["loss"])
    mae = _model(split, objective="mae")(batch)
    assert "sigreg" not in mae and "prediction_loss" not in mae
    ehr_only = make_batch(split, samples, drop="image")  # patches only: nothing to regularise
    out = _model(split, sigreg_ehr=False).eval()(ehr_only)
    assert "sigreg" not in out and float(out["loss"]) == pytest.approx(float(plain(ehr_only)["loss"]))
    assert "sigreg" in _model(split).eval()(ehr_only)  # the default regularises the EHR tokens too


def test_sigreg_over_ehr_tokens_is_a_term_of_its_own(split, samples):
    from jepa_ray.model.jepa import sigreg

    batch, ehr_only = make_batch(split, samples), make_batch(split, samples, drop="image")
    plain = _model(split, sigreg=0).eval()
    model = _model(split, sigreg=0.1, sigreg_ehr=True).eval()
    out = model(ehr_only)  # an EHR-only batch is regularised too, on its EHR tokens alone
    assert float(out["prediction_loss"]) == pytest.approx(float(plain(ehr_only)["loss"]))
    assert float(out["sigreg"]) > 0
    assert float(out["loss"]) == pytest.approx(
        0.9 * float(out["prediction_loss"]) + 0.1 * float(out["sigreg"])
    )
    # with images: the patches' term and the EHR tokens' term, each a distance of its own
    image_only = _model(split, sigreg=0.1, sigreg_ehr=False).eval()(batch)
    both = model(batch)
    ctx = model.context(batch, batch["img_ctx_idx"], batch["img_ctx_keep"], batch["ehr_ctx"])
    n = ctx["img_keep"].shape[1]
    patches, ehr = ctx["tokens"][:, 1 : 1 + n][ctx["img_keep"]], ctx["tokens"][:, 1 + n :][ctx["ehr_keep"]]
    fixed = torch.Generator().manual_seed(0)  # eval mode: one fixed stream of directions, patches first
    assert float(sigreg(patches, generator=fixed)) == pytest.approx(float(image_only["sigreg"]))
    expected = float(image_only["sigreg"]) + float(sigreg(ehr, generator=fixed))
    assert float(both["sigreg"]) == pytest.approx(expected, rel=1e-5)
    assert float(both["prediction_loss"]) == pytest.approx(float(image_only["prediction_loss"]))


def test_embedding_stats_see_collapse():
    rng = np.random.default_rng(0)
    spread = torch.tensor(rng.normal(size=(64, 32)), dtype=torch.float32)
    collapsed = torch.tensor(rng.normal(size=(64, 1)) @ rng.normal(size=(1, 32)), dtype=torch.float32)
    s, c = embedding_stats(spread), embedding_stats(collapsed)
    assert s["rankme"] > 20 and c["rankme"] < 1.5
    assert embedding_stats(torch.ones(8, 4))["std"] == 0


def test_the_model_package_imports_neither_ray_nor_deepspeed():
    code = (
        "import sys, jepa_ray.model.jepa; print(sorted(m for m in ('ray', 'deepspeed') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_schedules_and_parameter_groups(split):
    from jepa_ray.model.optim import Schedule, param_groups

    s = Schedule(total_steps=100, lr=1e-3, warmup_steps=10, final_lr=1e-6)
    assert s.lr_at(0) == pytest.approx(1e-4) and s.lr_at(9) == pytest.approx(1e-3)
    assert s.lr_at(100) == pytest.approx(1e-6) and s.lr_at(55) == pytest.approx((1e-3 + 1e-6) / 2)
    assert s.weight_decay_at(0) == pytest.approx(0.04) and s.weight_decay_at(100) == pytest.approx(0.4)
    assert s.momentum_at(0) == 0.996 and s.momentum_at(100) == 1.0
    # the configured EMA schedule; an MAE's target is a copy
    assert target_ema(ModelConfig()) == (0.996, 1.0)
    assert target_ema(ModelConfig(ema=(0.99, 0.999))) == (0.99, 0.999)
    assert target_ema(ModelConfig(objective="mae", ema=(0.99, 1.0))) == (0.0, 0.0)
    decay, no_decay = param_groups(_model(split))
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    model = _model(split)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == n_trainable


def test_a_few_hundred_cpu_steps_lower_the_loss_without_collapse(split, small_shards):
    samples = {}
    for p in split.paths:
        samples.update(raw_samples(p))
    cfg = _pipeline_cfg()
    model = _model(split)
    losses = train_in_memory(model, samples, split.spec, cfg, steps=150)
    assert np.isfinite(losses).all()
    # measured: 0.92 -> 0.48 at the default SIGReg weight (LeJEPA's weighed in SIGReg's fast early fall: < 0.5)
    assert np.mean(losses[-20:]) < 0.6 * np.mean(losses[:10])
    evaluation = collate(transform_batch(raw_batch(samples), split.spec, cfg, train=False, epoch=0))
    stats = embedding_stats(model.encode(evaluation, "both")["pooled"])
    assert stats["std"] > 0.05 and stats["rankme"] > 3


def test_padding_ehr_slots_do_not_reach_the_target_encoder(split, samples):
    batch = make_batch(split, samples)
    model = _model(split)
    padding = ~batch["ehr_valid"]
    assert padding.any()
    changed = dict(batch)
    changed["ehr_time"] = torch.where(padding, batch["ehr_time"] + 50, batch["ehr_time"])
    changed["ehr_code"] = torch.where(padding & (torch.arange(padding.shape[1]) >= 4), 5, batch["ehr_code"])
    z_img, z_ehr = model.targets(batch)
    c_img, c_ehr = model.targets(changed)
    torch.testing.assert_close(c_img[batch["has_image"]], z_img[batch["has_image"]])
    torch.testing.assert_close(c_ehr[batch["ehr_valid"]], z_ehr[batch["ehr_valid"]])


def test_multi_block_targets_average_each_blocks_normed_output(split, samples):
    batch = make_batch(split, samples)
    last_only = _model(split, depth=3)
    averaged = _model(split, depth=3, target_layers=2)
    averaged.load_state_dict(last_only.state_dict())  # the same weights: only the targets differ
    with torch.no_grad():
        _, z_ehr1 = last_only.targets(batch)
        z_img2, z_ehr2 = averaged.targets(batch)
        # the same average by hand: the target encoder's blocks run one by one
        enc = averaged.target
        out = enc(batch, ehr_visible=torch.ones_like(batch["ehr_valid"]))
        keep = out["keep"]
        b = batch["image"].shape[0]
        x = torch.cat(
            [
                enc.global_token.expand(b, -1, -1),
                enc.image(batch["image"]),
                torch.gather(
                    enc.ehr(batch)[0], 1, out["ehr_idx"].unsqueeze(-1).expand(-1, -1, averaged.width)
                ),
            ],
            dim=1,
        )
        outs = []
        for block in enc.trunk.blocks:
            x = block(x, keep)
            outs.append(torch.nn.functional.layer_norm(x, x.shape[-1:]))
        expected = torch.nn.functional.layer_norm((outs[1] + outs[2]) / 2, x.shape[-1:])
    n = averaged.dims.patches
    torch.testing.assert_close(z_img2, expected[:, 1 : 1 + n], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(z_ehr2, expected[:, 1 + n :], atol=1e-5, rtol=1e-4)
    assert (z_ehr1 - z_ehr2).abs().max() > 1e-2  # the setting changes the targets
    assert torch.isfinite(averaged(batch)["loss"])
    # one block is the encoder's final output, as before the setting existed
    torch.testing.assert_close(enc.trunk.layer_average(x, keep, 1), enc.trunk(x, keep))


def test_more_target_blocks_than_the_encoder_has_is_refused_by_name():
    with pytest.raises(ValueError, match=r"model\.target_layers=3 exceeds the encoder's 2 blocks"):
        ModelConfig(target_layers=3)
    assert ModelConfig(preset="small", target_layers=3).target_layers == 3
