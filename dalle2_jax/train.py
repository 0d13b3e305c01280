"""Train a stage: `python -m dalle2_jax.train --config configs/clip.py:tiny --workdir DIR`.

Running the same command again resumes from the workdir's newest checkpoint. Any config key can be
overridden: `--config.total_steps=200`.

Multi-host: start the same command in every process. On a TPU pod, under SLURM (`srun`) or `mpirun` JAX
finds the other processes by itself (`--distributed` forces that detection, `--nodistributed` turns it
off); elsewhere give `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (or the
DALLE2_COORDINATOR, DALLE2_NUM_PROCESSES and DALLE2_PROCESS_ID environment variables, which the flags
override).
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from dalle2_jax.cli_util import exit_on_errors, run_program


def define_flags(fv: flags.FlagValues) -> None:
    config_flags.DEFINE_config_file("config", None, "Stage config file, e.g. configs/clip.py:tiny.",
                                    flag_values=fv, lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, config.json and TensorBoard events.",
                        flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0's coordinator "
                        "(overrides $DALLE2_COORDINATOR).", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "Multi-process: the number of processes (overrides "
                         "$DALLE2_NUM_PROCESSES).", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("process_id", None, "Multi-process: this process's id in [0, num_processes) (overrides "
                         "$DALLE2_PROCESS_ID).", lower_bound=0, flag_values=fv)
    flags.DEFINE_bool("distributed", None, "Multi-process with the cluster detected by JAX (TPU pod, SLURM, "
                      "Open MPI). Default: on when such a cluster is clearly present or $DALLE2_DISTRIBUTED_AUTO=1; "
                      "--nodistributed: always one process.", flag_values=fv)


def main(fv: flags.FlagValues) -> None:
    from dalle2_jax.distributed import maybe_initialize
    from dalle2_jax.training.trainer import train

    try:
        maybe_initialize(fv.coordinator_address, fv.num_processes, fv.process_id, fv.distributed)
    except ValueError as e:  # incomplete or inconsistent multi-process settings: bad usage
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    with exit_on_errors():
        train(fv.config, fv.workdir)


def run(argv: list[str] | None = None) -> None:
    run_program(__doc__, define_flags, main, argv, required=("config", "workdir"))


if __name__ == "__main__":
    run()
