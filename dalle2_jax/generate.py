"""Run an exported bundle: text -> image and the image-editing methods of unCLIP.

    dalle2-jax generate "a red circle to the left of a blue square" --bundle B --num 4 --seed 0 --out DIR
    dalle2-jax variations IMAGE --bundle B --num 4 --eta 0.8 --out DIR
    dalle2-jax interpolate IMAGE_A IMAGE_B --bundle B --frames 5 --out DIR
    dalle2-jax edit IMAGE --from "a red circle" --to "a blue circle" --bundle B --out DIR
    dalle2-jax inpaint IMAGE "a green star" --mask MASK --bundle B --out DIR

(`python -m dalle2_jax.generate [generate|variations|interpolate|edit|inpaint] ...` is the same.)
Each writes DIR/grid.png, the single images (DIR/000.png, ...) at the last stage's resolution and
DIR/settings.json (the prompt, seed and every setting, the timings). Per-stage sampling settings default to
the bundle's configs: --prior_steps, --decoder_guidance, --upsampler_steps, ...

Every flag, input image and --out is checked before the bundle loads (DIR is created then, or refused: an
existing file, an unwritable place), and the bundle-dependent limits (--num_upsamplers, step counts, the
memory the request needs) right after its manifest is read, before any params load: each mistake exits 2
with one `error:` line naming the flag. The rows go through the whole cascade --batch_size at a time and each
batch's images are written as soon as they are done; Ctrl-C stops the run after the batch in flight (exit
130), leaving the images already written. An over-long prompt is truncated to CLIP's context with a
warning; an input with transparency is composited over --background, and of a multi-frame image (GIF) the
first frame is used, each with a one-line warning.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from absl import flags

from dalle2_jax import fileio
from dalle2_jax.cli_util import exit_on_errors, fail, run_program
from dalle2_jax.inference.errors import InputError

# the default --batch_size: all rows up to this many (fewer if memory needs), so a long run writes its
# images as it goes and Ctrl-C stops it after a short batch
DEFAULT_MAX_BATCH = 16
MAX_GUIDANCE = 100.0

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
    flags.DEFINE_string("out", None, "Output directory, created before the bundle loads (refused if it is a file "
                        "or cannot be written): grid.png, single images, settings.json.", **f)
    flags.DEFINE_integer("seed", 0, "Random seed: the same seed and settings give the same images.", **f)
    flags.DEFINE_integer("batch_size", None, "Rows sampled at a time through the whole cascade; each batch's images "
                         f"are written when done (default: all rows up to {DEFAULT_MAX_BATCH}, fewer if the memory "
                         "estimate needs; a batch that cannot fit in memory is refused with the largest that can).",
                         **f)
    flags.DEFINE_integer("num_upsamplers", None, "Run only the first N upsamplers, N in [0, the bundle's count] "
                         "(default: all; 0 = the decoder's resolution).", **f)
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
            flags.DEFINE_integer("num", 4 if method != "inpaint" else 2, "Images per prompt / input (>= 1; at "
                                 "most what the memory estimate allows).", **f)
        if method != "generate":
            flags.DEFINE_string("background", "white", "Colour under the transparent pixels of an input image "
                                "(RGBA, LA, a transparent GIF/PNG): white, black, gray, #rrggbb or r,g,b.", **f)
        if method == "variations":
            flags.DEFINE_float("eta", 0.8, "DDIM eta of the variations (0 reconstructs the input).", **f)
        if method in ("interpolate", "edit"):
            flags.DEFINE_integer("frames", 5, "Number of frames, >= 2 (the first is "
                                 + ("image A, the last image B)." if method == "interpolate" else
                                    "the unedited reconstruction)."), **f)
        if method == "interpolate":
            flags.DEFINE_enum("noise", "interpolate", ["interpolate", "fixed"],
                              "DDIM noise: slerp of the two inversions, or one fixed draw.", **f)
        if method == "edit":
            flags.DEFINE_string("from", None, "The caption describing the image now.", **f)
            flags.DEFINE_string("to", None, "The caption to move toward.", **f)
            flags.DEFINE_float("max_angle", 0.5, "Largest slerp fraction toward the text diff.", **f)
        if method == "inpaint":
            flags.DEFINE_string("mask", None, "Mask image, same size as IMAGE: white (>127) = regenerate "
                                "(transparent = keep). The pixels outside the mask are kept at every input size: "
                                "each stage (decoder, upsamplers) runs RePaint with the image and mask resized to "
                                "its resolution, then the input's kept pixels (resized) are pasted back over its "
                                "output.", **f)
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


def write_grid_and_settings(out_dir: str, output, grid_rows: list, extra: dict, files: list[str]) -> None:
    """grid.png and settings.json in out_dir (a local path or a URI); the images are written batch by batch."""
    from dalle2_jax.images import save_png

    out_dir = fileio.resolve(out_dir)
    save_png(fileio.join(out_dir, "grid.png"), _grid(grid_rows))
    settings = dict(output.settings)
    settings.update(extra)
    settings.update(timings_seconds=output.timings, warnings=output.warnings, files=files,
                    resolution=int(output.images.shape[1]))
    fileio.write_text(fileio.join(out_dir, "settings.json"), json.dumps(settings, indent=2, default=str))


def image_name(i: int) -> str:
    return f"{i:03d}.png"


# --- checks before the bundle loads ------------------------------------------------------------------------
class Request:
    """What the checks before the bundle load found: the loaded input images, the mask, the row count, the
    output directory (and whether this run created it)."""

    def __init__(self):
        self.images: list = []
        self.mask = None
        self.rows = 0
        self.out = ""
        self.created_out: str | None = None  # the topmost directory made for --out
        self.warnings: list[str] = []


def _check_range(name: str, value, lo=None, hi=None, lo_open: bool = False, why: str = "") -> None:
    if value is None:
        return
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi)
    if bad:
        if lo is not None and hi is not None:
            rng = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
        elif lo is not None:
            rng = f"{'>' if lo_open else '>='} {lo:g}"
        else:
            rng = f"<= {hi:g}"
        raise InputError(f"--{name} must be {rng}{why}, got {value:g}")


def _rows(method: str, fv: flags.FlagValues, args: list[str]) -> int:
    if method == "generate":
        return fv.num * len(args)
    if method in ("variations", "inpaint"):
        return fv.num
    return fv.frames


def prepare_out(out: str) -> str | None:
    """Creates the output directory or refuses it with an InputError naming --out: an existing file, a file
    on the way, a place where a directory cannot be made or written. Returns the topmost directory this call
    created (None if the directory existed), for `remove_created` to take back."""
    if fileio.is_remote(out):
        fileio.makedirs(out)
        return None
    path = fileio.resolve(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"--out {out!r} is an existing file, not a directory; give a new or existing directory")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise InputError(f"--out {out!r}: {parent!r} is a file, so no directory can be made under it")
    created = None
    if not os.path.exists(path):
        created = path
        while not os.path.exists(os.path.dirname(created)):
            created = os.path.dirname(created)
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test_{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        remove_created(path, created)
        raise InputError(f"--out {out!r}: no directory can be created or written there under {parent!r} "
                         f"({e.strerror or type(e).__name__}); give a writable directory") from None
    return created


def remove_created(path: str, top: str | None) -> None:
    """Removes the empty directories from `path` up to `top` (what prepare_out made); nothing if top is None."""
    if top is None:
        return
    while True:
        try:
            if os.path.isdir(path) and not os.listdir(path):
                os.rmdir(path)
        except OSError:
            return
        if path == top or os.path.dirname(path) == path:
            return
        path = os.path.dirname(path)


def validate_request(method: str, fv: flags.FlagValues, args: list[str], log) -> Request:
    """Every check that needs no bundle, in flag order, then the inputs, then --out (created last, so a
    mistake elsewhere leaves nothing behind). Raises InputError naming the flag or file."""
    from dalle2_jax.images import WHITE, BLACK, load_image, parse_color

    req = Request()
    if method == "edit" and (not (fv["from"].value or "").strip() or not (fv["to"].value or "").strip()):
        raise InputError("edit needs --from and --to captions")
    if method == "inpaint" and not fv.mask:
        raise InputError("inpaint needs --mask MASK (white = regenerate)")
    if "num" in fv:
        _check_range("num", fv.num, 1)
    if "frames" in fv:
        what = "image A to image B" if method == "interpolate" else "the unedited image to the edit"
        _check_range("frames", fv.frames, 2, why=f" (the frames go from {what})")
    _check_range("batch_size", fv.batch_size, 1)
    _check_range("num_upsamplers", fv.num_upsamplers, 0)
    if "eta" in fv:
        _check_range("eta", fv.eta, 0.0, 1.0)
    if "max_angle" in fv:
        _check_range("max_angle", fv.max_angle, 0.0, 1.0, lo_open=True)
    if "resample" in fv:
        _check_range("resample", fv.resample, 1)
        _check_range("jump_length", fv.jump_length, 1)
    _check_range("candidates", fv.candidates, 1, 64)
    from dalle2_jax.inference.pipeline import SAMPLERS

    for stage in ("prior", "decoder", "upsampler"):
        _check_range(f"{stage}_steps", fv[f"{stage}_steps"].value, 1)
        if f"{stage}_guidance" in fv:
            _check_range(f"{stage}_guidance", fv[f"{stage}_guidance"].value, 0.0, MAX_GUIDANCE)
        _check_range(f"{stage}_eta", fv[f"{stage}_eta"].value, 0.0, 1.0)
        sampler = fv[f"{stage}_sampler"].value
        if sampler is not None and sampler not in SAMPLERS[stage]:
            raise InputError(f"--{stage}_sampler {sampler!r}: use one of {', '.join(SAMPLERS[stage])}")
    background = WHITE
    if "background" in fv:
        try:
            background = parse_color(fv.background)
        except ValueError as e:
            raise InputError(f"--background {e}") from None

    def warn(message: str) -> None:
        req.warnings.append(message)
        log(f"warning: {message}")

    num_images = {"generate": 0, "interpolate": 2}.get(method, 1)
    req.images = [load_image(a, "image", background, warn) for a in args[:num_images]]
    if method == "inpaint":
        req.mask = load_image(fv.mask, "mask", BLACK, warn)
        image = req.images[0]
        if req.mask.shape[:2] != image.shape[:2]:
            raise InputError(f"the mask is {req.mask.shape[1]}x{req.mask.shape[0]} but the image is "
                             f"{image.shape[1]}x{image.shape[0]}; they must be the same size")
        from dalle2_jax.inference.pipeline import center_square

        if not center_square(req.mask.max(axis=-1) > 127).any():
            raise InputError(f"--mask {fv.mask!r} selects no pixels of the image's centred square (white = "
                             "regenerate); nothing to inpaint")
    if method in ("generate", "inpaint"):
        for p in args[num_images:]:
            if not p.strip():
                raise InputError("empty prompt: give some text to condition on")
    req.rows = _rows(method, fv, args)
    req.out = fv.out
    req.created_out = prepare_out(fv.out)
    return req


# --- checks from the bundle's manifest, before its params load -----------------------------------------------
def check_against_bundle(method: str, fv: flags.FlagValues, args: list[str], rows: int) -> int:
    """The limits that depend on the bundle, from its manifest and stage configs only (no params loaded):
    a prior for the text methods, --num_upsamplers in [0, available], step counts within each stage's
    schedule, and the memory estimate (inference/budget.py) of --num / --frames and --batch_size. Returns
    the batch size to sample with."""
    from dalle2_jax.inference import budget
    from dalle2_jax.inference.bundle import BundleError, read_manifest, verify_files

    path = fileio.resolve(fv.bundle)
    manifest = read_manifest(path)
    verify_files(path, manifest, hashes=False)
    stages = manifest["stages"]
    configs = {}
    for s in stages:
        try:
            configs[s["name"]] = fileio.read_json(fileio.join(path, s["config"]))
        except (OSError, ValueError) as e:
            raise BundleError(f"damaged bundle: {s['config']} is unreadable ({type(e).__name__})") from None
    kinds = [s["kind"] for s in stages]
    if method in ("generate", "inpaint") and "prior" not in kinds:
        raise InputError(f"this bundle has no prior; {method} needs one (export with --prior)")
    ups = [s["name"] for s in stages if s["kind"] == "upsampler"]
    if fv.num_upsamplers is not None and fv.num_upsamplers > len(ups):
        raise InputError(f"--num_upsamplers must be in [0, {len(ups)}]: this bundle has {len(ups)} upsampler"
                         f"{'s' if len(ups) != 1 else ''}{' (' + ', '.join(ups) + ')' if ups else ''}, "
                         f"got {fv.num_upsamplers}")
    for kind in ("prior", "decoder", "upsampler"):
        steps = fv[f"{kind}_steps"].value
        for s in stages:
            if steps is None or s["kind"] != kind:
                continue
            n = int(configs[s["name"]].get("diffusion", {}).get("num_steps", 0) or 0)
            if n and steps > n:
                raise InputError(f"--{kind}_steps {steps}: {s['name']} steps must be an integer in [1, {n}] "
                                 "(its diffusion schedule's length)")
    plan = budget.plan(manifest, configs, fv.num_upsamplers, inverts=method in ("variations", "interpolate", "edit"))
    count_flag = "frames" if method in ("interpolate", "edit") else "num"
    per = len(args) if method == "generate" else 1
    avail = f"{budget.gib(plan.host_available)} of host memory is available"
    if plan.device_available is not None:
        avail += f" ({budget.gib(plan.device_available)} on the accelerator)"
    if not plan.fits(rows, 1):
        most = plan.largest_rows() // per
        host, _ = plan.need(rows, 1)
        raise InputError(f"--{count_flag} {getattr(fv, count_flag)}: {rows} images at {_final_res(stages, fv)} px "
                         f"need about {budget.gib(host)} but {avail}; use --{count_flag} {max(most, 1)} or less")
    largest = plan.largest_batch(rows)
    if fv.batch_size is not None:
        bs = min(fv.batch_size, rows)
        if not plan.fits(rows, bs):
            host, dev = plan.need(rows, bs)
            raise InputError(f"--batch_size {fv.batch_size}: {rows} images sampled {bs} at a time need about "
                             f"{budget.gib(host)}{' (+' + budget.gib(dev) + ' on the accelerator)' if dev else ''} "
                             f"but {avail}; use --batch_size {largest} or less")
        return bs
    return max(1, min(rows, DEFAULT_MAX_BATCH, largest))


def _final_res(stages: list[dict], fv: flags.FlagValues) -> int:
    image = [s for s in stages if s["kind"] in ("decoder", "upsampler")]
    k = len(image) - 1 if fv.num_upsamplers is None else fv.num_upsamplers
    return int(image[k]["interface"]["resolution"])


# --- running ---------------------------------------------------------------------------------------------------
def run_method(method: str, fv: flags.FlagValues, args: list[str]) -> str:
    """Runs one method from parsed flags; returns the output directory."""
    log = lambda m: print(m, flush=True)  # noqa: E731
    req = validate_request(method, fv, args, log)
    written: list[str] = []
    out_dir = fileio.resolve(fv.out)
    try:
        bs = check_against_bundle(method, fv, args, req.rows)
        return _run(method, fv, args, req, bs, log, out_dir, written)
    except KeyboardInterrupt:
        if not written:
            remove_created(out_dir, req.created_out)
        fail(f"interrupted: wrote {len(written)} of {req.rows} images to {out_dir}" if written else
             "interrupted before any image was written", 130)
    except BaseException:
        if not written:
            remove_created(out_dir, req.created_out)
        raise


def _run(method, fv, args, req: Request, bs: int, log, out_dir: str, written: list[str]) -> str:
    from dalle2_jax.images import save_png
    from dalle2_jax.inference.pipeline import UnCLIPPipeline, center_square, resize

    import jax

    from dalle2_jax.training.partitioning import data_parallel_mesh

    images, mask = req.images, req.mask
    mesh = data_parallel_mesh() if fv.shard and jax.device_count() > 1 else None
    pipe = UnCLIPPipeline.from_bundle(fv.bundle, verify_hashes=fv.verify, log=log, mesh=mesh)
    batches = -(-req.rows // bs)

    def on_batch(start: int, imgs) -> None:
        for k, img in enumerate(imgs):
            p = fileio.join(out_dir, image_name(start + k))
            save_png(p, img)
            written.append(p)
        if batches > 1:
            log(f"wrote images {start}-{start + len(imgs) - 1} of {req.rows}")

    common = dict(seed=fv.seed, settings=stage_overrides(fv), batch_size=bs, num_upsamplers=fv.num_upsamplers,
                  on_batch=on_batch)
    extra: dict = {"command": method, "inputs": args, "batch_size": bs}
    if "background" in fv:
        extra["background"] = fv.background
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
    out.warnings = req.warnings + list(out.warnings)
    write_grid_and_settings(out_dir, out, rows, extra, [os.path.basename(p) for p in written])
    total = sum(out.timings.values())
    print(f"wrote {len(written)} images ({out.images.shape[1]}x{out.images.shape[2]}), grid.png and settings.json "
          f"to {out_dir} in {total:.1f}s", flush=True)
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
