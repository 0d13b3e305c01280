"""Multi-host start-up through JAX's own runtime (`jax.distributed`).

Every process of a multi-host run calls `maybe_initialize` before anything touches a JAX device. The
settings come, first found first, from the arguments (train.py's flags), the environment variables
DALLE2_COORDINATOR (host:port), DALLE2_NUM_PROCESSES, DALLE2_PROCESS_ID and DALLE2_DISTRIBUTED_AUTO
(1 = let JAX detect the cluster, 0 = no automatic start), and lastly from a cluster JAX detects by itself
(a SLURM step with more than one task, a multi-host TPU slice, an Open MPI job of several ranks).
"""

from __future__ import annotations

import os

import jax


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _env_count(name: str) -> int:
    """A count in the environment (a SLURM/MPI task count), 0 when absent or malformed."""
    try:
        return int(os.environ.get(name, "0"))
    except ValueError:
        return 0


def _hosts(name: str) -> int:
    """How many comma-separated host names an environment variable lists."""
    return len([h for h in os.environ.get(name, "").split(",") if h.strip()])


def detected_cluster() -> str | None:
    """The multi-process cluster the environment clearly describes ('slurm', 'tpu', 'ompi'), or None.

    These are the environments `jax.distributed.initialize()` reads on its own (jax/_src/clusters):
    a SLURM step (srun) with SLURM_NTASKS > 1; a TPU slice whose TPU_WORKER_HOSTNAMES or
    TPU_PROCESS_ADDRESSES name more than one host, or a multislice job (MEGASCALE_COORDINATOR_ADDRESS or
    MEGASCALE_NUM_SLICES > 1); an `mpirun` job with OMPI_COMM_WORLD_SIZE > 1. A single-host TPU VM
    (TPU_WORKER_HOSTNAMES=localhost) or a one-task SLURM job is not a cluster. TPU VMs that publish the
    worker list only through the metadata server need `--distributed` (or DALLE2_DISTRIBUTED_AUTO=1).
    """
    slurm_vars = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
    if all(v in os.environ for v in slurm_vars) and _env_count("SLURM_NTASKS") > 1:
        return "slurm"
    if (max(_hosts("TPU_PROCESS_ADDRESSES"), _hosts("TPU_WORKER_HOSTNAMES")) > 1
            or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS") or _env_count("MEGASCALE_NUM_SLICES") > 1):
        return "tpu"
    if "OMPI_MCA_orte_hnp_uri" in os.environ and _env_count("OMPI_COMM_WORLD_SIZE") > 1:
        return "ompi"
    return None


def maybe_initialize(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, distributed: bool | None = None) -> bool:
    """Calls `jax.distributed.initialize` once when the arguments or the environment describe a
    multi-process run; returns whether this call initialised it.

    coordinator_address ('host:port' of process 0), num_processes and process_id: an explicit start
    (each falls back to DALLE2_COORDINATOR / DALLE2_NUM_PROCESSES / DALLE2_PROCESS_ID).
    distributed: True = let JAX detect the cluster (TPU pods, SLURM, Open MPI; a given process count
    and id still apply), False = stay single-process, None = an explicit start if a coordinator is
    set, else DALLE2_DISTRIBUTED_AUTO (1 or 0) if set, else start only when `detected_cluster()` finds
    one. Does nothing if jax.distributed is already initialised. Process 0 prints one line with the
    process count and the local and global device counts.
    """
    if distributed is False or jax.distributed.is_initialized():
        return False
    coordinator = coordinator_address or os.environ.get("DALLE2_COORDINATOR") or None
    n = num_processes if num_processes is not None else _env_int("DALLE2_NUM_PROCESSES")
    pid = process_id if process_id is not None else _env_int("DALLE2_PROCESS_ID")
    auto_env = os.environ.get("DALLE2_DISTRIBUTED_AUTO", "")
    if coordinator:
        if n is None or pid is None:
            raise ValueError(f"a coordinator address ({coordinator!r}) needs the process count and this "
                             "process's id too: set --num_processes and --process_id (or DALLE2_NUM_PROCESSES "
                             "and DALLE2_PROCESS_ID)")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=n, process_id=pid)
    elif distributed or auto_env == "1" or (auto_env != "0" and detected_cluster() is not None):
        jax.distributed.initialize(num_processes=n, process_id=pid)  # JAX reads the cluster's environment
    else:
        return False
    if jax.process_index() == 0:
        print(f"jax.distributed: {jax.process_count()} processes, {jax.local_device_count()} local devices, "
              f"{jax.device_count()} global devices", flush=True)
    return True
