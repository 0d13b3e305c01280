"""`config.profile`: a `jax.profiler` trace of a chosen range of train steps, viewable in TensorBoard.

With `profile.start_step = S` and `profile.num_steps = N` (N = 0: off) the trainer traces steps S .. S+N-1
into `<workdir>/tensorboard/plugins/profile/<run>/` (the layout TensorBoard's profile plugin reads:
`pip install tensorboard tensorboard-plugin-profile`, then `tensorboard --logdir <workdir>/tensorboard`).
Start after the first step, which compiles. Each process writes its own trace.
"""

from __future__ import annotations

import logging
from typing import Any

import jax

log = logging.getLogger("dalle2_jax")


class StepProfiler:
    """Starts a trace before step `start_step` and stops it (after the device finished) at the range's end."""

    def __init__(self, config, logdir: str):
        prof = config.get("profile") or {}
        self.start, self.num = int(prof.get("start_step", 0)), int(prof.get("num_steps", 0))
        self.logdir = logdir
        self.active = False

    def before_step(self, step: int) -> None:
        """Call with the number of the step about to run (1-based)."""
        if self.num > 0 and step == self.start and not self.active:
            jax.profiler.start_trace(self.logdir)
            self.active = True

    def after_step(self, step: int, outputs: Any) -> None:
        """Call after step `step` was dispatched, with its outputs (waited for before the trace stops)."""
        if self.active and step >= self.start + self.num - 1:
            jax.block_until_ready(outputs)
            self.stop()
            msg = f"profiled steps {self.start}..{step}: trace in {self.logdir}/plugins/profile (TensorBoard)"
            log.info(msg)
            if jax.process_index() == 0:
                print(msg, flush=True)

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
