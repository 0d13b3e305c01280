"""Preemption notices: SIGTERM in a single process, JAX's preemption sync point across processes.

A cluster scheduler (a TPU VM's maintenance event, SLURM's `--signal`, Kubernetes) sends SIGTERM some
seconds before it kills a job. With `jax.distributed` running, JAX's own preemption service catches the
signal on any host, tells the others, and `multihost_utils.reached_preemption_sync_point(step)` becomes
true on every process at the same step, so all of them save that step together. In a single process a
SIGTERM handler sets a flag that the trainer reads after each step.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("dalle2_jax")


def _distributed_client_running() -> bool:
    from jax._src import distributed  # the public reached_preemption_sync_point reads the same state

    return distributed.global_state.client is not None


class PreemptionWatch:
    """`reached(step)` is true once a preemption notice has arrived (and, multi-process, all processes
    have reached the same sync step). Use as a context manager: the single-process SIGTERM handler is
    installed on entry and the previous one put back on exit."""

    def __init__(self):
        self._use_jax = _distributed_client_running()
        self._flag = threading.Event()
        self._previous = None
        self.signal_name: str | None = None

    def __enter__(self) -> "PreemptionWatch":
        # JAX's preemption service installs its own SIGTERM notifier; a Python handler would replace it.
        if not self._use_jax and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_signal(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        self._flag.set()

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step` (call it after every step, on every process)."""
        if self._use_jax:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.signal_name = self.signal_name or "preemption notice (JAX preemption sync point)"
                return True
            return False
        return self._flag.is_set()
