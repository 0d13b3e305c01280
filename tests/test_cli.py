"""The entry points, called in-process as a user would call them."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
from conftest import copy_workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP_TINY = os.path.join(REPO, "configs", "clip.py") + ":tiny"


def _run(capsys, *argv):
    from dalle2_jax.cli import main

    with pytest.raises(SystemExit) as e:
        main(["dalle2-jax", *argv])
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


def _small_flags(data_dir):
    return [f"--config.data.data_dir={data_dir}", "--config.data.num_train=256", "--config.data.num_test=64",
            "--config.data.num_workers=0", "--config.batch_size=16", "--config.optimizer.warmup_steps=1",
            "--config.eval.batch_size=64"]


def test_train_cli_end_to_end(shapes_data_dir, tmp_path, capsys):
    workdir = str(tmp_path / "w")
    code, out, err = _run(capsys, "train", "--config", CLIP_TINY, "--workdir", workdir, "--config.total_steps=3",
                          "--config.log_every=1", "--config.checkpoint_every=2", *_small_flags(shapes_data_dir))
    assert code == 0, err
    assert "step 3/3 | loss" in out and "steps/s" in out
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "3"]
    assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    assert json.load(open(os.path.join(workdir, "config.json")))["total_steps"] == 3
    assert os.path.exists(os.path.join(workdir, "tokenizer", "tokenizer_meta.json"))
    assert os.path.exists(os.path.join(workdir, "reports", "eval_3.json"))


def test_evaluate_cli_prints_json_last(trained_clip, tmp_path, capsys):
    workdir = copy_workdir(trained_clip, tmp_path / "clip")
    code, out, err = _run(capsys, "evaluate", "--workdir", workdir)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    for key in ("step", "num_examples", "params", "zero_shot_color_acc", "zero_shot_shape_acc",
                "heldout_color_acc", "heldout_shape_acc", "caption_retrieval_r1"):
        assert key in result, key
    assert result["step"] == 4 and result["params"] == "ema" and result["num_examples"] == 64
    assert 0.0 <= result["zero_shot_shape_acc"] <= 1.0
    assert json.load(open(os.path.join(workdir, "reports", "eval_4.json"))) == result


def test_params_tool_counts_paper_clip_without_memory(capsys):
    code, out, _ = _run(capsys, "params", "--config", os.path.join(REPO, "configs", "clip.py") + ":paper")
    assert code == 0
    counts = json.loads(out.strip().splitlines()[-1])
    assert counts["total"] == counts["text"] + counts["vision"] + counts["logit_scale"]
    assert 620e6 < counts["vision"] < 640e6  # ViT-H/16: ~632M
    assert 300e6 < counts["text"] < 360e6


def test_bad_usage_exits_2_with_a_message(tmp_path, capsys):
    code, _, err = _run(capsys, "train", "--config", CLIP_TINY)
    assert code == 2 and "--workdir is required" in err
    code, _, err = _run(capsys, "train", "--config", CLIP_TINY, "--workdir", str(tmp_path), "--config.stage=nope")
    assert code == 2 and "config.stage" in err
    code, _, err = _run(capsys, "frobnicate")
    assert code == 2 and "unknown command" in err
    code, _, err = _run(capsys, "evaluate", "--workdir", str(tmp_path / "missing"))
    assert code == 2 and "not a workdir" in err


def test_train_on_a_user_folder(tmp_path, capsys):
    """build-folder then train on it by name and feature keys."""
    import numpy as np
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"picture number {i % 5}")
    data_dir = str(tmp_path / "data")
    code, out, err = _run(capsys, "build-folder", "--folder", str(folder), "--data_dir", data_dir, "--name", "mine",
                          "--test_fraction", "0.25")
    assert code == 0, err
    assert "--config.data.name=image_folder_captions/mine_test0.25" in out
    workdir = str(tmp_path / "w")
    code, out, err = _run(capsys, "train", "--config", CLIP_TINY, "--workdir", workdir,
                          "--config.data.name=image_folder_captions/mine_test0.25", "--config.data.image_key=image",
                          f"--config.data.data_dir={data_dir}", "--config.data.num_workers=0",
                          "--config.batch_size=8", "--config.total_steps=2", "--config.optimizer.warmup_steps=1",
                          "--config.log_every=1")
    assert code == 0, err
    result = json.loads([ln for ln in out.splitlines() if ln.startswith("eval ")][-1][5:])
    assert result["num_examples"] == 6 and "caption_retrieval_r1" in result
    assert "zero_shot_shape_acc" not in result  # no structured scenes in a user's data


def test_evaluate_sampling_overrides_write_their_own_report(trained_decoder, tmp_path, capsys):
    """`evaluate --sampling KEY=VALUE` evaluates with changed sampling settings, records them, and leaves the
    training run's report alone; bad overrides exit 2 naming the problem. `--raw_params` evaluates the raw
    params; `--renoise_steps` adds the checker's
    renoise_t<t>_* accuracies and the conditioning probe's x0_mse_t<t>_<mode> errors."""
    import shutil

    from dalle2_jax.stages import get_stage_class

    workdir = str(tmp_path / "decoder")
    shutil.copytree(trained_decoder[0], workdir)
    before = json.load(open(os.path.join(workdir, "reports", "eval_4.json")))
    code, out, err = _run(capsys, "evaluate", "--workdir", workdir, "--sampling", "sampler=ddim",
                          "--sampling", "steps=1", "--sampling", "eta=1.0", "--max_examples", "8")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["sampling_overrides"] == {"eta": "1.0", "sampler": "ddim", "steps": "1"}
    assert result["num_examples"] == 8 and "clip_cosine" in result
    assert json.load(open(os.path.join(workdir, "reports", "eval_4_eta1.0_samplerddim_steps1.json"))) == result
    assert json.load(open(os.path.join(workdir, "reports", "eval_4.json"))) == before
    code, out, err = _run(capsys, "evaluate", "--workdir", workdir, "--raw_params", "--renoise_steps", "1,900",
                          "--max_examples", "8")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["params"] == "raw" and result["renoise_steps"] == [1, 900]
    assert os.path.exists(os.path.join(workdir, "reports", "eval_4_renoise1-900_raw.json"))
    assert json.load(open(os.path.join(workdir, "reports", "eval_4.json"))) == before
    for t in (1, 900):  # the checker's accuracies on the renoised real images
        for k in ("color_acc", "shape_acc", "shape_acc_small", "shape_acc_large"):
            v = result[f"renoise_t{t}_{k}"]
            assert np.isnan(v) or 0 <= v <= 1, (t, k, v)
    assert result["renoise_t1_color_acc"] >= 0.75  # the real images, barely noised, keep their colours
    # the conditioning probe: x0 MSE per conditioning; at t = 1 the prediction is the image itself
    for t in (1, 900):
        for m in get_stage_class("decoder").COND_PROBE_MODES:
            assert np.isfinite(result[f"x0_mse_t{t}_{m}"]) and result[f"x0_mse_t{t}_{m}"] >= 0, (t, m)
    assert result["x0_mse_t1_both"] < 1e-3 < result["x0_mse_t900_both"]
    for bad, message in [("0", "must be in (0, 1000)"), ("x", "integers")]:
        code, _, err = _run(capsys, "evaluate", "--workdir", workdir, "--renoise_steps", bad)
        assert code == 2 and message in err, (bad, err)
    for bad, message in [("steps", "KEY=VALUE"), ("nope=1", "not a key"), ("steps=many", "steps=many"),
                         ("clip_x0=maybe", "true or false")]:
        code, _, err = _run(capsys, "evaluate", "--workdir", workdir, "--sampling", bad)
        assert code == 2 and message in err, (bad, err)
