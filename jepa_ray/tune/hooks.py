"""A sweep trial's hook into its training loop, in a module that imports neither torch nor the
loop (see `jepa_ray.train.hooks`): Ray Train's controller unpickles it with the loop config of
every trial, and only the workers measure anything."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from jepa_ray.train.hooks import Hooks

if TYPE_CHECKING:
    from jepa_ray.train.loop import Worker


class ObjectiveHooks(Hooks):
    """At every report, rank 0 measures the trial's objective on its first validation batches (the
    target encoder is whole on every rank, even under ZeRO-3). `objective`: kind, label, batches,
    and optionally mask and candidates (see `jepa_ray.tune.objective.measure`). The collapse
    guard's reference is measured at the first report, from the rebuilt starting encoder."""

    def __init__(self, objective: dict[str, Any]) -> None:
        self.objective = objective
        self.val_batches = objective["batches"]
        self.start: dict[str, float] | None = None

    def on_report(self, worker: Worker, metrics: dict[str, float]) -> None:
        if worker.rank != 0:
            return
        from jepa_ray.train.loop import to_device
        from jepa_ray.tune.objective import LABEL_FREE, embedding_start, measure

        o = self.objective
        batches = [to_device(b, worker.device) for b in worker.val[: o["batches"]]]
        if self.start is None and o["kind"] in LABEL_FREE:
            self.start = embedding_start(worker, batches)
        extra = {"mask": o.get("mask"), "candidates": o.get("candidates", ()), "start": self.start}
        metrics.update(measure(worker.model, batches, o["kind"], o["label"], **extra))
