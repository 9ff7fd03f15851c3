"""The JEPA step under DeepSpeed: its config, the EMA target under every ZeRO stage, checkpoints.

Who owns what: the DeepSpeed engine owns the *student* (context encoder + predictor) with its
optimizer state, partitioned as the ZeRO stage says. The EMA target encoder stays outside the
engine, as an fp32 module complete on every rank: it has no gradients or optimizer state (4 bytes a
parameter, against 16 for the student under mixed precision), and keeping it out of the engine
keeps it in fp32 when the engine runs bf16 — an EMA step of (1 - 0.999) x difference would be
rounded away in bf16. The EMA reads the student's context encoder, gathering its parameters group
by group under ZeRO-3, so every rank applies the same update to the same full target.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from jepa_ray.config import TrainConfig
from jepa_ray.model.jepa import ema_

ENGINE_TAG = "engine"  # the tag of the DeepSpeed checkpoint inside each of our checkpoint directories
UNIVERSAL_TAG = "universal"  # the tag of its universal conversion, made to resume at another world size
TARGET_FILE = "target.safetensors"  # the EMA target: tensors only, nothing to unpickle
LEGACY_TARGET_FILE = "target.pt"  # written by jepa-ray 0.1.0 before; still read (restricted unpickler)
STATE_FILE = "state.json"
GATHER_NUMEL = 50_000_000  # parameters gathered at once by the ZeRO-3 EMA update
BUCKET_NUMEL = 500_000_000  # DeepSpeed's default communication bucket, the most we ever ask for
BUCKET_FLOOR = 1 << 22  # 16 MB in fp32: below this, more collectives cost more than the memory saves


def zero_buckets(params: int, width: int) -> dict[str, int]:
    """Communication buckets and the ZeRO-3 persistence threshold sized to the model.

    DeepSpeed's defaults suit billion-parameter models: a 5e8-element reduce bucket is allocated
    whole (2 GB per rank in fp32, even for a 1M-parameter model), and ZeRO-3 keeps every tensor
    under 1e5 elements unpartitioned (all of a narrow model). Here a bucket is 1/16 of the student
    (at least BUCKET_FLOOR elements, at most the default), so it costs ~1/16 of a gradient copy, and
    only vectors (biases, norms: under 10 x width elements) stay whole on every rank. The floor keeps
    a small model's gradients in one or a few collectives: at 64k elements the demo's tiny model
    took ~16 gloo calls a step (measured: 13-21% fewer samples/s).
    """
    # a multiple of 256: DeepSpeed asserts the all-gather bucket is aligned (2 elements on gloo, more
    # with NCCL), and a sixteenth of an arbitrary parameter count is not
    bucket = int(min(BUCKET_NUMEL, max(params // 16, BUCKET_FLOOR))) // 256 * 256
    return {
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
        "stage3_prefetch_bucket_size": bucket,
        "stage3_param_persistence_threshold": 10 * width,
    }


def load_deepspeed() -> Any:
    """`import deepspeed`, without the MLflow import its autotuner makes when MLflow is installed
    (2-3 s of every Ray Train worker's start on a CPU). jepa-ray never runs DeepSpeed's autotuner,
    its only user of MLflow; a process that has imported MLflow (train.tracker=mlflow) keeps it."""
    import sys

    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    hide = "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # `import mlflow` raises ImportError
    try:
        import deepspeed
    finally:
        if hide and "mlflow" in sys.modules and sys.modules["mlflow"] is None:
            del sys.modules["mlflow"]  # a later `import mlflow` loads it
    return deepspeed


def deepspeed_config(
    tc: TrainConfig, micro_batch: int, bf16: bool, params: int, width: int, accum: int | None = None
) -> dict[str, Any]:
    """The DeepSpeed config for a run: ZeRO stage, precision, clipping, accumulation (`accum`
    micro-batches a step, default train.grad_accum), AdamW, offload; `params` (the student's
    parameter count) and `width` (the encoder's) size the ZeRO buckets.

    The learning rate and weight decay are set by `apply_schedule` every step (warm-up + cosine,
    cosine weight decay), so no DeepSpeed scheduler is configured.
    """
    zero: dict[str, Any] = {"stage": tc.zero_stage}
    if tc.zero_stage >= 1:
        zero.update(overlap_comm=False, contiguous_gradients=True, **zero_buckets(params, width))
    if tc.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": tc.use_gpu}
    if tc.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": tc.use_gpu}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accum or tc.grad_accum,
        "gradient_clipping": tc.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": tc.lr,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "weight_decay": tc.weight_decay[0],
                # the fused CPU Adam of ZeRO-Offload is a JIT build; plain torch AdamW otherwise
                "torch_adam": not tc.offload_optimizer,
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def apply_schedule(optimizer: Any, lr: float, weight_decay: float) -> None:
    """Set this step's learning rate everywhere and its weight decay on the decayed group.

    `param_groups` of every ZeRO optimizer wrapper are the base optimizer's groups; the first group
    is the decayed one (see `jepa_ray.model.optim.param_groups`), the second never decays.
    """
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = lr
        group["weight_decay"] = weight_decay if group.get("apply_wd", i == 0) else 0.0


def _chunks(params: list[torch.nn.Parameter], limit: int):
    chunk, size = [], 0
    for p in params:
        n = getattr(p, "ds_numel", p.numel())
        if chunk and size + n > limit:
            yield chunk
            chunk, size = [], 0
        chunk.append(p)
        size += n
    if chunk:
        yield chunk


@torch.no_grad()
def ema_update(target: torch.nn.Module, context: torch.nn.Module, momentum: float, zero3: bool) -> None:
    """target <- momentum * target + (1 - momentum) * context, in fp32, on every rank.

    Under ZeRO-3 the context parameters are partitioned: they are gathered (read-only, a bounded
    number at a time) so that the full target sees the full context. Every rank must call this.
    """
    targets, contexts = list(target.parameters()), list(context.parameters())
    if not zero3:
        ema_(targets, contexts, momentum)
        return
    import deepspeed

    by_param = {id(c): t for t, c in zip(targets, contexts, strict=True)}
    for chunk in _chunks(contexts, GATHER_NUMEL):
        with deepspeed.zero.GatheredParameters(chunk, modifier_rank=None):
            ema_([by_param[id(c)] for c in chunk], chunk, momentum)


def save_checkpoint(engine: Any, target: torch.nn.Module, state: dict, directory: Path, rank: int) -> None:
    """Write this rank's part of a checkpoint into an empty `directory`: its DeepSpeed shard; rank 0
    also the target and state; then the sha256 of every file it wrote (checkpoints.write_digests).

    Ray Train merges the ranks' directories into one checkpoint once every rank has reported, so a
    crash while writing leaves the previous checkpoint the latest one.
    """
    from jepa_ray.train.checkpoints import write_digests

    engine.save_checkpoint(str(directory), tag=ENGINE_TAG)
    if rank == 0:
        from safetensors.torch import save_file

        save_file(
            {k: v.detach().contiguous() for k, v in target.state_dict().items()}, str(directory / TARGET_FILE)
        )
        (directory / STATE_FILE).write_text(json.dumps(state, indent=2))
    write_digests(directory, rank)


def read_target(directory: Path) -> dict[str, torch.Tensor]:
    """The EMA target's weights of a checkpoint: safetensors, or an older checkpoint's torch file
    (read by the restricted unpickler whoever calls)."""
    from safetensors.torch import load_file

    if (directory / TARGET_FILE).exists() or not (directory / LEGACY_TARGET_FILE).exists():
        return load_file(str(directory / TARGET_FILE), device="cpu")
    return torch.load(directory / LEGACY_TARGET_FILE, map_location="cpu", weights_only=True)


def to_universal(directory: Path, out: Path) -> Path:
    """DeepSpeed's universal checkpoint (each parameter and its optimizer state whole, in files of
    their own) made from the ZeRO checkpoint in `directory`, under `out`/UNIVERSAL_TAG; it loads at
    any world size. Its files are read by the restricted unpickler, one process, quietly."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main

    from jepa_ray.train.checkpoints import quietly, safe_loading

    args = argparse.Namespace(
        input_folder=str(directory / ENGINE_TAG),
        output_folder=str(out / UNIVERSAL_TAG),
        num_extract_workers=1,  # no child processes: they would not read through safe_loading
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # the version record a Megatron client would add; none is needed here
    )
    with safe_loading(), quietly():
        main(args)
    return out / UNIVERSAL_TAG


def load_checkpoint(engine: Any, target: torch.nn.Module, directory: Path, world: int | None = None) -> dict:
    """Restore the engine (weights, optimizer, DeepSpeed counters) and the target; return the state.
    Every file is verified against its digest first, and read by the restricted unpickler
    (checkpoints.safe_loading): CheckpointError names a file that fails either. A ZeRO-1/2/3
    checkpoint written at another world size than `world` (its ranks' partitions do not fit this
    one's) is converted to DeepSpeed's universal checkpoint first, which loads at any world size."""
    import tempfile

    from jepa_ray.errors import CheckpointError
    from jepa_ray.train.checkpoints import load_error, safe_loading, verify

    verify(directory)
    state = json.loads((directory / STATE_FILE).read_text())
    reshard = (
        world is not None and state.get("zero_stage", 0) >= 1 and state.get("world_size", world) != world
    )
    try:
        with tempfile.TemporaryDirectory(prefix="jepa-universal-") as tmp:
            if reshard:
                to_universal(directory, Path(tmp))
                engine._config.load_universal_checkpoint = True
            # ZeRO-3's universal load copies the first parameter group's settings into every group
            # (DeepSpeed 0.19): the no-decay group would be decayed from then on
            groups = [
                {k: g.get(k) for k in ("apply_wd", "weight_decay")} for g in engine.optimizer.param_groups
            ]
            try:
                with safe_loading():
                    path, _ = engine.load_checkpoint(
                        tmp if reshard else str(directory), tag=UNIVERSAL_TAG if reshard else ENGINE_TAG
                    )
            finally:
                engine._config.load_universal_checkpoint = False
            for group, kept in zip(engine.optimizer.param_groups, groups, strict=False):
                if kept["apply_wd"] is not None:
                    group["apply_wd"] = kept["apply_wd"]
                    if not kept["apply_wd"]:
                        group["weight_decay"] = kept["weight_decay"]
        with safe_loading():
            weights = read_target(directory)
    except CheckpointError:
        raise
    except Exception as e:
        raise load_error(directory / ENGINE_TAG, e) from None
    if path is None:
        raise CheckpointError(
            f"checkpoint {directory}: DeepSpeed found no engine state under tag {ENGINE_TAG!r}"
        )
    target.load_state_dict(weights)
    return state
