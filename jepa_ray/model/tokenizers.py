"""Modality tokenizers: image patches and EHR tokens to (B, T, D) embeddings, plus position codes.

Each tokenizer also gives the *position* of every token without its content: the patch's place in
the grid, or the EHR slot's identity (which static feature; a static code; an event and its time).
The predictor's mask tokens carry exactly that, so it knows what it must predict but not its value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from jepa_ray.model.vit import learned, sincos_1d, sincos_grid

MIXED_BATCH = "a mixed 2-D + 3-D model takes batches of pipeline.dims=mixed (volume, is_volume)"


@dataclass(frozen=True)
class InputDims:
    """What the batches look like (see `FeatureSpec.model_dims` in the data pipeline)."""

    image_size: int
    patch_size: int
    vocab_size: int
    n_num: int
    cat_sizes: tuple[int, ...]
    max_static_codes: int
    max_events: int
    num_target_blocks: int = 4
    channels: int = 1  # image channels: 1 for radiographs, one per CT window for volumes
    volume_size: tuple[int, ...] | None = None  # 3-D input (slices, rows, columns); None: 2-D
    tubelet: tuple[int, ...] | None = None  # 3-D patch size
    mixed: bool = False  # radiographs and CT volumes, each with its own patch embedder

    @classmethod
    def from_dict(cls, d: dict) -> InputDims:
        keys = cls.__dataclass_fields__
        tuples = ("cat_sizes", "volume_size", "tubelet")
        return cls(**{k: tuple(v) if k in tuples and v is not None else v for k, v in d.items() if k in keys})

    @property
    def grid_2d(self) -> tuple[int, int]:
        g = self.image_size // self.patch_size
        return (g, g)

    @property
    def grid_3d(self) -> tuple[int, ...] | None:
        if self.volume_size is None:
            return None
        return tuple(v // t for v, t in zip(self.volume_size, self.tubelet, strict=True))

    @property
    def grid(self) -> tuple[int, ...]:
        """The patch grid of a one-kind model (a mixed one has two: `grids`)."""
        if self.mixed:
            raise ValueError("a mixed 2-D + 3-D model has two patch grids: use grids")
        return self.grid_3d if self.volume_size is not None else self.grid_2d

    @property
    def grids(self) -> tuple[tuple[int, ...], ...]:
        """Every patch grid of the model: image kind k (0 radiograph, 1 CT in a mixed model) uses grids[k]."""
        if self.mixed:
            return (self.grid_2d, self.grid_3d)
        return (self.grid,)

    @property
    def patches(self) -> int:
        """Image token slots: the grid's patches; in a mixed model the larger grid's (a sample of
        the smaller kind leaves the slots past its own grid empty)."""
        return max(math.prod(g) for g in self.grids)

    @property
    def ehr_tokens(self) -> int:
        return self.n_num + len(self.cat_sizes) + self.max_static_codes + self.max_events


class ImageTokenizer(nn.Module):
    """Patch embedding (a strided convolution: 2-D patches, or 3-D tubelets of a volume) + fixed
    sin-cos positions over the 2-D or 3-D patch grid + an image modality vector.

    A mixed model has both embedders, each with its own positions and kind vector: a batch's
    radiographs go through the 2-D one and its volumes through the 3-D one, and their tokens share
    the image slots (a sample of the smaller grid leaves the slots past its own empty).
    """

    def __init__(self, dims: InputDims, width: int) -> None:
        super().__init__()
        self.dims = dims
        if dims.volume_size is not None and not dims.mixed:
            self.patch = nn.Conv3d(dims.channels, width, dims.tubelet, stride=dims.tubelet)
        else:
            self.patch = nn.Conv2d(
                1 if dims.mixed else dims.channels, width, dims.patch_size, stride=dims.patch_size
            )
        self.register_buffer("pos", sincos_grid(dims.grids[0], width), persistent=False)  # (N, D)
        self.modality = learned(width)
        if dims.mixed:
            self.patch3 = nn.Conv3d(dims.channels, width, dims.tubelet, stride=dims.tubelet)
            self.register_buffer("pos3", sincos_grid(dims.grid_3d, width), persistent=False)
            self.modality3 = learned(width)

    def forward(
        self, image: torch.Tensor, volume: torch.Tensor | None = None, is_volume: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, C, S, S) or (B, C, Z, Y, X) -> (B, N, D) patch tokens, N in row-major grid order.

        Mixed: image (B, 1, S, S), volume (B, C, Z, Y, X), is_volume (B,) which of the two each
        sample holds -> (B, N, D) with N the larger grid's patches (zeros past a sample's grid)."""
        if not self.dims.mixed:
            return self.patch(image).flatten(2).transpose(1, 2) + self.pos + self.modality
        if volume is None or is_volume is None:
            raise ValueError(MIXED_BATCH)
        b, n = image.shape[0], self.dims.patches
        flat = ~is_volume
        # each embedder runs on its own kind's samples only; both run on every batch (an empty one
        # included), so every rank's backward reaches every parameter, as data parallelism needs
        t2 = self.patch(image[flat]).flatten(2).transpose(1, 2) + self.pos + self.modality
        t3 = self.patch3(volume[is_volume]).flatten(2).transpose(1, 2) + self.pos3 + self.modality3
        out = t2.new_zeros(b, n, t2.shape[-1])
        out[flat, : t2.shape[1]] = t2
        out[is_volume, : t3.shape[1]] = t3
        return out


