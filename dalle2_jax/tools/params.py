"""Parameter count of a config, without memory: `python -m dalle2_jax.tools.params --config configs/clip.py:paper`.

Prints one JSON object: `total` and one key per top-level module (tower), counted with jax.eval_shape.
"""

from __future__ import annotations

import json

import numpy as np
from absl import flags
from ml_collections import config_flags

from dalle2_jax.cli_util import run_program


def define_flags(fv: flags.FlagValues) -> None:
    config_flags.DEFINE_config_file("config", None, "Stage config file, e.g. configs/clip.py:paper.",
                                    flag_values=fv)


def count_params(config) -> dict:
    """{'total': N, '<module>': n, ...} for the model of `config.stage`, via jax.eval_shape."""
    import jax

    from dalle2_jax.stages import get_stage_class
    from dalle2_jax.training.partitioning import strip_boxes

    stage = get_stage_class(config.stage)(config, workdir="")
    shapes = strip_boxes(jax.eval_shape(stage.abstract_init, jax.random.key(0)))
    params = shapes.get("params", shapes)
    out = {"total": 0}
    for name, sub in params.items():
        n = int(sum(np.prod(x.shape) for x in jax.tree.leaves(sub)))
        out[name] = n
        out["total"] += n
    return out


def main(fv: flags.FlagValues) -> None:
    print(json.dumps(count_params(fv.config)))


def run(argv: list[str] | None = None) -> None:
    run_program(__doc__, define_flags, main, argv, required=("config",))


if __name__ == "__main__":
    run()
