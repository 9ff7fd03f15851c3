"""What a person sees on the console: one progress display per phase, driven on the driver.

On a terminal a phase is a rich progress bar; when stdout is not a terminal (a file, a pipe, a CI
log) it is plain lines, without escape codes or bars:

- `PhaseProgress`: a phase of N units (prepare's header scan, its shard writing).
- `TrainingProgress`: a training run, fed by every Ray Train report (steps done/total, loss,
  samples/s, ETA) through a Ray Train callback in the run's controller (`jepa_ray.train.reports`),
  so that the worker loop has nothing to do with it.

Ray's own output is off the console unless a command runs with `--verbose`, and in log files under
Ray's session directory (`/tmp/ray/session_latest/logs/` on a local Ray) either way:

- Ray Data's per-epoch dataset bars: `ray_data_progress(ds.context, verbose)`. A dataset executes
  under a copy of its own context (in a Ray Train run, in its split coordinator:
  ray/data/_internal/iterator/stream_split_iterator.py), so `build_trainer` sets it on each dataset.
- Ray Data's per-execution INFO lines: `quiet_ray_data`, for a Ray started here (`logs/ray-data/`).
- Ray Train's INFO lines: the run's `ray.train.LoggingConfig` level (`train_log_level`); and
  "Reporting training result", whose logger Ray names after its file so that no level reaches it,
  with jepa-ray's own INFO lines on the workers: `quiet_worker_logs`, called at the start of the
  loop (`logs/train/ray-train-app-worker-*.log`).
- The driver's own log: `setup_logging`, to stderr and, whole, to `jepa-ray.log` in the command's
  output directory (`log_file`).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import yaml

LOG_NAME = "jepa-ray.log"
PLAIN_EVERY_S = 10.0  # off a terminal, a phase's progress line at most this often

# The lines the displays show, also as log records: setup_logging sends them to the log file only.
log = logging.getLogger(__name__)


def is_terminal(stream: TextIO) -> bool:
    """Whether `stream` is an interactive terminal, as rich decides it (FORCE_COLOR, TTY_COMPATIBLE)."""
    from rich.console import Console

    return Console(file=stream).is_terminal


def duration(seconds: float) -> str:
    """A short duration for people: 12s, 4m05s, 1h02m."""
    s = max(round(seconds), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class PhaseProgress:
    """One phase of `total` units: `with PhaseProgress("write shards", n) as advance: ... advance()`.

    A rich bar on a terminal; otherwise a plain line when the phase starts, at most every
    `every_s` seconds while it runs (done/total, ETA) and when it ends."""

    def __init__(
        self,
        title: str,
        total: int,
        *,
        stream: TextIO | None = None,
        every_s: float = PLAIN_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.title, self.total, self.every_s, self.clock = title, total, every_s, clock
        self.stream = stream if stream is not None else sys.stdout
        self.done = 0
        self._bar: Any = None

    def __enter__(self) -> Callable[..., None]:
        self._t0 = self._last = self.clock()
        if is_terminal(self.stream):
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TimeElapsedColumn(),
                console=Console(file=self.stream),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.title, total=self.total)
            log.info("%s: %d to do", self.title, self.total)
        else:
            self._line(f"{self.title}: 0/{self.total}")
        return self.advance

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.advance(self._task, n)
        elif self.clock() - self._last >= self.every_s and self.done < self.total:
            elapsed = self.clock() - self._t0
            eta = elapsed / self.done * (self.total - self.done)
            pct = 100 * self.done // max(self.total, 1)
            self._line(f"{self.title}: {self.done}/{self.total} ({pct}%), ETA {duration(eta)}")

    def __exit__(self, exc_type, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
        elapsed = duration(self.clock() - self._t0)
        end = "stopped at" if exc_type is not None else "done:"
        text = f"{self.title}: {end} {self.done}/{self.total} in {elapsed}"
        if self._bar is None:
            self._line(text)
        else:
            log.info("%s", text)

    def _line(self, text: str) -> None:
        self._last = self.clock()
        self.stream.write(text + "\n")
        self.stream.flush()
        log.info("%s", text)


def report_stats(report: dict[str, Any]) -> str:
    """A report's numbers for people: loss, validation loss, samples/s, data wait, epoch."""
    parts = []
    if _number(report.get("loss")):
        parts.append(f"loss {report['loss']:.4f}")
    if _number(report.get("val_loss")):
        parts.append(f"val {report['val_loss']:.4f}")
    if _number(report.get("samples_per_s")):
        parts.append(f"{report['samples_per_s']:.1f} samples/s")
    if _number(report.get("data_wait")):
        parts.append(f"data wait {100 * report['data_wait']:.0f}%")
    if report.get("epoch") is not None:
        parts.append(f"epoch {report['epoch']}")
    return "  ".join(parts)


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


