"""Build a TFDS data set from your own folder of captioned images.

`python -m dalle2_jax.tools.build_folder --folder IMAGES --data_dir DATA --name mydata [--test_fraction 0.05]`

Captions come from `IMAGES/captions.jsonl` (`{"file": "a/b.png", "caption": "..."}` per line) or from a
`.txt` beside each image. Then train on it with
`--config.data.name=image_folder_captions/<config> --config.data.image_key=image --config.data.data_dir=DATA`
(the command prints the exact overrides).

No single bad file stops the build. Grayscale, transparent, palette, CMYK and 16-bit/float images are
converted to 8-bit RGB, images longer than `--max_side` (default 4096; 0 = keep every size) are
downscaled, captions longer than `--max_caption_chars` (default 1000) are cut and invalid UTF-8 in a
caption is replaced with U+FFFD. Zero-byte, corrupt or truncated files, images of more than `--max_pixels`
pixels (default PIL's limit, about 89.5M; read from the header, never decoded), images without a caption
and unparseable captions.jsonl lines are skipped. Every conversion and skip is counted in the one-line
summary and listed (file, reason, detail) in `build_report.json` beside the data set; see
dalle2_jax/data/image_folder.py for the reasons.
"""

from __future__ import annotations

from absl import flags

from dalle2_jax.cli_util import run_program


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("folder", None, "Folder of images with captions.", flag_values=fv)
    flags.DEFINE_string("data_dir", None, "TFDS data dir to write into.", flag_values=fv)
    flags.DEFINE_string("name", "default", "Name of this data set (the builder config).", flag_values=fv)
    flags.DEFINE_float("test_fraction", 0.0, "Fraction of images held out as the test split.", flag_values=fv)
    flags.DEFINE_integer("max_side", None, "Downscale images whose longer side exceeds this (default 4096; 0 = "
                         "never). A non-default value is part of the config name (_max<N>).", flag_values=fv)
    flags.DEFINE_integer("max_pixels", None, "Skip images with more pixels than this (default PIL's "
                         "MAX_IMAGE_PIXELS, 89478485). A non-default value is part of the config name (_px<N>).",
                         flag_values=fv)
    flags.DEFINE_integer("max_caption_chars", None, "Cut captions longer than this many characters (default "
                         "1000). A non-default value is part of the config name (_cap<N>).", flag_values=fv)


def main(fv: flags.FlagValues) -> None:
    from dalle2_jax.cli_util import fail
    from dalle2_jax.data.image_folder import prepare_image_folder

    try:
        builder = prepare_image_folder(fv.folder, fv.data_dir, fv.name, fv.test_fraction, fv.max_side,
                                       fv.max_pixels, fv.max_caption_chars)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e), 2)
    name = f"image_folder_captions/{builder.builder_config.name}"
    test = " --config.data.eval_split=test" if fv.test_fraction else " --config.data.eval_split=train[:256]"
    print(f"train on it with: --config.data.name={name} --config.data.image_key=image "
          f"--config.data.text_key=caption --config.data.data_dir={fv.data_dir}{test}")


def run(argv: list[str] | None = None) -> None:
    run_program(__doc__, define_flags, main, argv, required=("folder", "data_dir"))


if __name__ == "__main__":
    run()
