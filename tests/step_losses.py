"""Prints the losses of a few real train steps of a tiny decoder (UNet) on fixed random data as one JSON line.

Run as a script in its own process (tests/test_cpu_flags.py), so the XLA flags of the process are the ones its
environment sets: `python tests/step_losses.py [steps]`.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SPEC = {"key": "decoder", "config": "configs/decoder.py:tiny", "batch": 4, "clip_config": "configs/clip.py:tiny",
        "overrides": {"data.embeddings_dir": "precomputed", "data.resolution": 32, "model.channels": 32,
                      "model.channel_mult": (1, 2), "model.num_res_blocks": 1, "model.attention_resolutions": (16,),
                      "model.caption_depth": 0, "optimizer.warmup_steps": 1}}


def main() -> None:
    import jax

    from benchmarks.run import TrainStep

    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    ts = TrainStep(SPEC)
    losses = []
    with jax.set_mesh(ts.mesh):
        for _ in range(steps):
            ts.state, metrics = ts.compiled(ts.state, ts.batch, ts.frozen, ts.key)
            losses.append(float(metrics["loss"]))
    print(json.dumps({"losses": losses, "xla_flags": os.environ.get("XLA_FLAGS", "")}))


if __name__ == "__main__":
    main()