class TrainingProgress:
    """The driver's display of one training run of `total_steps` optimizer steps, one report at a
    time (`put`): steps done/total, loss, validation loss, samples/s, data wait, ETA.

    A rich bar on a terminal; otherwise one plain line per report. The ETA is the remaining steps
    at the pace measured since the first report (so it includes validation and checkpointing, and
    not the workers' start-up), shown from the second report on. In a Ray Train run the reports
    come from its controller through `sink()`:

        with TrainingProgress("pretrain demo", cfg.train.steps) as display:
            pretrain(cfg, callbacks=[ForwardReports(display.sink())])
    """

    def __init__(
        self,
        title: str,
        total_steps: int,
        *,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.title, self.total, self.clock = title, total_steps, clock
        self.stream = stream if stream is not None else sys.stdout
        self._first: tuple[float, int] | None = None  # (time, step) of the first report
        self._bar: Any = None
        self._queue: Any = None
        self._pump: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def __enter__(self) -> TrainingProgress:
        if is_terminal(self.stream):
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("step {task.completed}/{task.total}"),
                TextColumn("{task.fields[stats]}"),
                TextColumn("{task.fields[eta]}"),
                TimeElapsedColumn(),
                console=Console(file=self.stream),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(
                self.title, total=self.total, stats="starting the Ray Train workers", eta=""
            )
            log.info("%s: %d steps", self.title, self.total)
        else:
            self._line(f"{self.title}: {self.total} steps; starting the Ray Train workers")
        self._t0 = self.clock()
        return self

    def put(self, report: dict[str, Any]) -> None:
        """Show one report: rank 0's metrics (step, loss, samples_per_s, val_loss, data_wait, epoch)
        and `checkpoint`, whether one was saved with it."""
        with self._lock:
            now, step = self.clock(), int(report.get("step", 0))
            if self._first is None:
                self._first = (now, step)
            t_first, s_first = self._first
            if step >= self.total:
                eta = f"done in {duration(now - self._t0)}"
            elif step > s_first and now > t_first:
                eta = f"ETA {duration((self.total - step) * (now - t_first) / (step - s_first))}"
            else:
                eta = "ETA -"
            stats = report_stats(report)
            if report.get("checkpoint"):
                stats += "  checkpoint saved"
            if self._bar is not None:
                self._bar.update(self._task, completed=min(step, self.total), stats=stats, eta=eta)
                log.info("%s: step %d/%d  %s  %s", self.title, step, self.total, stats, eta)
            else:
                pct = 100 * step // max(self.total, 1)
                self._line(f"{self.title}: step {step}/{self.total} ({pct}%)  {stats}  {eta}")

    def sink(self) -> Any:
        """Where a Ray Train callback in another process puts the reports: a `ray.util.queue.Queue`
        (an actor with no CPU) that a thread here drains into `put` until the display closes."""
        if self._queue is None:
            from ray.util.queue import Queue

            self._queue = Queue(actor_options={"num_cpus": 0})
            self._pump = threading.Thread(target=self._drain, name="training-progress", daemon=True)
            self._pump.start()
        return self._queue

    def _drain(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                report = self._queue.get(timeout=0.5)
            except Empty:
                continue
            except Exception as e:  # the queue's actor is gone: training goes on without a display
                log.warning("%s: the progress display stopped (%s)", self.title, type(e).__name__)
                return
            self.put(report)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._pump is not None:
            from ray.util.queue import Empty

            self._pump.join()
            try:  # what the callback put after the thread's last look
                while True:
                    self.put(self._queue.get_nowait())
            except Empty:
                pass
            except Exception as e:  # Ray is going down: nothing more to show
                log.debug("%s: queue closed (%s)", self.title, type(e).__name__)
            try:
                self._queue.shutdown(force=True)
            except Exception as e:
                log.debug("%s: queue not shut down (%s)", self.title, type(e).__name__)
        if self._bar is not None:
            self._bar.stop()

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()
        log.info("%s", text)


# --- what Ray prints: off unless verbose, in log files either way ---------------------------------


def ray_data_progress(context: Any, verbose: bool) -> None:
    """Ray Data's progress bars (the whole dataset's and each operator's) on or off for what runs
    under `context`, a `ray.data.DataContext` (e.g. a dataset's `ds.context`)."""
    context.enable_progress_bars = verbose
    context.enable_operator_progress_bars = verbose


def plain_output() -> None:
    """Off a terminal, what others print comes without escape codes or bars too: the lines Ray
    forwards from its processes to the driver without colored "(RayTrainWorker pid=...)" prefixes
    (RAY_COLOR_PREFIX=0, read as Ray prints them) and each as it was written rather than a colored
    "[repeated 2x across cluster]" summary (RAY_DEDUP_LOGS=0, read when `ray` is imported: call
    this first); and no tqdm bars (TQDM_DISABLE=1: DeepSpeed's while an export consolidates a
    checkpoint). Values already set are kept."""
    if not (is_terminal(sys.stdout) and is_terminal(sys.stderr)):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        os.environ.setdefault("TQDM_DISABLE", "1")


RAY_DATA_LOGGING_ENV = "RAY_DATA_LOGGING_CONFIG"  # Ray Data's logging config file, read at import


def quiet_ray_data(verbose: bool) -> dict[str, str]:
    """Unless verbose, Ray Data's INFO lines ("Starting execution of Dataset train_...", its plan,
    "... execution finished": three per dataset execution, i.e. per epoch of a run, from its split
    coordinator) go to Ray Data's log files (`logs/ray-data/`) only, not to the console: in this
    process now, and in the processes of a Ray started here through the environment variables
    returned (Ray Data's own default logging config with its console handler at WARNING instead of
    INFO, in a file it reads when a process imports it). The file is on this machine: never give
    these to a cluster's processes. Nothing when verbose, or when the installed Ray has no default
    config to start from."""
    if verbose:
        return {}
    try:
        from ray.data._internal.logging import DEFAULT_CONFIG, configure_logging
    except ImportError:
        return {}
    config = copy.deepcopy(DEFAULT_CONFIG)
    console = config.get("handlers", {}).get("console")
    if console is None:
        return {}
    console["level"] = "WARNING"
    path = Path(tempfile.gettempdir()) / "jepa-ray" / "ray-data-logging.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.{os.getpid()}")
    part.write_text(yaml.safe_dump(config))
    part.replace(path)  # other commands may read it right now
    env = {RAY_DATA_LOGGING_ENV: str(path)}
    os.environ.update(env)
    configure_logging()  # importing ray.data above configured it from Ray's default
    return env


def train_log_level(verbose: bool) -> str:
    """The `ray.train.LoggingConfig` level of a run: INFO shows Ray Train's per-report lines on
    the console, WARNING keeps them in its log files only."""
    return "INFO" if verbose else "WARNING"


_RAY_TRAIN_SOURCE = f"{os.sep}ray{os.sep}train{os.sep}"


class _QuietInfo(logging.Filter):
    """Drops records below WARNING from jepa-ray and from Ray Train's source files (they go on to
    the other handlers: the files)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return not (record.name.startswith("jepa_ray") or _RAY_TRAIN_SOURCE in record.pathname)


def quiet_worker_logs(verbose: bool) -> None:
    """On a Ray Train worker, first thing in its loop: INFO lines of jepa-ray (rank 0's metrics at
    every report, resumes, the end) and of Ray Train ("Reporting training result N ..." from every
    worker at every report) no longer go to the console, which Ray streams to the driver; they
    still go to Ray Train's log file (`logs/train/ray-train-app-worker-*.log` in the session
    directory), and warnings still show. Nothing changes in a verbose run (the loop config's
    `verbose`, set by `build_trainer`).

    Ray Train gives the worker's root logger a console handler (a StreamHandler to stderr) and a
    file handler (not a StreamHandler) before the loop starts; the filter goes on the first. (The
    run's LoggingConfig level does not reach "Reporting training result": its logger is named
    after its file, ray/train/v2/_internal/execution/context.py, not under `ray.train`.)"""
    if verbose:
        return
    for handler in logging.getLogger().handlers:
        to_console = isinstance(handler, logging.StreamHandler) and not isinstance(
            handler, logging.FileHandler
        )
        if to_console and not any(isinstance(f, _QuietInfo) for f in handler.filters):
            handler.addFilter(_QuietInfo())


# --- the driver's log --------------------------------------------------------------------------


class _Stderr(logging.StreamHandler):
    """stderr as it is when a record is written (a test runner swaps sys.stderr per command)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


