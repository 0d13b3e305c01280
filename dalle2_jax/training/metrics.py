"""TensorBoard scalars (tensorboardX) and the one-line progress report on stdout."""

from __future__ import annotations

import collections
import math

import numpy as np


class MetricWriter:
    """Writes scalars and images to TensorBoard event files in `logdir`.

    `purge_step`: a resumed run passes the step after the one it resumed from, and TensorBoard hides the
    events an interrupted run wrote from that step on (its curves show each step once).
    A remote `logdir` (gs://...) gets its event file written locally and copied up after every flush
    (fileio), so TensorBoard pointed at the bucket follows the run."""

    def __init__(self, logdir: str, purge_step: int | None = None):
        from tensorboardX import SummaryWriter

        from dalle2_jax import fileio

        self._remote = fileio.resolve(logdir) if fileio.is_remote(logdir) else None
        if self._remote:
            import tempfile

            self._local = tempfile.mkdtemp(prefix="dalle2_jax_tb_")
        else:
            self._local = fileio.resolve(logdir)
            fileio.makedirs(self._local)
        self._w = SummaryWriter(self._local, purge_step=purge_step)

    def _flush(self) -> None:
        self._w.flush()
        if self._remote:
            from dalle2_jax import fileio

            fileio.copy_tree(self._local, self._remote)

    def scalars(self, step: int, values: dict) -> None:
        for k, v in values.items():
            if isinstance(v, (int, float, np.floating, np.integer)) and math.isfinite(float(v)):
                self._w.add_scalar(k, float(v), global_step=int(step))
        self._flush()

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """image: uint8 [H, W, 3]."""
        self._w.add_image(tag, image, global_step=int(step), dataformats="HWC")
        self._flush()

    def close(self) -> None:
        self._w.close()
        if self._remote:
            import shutil

            from dalle2_jax import fileio

            fileio.copy_tree(self._local, self._remote)
            shutil.rmtree(self._local, ignore_errors=True)


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class RateWindow:
    """Steps per second over the last `window` log intervals: the ETA follows the run's pace, not the
    one interval that held a checkpoint, an evaluation or a burst of load on the machine."""

    def __init__(self, window: int = 10):
        self.points: collections.deque = collections.deque(maxlen=window + 1)

    def add(self, t: float, step: int) -> float:
        """Records (time, step); returns the rate over the window (0.0 before two points)."""
        self.points.append((t, step))
        (t0, s0), (t1, s1) = self.points[0], self.points[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0


def format_progress(step: int, total: int, metrics: dict, steps_per_sec: float) -> str:
    """'step 200/3000 | loss 1.2345 | i2t_acc 0.512 | ... | 3.02 steps/s | ETA 15m27s' (steps_per_sec: the
    rate over a window of log intervals, see RateWindow)."""
    parts = [f"step {step}/{total}"]
    if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.4f}")
    for k in sorted(metrics):
        if k not in ("loss", "lr"):
            parts.append(f"{k} {metrics[k]:.4g}")
    if "lr" in metrics:
        parts.append(f"lr {metrics['lr']:.3g}")
    if steps_per_sec > 0:
        parts.append(f"{steps_per_sec:.2f} steps/s")
        parts.append(f"ETA {_duration((total - step) / steps_per_sec)}")
    return " | ".join(parts)
