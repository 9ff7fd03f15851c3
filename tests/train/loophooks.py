"""The tests' hooks into the training loop: the same in-memory batches at every step, a worker
killed mid-run, and a probe of what an export must reproduce."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterable

import ray.cloudpickle
import torch

from jepa_ray.train.hooks import Hooks
from jepa_ray.train.loop import Worker, to_device

# Ray workers cannot import this module (it lives in tests/): its hooks travel by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class FixedBatches(Hooks):
    """Replaces Ray Data with in-memory batches, the same every epoch: per_rank[rank] is rank's
    list (its first ones are also the validation batches), so the data of every step is known,
    e.g. to compare ZeRO stages step for step. With `probe_path`, rank 0 saves at the end a batch,
    both encoders' outputs and the loss on it."""

    def __init__(self, per_rank: list[list[dict]], dims: dict, probe_path: str | None = None) -> None:
        self.per_rank, self.dims, self.probe_path = per_rank, dims, probe_path

    def batches(self, rank: int, world: int, epoch: int) -> Iterable[dict]:
        if len(self.per_rank) != world:
            raise ValueError(
                f"FixedBatches holds batches for {len(self.per_rank)} ranks, the run has {world}"
            )
        return iter(self.per_rank[rank])

    def with_probe(self, path: str) -> FixedBatches:
        return FixedBatches(self.per_rank, self.dims, path)

    @torch.no_grad()
    def at_end(self, worker: Worker) -> None:
        if not self.probe_path or not worker.val:
            return
        raw = worker.val[0]
        batch = to_device(raw, worker.device)
        student = worker.engine.module
        student.eval()  # every rank runs the student: under ZeRO-3 its forward gathers parameters
        context = student.context(batch)["tokens"].float().cpu()
        loss = float(student(batch, *worker.model.targets(batch))["loss"])
        if worker.rank == 0:
            target = worker.model.target(batch)["tokens"].cpu()
            torch.save({"batch": raw, "context": context, "target": target, "loss": loss}, self.probe_path)


class KillWorker(Hooks):
    """Rank 1 kills its own process after optimizer step `step`, unless it resumed from a
    checkpoint: Ray Train must restart the group, which resumes from the last checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def after_step(self, worker: Worker) -> None:
        if worker.position.step == self.step and worker.rank == 1 and not worker.resumed:
            # Ray Train's controller collects reported checkpoints when it polls the workers
            # (every 0.5 s under the tests, conftest.py): let it see the last one, as it would in
            # any run with real step times
            time.sleep(2.5)
            os.kill(os.getpid(), signal.SIGKILL)


class SlowSteps(Hooks):
    """Every optimizer step takes at least `seconds` longer: a run lasts long enough for a test to
    change the cluster under it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def after_step(self, worker: Worker) -> None:
        time.sleep(self.seconds)
