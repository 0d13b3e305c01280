"""Train a stage: `python -m dalle2_jax.train --config configs/clip.py:tiny --workdir DIR`.

Running the same command again resumes from the workdir's newest checkpoint. Any config key can be
overridden: `--config.total_steps=200`.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from dalle2_jax.cli_util import exit_on_errors, run_program


def define_flags(fv: flags.FlagValues) -> None:
    config_flags.DEFINE_config_file("config", None, "Stage config file, e.g. configs/clip.py:tiny.",
                                    flag_values=fv, lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, config.json and TensorBoard events.",
                        flag_values=fv)


def main(fv: flags.FlagValues) -> None:
    from dalle2_jax.distributed import maybe_initialize
    from dalle2_jax.training.trainer import train

    maybe_initialize()
    with exit_on_errors():
        train(fv.config, fv.workdir)


def run(argv: list[str] | None = None) -> None:
    run_program(__doc__, define_flags, main, argv, required=("config", "workdir"))


if __name__ == "__main__":
    run()
