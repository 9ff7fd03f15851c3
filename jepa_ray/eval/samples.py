"""The evaluated samples of one split (one per subject) as arrays: embeddings, tokens, labels and
follow-up, read by every evaluation (probes, retrieval, time-to-event heads)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Split:
    """The evaluated samples of one split (one per subject), as arrays."""

    cols: dict[str, np.ndarray]
    meta: list[dict[str, Any]]
    dropped_later_studies: int

    def __len__(self) -> int:
        return len(self.meta)

    @property
    def subjects(self) -> np.ndarray:
        return np.array([m["subject"] for m in self.meta])

    def image_tokens(self) -> np.ndarray:
        """(n, r*r, D) float32: the image's patch tokens pooled to the eval.regions grid."""
        n, d = self.cols["emb_image"].shape
        return self.cols["img_tokens"].astype(np.float32).reshape(n, -1, d)

    def label(self, name: str) -> np.ndarray:
        """(n,) float: 1/0, NaN where the label is not given."""
        return np.array([float(m.get("labels", {}).get(name, np.nan)) for m in self.meta])

    def tte(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(days, event): NaN days where the subject has no follow-up for `name`."""
        days = np.array([m.get("tte", {}).get(name, {}).get("days", np.nan) for m in self.meta], float)
        event = np.array([bool(m.get("tte", {}).get(name, {}).get("event", False)) for m in self.meta])
        return days, event
