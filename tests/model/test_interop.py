"""Weights in and out: a ViT made by Hugging Face transformers (ViT, DINOv2; new and legacy key
names) initialises jepa-ray's encoders with the library's own features on the same image, and the
target encoder exported as a transformers ViT loads there with jepa-ray's features."""

from __future__ import annotations

import json
import re

import pytest
import torch
from interopkit import timm_to_transformers, timm_vit_layout
from safetensors.torch import load_file, save_file
from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

from jepa_ray.config import ModelConfig
from jepa_ray.errors import ConfigError
from jepa_ray.model.interop import TIMM_ARCHITECTURE, export_hf, export_timm, init_from
from jepa_ray.model.io import save_jepa
from jepa_ray.model.jepa import JEPA
from jepa_ray.model.tokenizers import InputDims

DIMS = InputDims(
    image_size=32, patch_size=8, vocab_size=10, n_num=0, cat_sizes=(), max_static_codes=0, max_events=4
)
NORMALIZE = (0.5, 0.25)  # the run's pipeline.normalize
IMAGENET = (torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225]))


def _batch(b: int = 3) -> dict[str, torch.Tensor]:
    """Images alone (normalised as the run normalises them), every EHR slot padding."""
    n = DIMS.ehr_tokens
    g = torch.Generator().manual_seed(1)
    return {
        "image": torch.randn(b, 1, 32, 32, generator=g),
        "has_image": torch.ones(b, dtype=torch.bool),
        "ehr_valid": torch.zeros(b, n, dtype=torch.bool),
        "ehr_code": torch.zeros(b, n, dtype=torch.long),
        "ehr_value": torch.zeros(b, n),
        "ehr_value_present": torch.zeros(b, n),
        "ehr_time": torch.zeros(b, n),
    }


def _scramble(model: torch.nn.Module) -> None:
    """Positions, class token and layer scales away from their (near-trivial) initial values."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("position_embeddings", "cls_token")):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            if name.endswith("lambda1"):
                p.copy_(0.1 + 0.9 * torch.rand(p.shape, generator=g))


def _legacy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5's ViT names -> the names published checkpoints use (transformers 4), prefixed."""
    out = {}
    for key, value in state.items():
        for new, old in (
            (r"^layers\.", "encoder.layer."),
            (r"attention\.q_proj", "attention.attention.query"),
            (r"attention\.k_proj", "attention.attention.key"),
            (r"attention\.v_proj", "attention.attention.value"),
            (r"attention\.o_proj", "attention.output.dense"),
            (r"mlp\.fc1", "intermediate.dense"),
            (r"mlp\.fc2", "output.dense"),
        ):
            key = re.sub(new, old, key)
        out["vit." + key] = value
    return out


def _init(tmp_path, state: dict[str, torch.Tensor], **model) -> tuple[JEPA, object]:
    path = tmp_path / "checkpoint.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    torch.manual_seed(0)
    jepa = JEPA(DIMS, ModelConfig(width=32, depth=2, heads=4, init_from=str(path), **model)).eval()
    return jepa, init_from(jepa, str(path), NORMALIZE)


@pytest.mark.parametrize("names", ["transformers", "legacy"])
def test_a_huggingface_vit_initialises_both_encoders_with_its_own_features(tmp_path, names):
    cfg = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        num_channels=1,
        layer_norm_eps=1e-12,  # HF ViT's
        hidden_act="gelu",
    )
    torch.manual_seed(3)
    hf = ViTModel(cfg, add_pooling_layer=False).eval()
    _scramble(hf)
    state = hf.state_dict() if names == "transformers" else _legacy(hf.state_dict())
    jepa, report = _init(tmp_path, state, norm_eps=1e-12)
    assert report.layout == "huggingface" and report.unused == []
    assert not any(k.startswith(("image.", "trunk.", "global_token")) for k in report.kept)  # all loaded
    batch = _batch()
    with torch.no_grad():
        ours = jepa.encode(batch, "image")["tokens"][:, : 1 + DIMS.patches]
        context = jepa.encode(batch, "image", encoder="context")["tokens"][:, : 1 + DIMS.patches]
        theirs = hf(pixel_values=batch["image"]).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(context, ours)
    assert jepa.context.image.pos.requires_grad  # model.positions=auto: a learned table with init_from


