"""The console a person reads: progress displays on the driver, plain lines off a terminal, Ray's own
output quiet unless --verbose, and the driver's log in a file."""

from __future__ import annotations

import io
import logging
import os
import re

import pytest
from typer.testing import CliRunner

from jepa_ray.cli import app
from jepa_ray.console import (
    LOG_NAME,
    PhaseProgress,
    TrainingProgress,
    log_file,
    quiet_worker_logs,
    setup_logging,
)

ESCAPE = re.compile(r"\x1b\[")
BARS = ("━", "█", "▏", "╸")


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _report(step: int) -> dict:
    return {"step": step, "epoch": step // 30, "loss": 2.0 / step, "samples_per_s": 250.0, "data_wait": 0.05}


def test_training_reports_through_the_callback_are_plain_lines_off_a_terminal():
    """The Ray Train callback as the controller calls it (every worker's metrics, a checkpoint or
    None) -> one plain line per report: steps, numbers, and an ETA at the pace since the first."""
    from jepa_ray.train.reports import ForwardReports

    out, clock = io.StringIO(), Clock()
    with TrainingProgress("pretrain run-a", 100, stream=out, clock=clock) as display:
        callback = ForwardReports(display)
        for step in (20, 40, 60, 100):
            clock.t += 10.0
            rank0 = _report(step) | ({"val_loss": 0.75} if step >= 40 else {})
            checkpoint = object() if step in (60, 100) else None
            callback.after_report(
                run_context=None, metrics=[rank0, _report(step) | {"loss": 9.9}], checkpoint=checkpoint
            )
    text = out.getvalue()
    assert not ESCAPE.search(text) and not any(b in text for b in BARS), text
    lines = text.splitlines()
    assert lines[0] == "pretrain run-a: 100 steps; starting the Ray Train workers"
    assert len(lines) == 5, lines  # one per report
    first, second, third, last = lines[1:]
    assert first.startswith("pretrain run-a: step 20/100 (20%)  loss 0.1000  250.0 samples/s  data wait 5%")
    assert first.endswith("ETA -")  # no pace yet
    assert "9.9" not in text  # rank 0's metrics
    # 20 steps in 10 s since the first report: 60 steps left take 30 s
    assert "step 40/100 (40%)" in second and "val 0.7500" in second and second.endswith("ETA 30s")
    assert "checkpoint saved" in third and third.endswith("ETA 20s")
    assert "step 100/100 (100%)" in last and last.endswith("done in 40s")


def test_training_display_reads_reports_from_a_ray_queue(ray_session):
    """In a run the callback lives in Ray Train's controller: it puts into the display's Ray queue,
    drained on the driver by a thread; what is still queued when the run ends is shown too."""
    import ray.cloudpickle

    from jepa_ray.train.reports import ForwardReports

    out = io.StringIO()
    with TrainingProgress("pretrain run-b", 10, stream=out) as display:
        callback = ray.cloudpickle.loads(ray.cloudpickle.dumps(ForwardReports(display.sink())))
        for step in (5, 10):
            callback.after_report(None, [_report(step)], None)
    lines = out.getvalue().splitlines()
    assert [line.split("  ")[0] for line in lines[1:]] == [
        "pretrain run-b: step 5/10 (50%)",
        "pretrain run-b: step 10/10 (100%)",
    ]


def test_a_phase_off_a_terminal_is_a_few_plain_lines():
    out, clock = io.StringIO(), Clock()
    with PhaseProgress("scan DICOM", 40, stream=out, clock=clock, every_s=10.0) as advance:
        for _ in range(40):
            clock.t += 1.0
            advance()
    text = out.getvalue()
    assert not ESCAPE.search(text) and not any(b in text for b in BARS), text
    lines = text.splitlines()
    assert lines[0] == "scan DICOM: 0/40"
    assert lines[1] == "scan DICOM: 10/40 (25%), ETA 30s"  # a line every 10 s, not one per unit
    assert lines[-1] == "scan DICOM: done: 40/40 in 40s"
    assert len(lines) == 5


def test_a_run_keeps_ray_data_bars_and_train_report_lines_off_unless_verbose(
    small_shards, tmp_path, ray_session
):
    """The run config: Ray Data's bars are off in the contexts of the datasets the run's data feed
    executes, Ray Train's logger prints WARNING and above, and the workers are told; --verbose turns
    all three on. The driver's own DataContext is left alone."""
    import ray.data

    from jepa_ray.config import load_config
    from jepa_ray.train.trainer import build_trainer

    cfg = load_config(
        overrides=[
            f"train.shards={small_shards}",
            f"train.storage_path={tmp_path}",
            "train.cpus_per_worker=0.5",
            "pipeline.batch_size=4",
        ]
    )
    before = ray.data.DataContext.get_current().enable_progress_bars
    for verbose in (False, True, None):
        kwargs = {} if verbose is None else {"verbose": verbose}  # None: the default, quiet
        trainer = build_trainer(cfg, name=f"quiet-{verbose}", free_check=False, **kwargs)
        feed = trainer.train_loop_config["feed"]
        assert ray.get(feed.progress_bars.remote()) == (bool(verbose), bool(verbose))
        ray.kill(feed)
        rc = trainer.run_config
        assert rc.logging_config.log_level == ("INFO" if verbose else "WARNING")
        assert trainer.train_loop_config["verbose"] is bool(verbose)
    assert ray.data.DataContext.get_current().enable_progress_bars == before


@pytest.mark.parametrize("command", ["pretrain", "tune", "evaluate", "demo"])
def test_verbose_is_an_option_of_the_commands_that_run_ray_data_or_train(command):
    r = CliRunner().invoke(app, [command, "--help"])
    assert r.exit_code == 0 and "--verbose" in r.output


def test_pretrain_accepts_verbose_and_logs_to_its_run_directory(tmp_path, ray_session):
    """--verbose is taken (a config error, not an unknown option), and the driver's log is in the
    run directory."""
    r = CliRunner().invoke(app, ["pretrain", "--verbose", "--name", "v1", f"train.storage_path={tmp_path}"])
    assert r.exit_code == 2, r.output
    assert "No such option" not in r.output and "train.shards: no shards given" in r.output
    log = (tmp_path / "v1" / LOG_NAME).read_text()
    assert "jepa-ray pretrain started" in log and "error: train.shards: no shards given" in log
    r = CliRunner().invoke(app, ["pretrain", "--name", "../up", f"train.storage_path={tmp_path}"])
    assert r.exit_code == 2 and "train.name '../up'" in r.output
    assert not (tmp_path.parent / "up").exists()  # checked before the log's directory is made


def test_the_driver_log_file_has_what_the_console_shows(tmp_path):
    root = logging.getLogger()
    level = root.level
    try:
        path = log_file(tmp_path / "out", "evaluate")
        assert path == (tmp_path / "out" / LOG_NAME).resolve()
        setup_logging("WARNING", path)
        logging.getLogger("jepa_ray.eval").info("embedded 12 samples")  # below the console's level
        out = io.StringIO()
        with TrainingProgress("pretrain run-c", 10, stream=out, clock=Clock()) as display:
            display.put(_report(10))
        text = path.read_text()
        assert "embedded 12 samples" in text and "pretrain run-c: step 10/10" in text
    finally:
        setup_logging("INFO")  # no file
        root.setLevel(level)
    assert str(log_file("s3://bucket/shards", "prepare")).endswith(".log")
    assert "s3:" not in str(log_file("s3://bucket/shards", "prepare"))


def test_worker_info_lines_leave_the_console_for_the_file(monkeypatch):
    """As Ray Train sets up a worker's root logger (a console StreamHandler, a file handler): after
    quiet_worker_logs, jepa-ray's INFO lines reach only the file; warnings and others' lines both."""
    console, file = io.StringIO(), io.StringIO()

    class FileLike(logging.Handler):  # Ray Train's SessionFileHandler is not a StreamHandler
        def emit(self, record):
            file.write(record.getMessage() + "\n")

    root = logging.getLogger()
    level = root.level
    monkeypatch.setattr(root, "handlers", [logging.StreamHandler(console), FileLike()])
    root.setLevel(logging.INFO)
    try:
        quiet_worker_logs(False)
        quiet_worker_logs(False)  # twice is the same as once
        logging.getLogger("jepa_ray.train").info("step 2/8 loss 0.5")
        logging.getLogger("jepa_ray.train").warning("checkpoint skipped")
        logging.getLogger("some.library").info("engine ready")
        assert console.getvalue().splitlines() == ["checkpoint skipped", "engine ready"]
        assert file.getvalue().splitlines() == ["step 2/8 loss 0.5", "checkpoint skipped", "engine ready"]

        fresh = io.StringIO()
        monkeypatch.setattr(root, "handlers", [logging.StreamHandler(fresh)])
        quiet_worker_logs(True)
        logging.getLogger("jepa_ray.train").info("step 4/8 loss 0.4")
        assert fresh.getvalue() == "step 4/8 loss 0.4\n"
    finally:
        root.setLevel(level)


def test_quiet_ray_data_keeps_its_info_lines_off_the_console_of_this_and_a_local_rays_processes():
    """This process's Ray Data console at WARNING, and a config file for a local Ray's processes
    that Ray Data loads when a fresh process imports it (a file it cannot load would break every
    worker's `import ray.data`): Ray's own default with the console at WARNING, the files at DEBUG."""
    import json
    import subprocess
    import sys

    def run(code: str, env: dict[str, str]) -> str:
        r = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout.strip().splitlines()[-1]

    levels = (
        "import json, logging; lg = logging.getLogger('ray.data'); "
        "print(json.dumps([logging.getLevelName(lg.level), "
        "{h.name: logging.getLevelName(h.level) for h in lg.handlers}]))"
    )
    driver = json.loads(
        run(
            "from jepa_ray.console import quiet_ray_data; import json; "
            "env = quiet_ray_data(verbose=False); assert quiet_ray_data(verbose=True) == {}; "
            f"print(json.dumps(env)); {levels}",
            {},
        )
    )
    assert driver[1]["console"] == "WARNING" and driver[0] == "DEBUG", driver
    env = json.loads(
        run(
            "from jepa_ray.console import quiet_ray_data; import json; print(json.dumps(quiet_ray_data(False)))",
            {},
        )
    )
    worker = json.loads(run(f"import ray.data; {levels}", env))
    assert worker[1]["console"] == "WARNING" and "file" in worker[1] and worker[0] == "DEBUG", worker
