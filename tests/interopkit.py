"""A timm ViT checkpoint run by transformers: timm's `VisionTransformer` (pre-norm blocks, fused qkv
split [q; k; v], exact GELU, class token, learned positions, final norm) is the computation of
transformers' `ViTModel`, so a timm state dict renamed to transformers 5's ViT names gives timm's
`forward_features` from transformers. (timm itself imports torchvision, which a CPU-only torch from
PyPI cannot load; its key names and shapes are checked against timm's layout here.)"""

from __future__ import annotations

import torch


def timm_vit_layout(depth: int, width: int, hidden: int, patches: int, channels: int, patch: int) -> dict:
    """The names and shapes of timm's VisionTransformer(class_token=True, global_pool="avg",
    fc_norm=False, num_classes=0)."""
    shapes = {
        "cls_token": (1, 1, width),
        "pos_embed": (1, patches + 1, width),
        "patch_embed.proj.weight": (width, channels, patch, patch),
        "patch_embed.proj.bias": (width,),
        "norm.weight": (width,),
        "norm.bias": (width,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes |= {
            b + "norm1.weight": (width,),
            b + "norm1.bias": (width,),
            b + "attn.qkv.weight": (3 * width, width),
            b + "attn.qkv.bias": (3 * width,),
            b + "attn.proj.weight": (width, width),
            b + "attn.proj.bias": (width,),
            b + "norm2.weight": (width,),
            b + "norm2.bias": (width,),
            b + "mlp.fc1.weight": (hidden, width),
            b + "mlp.fc1.bias": (hidden,),
            b + "mlp.fc2.weight": (width, hidden),
            b + "mlp.fc2.bias": (width,),
        }
    return shapes


def timm_to_transformers(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    out = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.position_embeddings": state["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    for i in range(depth):
        t, h = f"blocks.{i}.", f"layers.{i}."
        for part in ("weight", "bias"):
            q, k, v = state[t + f"attn.qkv.{part}"].chunk(3)
            out |= {
                h + f"attention.q_proj.{part}": q,
                h + f"attention.k_proj.{part}": k,
                h + f"attention.v_proj.{part}": v,
                h + f"attention.o_proj.{part}": state[t + f"attn.proj.{part}"],
                h + f"layernorm_before.{part}": state[t + f"norm1.{part}"],
                h + f"layernorm_after.{part}": state[t + f"norm2.{part}"],
                h + f"mlp.fc1.{part}": state[t + f"mlp.fc1.{part}"],
                h + f"mlp.fc2.{part}": state[t + f"mlp.fc2.{part}"],
            }
    return out
