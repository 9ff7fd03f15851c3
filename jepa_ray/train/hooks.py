"""What a caller may add to the training loop (`jepa_ray.train.loop`), in a module that imports
neither torch nor the loop: hooks travel inside the loop config, which Ray Train's controller
unpickles too, and a controller has no use for torch (each import costs it seconds of CPU and
hundreds of MB on the head node, once per run or sweep trial)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

Worker = Any  # a `jepa_ray.train.loop.Worker` (not imported: the loop imports this module)
BatchSource = Callable[[int, int, int], Iterable[dict]]  # (rank, world, epoch) -> that epoch's batches


class Hooks:
    """What a caller may add to the loop; this base adds nothing. A sweep's trials measure their
    objective at every report (`jepa_ray.tune.hooks.ObjectiveHooks`); tests fix every step's
    data, kill a worker mid-run or save what an export must reproduce. Hooks travel to the workers
    inside the loop config, so they must pickle."""

    batches: BatchSource | None = None  # replaces Ray Data: every rank's batches, per epoch
    dims: dict | None = None  # the model input dims, needed with `batches` (there are no shards)
    val_batches: int = 0  # validation batches `on_report` reads, loaded beside train.val_batches

    def after_step(self, worker: Worker) -> None:
        """After every optimizer step, before that step's report (if any)."""

    def on_report(self, worker: Worker, metrics: dict[str, float]) -> None:
        """May add to a report's metrics before they are logged and reported."""

    def at_end(self, worker: Worker) -> None:
        """After the last step, on every rank."""
