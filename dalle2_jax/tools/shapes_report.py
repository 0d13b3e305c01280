"""The quality report of a cascade trained on the built-in `captioned_shapes` data set (launch/shapes_recipe.sh).

    python -m dalle2_jax.tools.shapes_report --bundle B --clip_workdir C --prior_workdir P \
        --decoder_workdir D --upsampler_workdir U --out OUTDIR [--num 256] [--seed 0]

Text -> 64 px images through the exported bundle's prior and decoder for the first `--num` test captions,
then:
- `generated`: the pixel-level checker (dalle2_jax/scene_checker.py) on those images against each
  caption's scene (color, shape, size, relation, background), next to `real`, the same checker on the real
  test images (its ceiling).
- `frechet_clip`: the Frechet distance between Gaussians fitted to the frozen CLIP's image embeddings of
  the generated and of the real test images (an FID in CLIP space, computed offline with the bundle's own
  CLIP), next to the distance between two halves of the real images (the floor at this sample size) and
  between the real images and each scene's empty background (what a generator that draws no object gets).
- each stage's own newest evaluation report (`reports/eval_<step>.json`): CLIP zero-shot color / shape
  accuracy, the prior's cosine with its text and shuffled baselines, the upsampler's PSNR against bicubic.
- `grid.png`: 8 test captions through the whole cascade (upsampler included), captions in the report.

Writes OUTDIR/report.json, OUTDIR/report.md (the same as tables, with the goals) and OUTDIR/grid.png; the
last stdout line is the report as one JSON object.
"""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Any

import numpy as np
from absl import flags

from dalle2_jax.cli_util import exit_on_errors, run_program

