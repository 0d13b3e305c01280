"""Train a stage: `python -m dalle2_jax.train --config configs/clip.py:tiny --workdir DIR`.

Running the same command again resumes from the workdir's newest checkpoint. Any config key can be
overridden: `--config.total_steps=200`.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from dalle2_jax.cli_util import exit_on_errors, setup_logging

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file, e.g. configs/clip.py:tiny.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, config.json and TensorBoard events.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    setup_logging()
    from dalle2_jax.distributed import maybe_initialize
    from dalle2_jax.training.trainer import train

    maybe_initialize()
    with exit_on_errors():
        train(_CONFIG.value, _WORKDIR.value)


def run() -> None:
    app.run(main, argv=sys.argv)


if __name__ == "__main__":
    run()
