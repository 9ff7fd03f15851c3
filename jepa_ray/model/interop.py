"""Weights in and out of the layouts other tools use: start a run from a public ViT checkpoint
(`model.init_from`), export the target encoder as a Hugging Face `transformers` ViT
(`jepa-ray export --format hf`) or a timm VisionTransformer (`--format timm`).

Checkpoints read (safetensors only: a pickle can run code), by their key names:

- timm ViT (`patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.N.attn.qkv`, `blocks.N.ls1.gamma`, ...);
- Hugging Face ViT and DINOv2 (`embeddings.patch_embeddings.projection`,
  `encoder.layer.N.attention.attention.query`, `layer_scale1.lambda1`, ... and transformers 5's
  `layers.N.attention.q_proj`), with or without a `vit.` / `dinov2.` / `model.` prefix;
- a jepa-ray export (its `target.` encoder).

Every layout is read into one set of names (patch, cls, pos, per block norm1, q/k/v or qkv, proj,
norm2, fc1, fc2, layer scales; norm), then written into jepa-ray's encoder, where the blocks are
the same pre-norm ViT block: LayerScale is folded into the projection it scales; the class token
takes its position (jepa-ray's global token has none); positions are resized (bicubic) to the
run's patch grid; an RGB patch embedding becomes a grayscale one by folding the checkpoint's
per-channel normalisation into it (a gray image replicated to 3 channels, normalised as the
checkpoint was trained, gives the same features as jepa-ray's one channel normalised by
pipeline.normalize). Keys that do not map (a classifier head, register tokens, a mask token) are
listed; a shape that does not fit the run is an error naming the key.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from jepa_ray.errors import ConfigError

log = logging.getLogger("jepa_ray.model")

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # what timm / HF ViTs are trained with
PREFIXES = ("module.", "model.", "vit.", "dinov2.", "backbone.", "encoder_q.")
LAYER = r"(?:blocks|encoder\.layer|layers)\.(\d+)\."
RULES: list[tuple[str, str]] = [
    (r"(?:patch_embed\.proj|embeddings\.patch_embeddings\.projection)\.(weight|bias)", "patch.{}"),
    (r"(?:cls_token|embeddings\.cls_token)", "cls"),
    (r"(?:pos_embed|embeddings\.position_embeddings)", "pos"),
    (r"(?:norm|layernorm)\.(weight|bias)", "norm.{}"),
    (LAYER + r"(?:norm1|layernorm_before)\.(weight|bias)", "{}.norm1.{}"),
    (LAYER + r"(?:norm2|layernorm_after)\.(weight|bias)", "{}.norm2.{}"),
    (LAYER + r"attn\.qkv\.(weight|bias)", "{}.qkv.{}"),
    (LAYER + r"attention\.(?:attention\.query|q_proj)\.(weight|bias)", "{}.q.{}"),
    (LAYER + r"attention\.(?:attention\.key|k_proj)\.(weight|bias)", "{}.k.{}"),
    (LAYER + r"attention\.(?:attention\.value|v_proj)\.(weight|bias)", "{}.v.{}"),
    (LAYER + r"(?:attn\.proj|attention\.output\.dense|attention\.o_proj)\.(weight|bias)", "{}.proj.{}"),
    (LAYER + r"(?:mlp\.fc1|intermediate\.dense)\.(weight|bias)", "{}.fc1.{}"),
    (LAYER + r"(?:mlp\.fc2|output\.dense)\.(weight|bias)", "{}.fc2.{}"),
    (LAYER + r"(?:ls1\.gamma|layer_scale1\.lambda1)", "{}.ls1"),
    (LAYER + r"(?:ls2\.gamma|layer_scale2\.lambda1)", "{}.ls2"),
]


@dataclass
class InitReport:
    """What `init_encoder` did: the layout recognised, the jepa-ray keys written, the checkpoint's
    keys that did not map, and the run's encoder keys left as initialised."""

    layout: str
    loaded: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def canonical(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str], dict[str, str]]:
    """A timm / HF checkpoint's tensors under the common names (see RULES); the keys that did not
    map; each common name's original key."""
    out, unused, origin = {}, [], {}
    for key, value in tensors.items():
        name = key
        while name.startswith(PREFIXES):
            name = name.split(".", 1)[1]
        for pattern, template in RULES:
            m = re.fullmatch(pattern, name)
            if m:
                out[template.format(*m.groups())] = value
                origin[template.format(*m.groups())] = key
                break
        else:
            unused.append(key)
    return out, sorted(unused), origin


