"""`ForwardReports`: a Ray Train callback that hands every report of a run to the driver's display.

Ray Train V2 calls a `ray.train.UserCallback` in its controller actor, not in the driver process
(ray/train/v2/api/callback.py; the controller is started by `DataParallelTrainer.fit`), with
`after_report(run_context, metrics, checkpoint)` once every worker has called `ray.train.report`:
`metrics[i]` is worker i's dict, `checkpoint` the persisted checkpoint or None. This callback puts
rank 0's dict (the loop reports rank-averaged metrics from every rank), with `checkpoint` set to
whether one was saved, into a sink the driver reads: `jepa_ray.console.TrainingProgress.sink()`,
or any object with `put(dict)`.
"""

from __future__ import annotations

import logging
from typing import Any

import ray.train

log = logging.getLogger(__name__)


class ForwardReports(ray.train.UserCallback):
    """Every report's metrics to `sink.put` (a display on the driver); never fails the run."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self._failed = False

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if not metrics or self._failed:
            return
        try:
            self.sink.put({**metrics[0], "checkpoint": checkpoint is not None})
        except Exception as e:  # the display is gone (its driver thread, its queue): train on
            self._failed = True
            log.warning("training progress is no longer shown: %s", type(e).__name__)
