"""`jepa-ray export`: consolidated fp32 encoder weights from a checkpoint of any ZeRO stage.

Writes `<out>.safetensors` with `context.*` (the trained context encoder), `target.*` (the EMA
target encoder, the one the reference evaluates) and `predictor.*` (cross-modal retrieval uses its
predictions), and `<out>.json` with what rebuilds the model
(input dims, model config, the pipeline's image settings, the step). `jepa_ray.model.io` loads
them without Ray or DeepSpeed. A run on S3 (`train.storage_path=s3://...`) is read through the same
storage settings as training; its newest checkpoint is downloaded to a temporary directory first.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from jepa_ray.config import StorageConfig
from jepa_ray.errors import ConfigError
from jepa_ray.storage import is_remote, make_filesystem
from jepa_ray.train.checkpoints import load_error, quietly, safe_loading, verify
from jepa_ray.train.engine import ENGINE_TAG, STATE_FILE, TARGET_FILE, read_target


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself, or the newest checkpoint of a run directory."""
    p = Path(path)
    if (p / STATE_FILE).exists():
        return p
    if not p.is_dir():
        raise ConfigError(f"{path}: not a run or checkpoint directory")
    found = sorted(c for c in p.glob("checkpoint_*") if (c / STATE_FILE).exists())
    if not found:
        raise ConfigError(f"{path}: no checkpoint in this run directory (nothing with a {STATE_FILE})")
    return found[-1]


@contextmanager
def local_checkpoint(path: str | Path, storage: StorageConfig | None = None) -> Iterator[tuple[Path, str]]:
    """(local directory, its URL) of a checkpoint, or of a run's newest one; an s3:// one is
    downloaded to a temporary directory, removed on exit."""
    url = str(path).rstrip("/")
    if not is_remote(url):
        ckpt = find_checkpoint(url)
        yield ckpt, str(ckpt)
        return
    fs = make_filesystem(url, storage)
    root = url.split("://", 1)[1]
    if fs.exists(f"{root}/{STATE_FILE}"):
        chosen = root
    else:
        found = sorted(fs.glob(f"{root}/checkpoint_*/{STATE_FILE}"))
        if not found:
            raise ConfigError(f"{url}: no checkpoint in this run directory (nothing with a {STATE_FILE})")
        chosen = found[-1].rsplit("/", 1)[0]
    with tempfile.TemporaryDirectory(prefix="jepa-export-") as d:
        local = Path(d) / "checkpoint"
        fs.get(chosen + "/", str(local) + "/", recursive=True)
        yield local, "s3://" + chosen


def student_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """The student's full fp32 weights, gathered from the ZeRO partitions when there are any; read
    with the restricted unpickler (checkpoints.safe_loading), never running code from the files."""
    engine_dir = ckpt / ENGINE_TAG
    try:
        with safe_loading():
            if any(engine_dir.glob("*zero_pp_rank_*optim_states.pt")):
                if not torch.cuda.is_available():  # what DeepSpeed picks then, without its warning
                    os.environ.setdefault("DS_ACCELERATOR", "cpu")
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

                with quietly():
                    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=ENGINE_TAG)
            else:  # ZeRO-0 in fp32: the module's weights are whole in the model-states file
                sd = torch.load(engine_dir / "mp_rank_00_model_states.pt", map_location="cpu")["module"]
    except Exception as e:
        raise load_error(engine_dir, e) from None
    return {k: v.float() for k, v in sd.items()}


def export(path: str | Path, out: str | Path, storage: StorageConfig | None = None) -> tuple[Path, Path]:
    """Export a run's (or a checkpoint's) encoders; returns the safetensors and JSON paths.
    `storage` reaches an s3:// run (endpoint, region), as in training."""
    with local_checkpoint(path, storage) as (ckpt, url):
        return _export(ckpt, url, Path(out))


def _export(ckpt: Path, url: str, out: Path) -> tuple[Path, Path]:
    from safetensors.torch import save_file

    verify(ckpt)
    state = json.loads((ckpt / STATE_FILE).read_text())
    student = student_state_dict(ckpt)
    try:
        target = read_target(ckpt)
    except Exception as e:
        raise load_error(ckpt / TARGET_FILE, e) from None
    tensors = {k: v for k, v in student.items() if k.startswith(("context.", "predictor."))}
    tensors.update({f"target.{k}": v.float() for k, v in target.items()})
    weights = out if out.suffix == ".safetensors" else out.with_suffix(".safetensors")
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(weights))
    pipeline = state["config"]["pipeline"]
    meta = {
        "dims": state["dims"],
        "model": state["config"]["model"],
        "pipeline": {  # what evaluation must feed the encoder (2-D or 3-D, sizes, EHR lengths)
            k: pipeline[k]
            for k in (
                "dims",
                "image_size",
                "patch_size",
                "volume_size",
                "tubelet",
                "normalize",
                "max_events",
                "max_static_codes",
            )
            if k in pipeline
        },
        "step": state["step"],
        "checkpoint": url,
        # the seed its initial weights were drawn from: evaluate's random init is that start
        "init_seed": pipeline.get("seed", 0),
    }
    info = weights.with_suffix(".json")
    info.write_text(json.dumps(meta, indent=2))
    return weights, info
