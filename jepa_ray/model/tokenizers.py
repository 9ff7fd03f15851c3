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

    def __init__(self, dims: InputDims, width: int, learned_positions: bool = False) -> None:
        super().__init__()
        self.dims = dims
        if dims.volume_size is not None and not dims.mixed:
            self.patch = nn.Conv3d(dims.channels, width, dims.tubelet, stride=dims.tubelet)
        else:
            self.patch = nn.Conv2d(
                1 if dims.mixed else dims.channels, width, dims.patch_size, stride=dims.patch_size
            )
        if learned_positions:  # a table that trains, from sin-cos (or a checkpoint's positions)
            self.pos = nn.Parameter(sincos_grid(dims.grids[0], width))
        else:
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


NUMERIC_EMBEDDINGS = ("linear", "periodic", "piecewise")  # model.numeric_embedding
EVENT_VALUES = ("per_code", "shared")  # model.event_values
# per_code: the init std of each code's value direction, about the periodic embedding's output RMS
# at init (ReLU of ~N(0, 0.5)), so a code's value moves its token as much as the value itself does
CODE_VALUE_STD = 0.5
PERIODIC_FREQUENCIES = 16  # k: a value enters as cos and sin of 2*pi*c*x at k learned frequencies c
PERIODIC_SIGMA = 0.5  # initial frequencies ~ N(0, sigma^2), per feature (Gorishniy et al. 2022)
# piecewise-linear bin edges on the standardised scale: standard-normal quantiles at i/8 (ends +-2.5),
# since a model is built before it sees data and the manifest keeps each feature's mean and std only
PIECEWISE_EDGES = (-2.5, -1.15, -0.67, -0.32, 0.0, 0.32, 0.67, 1.15, 2.5)


