"""Seconds per image of each stage and of the whole text -> image cascade of a bundle.

    python benchmarks/cascade_speed.py --bundle B [--num 4] [--repeats 2] [--decoder_steps 25 ...] \
        [--out benchmarks/results/cascade_speed.json]

Runs `UnCLIPPipeline.generate` once to compile (reported as `first_call_seconds`), then `--repeats` more
times with other seeds, and reports the median wall time per stage divided by the number of images, with the
step counts, samplers and the device. Sampling settings default to the bundle's configs; the flags override
them like the generate CLI's.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dalle2_jax.cli_util import exit_on_errors, run_program  # noqa: E402
from dalle2_jax.generate import define_common, stage_overrides  # noqa: E402

PROMPTS = ["a red circle to the left of a blue square", "a small green star", "a large yellow triangle",
           "a purple cross above an orange circle"]


def define_flags(fv: flags.FlagValues) -> None:
    define_common(fv)
    flags.DEFINE_integer("num", 4, "Images per call (one per prompt, prompts cycled).", flag_values=fv)
    flags.DEFINE_integer("repeats", 2, "Timed calls after the compiling one.", flag_values=fv)


def main(fv: flags.FlagValues) -> None:
    import jax

    from dalle2_jax.inference.pipeline import UnCLIPPipeline

    with exit_on_errors():
        pipe = UnCLIPPipeline.from_bundle(fv.bundle, verify_hashes=fv.verify, log=lambda m: print(m, flush=True))
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(fv.num)]
        kw = dict(settings=stage_overrides(fv), num_upsamplers=fv.num_upsamplers, batch_size=fv.batch_size)
        first = pipe.generate(prompts, 1, seed=0, **kw)
        runs = [pipe.generate(prompts, 1, seed=1 + r, **kw) for r in range(fv.repeats)]
    stages = list(first.timings)
    per_image = {s: statistics.median(r.timings[s] for r in runs) / fv.num for s in stages}
    result = {
        "bundle": os.path.abspath(fv.bundle),
        "device": f"{jax.devices()[0].device_kind} x{jax.device_count()} ({platform.processor() or platform.machine()},"
                  f" {os.cpu_count()} cores visible)",
        "images_per_call": fv.num, "repeats": fv.repeats, "resolution": int(first.images.shape[1]),
        "sampling": first.settings["sampling"],
        "seconds_per_image": per_image,
        "cascade_seconds_per_image": sum(per_image.values()),
        "first_call_seconds": sum(first.timings.values()),
    }
    print(json.dumps(result, indent=2))
    if fv.out:
        os.makedirs(os.path.dirname(os.path.abspath(fv.out)) or ".", exist_ok=True)
        with open(fv.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    run_program(__doc__, define_flags, main, required=("bundle",))
