"""Run an exported bundle: text -> image and the image-editing methods of unCLIP.

    dalle2-jax generate "a red circle to the left of a blue square" --bundle B --num 4 --seed 0 --out DIR
    dalle2-jax variations IMAGE --bundle B --num 4 --eta 0.8 --out DIR
    dalle2-jax interpolate IMAGE_A IMAGE_B --bundle B --frames 5 --out DIR
    dalle2-jax edit IMAGE --from "a red circle" --to "a blue circle" --bundle B --out DIR
    dalle2-jax inpaint IMAGE "a green star" --mask MASK --bundle B --out DIR

(`python -m dalle2_jax.generate [generate|variations|interpolate|edit|inpaint] ...` is the same.)
Each writes DIR/grid.png, the single images (DIR/000.png, ...) at the last stage's resolution and
DIR/settings.json (the prompt, seed and every setting, the timings). Per-stage sampling settings default to
the bundle's configs: --prior_steps, --decoder_guidance, --upsampler_steps, ... Bad input (an empty prompt,
a missing or incomplete bundle, an unreadable image, a mask of the wrong size, an out-of-range setting)
exits 2 with a message; an over-long prompt is truncated to CLIP's context with a warning.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from absl import flags

from dalle2_jax import fileio
from dalle2_jax.cli_util import exit_on_errors, run_program

METHODS = {
    "generate": ("PROMPT [PROMPT ...]", 1, -1),
    "variations": ("IMAGE", 1, 1),
    "interpolate": ("IMAGE_A IMAGE_B", 2, 2),
    "edit": ("IMAGE", 1, 1),
    "inpaint": ("IMAGE PROMPT", 2, 2),
}


def define_common(fv: flags.FlagValues) -> None:
    f = dict(flag_values=fv)
    flags.DEFINE_string("bundle", None, "An exported bundle (dalle2-jax export).", **f)
    flags.DEFINE_string("out", None, "Output directory (created): grid.png, single images, settings.json.", **f)
    flags.DEFINE_integer("seed", 0, "Random seed: the same seed and settings give the same images.", **f)
    flags.DEFINE_integer("batch_size", None, "Rows sampled at a time (default: all together).", **f)
    flags.DEFINE_integer("num_upsamplers", None, "Run only the first N upsamplers (default: all; 0 = 64x64).", **f)
    flags.DEFINE_bool("verify", True, "Check the bundle files' sha256 hashes on load.", **f)
    flags.DEFINE_bool("shard", True, "With more than one device: replicate the params on every device and split "
                      "each sampling batch over them (batches rounded up to a multiple of the device count).", **f)
    for stage, keys in (("prior", ("steps", "guidance", "sampler", "eta")),
                        ("decoder", ("steps", "guidance", "sampler", "eta")),
                        ("upsampler", ("steps", "sampler", "eta"))):
        for key in keys:
            name = f"{stage}_{key}"
            help_ = f"{stage} sampling {key} (default: the bundle's config)"
            if key == "steps":
                flags.DEFINE_integer(name, None, help_, **f)
            elif key == "sampler":
                flags.DEFINE_string(name, None, help_, **f)
            else:
                flags.DEFINE_float(name, None, help_, **f)
    flags.DEFINE_integer("candidates", None, "Prior candidates per image, best by dot product with the text.", **f)


def define_flags_for(method: str):
    def define(fv: flags.FlagValues) -> None:
        define_common(fv)
        f = dict(flag_values=fv)
        if method in ("generate", "variations", "inpaint"):
            flags.DEFINE_integer("num", 4 if method != "inpaint" else 2, "Images per prompt / input.", **f)
        if method == "variations":
            flags.DEFINE_float("eta", 0.8, "DDIM eta of the variations (0 reconstructs the input).", **f)
        if method in ("interpolate", "edit"):
            flags.DEFINE_integer("frames", 5, "Number of frames.", **f)
        if method == "interpolate":
            flags.DEFINE_enum("noise", "interpolate", ["interpolate", "fixed"],
                              "DDIM noise: slerp of the two inversions, or one fixed draw.", **f)
        if method == "edit":
            flags.DEFINE_string("from", None, "The caption describing the image now.", **f)
            flags.DEFINE_string("to", None, "The caption to move toward.", **f)
            flags.DEFINE_float("max_angle", 0.5, "Largest slerp fraction toward the text diff.", **f)
        if method == "inpaint":
            flags.DEFINE_string("mask", None, "Mask image, same size as IMAGE: white (>127) = regenerate.", **f)
            flags.DEFINE_integer("resample", 4, "RePaint resamplings per jump.", **f)
            flags.DEFINE_integer("jump_length", 5, "RePaint jump length in sampling steps.", **f)
    return define


def stage_overrides(fv: flags.FlagValues) -> dict:
    out: dict[str, dict] = {}
    for stage in ("prior", "decoder", "upsampler"):
        d = {}
        for key, setting in (("steps", "steps"), ("guidance", "guidance_scale"), ("sampler", "sampler"),
                             ("eta", "eta")):
            name = f"{stage}_{key}"
            if name in fv and fv[name].value is not None:
                d[setting] = fv[name].value
        if stage == "prior" and fv.candidates is not None:
            d["num_candidates"] = fv.candidates
        if d:
            out[stage] = d
    return out


def _grid(rows: list) -> Any:
    import numpy as np

    from dalle2_jax.stages.image_diffusion import image_grid

    n = max(len(r) for r in rows)
    side = max(r[0].shape[0] for r in rows)
    blank = np.full((side, side, 3), 255, np.uint8)
    rows = [np.stack(list(r) + [blank] * (n - len(r))) for r in rows]
    return image_grid(rows)


def _show_mask(image, regen):
    """The input with the region to regenerate greyed out."""
    import numpy as np

    out = image.copy()
    out[regen] = (0.5 * out[regen] + 64).astype(np.uint8)
    return out


def write_outputs(out_dir: str, output, grid_rows: list, extra: dict) -> list[str]:
    """grid.png, 000.png... and settings.json in out_dir (a local path or a URI); returns the image paths."""
    from dalle2_jax.images import save_png

    out_dir = fileio.resolve(out_dir)
    paths = []
    for i, img in enumerate(output.images):
        p = fileio.join(out_dir, f"{i:03d}.png")
        save_png(p, img)
        paths.append(p)
    save_png(fileio.join(out_dir, "grid.png"), _grid(grid_rows))
    settings = dict(output.settings)
    settings.update(extra)
    settings.update(timings_seconds=output.timings, warnings=output.warnings,
                    files=[os.path.basename(p) for p in paths], resolution=int(output.images.shape[1]))
    fileio.write_text(fileio.join(out_dir, "settings.json"), json.dumps(settings, indent=2, default=str))
    return paths


def run_method(method: str, fv: flags.FlagValues, args: list[str]) -> str:
    """Runs one method from parsed flags; returns the output directory."""
    from dalle2_jax.inference.errors import InputError
    from dalle2_jax.inference.pipeline import UnCLIPPipeline, center_square, load_image, resize

    if method == "edit" and (not fv["from"].value or not fv["to"].value):
        raise InputError("edit needs --from and --to captions")
    if method == "inpaint" and not fv.mask:
        raise InputError("inpaint needs --mask MASK (white = regenerate)")
    # check the inputs before the (slow) bundle load
    num_images = {"generate": 0, "interpolate": 2}.get(method, 1)
    images = [load_image(a, "image") for a in args[:num_images]]
    if method == "inpaint":
        mask = load_image(fv.mask, "mask")
        if mask.shape[:2] != images[0].shape[:2]:
            raise InputError(f"the mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
                             f"{images[0].shape[1]}x{images[0].shape[0]}; they must be the same size")
    if method in ("generate", "inpaint"):
        for p in args[num_images:]:
            if not p.strip():
                raise InputError("empty prompt: give some text to condition on")
    log = lambda m: print(m, flush=True)  # noqa: E731
    import jax

    from dalle2_jax.training.partitioning import data_parallel_mesh

    mesh = data_parallel_mesh() if fv.shard and jax.device_count() > 1 else None
    pipe = UnCLIPPipeline.from_bundle(fv.bundle, verify_hashes=fv.verify, log=log, mesh=mesh)
    common = dict(seed=fv.seed, settings=stage_overrides(fv), batch_size=fv.batch_size,
                  num_upsamplers=fv.num_upsamplers)
    extra: dict = {"command": method, "inputs": args}
    if method == "generate":
        out = pipe.generate(args, num_images=fv.num, **common)
        n = fv.num
        rows = [list(out.images[i * n: (i + 1) * n]) for i in range(len(args))]
    elif method == "variations":
        out = pipe.variations(images[0], num=fv.num, eta=fv.eta, **common)
        rows = [[resize(center_square(images[0]), out.images.shape[1])] + list(out.images)]
    elif method == "interpolate":
        out = pipe.interpolate(images[0], images[1], steps=fv.frames, noise=fv.noise, **common)
        rows = [list(out.images)]
    elif method == "edit":
        out = pipe.text_diff(images[0], fv["from"].value, fv["to"].value, steps=fv.frames, max_angle=fv.max_angle,
                             **common)
        rows = [list(out.images)]
    else:
        out = pipe.inpaint(images[0], mask, args[1], num=fv.num, resample=fv.resample,
                           jump_length=fv.jump_length, **common)
        res = out.images.shape[1]
        src = resize(center_square(images[0]), res)
        regen = resize(center_square(mask.max(axis=-1) > 127), res)
        rows = [[src, _show_mask(src, regen)] + list(out.images)]
    paths = write_outputs(fv.out, out, rows, extra)
    total = sum(out.timings.values())
    print(f"wrote {len(paths)} images ({out.images.shape[1]}x{out.images.shape[2]}), grid.png and settings.json "
          f"to {fileio.resolve(fv.out)} in {total:.1f}s", flush=True)
    return fv.out


def run(argv: list[str] | None = None, method: str | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if method is None:  # python -m dalle2_jax.generate [method] ...
        method = "generate"
        if len(argv) > 1 and argv[1] in METHODS:
            method = argv.pop(1)
    names, lo, hi = METHODS[method]

    def main(fv: flags.FlagValues, args: list[str]) -> None:
        with exit_on_errors():
            run_method(method, fv, args)

    run_program(__doc__, define_flags_for(method), main, argv, required=("bundle", "out"),
                positional=(names, lo, hi))


def run_generate(argv=None):
    run(argv, "generate")


def run_variations(argv=None):
    run(argv, "variations")


def run_interpolate(argv=None):
    run(argv, "interpolate")


def run_edit(argv=None):
    run(argv, "edit")


def run_inpaint(argv=None):
    run(argv, "inpaint")


if __name__ == "__main__":
    run()