class EhrTokenizer(nn.Module):
    """One token per static numeric feature, categorical feature, static code and event.

    numeric: feature vector + value x a learned direction, or a learned missing vector;
    categorical: feature vector + the category's embedding (one table per feature);
    static code: code embedding + a static-code vector; event: code embedding + value (or a no-value
    vector) + sin-cos of log days before the index. Every token also gets the EHR modality vector.
    """

    def __init__(self, dims: InputDims, width: int) -> None:
        super().__init__()
        self.dims = dims
        n_num, n_cat = dims.n_num, len(dims.cat_sizes)
        self.feature = learned(n_num + n_cat, width)  # static feature identities
        self.value = learned(width)  # direction a standardised value moves along
        self.missing = learned(width)
        self.no_value = learned(width)
        self.cat_offsets = [0]
        for size in dims.cat_sizes:
            self.cat_offsets.append(self.cat_offsets[-1] + size)
        self.categories = nn.Embedding(max(self.cat_offsets[-1], 1), width)
        self.codes = nn.Embedding(dims.vocab_size, width, padding_idx=0)
        self.kind = learned(4, width)  # numeric, categorical, static code, event
        self.slot = learned(dims.ehr_tokens, width)  # which position in the layout
        self.time = nn.Linear(32, width)
        self.modality = learned(width)
        kinds = [0] * n_num + [1] * n_cat + [2] * dims.max_static_codes + [3] * dims.max_events
        self.register_buffer("kinds", torch.tensor(kinds), persistent=False)

    def _time(self, days: torch.Tensor) -> torch.Tensor:
        return self.time(sincos_1d(torch.log1p(days.clamp(min=0)) * 8.0, 32))

    def positions(self, time: torch.Tensor) -> torch.Tensor:
        """(B, L, D) what a mask token at each EHR slot carries: its kind, slot, feature and time."""
        n_static = self.dims.n_num + len(self.dims.cat_sizes)
        pos = self.kind[self.kinds] + self.slot + self.modality  # (L, D)
        pos = pos.unsqueeze(0).expand(time.shape[0], -1, -1).clone()
        pos[:, :n_static] += self.feature
        ev = slice(self.dims.ehr_tokens - self.dims.max_events, None)
        pos[:, ev] += self._time(time[:, ev])
        return pos

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's EHR arrays -> (B, L, D) tokens (padding slots get position only) and the
        (B, L, D) positions alone (what a mask token at each slot carries).

        Both come out of one forward so that a parameter-sharded wrapper (ZeRO-3), which gathers a
        module's parameters around its forward only, sees every parameter used.
        """
        code, value = batch["ehr_code"], batch["ehr_value"]
        present = batch["ehr_value_present"].unsqueeze(-1).to(value.dtype)
        pos = self.positions(batch["ehr_time"])
        x = pos.clone()
        n_num, n_cat = self.dims.n_num, len(self.dims.cat_sizes)
        num = slice(0, n_num)
        x[:, num] += present[:, num] * value[:, num, None] * self.value + (1 - present[:, num]) * self.missing
        cat = slice(n_num, n_num + n_cat)
        if n_cat:
            offsets = torch.tensor(self.cat_offsets[:-1], device=code.device)
            x[:, cat] += self.categories(code[:, cat] + offsets)
        rest = slice(n_num + n_cat, None)
        x[:, rest] += self.codes(code[:, rest])
        ev = slice(self.dims.ehr_tokens - self.dims.max_events, None)
        x[:, ev] += present[:, ev] * value[:, ev, None] * self.value + (1 - present[:, ev]) * self.no_value
        return x, pos
