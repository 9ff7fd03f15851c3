"""Shared by the job entrypoints: run one `jepa-ray` command with this process's arguments.

A Ray job runs with the uploaded checkout as its working directory (on PYTHONPATH) and RAY_ADDRESS
set to its cluster, so the command connects to that cluster rather than starting a local Ray.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def run(command: str) -> None:
    from jepa_ray.cli import app

    app(args=[command, *sys.argv[1:]], prog_name=f"jobs/{command}.py")


COMMANDS = ("train", "stream")  # `jepa-ray bench train|stream`: what users measure their cluster with


def bench() -> None:
    """`jobs/bench.py train|stream [args]` runs `jepa-ray bench train|stream`; `jobs/bench.py
    <name> [args]` runs benchmarks/bench_<name>.py with those args (bench_train.py, whose name the
    command takes, runs as `python benchmarks/bench_train.py`)."""
    root = Path(__file__).resolve().parent.parent / "benchmarks"
    scripts = sorted(p.stem.removeprefix("bench_") for p in root.glob("bench_*.py"))
    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        from jepa_ray.cli import app

        app(args=["bench", *sys.argv[1:]], prog_name="jobs/bench.py")
        return
    names = sorted(set(scripts) - set(COMMANDS))
    if len(sys.argv) < 2 or sys.argv[1] not in names:
        given = sys.argv[1] if len(sys.argv) > 1 else "nothing"
        sys.exit(
            f"jobs/bench.py: got {given!r}; name a command ({', '.join(COMMANDS)}) or a benchmark: "
            f"{', '.join(names)}"
        )
    script = root / f"bench_{sys.argv[1]}.py"
    sys.argv = [str(script), *sys.argv[2:]]
    sys.path.insert(0, str(root))
    runpy.run_path(str(script), run_name="__main__")
