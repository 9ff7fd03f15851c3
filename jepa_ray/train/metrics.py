"""Training metrics on disk: a CSV, TensorBoard event files and a loss-curve PNG, in the run directory.

Rank 0 writes into a local directory; when the run lives on S3 the files are uploaded to
`<run>/metrics/` at every checkpoint and at the end. On resume the CSV keeps only the rows up to
the restored step, so a crash never leaves the same step twice in the curve.
"""

from __future__ import annotations

import csv
import math
import shutil
import tempfile
from pathlib import Path

from jepa_ray.config import StorageConfig
from jepa_ray.storage import Store, is_remote

CSV_NAME = "metrics.csv"
PLOT_NAME = "loss.png"


class MetricsLog:
    def __init__(self, run_url: str, storage: StorageConfig, resume_step: int, tracker=None) -> None:
        self.tracker = tracker  # an experiment tracker's run (jepa_ray.train.tracking), or None
        self.remote = is_remote(run_url)
        self.store = Store(run_url.rstrip("/") + "/metrics", storage)
        self.dir = Path(tempfile.mkdtemp(prefix="jepa-metrics-")) if self.remote else Path(self.store.root)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.csv = self.dir / CSV_NAME
        if self.remote and self.store.exists(CSV_NAME):
            self.csv.write_bytes(self.store.read_bytes(CSV_NAME))
        self.rows = [r for r in self._read() if int(float(r["step"])) <= resume_step]
        self.columns: list[str] = list(self.rows[0]) if self.rows else []
        self._rewrite()
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=resume_step + 1)

    def _read(self) -> list[dict]:
        if not self.csv.exists():
            return []
        with self.csv.open(newline="") as f:
            return list(csv.DictReader(f))

    def _rewrite(self) -> None:
        with self.csv.open("w", newline="") as f:
            if self.columns:
                w = csv.DictWriter(f, fieldnames=self.columns, restval="")
                w.writeheader()
                w.writerows(self.rows)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: v for k, v in metrics.items() if k != "step"}}
        self.rows.append(row)
        new = [k for k in row if k not in self.columns]
        if new:
            self.columns += new
            self._rewrite()
        else:
            with self.csv.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.columns, restval="").writerow(row)
        for k, v in metrics.items():
            if k != "step" and isinstance(v, int | float) and math.isfinite(v):
                self.tb.add_scalar(k, v, step)
        self.tb.flush()
        if self.tracker is not None:
            self.tracker.log(step, metrics)

    def sync(self) -> None:
        """Upload the files when the run lives on S3 (a no-op for a local run directory), the
        tracker's too."""
        if not self.remote:
            return
        if self.tracker is not None:
            self.tracker.sync()
        for path in self.dir.rglob("*"):
            if path.is_file():
                self.store.fs.put_file(str(path), self.store.path(str(path.relative_to(self.dir))))

    def plot(self) -> Path:
        """The loss curves (total, per policy, validation) as a PNG beside the CSV."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self._read()
        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
        for name in [c for c in self.columns if c == "loss" or c.startswith(("loss_", "val_loss"))]:
            pts = [(int(float(r["step"])), float(r[name])) for r in rows if r.get(name) not in (None, "")]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=name, lw=2 if name == "loss" else 1)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("JEPA loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        out = self.dir / PLOT_NAME
        fig.savefig(out)
        plt.close(fig)
        return out

    def close(self, failed: bool = False) -> None:
        """Flush and upload (the tracker gets the plot and CSV); a remote run's local staging
        directory is removed."""
        self.tb.close()
        self.sync()
        if self.tracker is not None:
            self.tracker.finish([self.dir / PLOT_NAME, self.csv], failed=failed)
        if self.remote:
            shutil.rmtree(self.dir, ignore_errors=True)
