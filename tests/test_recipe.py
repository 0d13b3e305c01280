"""The captioned_shapes quality report (dalle2_jax/tools/shapes_report.py) and the end-to-end recipe
(launch/shapes_recipe.sh; the whole script is a slow test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dalle2_jax.tools.shapes_report import format_markdown, frechet_distance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 4))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, 2.0, 0.0, 0.0])
    assert frechet_distance(a, a + shift) == pytest.approx(5.0, rel=1e-6)  # |mu_a - mu_b|^2, same covariance
    # N(0, I) vs N(0, 4I) in 4 dims: tr(I + 4I - 2 * 2I) = 4
    assert frechet_distance(a, 2 * rng.normal(size=(4000, 4))) == pytest.approx(4.0, rel=0.1)


def test_shapes_report_on_the_tiny_bundle(tiny_bundle, trained_clip, trained_prior, trained_decoder,
                                          trained_upsampler, tmp_path, capsys):
    from dalle2_jax.tools import shapes_report

    out = tmp_path / "report"
    with pytest.raises(SystemExit) as e:  # absl's app.run exits 0 after main
        shapes_report.run(["shapes-report", "--bundle", tiny_bundle, "--clip_workdir", trained_clip,
                           "--prior_workdir", trained_prior[0], "--decoder_workdir", trained_decoder[0],
                           "--upsampler_workdir", trained_upsampler[0], "--out", str(out), "--num", "12",
                           "--batch_size", "8", "--note", "test"])
    assert e.value.code in (0, None)
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((out / "report.json").read_text())
    assert printed == report
    assert report["real"]["color_acc"] == 1.0 and report["real"]["shape_acc"] == 1.0  # the checker's ceiling
    g = report["generated"]
    assert g["num_images"] == 12 and 0.0 <= g["color_acc"] <= 1.0 and 0.0 <= g["shape_acc"] <= 1.0
    fd = report["frechet_clip"]
    assert fd["num"] == 12 and fd["generated_vs_real"] >= 0.0 and np.isfinite(fd["real_half_vs_half"])
    assert np.isfinite(fd["blank_backgrounds_vs_real"])  # (a 4-step CLIP embeds everything alike: no ordering)
    assert report["clip"]["step"] == 4 and "zero_shot_color_acc" in report["clip"]
    assert "prior_cosine" in report["prior"] and "text_baseline_cosine" in report["prior"]
    assert "psnr" in report["upsampler"] and "psnr_bicubic" in report["upsampler"]
    assert len(report["grid"]["captions"]) == 8
    assert set(report["goals"]) == {"clip_zero_shot_color", "clip_zero_shot_shape", "prior_above_text_baseline",
                                    "generated_color", "generated_shape"}
    assert report["goals"]["generated_color"]["met"] == (g["color_acc"] >= 0.9)
    from PIL import Image

    grid = Image.open(out / "grid.png")
    assert grid.size[1] > 256 and grid.size[0] > 8 * 256  # one row of 8 images at the upsampler's 256 px
    md = (out / "report.md").read_text()
    assert md == format_markdown(report) and "| generated_shape |" in md and "Frechet" in md


@pytest.mark.slow
def test_recipe_script_runs_end_to_end_and_resumes(tmp_path):
    """launch/shapes_recipe.sh with a few steps per stage on the full built-in data set: every stage, the
    export and the report; a second run finds everything done and only rewrites the report."""
    env = dict(os.environ, CLIP_STEPS="4", PRIOR_STEPS="4", DECODER_STEPS="2", UPSAMPLER_STEPS="2", REPORT_NUM="16",
               EXTRA_FLAGS="--config.optimizer.warmup_steps=1",  # the configs' warm-ups exceed these step counts
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    out = tmp_path / "recipe"
    cmd = [os.path.join(ROOT, "launch", "shapes_recipe.sh"), str(out)]
    subprocess.run(cmd, env=env, check=True, timeout=3600)
    report = json.loads((out / "report.json").read_text())
    assert report["generated"]["num_images"] == 16 and report["real"]["shape_acc"] == 1.0
    assert (out / "grid.png").exists() and (out / "bundle" / "manifest.json").exists()
    names = [line.split("\t")[0] for line in (out / "timings.tsv").read_text().splitlines()]
    assert names == ["clip", "embed", "prior", "decoder", "upsampler", "export", "report"]
    subprocess.run(cmd, env=env, check=True, timeout=1800)  # resumes: every stage is finished
    names = [line.split("\t")[0] for line in (out / "timings.tsv").read_text().splitlines()]
    assert names[7:] == ["clip", "prior", "decoder", "upsampler", "report"]
