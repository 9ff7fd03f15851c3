"""Load exported encoders (`jepa-ray export`) into plain PyTorch: no Ray, no DeepSpeed.

model = load_jepa("encoder.safetensors")          # context + target loaded, predictor fresh
out = model.encode(batch, modality="image")       # pooled target-encoder embeddings
"""

from __future__ import annotations

import json
from pathlib import Path

from jepa_ray.config import ModelConfig
from jepa_ray.model.jepa import JEPA


def load_jepa(path: str | Path) -> JEPA:
    """A JEPA whose context and target encoders hold the exported weights (eval mode)."""
    from safetensors.torch import load_file

    weights = Path(path)
    info = json.loads(weights.with_suffix(".json").read_text())
    model = JEPA(info["dims"], ModelConfig.model_validate(info["model"]))
    tensors = load_file(str(weights))
    context = {k[len("context.") :]: v for k, v in tensors.items() if k.startswith("context.")}
    target = {k[len("target.") :]: v for k, v in tensors.items() if k.startswith("target.")}
    model.context.load_state_dict(context)
    model.target.load_state_dict(target)
    return model.eval()