def piecewise_linear(x: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """(...,) values -> (..., T) piecewise-linear encoding over T = len(edges) - 1 bins (Gorishniy
    et al. 2022): 1 for a bin below x, 0 for one above, the fraction of x's own bin covered; the first
    bin extends below its edge and the last above (linear there), so the encoding is continuous
    and each component non-decreasing in x."""
    lo, width = edges[:-1], edges[1:] - edges[:-1]
    t = (x.unsqueeze(-1) - lo) / width  # (..., T)
    inner = t.clamp(0.0, 1.0)
    first, last = t[..., :1].clamp(max=1.0), t[..., -1:].clamp(min=0.0)
    if t.shape[-1] == 1:
        return t
    return torch.cat([first, inner[..., 1:-1], last], dim=-1)


class NumericEmbedding(nn.Module):
    """Standardised values of F numeric features (B, L) -> (B, L, D), with `feature` (L,) the index
    in 0..F-1 of the embedding each column uses (a numeric value that is not a single scaled
    direction, which is `EhrTokenizer`'s linear embedding).

    periodic: cos/sin of the value at k learned frequencies per feature, then a per-feature linear
    map and a ReLU (Gorishniy et al. 2022's PLR). piecewise: the piecewise-linear encoding over fixed
    bins, then a per-feature linear map (continuous, linear within each bin).
    """

    def __init__(self, kind: str, features: int, width: int) -> None:
        super().__init__()
        if kind not in ("periodic", "piecewise"):
            raise ValueError(
                f"numeric embedding {kind!r}: periodic or piecewise (linear is EhrTokenizer.value)"
            )
        self.kind = kind
        if kind == "periodic":
            self.frequency = nn.Parameter(torch.randn(features, PERIODIC_FREQUENCIES) * PERIODIC_SIGMA)
            n_in = 2 * PERIODIC_FREQUENCIES
        else:
            self.register_buffer("edges", torch.tensor(PIECEWISE_EDGES), persistent=False)
            n_in = len(PIECEWISE_EDGES) - 1
        self.weight = nn.Parameter(nn.init.trunc_normal_(torch.empty(features, n_in, width), std=n_in**-0.5))
        self.bias = nn.Parameter(torch.zeros(features * width))  # (F, D) kept flat: 1-D, not decayed

    def forward(self, x: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        if self.kind == "periodic":
            angle = 2 * math.pi * self.frequency[feature] * x.unsqueeze(-1)  # (B, L, k)
            enc = torch.cat([torch.cos(angle), torch.sin(angle)], dim=-1)
        else:
            enc = piecewise_linear(x, self.edges)  # (B, L, T)
        bias = self.bias.view(self.weight.shape[0], -1)[feature]  # (L, D)
        out = torch.einsum("blt,ltd->bld", enc, self.weight[feature]) + bias
        return torch.relu(out) if self.kind == "periodic" else out


class EhrTokenizer(nn.Module):
    """One token per static numeric feature, categorical feature, static code and event.

    numeric: feature vector + the value's embedding (`numeric`: value x one learned direction, or
    a periodic or piecewise-linear embedding per feature), or a learned missing vector;
    categorical: feature vector + the category's embedding (one table per feature);
    static code: code embedding + a static-code vector; event: code embedding + value (embedded as
    a static numeric one is, every event value sharing one embedding; or a no-value vector) +
    sin-cos of log days before the index. Every token also gets the EHR modality vector.

    event_values="per_code": an event's value also moves its token along a learned direction of its
    own code (value x direction[code]). The shared embedding alone makes a BNP of +2 and a CRP of +2
    the same vector but for their codes' small embeddings, so a mean over the tokens mixes every
    code's values into one; with a direction per code the mean keeps each code's values apart (what
    a Cox model on per-code mean values reads).
    """

    def __init__(
        self, dims: InputDims, width: int, numeric: str = "linear", event_values: str = "shared"
    ) -> None:
        super().__init__()
        if numeric not in NUMERIC_EMBEDDINGS:
            raise ValueError(f"numeric embedding {numeric!r}: choose one of {', '.join(NUMERIC_EMBEDDINGS)}")
        if event_values not in EVENT_VALUES:
            raise ValueError(f"event values {event_values!r}: choose one of {', '.join(EVENT_VALUES)}")
        self.dims, self.numeric_embedding, self.event_values = dims, numeric, event_values
        n_num, n_cat = dims.n_num, len(dims.cat_sizes)
        self.feature = learned(n_num + n_cat, width)  # static feature identities
        if numeric == "linear":
            self.value = learned(width)  # direction a standardised value moves along
        else:  # one embedding per static numeric feature, and one shared by the event values
            self.numeric = NumericEmbedding(numeric, n_num + 1, width)
        self.missing = learned(width)
        self.no_value = learned(width)
        self.cat_offsets = [0]
        for size in dims.cat_sizes:
            self.cat_offsets.append(self.cat_offsets[-1] + size)
        self.categories = nn.Embedding(max(self.cat_offsets[-1], 1), width)
        self.codes = nn.Embedding(dims.vocab_size, width, padding_idx=0)
        if event_values == "per_code":  # a parameter, not an nn.Embedding: kept out of the 0.02 init
            self.code_values = nn.Parameter(
                nn.init.trunc_normal_(torch.empty(dims.vocab_size, width), std=CODE_VALUE_STD)
            )
        self.kind = learned(4, width)  # numeric, categorical, static code, event
        self.slot = learned(dims.ehr_tokens, width)  # which position in the layout
        self.time = nn.Linear(32, width)
        self.modality = learned(width)
        kinds = [0] * n_num + [1] * n_cat + [2] * dims.max_static_codes + [3] * dims.max_events
        self.register_buffer("kinds", torch.tensor(kinds), persistent=False)
        which = list(range(n_num)) + [n_num] * dims.max_events  # numeric slots, then event slots
        self.register_buffer("value_feature", torch.tensor(which, dtype=torch.long), persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # an export written before model.numeric_embedding existed holds the linear embedding (one
        # `value` direction): such weights make this tokenizer linear, so old exports keep loading
        old = prefix + "value" in state_dict and not any(
            k.startswith(prefix + "numeric.") for k in state_dict
        )
        if old and self.numeric_embedding != "linear":
            del self.numeric
            self.numeric_embedding = "linear"
            self.value = nn.Parameter(torch.empty_like(state_dict[prefix + "value"]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _values(self, value: torch.Tensor) -> torch.Tensor:
        """(B, n_num + max_events) standardised values of the numeric and event slots -> (B, ., D)."""
        if self.numeric_embedding == "linear":
            return value.unsqueeze(-1) * self.value
        return self.numeric(value, self.value_feature)

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
        ev = slice(self.dims.ehr_tokens - self.dims.max_events, None)
        # padding slots and missing values hold 0, which every embedding maps to a finite vector
        embedded = self._values(torch.cat([value[:, num], value[:, ev]], dim=1))  # (B, n_num + E, D)
        x[:, num] += present[:, num] * embedded[:, :n_num] + (1 - present[:, num]) * self.missing
        cat = slice(n_num, n_num + n_cat)
        if n_cat:
            offsets = torch.tensor(self.cat_offsets[:-1], device=code.device)
            x[:, cat] += self.categories(code[:, cat] + offsets)
        rest = slice(n_num + n_cat, None)
        x[:, rest] += self.codes(code[:, rest])
        x[:, ev] += present[:, ev] * embedded[:, n_num:] + (1 - present[:, ev]) * self.no_value
        if self.event_values == "per_code":  # padding and no-value events hold value 0: nothing added
            x[:, ev] += (present[:, ev] * value[:, ev].unsqueeze(-1)) * self.code_values[code[:, ev]]
        return x, pos