GOALS = {"clip_zero_shot_color": 0.9, "clip_zero_shot_shape": 0.9, "generated_color": 0.9, "generated_shape": 0.7}
GRID_CAPTIONS = 8


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("bundle", None, "The exported bundle (dalle2-jax export).", flag_values=fv)
    for stage in ("clip", "prior", "decoder", "upsampler"):
        flags.DEFINE_string(f"{stage}_workdir", "", f"The {stage}'s workdir (for its evaluation report).",
                            flag_values=fv)
    flags.DEFINE_string("out", None, "Output directory.", flag_values=fv)
    flags.DEFINE_integer("num", 256, "Test captions to generate 64 px images for.", flag_values=fv)
    flags.DEFINE_integer("batch_size", 64, "Rows per sampling call.", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=fv)
    flags.DEFINE_string("note", "", "Free text stored in the report (e.g. the machine).", flag_values=fv)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to the rows of a [N, D] and b [M, D]:
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))."""
    from scipy import linalg

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s_a @ s_b)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a + s_b - 2.0 * covmean))


def newest_report(workdir: str) -> dict | None:
    """The newest reports/eval_<step>.json of a workdir (with its step), or None."""
    from dalle2_jax import fileio

    d = fileio.join(workdir, "reports")
    if not workdir or not fileio.exists(d):
        return None
    steps = sorted(int(n[5:-5]) for n in fileio.listdir(d) if n.startswith("eval_") and n.endswith(".json"))
    if not steps:
        return None
    rep = fileio.read_json(fileio.join(d, f"eval_{steps[-1]}.json"))
    rep["step"] = steps[-1]
    return rep


def _pick(rep: dict | None, keys: tuple[str, ...]) -> dict:
    if rep is None:
        return {}
    out = {"step": rep.get("step")}
    src = rep.get("metrics", rep)
    for k in keys:
        if k in src:
            out[k] = src[k]
    return out


def _embed(pipe, images: np.ndarray, batch: int) -> np.ndarray:
    from dalle2_jax.images import resize_square

    size = int(pipe.decoder.stage.clip_resolution)
    out = [pipe.embed_images(resize_square(images[i: i + batch], size)) for i in range(0, len(images), batch)]
    e = np.concatenate(out)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def build_report(fv) -> tuple[dict, np.ndarray, list[str]]:
    import jax

    from dalle2_jax import scene_checker
    from dalle2_jax.data import pipeline, scenes as S
    from dalle2_jax.inference.pipeline import UnCLIPPipeline

    t0 = time.time()
    pipe = UnCLIPPipeline.from_bundle(fv.bundle, log=lambda m: print(m, flush=True))
    d = pipe.decoder.stage.config.data
    records = pipeline.read_split(d, d.eval_split, [d.image_key, d.text_key, "scene"], int(fv.num))
    captions = [r[d.text_key] if isinstance(r[d.text_key], str) else r[d.text_key].decode() for r in records]
    scenes = [S.decode_scene(r["scene"]) for r in records]
    real = np.stack([r[d.image_key] for r in records])
    print(f"generating {len(captions)} images at {real.shape[1]} px for test captions", flush=True)
    t_gen = time.time()
    gen = pipe.generate(captions, 1, seed=int(fv.seed), batch_size=int(fv.batch_size), num_upsamplers=0)
    gen_s = time.time() - t_gen
    images = gen.images
    checked = scene_checker.attribute_accuracy(images, scenes)
    ceiling = scene_checker.attribute_accuracy(real, scenes)
    e_gen, e_real = _embed(pipe, images, int(fv.batch_size)), _embed(pipe, real, int(fv.batch_size))
    half = len(e_real) // 2
    blank = np.stack([np.broadcast_to(np.array(S.BACKGROUNDS[s["background"]], np.uint8), real.shape[1:])
                      for s in scenes])  # each scene's background with no object: a poor generator's distance
    shuffled_cos = float(np.mean(np.sum(e_gen * np.roll(e_real, 1, 0), 1)))
    fd = {"generated_vs_real": frechet_distance(e_gen, e_real),
          "real_half_vs_half": frechet_distance(e_real[:half], e_real[half:]),
          "blank_backgrounds_vs_real": frechet_distance(_embed(pipe, blank, int(fv.batch_size)), e_real),
          "clip_cosine_generated_vs_real": float(np.mean(np.sum(e_gen * e_real, 1))),
          "clip_cosine_generated_vs_shuffled_real": shuffled_cos,
          "num": len(e_gen), "embed_dim": int(e_gen.shape[1])}

    grid_captions = captions[:GRID_CAPTIONS]
    t_grid = time.time()
    full = pipe.generate(grid_captions, 1, seed=int(fv.seed))
    grid_s = time.time() - t_grid
    grid_check = scene_checker.attribute_accuracy(full.stages["decoder"], scenes[:GRID_CAPTIONS])

    clip_rep = _pick(newest_report(fv.clip_workdir), ("zero_shot_color_acc", "zero_shot_shape_acc",
                                                      "heldout_color_acc", "heldout_shape_acc", "caption_r1"))
    prior_rep = _pick(newest_report(fv.prior_workdir), ("prior_cosine", "text_baseline_cosine",
                                                        "shuffled_baseline_cosine", "image_retrieval_r1",
                                                        "heldout_prior_cosine"))
    dec_rep = _pick(newest_report(fv.decoder_workdir), ("clip_cosine", "shuffled_clip_cosine", "checker_color_acc",
                                                        "checker_shape_acc", "checker_size_acc",
                                                        "checker_relation_acc"))
    up_rep = _pick(newest_report(fv.upsampler_workdir), ("psnr", "psnr_bicubic", "ssim", "ssim_bicubic"))
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].device_kind}",
        "note": fv.note, "bundle": os.path.abspath(fv.bundle),
        "sampling": gen.settings["sampling"],
        "clip": clip_rep, "prior": prior_rep, "decoder_eval": dec_rep, "upsampler": up_rep,
        "generated": checked, "real": ceiling, "frechet_clip": fd,
        "grid": {"captions": grid_captions, "decoder_checker": grid_check, "seconds": round(grid_s, 1)},
        "seconds": {"generate_64px": round(gen_s, 1), "total": round(time.time() - t0, 1)},
    }
    report["goals"] = {
        "clip_zero_shot_color": _goal(clip_rep.get("zero_shot_color_acc"), GOALS["clip_zero_shot_color"]),
        "clip_zero_shot_shape": _goal(clip_rep.get("zero_shot_shape_acc"), GOALS["clip_zero_shot_shape"]),
        "prior_above_text_baseline": {
            "value": prior_rep.get("prior_cosine"), "goal": prior_rep.get("text_baseline_cosine"),
            "met": bool(prior_rep and prior_rep.get("prior_cosine", 0) > prior_rep.get("text_baseline_cosine", 1))},
        "generated_color": _goal(checked["color_acc"], GOALS["generated_color"]),
        "generated_shape": _goal(checked["shape_acc"], GOALS["generated_shape"]),
    }
    return report, full.images, grid_captions


def _goal(value, goal) -> dict:
    return {"value": value, "goal": goal, "met": bool(value is not None and value >= goal)}


def _f(x, digits=3) -> str:
    return "-" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def format_markdown(r: dict) -> str:
    g, re_, fd = r["generated"], r["real"], r["frechet_clip"]
    c, p, u = r["clip"], r["prior"], r["upsampler"]
    lines = [f"# captioned_shapes recipe report ({r['date']}, {r['machine']})", ""]
    if r.get("note"):
        lines += [r["note"], ""]
    lines += ["| goal | value | target | met |", "| --- | --- | --- | --- |"]
    for name, v in r["goals"].items():
        lines.append(f"| {name} | {_f(v['value'])} | {_f(v['goal'])} | {'yes' if v['met'] else 'no'} |")
    lines += ["", f"Generated 64 px images ({g['num_images']} test captions, {g['num_objects']} objects; "
              "pixel-level checker) against the real test images:", "",
              "| images | color | shape | size | relation | background | all correct | held-out color | "
              "held-out shape |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, a in (("generated", g), ("real (ceiling)", re_)):
        lines.append(f"| {name} | {_f(a['color_acc'])} | {_f(a['shape_acc'])} | {_f(a['size_acc'])} | "
                     f"{_f(a['relation_acc'])} | {_f(a['background_acc'])} | {_f(a['all_correct'])} | "
                     f"{_f(a['heldout_color_acc'])} | {_f(a['heldout_shape_acc'])} |")
    lines += ["", "| Frechet distance in CLIP space | value |", "| --- | --- |",
              f"| generated vs real test images | {_f(fd['generated_vs_real'], 4)} |",
              f"| real: one half vs the other (floor at n={fd['num'] // 2}) | {_f(fd['real_half_vs_half'], 4)} |",
              f"| the scenes' empty backgrounds vs real (no objects) | {_f(fd['blank_backgrounds_vs_real'], 4)} |",
              f"| CLIP cosine generated vs its real image (vs a shuffled one) | "
              f"{_f(fd['clip_cosine_generated_vs_real'])} ({_f(fd['clip_cosine_generated_vs_shuffled_real'])}) |",
              "", "| stage | figures |", "| --- | --- |",
              f"| CLIP (step {c.get('step')}) | zero-shot color {_f(c.get('zero_shot_color_acc'))}, shape "
              f"{_f(c.get('zero_shot_shape_acc'))}; held-out color {_f(c.get('heldout_color_acc'))}, shape "
              f"{_f(c.get('heldout_shape_acc'))} |",
              f"| prior (step {p.get('step')}) | cosine {_f(p.get('prior_cosine'))} vs text baseline "
              f"{_f(p.get('text_baseline_cosine'))}, shuffled {_f(p.get('shuffled_baseline_cosine'))} |",
              f"| upsampler 64->256 (step {u.get('step')}) | PSNR {_f(u.get('psnr'), 2)} dB vs bicubic "
              f"{_f(u.get('psnr_bicubic'), 2)} dB; SSIM {_f(u.get('ssim'))} vs {_f(u.get('ssim_bicubic'))} |",
              "", "Grid captions (left to right): " + "; ".join(f"`{t}`" for t in r["grid"]["captions"]), "",
              f"Sampling: {json.dumps(r['sampling'])}", ""]
    return "\n".join(lines)


def main(fv: flags.FlagValues) -> None:
    from PIL import Image

    from dalle2_jax.stages.image_diffusion import image_grid

    with exit_on_errors():
        report, grid_images, _ = build_report(fv)
    os.makedirs(fv.out, exist_ok=True)
    Image.fromarray(image_grid([grid_images])).save(os.path.join(fv.out, "grid.png"))
    with open(os.path.join(fv.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    md = format_markdown(report)
    with open(os.path.join(fv.out, "report.md"), "w") as f:
        f.write(md)
    print(md)
    print(json.dumps(report))


def run(argv: list[str] | None = None) -> None:
    run_program(__doc__, define_flags, main, argv, required=("bundle", "out"))


if __name__ == "__main__":
    run()
