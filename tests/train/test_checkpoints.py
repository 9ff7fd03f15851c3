"""Checkpoint files cannot run code and cannot be silently different from what was written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from jepa_ray.errors import CheckpointError
from jepa_ray.train.checkpoints import DIGEST_PREFIX, safe_loading, verify, write_digests


class Payload:
    """What an attacker pickles: unpickling it calls os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_does_not_run_even_when_the_caller_asks_for_full_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "extra": Payload(marker)}, evil)
    with safe_loading(), pytest.raises(Exception, match=r"(?i)weights only|unsupported global"):
        torch.load(evil, map_location="cpu", weights_only=False)  # what DeepSpeed's loader asks for
    assert not marker.exists()
    assert torch.load is torch.serialization.load  # restored after the block


def test_what_deepspeed_checkpoints_hold_still_loads(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    path = tmp_path / "optim_states.pt"
    dynamic = DynamicLossScaler(2.0**16, 1000, 1.0, 2, False)  # bf16/fp16 runs' scaler
    state = {"w": torch.arange(3.0), "scaler": LossScaler(1.0), "dyn": dynamic, "stage": ZeroStageEnum(2)}
    state["param_slice_mappings"] = [{"w": fragment_address(numel=3, start=0)}]  # ZeRO-1/2
    torch.save(state, path)
    with safe_loading():
        back = torch.load(path, weights_only=False)
    assert torch.equal(back["w"], state["w"]) and back["stage"] == ZeroStageEnum(2)
    assert back["scaler"].cur_scale == 1.0 and isinstance(back["dyn"], DynamicLossScaler)
    assert back["param_slice_mappings"][0]["w"].numel == 3


def _checkpoint(tmp_path: Path) -> Path:
    d = tmp_path / "checkpoint_1"
    (d / "engine").mkdir(parents=True)
    (d / "engine" / "rank0.pt").write_bytes(b"a" * 100)
    (d / "state.json").write_text("{}")
    write_digests(d, 0)
    (d / "engine" / "rank1.pt").write_bytes(b"b" * 50)  # the other rank's part, merged by Ray Train
    write_digests(d, 1, before={d / "engine" / "rank0.pt", d / "state.json"})
    return d


def test_digests_name_a_changed_missing_or_foreign_file(tmp_path):
    d = _checkpoint(tmp_path)
    verify(d)  # as written: fine
    recorded = json.loads((d / f"{DIGEST_PREFIX}1.json").read_text())
    assert set(recorded) == {"engine/rank1.pt"}  # each rank records only what it wrote

    (d / "engine" / "rank1.pt").write_bytes(b"b" * 49 + b"c")  # one byte flipped, same size
    with pytest.raises(CheckpointError, match=r"engine/rank1.pt: changed since it was written"):
        verify(d)
    (d / "engine" / "rank1.pt").unlink()
    with pytest.raises(CheckpointError, match=r"engine/rank1.pt: missing"):
        verify(d)
    (d / "engine" / "rank1.pt").write_bytes(b"b" * 50)
    (d / "engine" / "extra.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"engine/extra.pt: not written by the run"):
        verify(d)
    (d / "engine" / "extra.pt").unlink()
    (d / f"{DIGEST_PREFIX}0.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"digests-rank0.json: unreadable digest file"):
        verify(d)


def test_a_checkpoint_from_before_digests_is_accepted(tmp_path, caplog):
    d = tmp_path / "old"
    d.mkdir()
    (d / "state.json").write_text("{}")
    verify(d)
    assert "no file digests" in caplog.text


def test_the_target_is_read_from_safetensors_and_an_older_torch_file_only_as_tensors(tmp_path):
    from safetensors.torch import save_file

    from jepa_ray.train.engine import LEGACY_TARGET_FILE, TARGET_FILE, read_target

    weights = {"blocks.0.w": torch.arange(6.0).reshape(2, 3), "norm.b": torch.ones(3)}
    new, old = tmp_path / "new", tmp_path / "old"
    new.mkdir(), old.mkdir()
    save_file(weights, str(new / TARGET_FILE))
    torch.save(weights, old / LEGACY_TARGET_FILE)
    for d in (new, old):
        got = read_target(d)
        assert got.keys() == weights.keys() and all(torch.equal(got[k], weights[k]) for k in weights)
    marker = tmp_path / "ran"
    torch.save({"w": Payload(str(marker))}, old / LEGACY_TARGET_FILE)
    with pytest.raises(Exception, match=r"(?i)weights only|unsupported global"):
        read_target(old)
    assert not marker.exists()


def test_each_rank_reads_its_own_copy_of_a_remote_checkpoint(tmp_path):
    """Ray Train's as_directory() downloads a checkpoint to a directory named by the checkpoint
    object's id, which every rank's (unpickled) copy of the restored checkpoint shares: a rank that
    downloads after another finished rewrites the files that rank is reading. private_copy gives
    each reader its own download, and removing one copy leaves the other whole."""
    import pickle

    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    from jepa_ray.train.checkpoints import private_copy

    src = tmp_path / "checkpoint_000004"
    (src / "engine").mkdir(parents=True)
    (src / "engine" / "shard.pt").write_bytes(b"x" * 4096)
    remote = pafs.SubTreeFileSystem("/", pafs.LocalFileSystem())  # read through a download, as S3 is
    rank0 = Checkpoint(str(src).lstrip("/"), filesystem=remote)
    rank1 = pickle.loads(pickle.dumps(rank0))
    with rank0.as_directory() as a, rank1.as_directory() as b:
        assert a == b  # what private_copy avoids: one directory for both ranks

    with private_copy(rank0) as mine:
        with private_copy(rank1) as theirs:
            assert mine != theirs and str(src) not in {str(mine), str(theirs)}
            assert (theirs / "engine" / "shard.pt").read_bytes() == b"x" * 4096
        assert not theirs.exists()
        assert (mine / "engine" / "shard.pt").read_bytes() == b"x" * 4096
    assert not mine.exists()
    assert (src / "engine" / "shard.pt").exists()

    local = Checkpoint(str(src))
    with private_copy(local) as d:
        assert d == src  # a local checkpoint is read in place, never copied or removed
    assert (src / "engine" / "shard.pt").exists()


def test_only_a_run_without_checkpoints_primes_its_stream_at_the_start(tmp_path):
    """The driver starts a new run's data stream at row 0 while the worker group starts; a run
    that resumes (a checkpoint exists) starts where its checkpoint says, so nothing is primed."""
    from jepa_ray.train.trainer import _has_checkpoints

    run = tmp_path / "run"
    assert not _has_checkpoints(str(run), None)  # not there yet
    (run / "metrics").mkdir(parents=True)
    assert not _has_checkpoints(str(run), None)  # started, no checkpoint written
    (run / "checkpoint_2026-12-04_17-35-56.685766").mkdir()
    assert _has_checkpoints(str(run), None)