def test_an_rgb_dinov2_with_layer_scale_initialises_a_gray_run_with_its_normalisation_folded(tmp_path):
    cfg = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        mlp_ratio=4,
        image_size=32,
        patch_size=8,
        num_channels=3,
        layer_norm_eps=1e-6,
        layerscale_value=0.3,
    )
    torch.manual_seed(4)
    d2 = Dinov2Model(cfg).eval()
    _scramble(d2)
    jepa, report = _init(tmp_path, {f"dinov2.{k}": v for k, v in d2.state_dict().items()}, norm_eps=1e-6)
    assert report.unused == ["dinov2.embeddings.mask_token"]
    assert any("folded to gray" in n for n in report.notes)
    batch = _batch()
    gray = batch["image"] * NORMALIZE[1] + NORMALIZE[0]  # the [0, 1] image both see
    rgb = (gray.expand(-1, 3, -1, -1) - IMAGENET[0][None, :, None, None]) / IMAGENET[1][None, :, None, None]
    with torch.no_grad():
        ours = jepa.encode(batch, "image")["tokens"][:, : 1 + DIMS.patches]
        theirs = d2(pixel_values=rgb).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_positions_are_resized_to_the_runs_grid_and_misfits_are_named(tmp_path):
    cfg = ViTConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=48,  # a 6 x 6 grid for the run's 4 x 4
        patch_size=8,
        num_channels=1,
    )
    hf = ViTModel(cfg, add_pooling_layer=True).eval()
    jepa, report = _init(tmp_path, hf.state_dict())
    assert jepa.target.image.pos.shape == (16, 32)
    # a third block and the pooler have no place in a 2-block run: listed, not loaded
    assert "layers.2.mlp.fc1.weight" in report.unused
    assert any(k.startswith("pooler.") for k in report.unused)

    wide = ViTModel(
        ViTConfig(
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            num_channels=1,
        )
    )
    with pytest.raises(ConfigError, match=r"patch embedding weight has shape \(48, 1, 8, 8\)"):
        _init(tmp_path, wide.state_dict())
    with pytest.raises(ConfigError, match="not a ViT checkpoint"):
        _init(tmp_path, {"fc.weight": torch.zeros(2, 2)})
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ConfigError, match=r"weights\.bin: a \.safetensors file is read"):
        init_from(
            JEPA(DIMS, ModelConfig(width=32, depth=2, heads=4)), str(tmp_path / "weights.bin"), NORMALIZE
        )
    with pytest.raises(ConfigError, match="no such file"):
        init_from(
            JEPA(DIMS, ModelConfig(width=32, depth=2, heads=4)), str(tmp_path / "none.safetensors"), NORMALIZE
        )


