"""Build a TFDS data set from your own folder of captioned images.

`python -m dalle2_jax.tools.build_folder --folder IMAGES --data_dir DATA --name mydata [--test_fraction 0.05]`

Captions come from `IMAGES/captions.jsonl` (`{"file": "a/b.png", "caption": "..."}` per line) or from a
`.txt` beside each image. Then train on it with
`--config.data.name=image_folder_captions/<config> --config.data.image_key=image --config.data.data_dir=DATA`
(the command prints the exact overrides). Unreadable files are skipped and listed in the build report.
"""

from __future__ import annotations

from absl import flags

from dalle2_jax.cli_util import run_program


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("folder", None, "Folder of images with captions.", flag_values=fv)
    flags.DEFINE_string("data_dir", None, "TFDS data dir to write into.", flag_values=fv)
    flags.DEFINE_string("name", "default", "Name of this data set (the builder config).", flag_values=fv)
    flags.DEFINE_float("test_fraction", 0.0, "Fraction of images held out as the test split.", flag_values=fv)
    flags.DEFINE_integer("max_side", None, "Downscale images whose longer side exceeds this.", flag_values=fv)


def main(fv: flags.FlagValues) -> None:
    import sys

    from dalle2_jax.data.image_folder import prepare_image_folder

    try:
        builder = prepare_image_folder(fv.folder, fv.data_dir, fv.name, fv.test_fraction, fv.max_side)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    name = f"image_folder_captions/{builder.builder_config.name}"
    test = " --config.data.eval_split=test" if fv.test_fraction else " --config.data.eval_split=train[:256]"
    print(f"train on it with: --config.data.name={name} --config.data.image_key=image "
          f"--config.data.text_key=caption --config.data.data_dir={fv.data_dir}{test}")


def run(argv: list[str] | None = None) -> None:
    run_program(__doc__, define_flags, main, argv, required=("folder", "data_dir"))


if __name__ == "__main__":
    run()
