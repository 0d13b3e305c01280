"""Export trained workdirs as one inference bundle:

    python -m dalle2_jax.export --clip CLIP --prior PRIOR --decoder DECODER --upsampler UP1 [--upsampler UP2] \\
        --out BUNDLE [--dtype bfloat16]

Takes each workdir's newest checkpoint (EMA params), its config, the CLIP's tokenizer and the prior's
embedding statistics, checks that the stages fit together (embedding sizes, text context, resolutions, and
each params tree against the model its config builds), and writes BUNDLE/manifest.json with the stage
order, interfaces and file hashes. Loading the bundle needs none of the workdirs.
"""

from __future__ import annotations

import json

from absl import flags

from dalle2_jax.cli_util import exit_on_errors, run_program


def define_flags(fv: flags.FlagValues) -> None:
    f = dict(flag_values=fv)
    flags.DEFINE_string("clip", None, "The CLIP workdir (trained or imported).", **f)
    flags.DEFINE_string("prior", None, "The prior workdir (optional: without it the bundle only does image "
                        "variations, interpolation and text diffs).", **f)
    flags.DEFINE_string("decoder", None, "The decoder workdir.", **f)
    flags.DEFINE_multi_string("upsampler", [], "Upsampler workdirs in cascade order (repeat the flag).", **f)
    flags.DEFINE_string("out", None, "The bundle directory to write.", **f)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Storage dtype of the params.", **f)
    flags.DEFINE_bool("overwrite", False, "Replace an existing bundle at --out.", **f)
    flags.DEFINE_bool("raw_params", False, "Export the raw params instead of the EMA params.", **f)


def main(fv: flags.FlagValues) -> None:
    from dalle2_jax.inference.bundle import export_bundle

    log = lambda m: print(m, flush=True)  # noqa: E731
    with exit_on_errors():
        manifest = export_bundle(fv.out, fv.clip, fv.decoder, prior=fv.prior, upsamplers=tuple(fv.upsampler),
                                 dtype=fv.dtype, overwrite=fv.overwrite, raw_params=fv.raw_params, log=log)
    stages = [(s["name"], s["models"]["main"]["num_params"]) for s in manifest["stages"]]
    print(f"wrote bundle {fv.out}: " + ", ".join(f"{n} ({p:,} params)" for n, p in stages), flush=True)
    print(json.dumps({"bundle": fv.out, "stages": [n for n, _ in stages]}), flush=True)


def run(argv: list[str] | None = None) -> None:
    run_program(__doc__, define_flags, main, argv, required=("clip", "decoder", "out"))


if __name__ == "__main__":
    run()
