"""Multi-host start-up through JAX's own runtime (`jax.distributed`)."""

from __future__ import annotations

import os

import jax


def maybe_initialize() -> None:
    """Calls `jax.distributed.initialize()` when the environment describes a multi-process run.

    On TPU pods and SLURM, JAX reads everything from the environment; elsewhere set
    DALLE2_COORDINATOR (host:port), DALLE2_NUM_PROCESSES and DALLE2_PROCESS_ID.
    """
    coordinator = os.environ.get("DALLE2_COORDINATOR")
    if coordinator:
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=int(os.environ["DALLE2_NUM_PROCESSES"]),
                                   process_id=int(os.environ["DALLE2_PROCESS_ID"]))
    elif os.environ.get("DALLE2_DISTRIBUTED_AUTO") == "1":
        jax.distributed.initialize()
