"""Transformer pieces shared by the encoders and the predictor (plain PyTorch, any device).

Pre-norm blocks on `scaled_dot_product_attention` with a key-padding mask, so that a batch of
token sets of different sizes (visible patches, EHR tokens) runs as one padded tensor; fixed
sin-cos positional embeddings written for any number of spatial axes (2-D radiographs, 3-D CT
volumes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """(...,) float positions -> (..., dim) sin-cos features (dim even), frequencies 1 .. 1/10000."""
    half = dim // 2
    freq = torch.exp(
        -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=positions.device) / half
    )
    angle = positions.float().unsqueeze(-1) * freq
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


def sincos_grid(grid: tuple[int, ...], dim: int) -> torch.Tensor:
    """(prod(grid), dim) fixed embedding of a patch grid with any number of axes (row-major order)."""
    axes = len(grid)
    per_axis = 2 * (dim // (2 * axes))
    coords = torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij")
    parts = [sincos_1d(c.reshape(-1), per_axis) for c in coords]
    out = torch.cat(parts, dim=-1)
    return F.pad(out, (0, dim - out.shape[-1]))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape  # (B, T, D)
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = keep[:, None, None, :] if keep is not None else None  # (B, 1, 1, T): attend to kept keys
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), keep)
        return x + self.mlp(self.norm2(x))


class Trunk(nn.Module):
    """A stack of blocks and a final norm over (B, T, D) tokens with a (B, T) keep mask.

    The first `checkpoint` blocks (-1: all) recompute their activations in the backward pass
    instead of keeping them (activation checkpointing), when gradients are being recorded.
    """

    def __init__(
        self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, checkpoint: int = 0, eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, eps) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.checkpoint = depth if checkpoint < 0 else min(checkpoint, depth)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        recompute = self.checkpoint and torch.is_grad_enabled() and self.training
        for i, block in enumerate(self.blocks):
            if recompute and i < self.checkpoint:
                x = checkpoint(block, x, keep, use_reentrant=False)
            else:
                x = block(x, keep)
        return self.norm(x)

    @torch.no_grad()
    def layer_average(self, x: torch.Tensor, keep: torch.Tensor | None, last: int) -> torch.Tensor:
        """The mean of the last `last` blocks' outputs, each layer-normed without affine (data2vec's
        targets); last=1 is the final norm's output."""
        if last == 1:
            return self.forward(x, keep)
        if not 1 <= last <= len(self.blocks):
            raise ValueError(f"cannot average the last {last} of {len(self.blocks)} blocks")
        total = torch.zeros_like(x)
        for i, block in enumerate(self.blocks):
            x = block(x, keep)
            if i >= len(self.blocks) - last:
                total = total + F.layer_norm(x, x.shape[-1:])
        return total / last


def learned(*shape: int) -> nn.Parameter:
    """A learned vector or table (modality, slot, feature, mask token...), truncated-normal std 0.02
    like every other embedding. Not zeros: identical zero vectors would make every numeric EHR
    token, and every slot a mask token asks for, the same at initialisation, a symmetry that
    training breaks only slowly."""
    return nn.Parameter(nn.init.trunc_normal_(torch.empty(*shape), std=0.02))


def init_weights(module: nn.Module) -> None:
    """Truncated-normal linear/conv weights (std 0.02), zero biases, unit LayerNorm, as in ViT/I-JEPA."""
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.Conv2d | nn.Conv3d | nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
