"""Every user mistake in the commands exits 2 with one `error: ...` line naming the key, flag or path (and
the fix), and no traceback; `--debug` shows the traceback. One process runs every case in-process through
the `dalle2-jax` console script (`dalle2_jax.cli.main`), so the table costs one JAX start."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = r"""
import contextlib, io, json, sys
from dalle2_jax.cli import main
results = {}
for name, argv in json.loads(sys.argv[1]).items():
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            main(["dalle2-jax"] + argv)
            code = 0
        except SystemExit as e:
            code = e.code
    results[name] = {"code": code, "stderr": err.getvalue(), "stdout": out.getvalue()}
print(json.dumps(results))
"""


def _cases(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = str(tmp_path / "missing")
    bundle_like = tmp_path / "bundle_like"  # what `export` writes, handed to a workdir flag
    bundle_like.mkdir()
    (bundle_like / "manifest.json").write_text("{}")
    workdir_like = tmp_path / "workdir_like"  # what `train` writes, handed to --bundle
    workdir_like.mkdir()
    (workdir_like / "config.json").write_text("{}")
    image = tmp_path / "in.png"
    Image.new("RGB", (8, 8), (255, 255, 255)).save(image)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    out = str(tmp_path / "out")
    w = str(tmp_path / "w")
    clip = ["train", "--config", "configs/clip.py:tiny", "--workdir", w]
    e, b = str(empty), str(bundle_like)
    # name: (argv, words the one error line must hold)
    return {
        "mistyped_key": (clip + ["--config.total_stepz=5"], ["--config.total_stepz", "--config.total_steps?"]),
        "mistyped_nested_key": (clip + ["--config.model.vision.widht=8"], ["model.vision.widht",
                                                                            "--config.model.vision.width?"]),
        "unknown_key": (clip + ["--config.zzz_unknown=1"], ["zzz_unknown", "configs/clip.py:tiny"]),
        "unknown_variant": (["train", "--config", "configs/clip.py:nonexistent", "--workdir", w],
                            ["configs/clip.py:nonexistent", "tiny, base, paper"]),
        "unknown_config_file": (["train", "--config", "configs/nope.py:tiny", "--workdir", w],
                                ["configs/nope.py", "clip.py, decoder.py, prior.py, upsampler.py"]),
        "bad_value": (clip + ["--config.total_steps=abc"], ["--config.total_steps=abc", "int()"]),
        "unknown_flag": (clip + ["--wokdir", w], ["wokdir"]),
        "train_no_workdir": (["train", "--config", "configs/clip.py:tiny"], ["--workdir is required"]),
        "params_bad_variant": (["params", "--config", "configs/prior.py:nonexistent"], ["configs/prior.py"]),
        "evaluate_empty": (["evaluate", "--workdir", e], ["is not a workdir", "dalle2-jax train"]),
        "evaluate_missing": (["evaluate", "--workdir", missing], ["no such directory"]),
        "evaluate_a_bundle": (["evaluate", "--workdir", b], ["inference bundle, not a workdir"]),
        "export_no_decoder": (["export", "--clip", e, "--out", out], ["--decoder is required"]),
        "export_empty_clip": (["export", "--clip", e, "--decoder", e, "--out", out], ["is not a workdir"]),
        "generate_no_out": (["generate", "a cat", "--bundle", b], ["--out is required"]),
        "generate_no_prompt": (["generate", "--bundle", b, "--out", out], ["PROMPT"]),
        "generate_missing_bundle": (["generate", "a cat", "--bundle", missing, "--out", out],
                                    ["no bundle at", "dalle2-jax export"]),
        "generate_empty_bundle": (["generate", "a cat", "--bundle", e, "--out", out], ["is not a bundle"]),
        "generate_a_workdir": (["generate", "a cat", "--bundle", str(workdir_like), "--out", out],
                               ["training workdir", "dalle2-jax export"]),
        "variations_two_images": (["variations", str(image), str(image), "--bundle", b, "--out", out], ["IMAGE"]),
        "interpolate_one_image": (["interpolate", str(image), "--bundle", b, "--out", out], ["IMAGE_A IMAGE_B"]),
        "inpaint_no_mask": (["inpaint", str(image), "a star", "--bundle", b, "--out", out], ["--mask MASK"]),
        "inpaint_missing_bundle": (["inpaint", str(image), "a star", "--mask", str(image), "--bundle", missing,
                                    "--out", out], ["no bundle at"]),
        "inpaint_broken_image": (["inpaint", str(broken), "a star", "--mask", str(image), "--bundle", missing,
                                  "--out", out], ["broken.png", "not a readable image"]),
        "edit_missing_bundle": (["edit", str(image), "--from", "a", "--to", "b", "--bundle", missing, "--out", out],
                                ["no bundle at"]),
        # issue 35: flags and paths are checked before the bundle is looked at (here it does not exist)
        "generate_out_is_a_file": (["generate", "a cat", "--bundle", missing, "--out", str(image)],
                                   ["--out", "existing file"]),
        "generate_negative_upsamplers": (["generate", "a cat", "--bundle", missing, "--out", out,
                                          "--num_upsamplers", "-1"], ["--num_upsamplers must be >= 0"]),
        "generate_batch_zero": (["generate", "a cat", "--bundle", missing, "--out", out, "--batch_size", "0"],
                                ["--batch_size must be >= 1"]),
        "edit_one_frame": (["edit", str(image), "--from", "a", "--to", "b", "--frames", "1", "--bundle", missing,
                            "--out", out], ["--frames must be >= 2"]),
        "interpolate_one_frame": (["interpolate", str(image), str(image), "--frames", "1", "--bundle", missing,
                                   "--out", out], ["--frames must be >= 2"]),
        "variations_bad_background": (["variations", str(image), "--background", "nope", "--bundle", missing,
                                       "--out", out], ["--background", "not a colour"]),
        "embed_empty_clip": (["embed", "--clip_workdir", e, "--out", out], ["is not a workdir"]),
        "embed_no_out": (["embed", "--clip_workdir", e], ["--out is required"]),
        "import_no_arch": (["import-clip", "--weights", str(tmp_path / "nope.safetensors"), "--out", out],
                           ["--arch NAME or --config"]),
        "import_missing_weights": (["import-clip", "--weights", str(tmp_path / "nope.safetensors"), "--arch",
                                    "ViT-B-32", "--out", out],
                                   ["nope.safetensors", "does not exist"]),
        "build_folder_missing": (["build-folder", "--folder", missing, "--data_dir", str(tmp_path / "d")],
                                 ["image folder", "does not exist"]),
        "build_folder_no_data_dir": (["build-folder", "--folder", e], ["--data_dir is required"]),
        "clip_score_empty": (["clip-score", "--workdir", e, "--text", "a cat", "--image", str(image)],
                             ["is not a workdir"]),
    }


def test_every_user_mistake_is_one_error_line_and_exit_2(tmp_path):
    cases = _cases(tmp_path)
    cases["debug"] = (["evaluate", "--workdir", str(tmp_path / "empty"), "--debug"], ["is not a workdir"])
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env.pop("DALLE2_DEBUG", None)
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps({k: v[0] for k, v in cases.items()})],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (_, words) in cases.items():
        r = results[name]
        lines = [line for line in r["stderr"].splitlines() if line.strip()]
        assert r["code"] == 2, (name, r)
        if name == "debug":  # the traceback, then the same one line
            assert "Traceback (most recent call last)" in r["stderr"] and lines[-1].startswith("error: "), r
            continue
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, r["stderr"])
        for word in words:
            assert word in lines[0], (name, word, lines[0])
    assert not os.path.exists(tmp_path / "w" / "checkpoints") and not os.path.exists(tmp_path / "out")
    # nothing else reached the real stderr (log records bypass the redirection): no warnings, no tracebacks
    noise = [line for line in proc.stderr.splitlines() if line.strip()]
    assert not noise, noise[:10]
