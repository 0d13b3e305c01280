"""Slow: the tiny-CLIP figure of README.md and docs/clip.md. Trains configs/clip.py:tiny with its own
defaults (about 20-25 minutes on 2 CPU cores) and checks the zero-shot goal:
>= 90% color and shape on the test split."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_tiny_clip_learns_color_and_shape(tmp_path):
    from configs.clip import get_config
    from dalle2_jax.evaluate import evaluate_workdir
    from dalle2_jax.training.trainer import train

    cfg = get_config("tiny")
    cfg.data.data_dir = str(tmp_path / "data")  # the default 32k/2k build, made here (15-30 s)
    train(cfg, str(tmp_path / "clip"))
    result = evaluate_workdir(str(tmp_path / "clip"))
    assert result["step"] == cfg.total_steps
    assert result["zero_shot_color_acc"] >= 0.9, result
    assert result["zero_shot_shape_acc"] >= 0.9, result
    assert result["heldout_color_acc"] >= 0.9, result
    assert result["heldout_shape_acc"] >= 0.8, result