def init_encoder(
    encoder: torch.nn.Module,
    tensors: dict[str, torch.Tensor],
    normalize: tuple[float, float],
    source_normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> InitReport:
    """Write a checkpoint's ViT weights into a jepa-ray `Encoder` (in place). `normalize`: the
    run's (mean, std) of [0, 1] images; `source_normalize`: the checkpoint's per-channel (mean,
    std), used when its channels differ from the run's (default ImageNet's for 3 channels)."""
    own = encoder.state_dict()
    if any(k.startswith("target.") for k in tensors):
        return _from_export(encoder, own, tensors)
    src, unused, origin = canonical(tensors)
    if "patch.weight" not in src or "0.norm1.weight" not in src:
        raise ConfigError(
            "model.init_from: not a ViT checkpoint jepa-ray can read (no patch embedding or first block "
            "under timm, Hugging Face ViT / DINOv2 or jepa-ray names); first keys: "
            + ", ".join(sorted(tensors)[:5])
        )
    layout = "timm" if any(k.startswith(("blocks.", "patch_embed.")) for k in tensors) else "huggingface"
    report = InitReport(layout, unused=unused)
    dims = encoder.dims
    if dims.volume_size is not None or dims.mixed:
        raise ConfigError("model.init_from: a 2-D ViT initialises a 2-D run only (pipeline.dims=2)")
    new: dict[str, torch.Tensor] = {}

    def put(key: str, value: torch.Tensor, source: str) -> None:
        if key not in own:
            raise ConfigError(f"model.init_from: {source} has no place in this run's encoder ({key})")
        if tuple(value.shape) != tuple(own[key].shape):
            raise ConfigError(
                f"model.init_from: {source} has shape {tuple(value.shape)}, this run's {key} "
                f"{tuple(own[key].shape)}: set model.width / depth / heads and pipeline.patch_size "
                "to the checkpoint's"
            )
        new[key] = value.detach().float()

    # the patch embedding, RGB folded into gray with the checkpoint's normalisation
    w, b = src["patch.weight"].float(), src.get("patch.bias")
    b = torch.zeros(w.shape[0]) if b is None else b.float()
    run_channels = own["image.patch.weight"].shape[1]
    if w.shape[1] != run_channels:
        if run_channels != 1:
            raise ConfigError(
                f"model.init_from: patch embedding of {w.shape[1]} channels for a run of {run_channels}"
            )
        mean_c, std_c = (torch.tensor(v) for v in (source_normalize or IMAGENET))
        if len(mean_c) != w.shape[1]:
            raise ConfigError(
                f"model.init_from: model.init_normalize has {len(mean_c)} channels, the checkpoint {w.shape[1]}"
            )
        mean, std = normalize
        # the checkpoint sees (x - m_c) / s_c for a gray x; the run gives z = (x - mean) / std
        scale = (std / std_c)[None, :, None, None]
        shift = ((mean - mean_c) / std_c)[None, :, None, None]
        b = b + (w * shift).sum(dim=(1, 2, 3))
        w = (w * scale).sum(dim=1, keepdim=True)
        report.notes.append(
            f"RGB patch embedding folded to gray (checkpoint normalisation {mean_c.tolist()})"
        )
    put("image.patch.weight", w, "patch embedding weight")
    put("image.patch.bias", b, "patch embedding bias")

    # positions: the class token's goes into the global token; the grid's resized to the run's
    grid = dims.grid_2d
    cls = src.get("cls")
    pos = src.get("pos")
    width = own["global_token"].shape[-1]
    cls_pos = torch.zeros(width)
    if pos is not None:
        pos = pos.float().reshape(-1, pos.shape[-1])
        prefix = _prefix_tokens(pos.shape[0])
        cls_pos = pos[0] if prefix else cls_pos
        table = _resize_grid(pos[prefix:], grid)
        if "image.pos" in own:
            put("image.pos", table, "pos_embed")
            put("image.modality", torch.zeros(width), "pos_embed (the modality vector is zeroed)")
        else:
            report.notes.append(
                "positions not used: the run has fixed sin-cos positions (model.positions=sincos)"
            )
    if cls is not None:
        put("global_token", cls.float().reshape(1, 1, -1) + cls_pos, "cls_token")

    depth = sum(1 for k in own if k.startswith("trunk.blocks.") and k.endswith(".norm1.weight"))
    blocks = 1 + max(int(k.split(".", 1)[0]) for k in src if k[0].isdigit())
    if blocks < depth:
        raise ConfigError(f"model.init_from: the checkpoint has {blocks} blocks, this run's encoder {depth}")
    for i in range(depth):
        pre = f"trunk.blocks.{i}."

        def get(name: str, i: int = i):
            key = f"{i}.{name}"
            if key not in src:
                raise ConfigError(f"model.init_from: block {i} has no {name} in the checkpoint")
            return src[key].float()

        for part in ("norm1", "norm2"):
            put(pre + f"{part}.weight", get(f"{part}.weight"), f"block {i} {part}")
            put(pre + f"{part}.bias", get(f"{part}.bias"), f"block {i} {part}")
        if f"{i}.qkv.weight" in src:
            qkv_w, qkv_b = get("qkv.weight"), src.get(f"{i}.qkv.bias")
        else:
            qkv_w = torch.cat([get("q.weight"), get("k.weight"), get("v.weight")])
            qkv_b = torch.cat([get("q.bias"), get("k.bias"), get("v.bias")]) if f"{i}.q.bias" in src else None
        put(pre + "attn.qkv.weight", qkv_w, f"block {i} qkv")
        put(
            pre + "attn.qkv.bias",
            torch.zeros(qkv_w.shape[0]) if qkv_b is None else qkv_b.float(),
            f"block {i} qkv",
        )
        for name, target, scale in (("proj", "attn.proj", "ls1"), ("fc2", "mlp.2", "ls2")):
            ls = src.get(f"{i}.{scale}")
            ls = torch.ones(get(f"{name}.weight").shape[0]) if ls is None else ls.float()
            put(pre + f"{target}.weight", get(f"{name}.weight") * ls[:, None], f"block {i} {name}")
            put(pre + f"{target}.bias", get(f"{name}.bias") * ls, f"block {i} {name}")
        put(pre + "mlp.0.weight", get("fc1.weight"), f"block {i} fc1")
        put(pre + "mlp.0.bias", get("fc1.bias"), f"block {i} fc1")
    report.unused += sorted(origin[k] for k in src if k[0].isdigit() and int(k.split(".", 1)[0]) >= depth)
    if "norm.weight" not in src:
        raise ConfigError("model.init_from: the checkpoint has no final norm (norm / layernorm)")
    put("trunk.norm.weight", src["norm.weight"], "final norm")
    put("trunk.norm.bias", src["norm.bias"], "final norm")
    encoder.load_state_dict(new, strict=False)
    report.loaded = sorted(new)
    report.kept = sorted(k for k in own if k not in new)
    return report


def _from_export(encoder: torch.nn.Module, own: dict[str, torch.Tensor], tensors: dict) -> InitReport:
    """A jepa-ray export's target encoder: every key by name; the image and trunk must fit, EHR
    layers of another vocabulary are left as initialised (listed)."""
    report = InitReport("jepa-ray")
    new = {}
    for key, value in tensors.items():
        if not key.startswith("target."):
            continue
        name = key[len("target.") :]
        if name not in own:
            report.unused.append(key)
        elif tuple(value.shape) != tuple(own[name].shape):
            if name.startswith("ehr."):
                report.unused.append(key)
                report.notes.append(f"{key}: another EHR vocabulary or feature set; left as initialised")
                continue
            raise ConfigError(
                f"model.init_from: {key} has shape {tuple(value.shape)}, this run's {tuple(own[name].shape)}"
            )
        else:
            new[name] = value.float()
    encoder.load_state_dict(new, strict=False)
    report.loaded = sorted(new)
    report.kept = sorted(k for k in own if k not in new)
    return report


def _prefix_tokens(n: int) -> int:
    """How many of a position table's n rows are prefix (class) tokens: the rest a square grid."""
    for prefix in (0, 1):
        side = math.isqrt(n - prefix)
        if side * side == n - prefix:
            return prefix
    raise ConfigError(f"model.init_from: a position table of {n} rows is not a square patch grid")


def _resize_grid(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(g * g, D) positions -> (grid[0] * grid[1], D), bicubic over the grid (as timm resamples)."""
    side = math.isqrt(table.shape[0])
    if (side, side) == tuple(grid):
        return table
    x = table.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=tuple(grid), mode="bicubic", align_corners=False, antialias=True)
    return x.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)


def load_checkpoint(url: str, storage=None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, local or s3:// (`train.storage`)."""
    from safetensors.torch import load

    from jepa_ray.storage import Store

    if not url.endswith(".safetensors"):
        raise ConfigError(
            f"model.init_from {url}: a .safetensors file is read (a pickled .pt/.bin can run code); "
            "convert it with safetensors.torch.save_file"
        )
    parent, _, name = url.rpartition("/")
    store = Store(parent or ".", storage)
    if not store.exists(name):
        raise ConfigError(f"model.init_from {url}: no such file")
    try:
        return load(store.read_bytes(name))
    except Exception as e:
        raise ConfigError(f"model.init_from {url}: not a safetensors file ({type(e).__name__})") from None


def init_from(
    model, url: str, normalize: tuple[float, float], storage=None, source_normalize=None
) -> InitReport:
    """Both encoders of a `JEPA` from the checkpoint at `url` (the target a copy of the context)."""
    report = init_encoder(model.context, load_checkpoint(url, storage), normalize, source_normalize)
    model.target.load_state_dict(model.context.state_dict())
    log.info(
        "model.init_from %s (%s layout): %d encoder tensors loaded, %d left as initialised%s",
        url,
        report.layout,
        len(report.loaded),
        len(report.kept),
        (
            f"; not used from the checkpoint: {', '.join(report.unused[:12])}"
            + (" ..." if len(report.unused) > 12 else "")
        )
        if report.unused
        else "",
    )
    for note in report.notes:
        log.info("model.init_from: %s", note)
    return report


def to_hf(model, pipeline: dict[str, Any]):
    """The target encoder as a `transformers` ViTModel (no pooler): `last_hidden_state` equals
    jepa-ray's image tokens [global | patches] and its mean over the patches the pooled embedding."""
    from transformers import ViTConfig, ViTModel

    enc, dims = model.target, model.dims
    if dims.volume_size is not None or dims.mixed:
        raise ConfigError("export --format hf: a 2-D image encoder only (a ViT takes 2-D images)")
    block = enc.trunk.blocks[0]
    width = enc.global_token.shape[-1]
    cfg = ViTConfig(
        hidden_size=width,
        num_hidden_layers=len(enc.trunk.blocks),
        num_attention_heads=block.attn.heads,
        intermediate_size=block.mlp[0].out_features,
        hidden_act="gelu",
        layer_norm_eps=block.norm1.eps,
        image_size=dims.image_size,
        patch_size=dims.patch_size,
        num_channels=dims.channels,
        qkv_bias=True,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    hf = ViTModel(cfg, add_pooling_layer=False).eval()
    own = enc.state_dict()
    pos = torch.zeros(1, dims.patches + 1, width)
    pos[0, 1:] = (enc.image.pos + enc.image.modality).detach()
    state = {
        "embeddings.cls_token": own["global_token"],
        "embeddings.position_embeddings": pos,
        "embeddings.patch_embeddings.projection.weight": own["image.patch.weight"],
        "embeddings.patch_embeddings.projection.bias": own["image.patch.bias"],
        "layernorm.weight": own["trunk.norm.weight"],
        "layernorm.bias": own["trunk.norm.bias"],
    }
    names = hf.state_dict().keys()
    legacy = any(k.startswith("encoder.layer.") for k in names)  # transformers 4 names
    for i in range(cfg.num_hidden_layers):
        src = f"trunk.blocks.{i}."
        dst = f"encoder.layer.{i}." if legacy else f"layers.{i}."
        q, k, v = own[src + "attn.qkv.weight"].chunk(3)
        qb, kb, vb = own[src + "attn.qkv.bias"].chunk(3)
        att = "attention.attention." if legacy else "attention."
        qn, kn, vn = ("query", "key", "value") if legacy else ("q_proj", "k_proj", "v_proj")
        out = "attention.output.dense" if legacy else "attention.o_proj"
        fc1, fc2 = ("intermediate.dense", "output.dense") if legacy else ("mlp.fc1", "mlp.fc2")
        state |= {
            dst + att + qn + ".weight": q,
            dst + att + qn + ".bias": qb,
            dst + att + kn + ".weight": k,
            dst + att + kn + ".bias": kb,
            dst + att + vn + ".weight": v,
            dst + att + vn + ".bias": vb,
            dst + out + ".weight": own[src + "attn.proj.weight"],
            dst + out + ".bias": own[src + "attn.proj.bias"],
            dst + "layernorm_before.weight": own[src + "norm1.weight"],
            dst + "layernorm_before.bias": own[src + "norm1.bias"],
            dst + "layernorm_after.weight": own[src + "norm2.weight"],
            dst + "layernorm_after.bias": own[src + "norm2.bias"],
            dst + fc1 + ".weight": own[src + "mlp.0.weight"],
            dst + fc1 + ".bias": own[src + "mlp.0.bias"],
            dst + fc2 + ".weight": own[src + "mlp.2.weight"],
            dst + fc2 + ".bias": own[src + "mlp.2.bias"],
        }
    missing = set(names) - set(state)
    if missing:
        raise ConfigError(
            f"export --format hf: this transformers' ViT has keys jepa-ray does not fill: {sorted(missing)[:4]}"
        )
    hf.load_state_dict({k: v.detach().float().contiguous() for k, v in state.items()})
    hf.config.update({"jepa_ray": {"pipeline": pipeline, "pooled": "mean of last_hidden_state[:, 1:]"}})
    return hf


def export_hf(weights: str, out: str) -> str:
    """A jepa-ray export (.safetensors + .json) -> a directory `transformers.ViTModel.from_pretrained`
    loads (config.json, model.safetensors), with jepa-ray's preprocessing in the config."""
    import json
    from pathlib import Path

    from jepa_ray.model.io import load_jepa

    info = json.loads(Path(weights).with_suffix(".json").read_text())
    hf = to_hf(load_jepa(weights), info["pipeline"])
    hf.save_pretrained(out, safe_serialization=True)
    return out


TIMM_ARCHITECTURE = "vit_base_patch16_224"  # a registered timm ViT; model_args set every size
TIMM_EPS = 1e-6  # the LayerNorm epsilon of timm's ViT (a config.json cannot set another)


def timm_checkpoint(model, pipeline: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The target encoder as a timm `VisionTransformer` (class token, learned positions, final norm
    on the tokens, `global_pool="avg"` over the patches): its state dict and the `config.json` that
    `timm.create_model("local-dir:<dir>", pretrained=True)` reads. `forward_features` gives
    jepa-ray's image tokens [global | patches], `forward` (no classifier) the pooled embedding."""
    enc, dims = model.target, model.dims
    if dims.volume_size is not None or dims.mixed:
        raise ConfigError("export --format timm: a 2-D image encoder only (a ViT takes 2-D images)")
    own = {k: v.detach().float() for k, v in enc.state_dict().items()}
    block = enc.trunk.blocks[0]
    width = own["global_token"].shape[-1]
    pos = torch.zeros(1, dims.patches + 1, width)
    pos[0, 1:] = (enc.image.pos + enc.image.modality).detach()
    state = {
        "cls_token": own["global_token"].reshape(1, 1, width),
        "pos_embed": pos,
        "patch_embed.proj.weight": own["image.patch.weight"],
        "patch_embed.proj.bias": own["image.patch.bias"],
        "norm.weight": own["trunk.norm.weight"],
        "norm.bias": own["trunk.norm.bias"],
    }
    for i in range(len(enc.trunk.blocks)):
        src, dst = f"trunk.blocks.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            state |= {
                dst + f"norm1.{part}": own[src + f"norm1.{part}"],
                dst + f"attn.qkv.{part}": own[src + f"attn.qkv.{part}"],  # [q; k; v], heads inside
                dst + f"attn.proj.{part}": own[src + f"attn.proj.{part}"],
                dst + f"norm2.{part}": own[src + f"norm2.{part}"],
                dst + f"mlp.fc1.{part}": own[src + f"mlp.0.{part}"],
                dst + f"mlp.fc2.{part}": own[src + f"mlp.2.{part}"],
            }
    mean, std = pipeline.get("normalize", (0.0, 1.0))
    args = {
        "img_size": dims.image_size,
        "patch_size": dims.patch_size,
        "in_chans": dims.channels,
        "embed_dim": width,
        "depth": len(enc.trunk.blocks),
        "num_heads": block.attn.heads,
        "mlp_ratio": block.mlp[0].out_features / width,
        "qkv_bias": True,
        "class_token": True,
        "global_pool": "avg",
        "fc_norm": False,  # the final norm on every token, then the mean, as jepa-ray pools
        "num_classes": 0,
    }
    config = {
        "architecture": TIMM_ARCHITECTURE,
        "num_classes": 0,
        "num_features": width,
        "global_pool": "avg",
        "model_args": args,
        "pretrained_cfg": {
            "input_size": [dims.channels, dims.image_size, dims.image_size],
            "interpolation": "bilinear",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": [mean] * dims.channels,
            "std": [std] * dims.channels,
            "num_classes": 0,
        },
        "jepa_ray": {
            "pipeline": pipeline,
            "norm_eps": block.norm1.eps,
            "pooled": "forward() (the mean of forward_features()[:, 1:])",
        },
    }
    return {k: v.contiguous() for k, v in state.items()}, config


def export_timm(weights: str, out: str) -> str:
    """A jepa-ray export (.safetensors + .json) -> a directory timm loads without jepa-ray:
    `timm.create_model("local-dir:<out>", pretrained=True)` (config.json, model.safetensors)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from jepa_ray.model.io import load_jepa

    info = json.loads(Path(weights).with_suffix(".json").read_text())
    model = load_jepa(weights)
    state, config = timm_checkpoint(model, info["pipeline"])
    eps = config["jepa_ray"]["norm_eps"]
    if not math.isclose(eps, TIMM_EPS):
        log.warning(
            "export --format timm: the encoder's LayerNorm epsilon is %g, timm's ViT uses %g: timm's "
            "features are close to jepa-ray's, not equal (about 1e-3 per token element at 1e-5); train "
            "with model.norm_eps=1e-6 for an exact match",
            eps,
            TIMM_EPS,
        )
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
