"""The reconstruction baseline (`model.objective: mae`): what a masked autoencoder learns with the
JEPA's own context encoder, masks and budget.

    context = Encoder(visible image patches + visible EHR tokens)            # the same encoder
    out     = Predictor(context, mask tokens at the hidden positions)       # the light decoder
    pixels  = Linear(out at hidden patches)   vs  per-patch normalised pixels (MAE's norm_pix_loss)
    EHR     = Linear heads at hidden slots    vs  value (+ whether present), category, code

Only the targets differ from the JEPA: content in input space instead of a target encoder's
latents, so the comparison isolates the objective. An MAE has no EMA target; the module's target
encoder is kept equal to the context encoder so that export, evaluate and tune read it unchanged.

Per hidden EHR token, by the kind of its slot: numeric = squared error of the standardised value
where one is present + binary cross-entropy of "present"; categorical = cross-entropy over the
feature's categories; static code = cross-entropy over the code vocabulary; event = code
cross-entropy + value error where present + "present" cross-entropy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from jepa_ray.model.tokenizers import InputDims

NORM_EPS = 1e-6  # per-patch normalisation of the pixel targets, as MAE's norm_pix_loss


def patchify(image: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
    """(B, C, *spatial) -> (B, N, C * prod(patch)): non-overlapping patches (2-D) or tubelets (3-D)
    in the row-major grid order of the patch embedding's strided convolution."""
    b, _, *spatial = image.shape
    if len(spatial) != len(patch) or any(s % p for s, p in zip(spatial, patch, strict=True)):
        raise ValueError(f"an image of shape {tuple(spatial)} does not split into patches of {patch}")
    x = image
    for axis, p in enumerate(patch):
        x = x.unfold(2 + axis, p, p)  # (B, C, g0, ..., p0, ...)
    axes = len(patch)
    grid = list(range(2, 2 + axes))
    inner = list(range(2 + axes, 2 + 2 * axes))
    x = x.permute(0, *grid, 1, *inner)  # (B, g0, .., C, p0, ..)
    return x.reshape(b, math.prod(s // p for s, p in zip(spatial, patch, strict=True)), -1)


def normalise_patches(patches: torch.Tensor) -> torch.Tensor:
    """Each patch (B, N, P) to zero mean and unit variance over its own pixels."""
    mean = patches.mean(-1, keepdim=True)
    var = patches.var(-1, keepdim=True, unbiased=False)
    return (patches - mean) / (var + NORM_EPS).sqrt()


class ReconstructionHeads(nn.Module):
    """Linear heads from the decoder's outputs (B, Q, D) to the hidden content.

    pixels: one head per image kind (2-D patches; 3-D tubelets; both in a mixed model); value:
    (standardised value, logit of "a value is present"); category: logits over every categorical
    feature's categories (feature offsets added to the slot's id); code: logits over the vocabulary.
    """

    def __init__(self, dims: InputDims, width: int) -> None:
        super().__init__()
        self.dims = dims
        kinds = []
        for g in dims.grids:
            if len(g) == 3:
                kinds.append((dims.channels, *dims.tubelet))
            else:
                kinds.append((1 if dims.mixed else dims.channels, dims.patch_size, dims.patch_size))
        self.patch_shapes = [tuple(k[1:]) for k in kinds]
        self.pixels = nn.ModuleList(nn.Linear(width, math.prod(k)) for k in kinds)
        self.value = nn.Linear(width, 2)
        offsets = [0]
        for size in dims.cat_sizes:
            offsets.append(offsets[-1] + size)
        self.cat_offsets = offsets
        self.category = nn.Linear(width, max(offsets[-1], 1))
        self.code = nn.Linear(width, dims.vocab_size)
        n_num, n_cat = dims.n_num, len(dims.cat_sizes)
        kinds_of_slots = [0] * n_num + [1] * n_cat + [2] * dims.max_static_codes + [3] * dims.max_events
        self.register_buffer("slot_kind", torch.tensor(kinds_of_slots), persistent=False)  # (L,)
        slot_offset = [0] * n_num + offsets[:-1] + [0] * (dims.max_static_codes + dims.max_events)
        self.register_buffer("slot_offset", torch.tensor(slot_offset), persistent=False)  # (L,)

    def image_error(
        self,
        pred: torch.Tensor,
        batch: dict[str, torch.Tensor],
        idx: torch.Tensor,
        distance,
    ) -> torch.Tensor:
        """pred (B, Q, D) at patch slots idx (B, Q) -> (B, Q) error against the normalised pixels
        of those patches (in a mixed model each sample against its own kind's patches)."""
        n = self.dims.patches
        errors = []
        for k, head in enumerate(self.pixels):
            source = batch["volume"] if self.dims.mixed and k == 1 else batch["image"]
            target = normalise_patches(patchify(source.float(), self.patch_shapes[k]))  # (B, N_k, P)
            target = F.pad(target, (0, 0, 0, n - target.shape[1]))  # to the model's N image slots
            target = torch.gather(target, 1, idx.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
            errors.append(distance(head(pred), target.to(pred.dtype)))
        if len(errors) == 1:
            return errors[0]
        return torch.where(batch["is_volume"].unsqueeze(-1), errors[1], errors[0])

    def ehr_error(
        self, pred: torch.Tensor, batch: dict[str, torch.Tensor], idx: torch.Tensor, distance
    ) -> torch.Tensor:
        """pred (B, Q, D) at EHR layout slots idx (B, Q) -> (B, Q) reconstruction error of each slot."""

        def at(name: str) -> torch.Tensor:
            return torch.gather(batch[name], 1, idx)

        kind = self.slot_kind[idx]  # (B, Q)
        code, value = at("ehr_code").long(), at("ehr_value").float()
        present = at("ehr_value_present").float()
        v = self.value(pred).float()  # (B, Q, 2)
        value_err = present * distance(v[..., :1], value.unsqueeze(-1))
        present_err = F.binary_cross_entropy_with_logits(v[..., 1], present, reduction="none")
        cat_err = F.cross_entropy(
            self.category(pred).float().transpose(1, 2),
            (code + self.slot_offset[idx]).clamp(max=self.category.out_features - 1),
            reduction="none",
        )
        code_err = F.cross_entropy(
            self.code(pred).float().transpose(1, 2),
            code.clamp(max=self.dims.vocab_size - 1),
            reduction="none",
        )
        numeric = value_err + present_err
        return torch.where(
            kind == 0,
            numeric,
            torch.where(kind == 1, cat_err, torch.where(kind == 2, code_err, code_err + numeric)),
        )