@pytest.mark.parametrize("positions", ["sincos", "learned"])
def test_the_target_encoder_exported_for_transformers_gives_jepa_rays_features(tmp_path, positions):
    torch.manual_seed(5)
    jepa = JEPA(DIMS, ModelConfig(width=32, depth=2, heads=4, positions=positions)).eval()
    with torch.no_grad():
        for p in jepa.target.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a target that is not the context's copy
    weights = save_jepa(
        jepa,
        tmp_path / "encoder.safetensors",
        {"image_size": 32, "patch_size": 8, "normalize": list(NORMALIZE)},
    )
    out = export_hf(str(weights), str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["jepa_ray"]["pipeline"]["normalize"] == list(NORMALIZE)
    back = ViTModel.from_pretrained(out, add_pooling_layer=False).eval()  # transformers alone
    batch = _batch()
    with torch.no_grad():
        ours = jepa.encode(batch, "image")
        theirs = back(pixel_values=batch["image"]).last_hidden_state
    torch.testing.assert_close(theirs, ours["tokens"][:, : 1 + DIMS.patches], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs[:, 1:].mean(1), ours["pooled"], atol=1e-5, rtol=1e-5)


def test_an_export_initialises_a_run_of_the_same_shape(tmp_path):
    torch.manual_seed(6)
    source = JEPA(DIMS, ModelConfig(width=32, depth=2, heads=4)).eval()
    weights = save_jepa(source, tmp_path / "encoder.safetensors", {"image_size": 32, "patch_size": 8})
    torch.manual_seed(7)
    jepa = JEPA(DIMS, ModelConfig(width=32, depth=2, heads=4, positions="sincos")).eval()
    report = init_from(jepa, str(weights), NORMALIZE)
    assert report.layout == "jepa-ray" and not report.kept
    for a, b in zip(jepa.target.state_dict().values(), source.target.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def _timm_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers DINOv2's weights under timm's ViT names (fused qkv, ls1/ls2.gamma): the layout
    timm writes. (The timm library itself needs torchvision, which this project's CPU-only test
    machine cannot load; the names are timm's VisionTransformer's.)"""
    out = {
        "patch_embed.proj.weight": state["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": state["embeddings.patch_embeddings.projection.bias"],
        "cls_token": state["embeddings.cls_token"],
        "pos_embed": state["embeddings.position_embeddings"],
        "norm.weight": state["layernorm.weight"],
        "norm.bias": state["layernorm.bias"],
        "head.weight": torch.zeros(5, 32),
    }
    for i in range(2):
        s, t = f"encoder.layer.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            out[t + f"attn.qkv.{part}"] = torch.cat([state[s + f"attention.{n}_proj.{part}"] for n in "qkv"])
            out[t + f"attn.proj.{part}"] = state[s + f"attention.o_proj.{part}"]
            for a, b in (
                ("norm1", "norm1"),
                ("norm2", "norm2"),
                ("mlp.fc1", "mlp.fc1"),
                ("mlp.fc2", "mlp.fc2"),
            ):
                out[t + f"{a}.{part}"] = state[s + f"{b}.{part}"]
        out[t + "ls1.gamma"] = state[s + "layer_scale1.lambda1"]
        out[t + "ls2.gamma"] = state[s + "layer_scale2.lambda1"]
    return out


def test_timm_names_fused_qkv_and_layer_scale_map_to_the_same_features(tmp_path):
    cfg = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        mlp_ratio=4,
        image_size=32,
        patch_size=8,
        num_channels=1,
        layer_norm_eps=1e-6,
    )
    torch.manual_seed(8)
    d2 = Dinov2Model(cfg).eval()
    _scramble(d2)
    jepa, report = _init(tmp_path, _timm_names(d2.state_dict()), norm_eps=1e-6)
    assert report.layout == "timm" and report.unused == ["head.weight"]
    batch = _batch()
    with torch.no_grad():
        ours = jepa.encode(batch, "image")["tokens"][:, : 1 + DIMS.patches]
        theirs = d2(pixel_values=batch["image"]).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positions", ["sincos", "learned"])
def test_the_target_encoder_exported_for_timm_gives_jepa_rays_features_and_initialises_a_run(
    tmp_path, positions
):
    torch.manual_seed(9)
    model = dict(width=32, depth=2, heads=4, positions=positions, norm_eps=1e-6)
    jepa = JEPA(DIMS, ModelConfig(**model)).eval()
    with torch.no_grad():
        for p in jepa.target.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pipeline = {"image_size": 32, "patch_size": 8, "normalize": list(NORMALIZE)}
    weights = save_jepa(jepa, tmp_path / "encoder.safetensors", pipeline)
    out = tmp_path / "timm"
    export_timm(str(weights), str(out))
    config = json.loads((out / "config.json").read_text())  # what timm's local-dir: loader reads
    assert config["architecture"] == TIMM_ARCHITECTURE and config["num_classes"] == 0
    assert config["model_args"] == {
        "img_size": 32,
        "patch_size": 8,
        "in_chans": 1,
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 4,
        "mlp_ratio": 4.0,
        "qkv_bias": True,
        "class_token": True,
        "global_pool": "avg",
        "fc_norm": False,
        "num_classes": 0,
    }
    cfg = config["pretrained_cfg"]
    assert (cfg["input_size"], cfg["mean"], cfg["std"]) == ([1, 32, 32], [0.5], [0.25])
    state = load_file(str(out / "model.safetensors"))
    layout = timm_vit_layout(depth=2, width=32, hidden=128, patches=DIMS.patches, channels=1, patch=8)
    assert {k: tuple(v.shape) for k, v in state.items()} == layout

    hf = ViTModel(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            image_size=32,
            patch_size=8,
            num_channels=1,
            layer_norm_eps=1e-6,
        ),
        add_pooling_layer=False,
    ).eval()
    hf.load_state_dict(timm_to_transformers(state, depth=2))
    batch = _batch()
    with torch.no_grad():
        ours = jepa.encode(batch, "image")
        theirs = hf(pixel_values=batch["image"]).last_hidden_state  # timm's forward_features
    torch.testing.assert_close(theirs, ours["tokens"][:, : 1 + DIMS.patches], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs[:, 1:].mean(1), ours["pooled"], atol=1e-5, rtol=1e-5)

    # and back: the timm checkpoint initialises a run with the same features
    back = JEPA(DIMS, ModelConfig(**model | {"positions": "learned"})).eval()
    report = init_from(back, str(out / "model.safetensors"), NORMALIZE)
    assert report.layout == "timm" and report.unused == []
    with torch.no_grad():
        again = back.encode(batch, "image")
    torch.testing.assert_close(again["pooled"], ours["pooled"], atol=1e-5, rtol=1e-5)


def test_a_timm_export_of_an_encoder_with_another_epsilon_says_so(tmp_path, caplog):
    jepa = JEPA(DIMS, ModelConfig(width=32, depth=2, heads=4)).eval()  # norm_eps 1e-5
    weights = save_jepa(jepa, tmp_path / "encoder.safetensors", {"image_size": 32, "patch_size": 8})
    with caplog.at_level("WARNING", logger="jepa_ray.model"):
        export_timm(str(weights), str(tmp_path / "timm"))
    assert "LayerNorm epsilon is 1e-05, timm's ViT uses 1e-06" in caplog.text
    assert json.loads((tmp_path / "timm" / "config.json").read_text())["jepa_ray"]["norm_eps"] == 1e-5
