"""Load exported encoders (`jepa-ray export`) into plain PyTorch: no Ray, no DeepSpeed.

model = load_jepa("encoder.safetensors")          # context, target and predictor loaded
out = model.encode(batch, modality="image")       # pooled target-encoder embeddings
"""

from __future__ import annotations

import json
from pathlib import Path

from jepa_ray.config import ModelConfig
from jepa_ray.model.jepa import JEPA

# model settings an export written before they existed was trained with (what the model did then)
FORMER_DEFAULTS = {"numeric_embedding": "linear", "event_values": "shared"}


def export_model_config(model: dict) -> ModelConfig:
    """The ModelConfig an export's metadata ("model") describes: a setting it predates takes the
    value it was trained with, not today's default, so that its weights load and its random-init
    baseline has its shape and its start."""
    return ModelConfig.model_validate(FORMER_DEFAULTS | model)


def load_jepa(path: str | Path) -> JEPA:
    """A JEPA whose context and target encoders hold the exported weights (eval mode)."""
    from safetensors.torch import load_file

    weights = Path(path)
    info = json.loads(weights.with_suffix(".json").read_text())
    model = JEPA(info["dims"], export_model_config(info["model"]))
    tensors = load_file(str(weights))
    context = {k[len("context.") :]: v for k, v in tensors.items() if k.startswith("context.")}
    target = {k[len("target.") :]: v for k, v in tensors.items() if k.startswith("target.")}
    predictor = {k[len("predictor.") :]: v for k, v in tensors.items() if k.startswith("predictor.")}
    model.context.load_state_dict(context)
    model.target.load_state_dict(target)
    model.predictor.load_state_dict(predictor)
    return model.eval()


def save_jepa(model: JEPA, path: str | Path, pipeline: dict, step: int = 0) -> Path:
    """Write a model in the export format (for models trained outside `jepa-ray pretrain`, e.g. in
    a notebook): `path` (.safetensors) and its .json; `pipeline` holds the image and EHR settings
    the model was trained with (image_size, patch_size, normalize, max_events, max_static_codes)."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    weights = Path(path).with_suffix(".safetensors")
    weights.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"context.{k}": v for k, v in model.context.state_dict().items()}
    tensors |= {f"predictor.{k}": v for k, v in model.predictor.state_dict().items()}
    tensors |= {f"target.{k}": v for k, v in model.target.state_dict().items()}
    save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, str(weights))
    dims = asdict(model.dims) | {"ehr_tokens": model.dims.ehr_tokens}
    meta = {"dims": dims, "model": model.cfg.model_dump(mode="json"), "pipeline": pipeline, "step": step}
    weights.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return weights