class _DriverFile(logging.FileHandler):
    """The command's log file."""


def log_file(out: str | Path, command: str) -> Path:
    """Where a command's driver log goes: `jepa-ray.log` in its output directory `out` when that is
    local; for an s3:// output, `<tmp>/jepa-ray/<command>-<time>.log` on this machine."""
    text = str(out)
    if "://" in text and not text.startswith("file://"):
        return Path(tempfile.gettempdir()) / "jepa-ray" / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    return Path(text.removeprefix("file://")).expanduser().resolve() / LOG_NAME


def record(text: str, level: int = logging.INFO) -> None:
    """Put a line the console already shows (an error message, a summary) into the log file too,
    when there is one (`setup_logging`); never on stderr a second time."""
    if not log.propagate:
        log.log(level, "%s", text)


def setup_logging(level: str, file: Path | None = None) -> None:
    """The driver's logging: records at `level` and above on stderr (unless something else, e.g.
    pytest, already handles the root logger), and every record at INFO and above (DEBUG when
    `level` is) appended to `file`. The displays' lines go to the file only: they are on stdout
    already. Calling it again replaces what an earlier call set up."""
    root, shown = logging.getLogger(), logging.getLogger(__name__)
    for lg in (root, shown):
        for h in [h for h in lg.handlers if isinstance(h, _Stderr | _DriverFile)]:
            lg.removeHandler(h)
            h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not root.handlers:
        err = _Stderr()
        err.setLevel(level)
        err.setFormatter(fmt)
        root.addHandler(err)
    wanted = min(logging.getLevelName(level), logging.INFO)
    if root.level > wanted:  # never raised: a test's capture may want more
        root.setLevel(wanted)
    shown.propagate = file is None
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handler = _DriverFile(file, encoding="utf-8")
        handler.setFormatter(fmt)
        root.addHandler(handler)
        shown.addHandler(handler)
