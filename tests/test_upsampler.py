"""The upsampler stage: crops and degradations in the pipeline, overfitting, full-size sampling, evaluation."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from conftest import copy_workdir, fixed_batch_losses, small_upsampler_config


def test_pipeline_crops_align_and_are_seeded(shapes_256_data_dir):
    from dalle2_jax.data import degradations as G
    from dalle2_jax.data.pipeline import upsampler_pipeline

    # No stored low-res image and no degradation: the low-res crop is the downsampled target.
    cfg = small_upsampler_config(shapes_256_data_dir, **{"data.low_res_key": ""})
    a = next(iter(upsampler_pipeline(cfg.data, "train", local_batch_size=4, seed=3, degradation="none")))
    b = next(iter(upsampler_pipeline(cfg.data, "train", local_batch_size=4, seed=3, degradation="none")))
    assert a["high"].shape == (4, 64, 64, 3) and a["low"].shape == (4, 16, 16, 3)
    assert a["high"].dtype == np.uint8 and a["low"].dtype == np.uint8
    np.testing.assert_array_equal(a["high"], b["high"])
    for hi, lo in zip(a["high"], a["low"]):
        # away from the crop border (where the full image's downsampling saw outside pixels)
        diff = np.abs(G.downsample(hi, 4).astype(int) - lo)[2:-2, 2:-2]
        assert diff.mean() < 3, diff.mean()

    # The stored 64x64 render with the paper's blur, deterministic per seed, differs across seeds.
    cfg = small_upsampler_config(shapes_256_data_dir)
    c = next(iter(upsampler_pipeline(cfg.data, "train", local_batch_size=4, seed=3, degradation="blur")))
    d = next(iter(upsampler_pipeline(cfg.data, "train", local_batch_size=4, seed=3, degradation="blur")))
    e = next(iter(upsampler_pipeline(cfg.data, "train", local_batch_size=4, seed=4, degradation="blur")))
    np.testing.assert_array_equal(c["low"], d["low"])
    assert not np.array_equal(c["high"], e["high"])
    bsr = [next(iter(upsampler_pipeline(cfg.data, "train", local_batch_size=4, seed=3, degradation="bsr")))["low"]
           for _ in range(2)]
    np.testing.assert_array_equal(bsr[0], bsr[1])


@pytest.mark.slow
def test_upsampler_overfits_one_batch(shapes_256_data_dir, tmp_path):
    cfg = small_upsampler_config(shapes_256_data_dir, total_steps=150,
                                 **{"optimizer.schedule": "constant", "optimizer.learning_rate": 3e-3,
                                    "optimizer.warmup_steps": 5, "data.crop_size": 32})
    losses, metrics = fixed_batch_losses(cfg, str(tmp_path))
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10]), (losses[:3], losses[-3:])


def test_upsampler_trained_on_crops_samples_full_size(trained_upsampler, tmp_path):
    from dalle2_jax.evaluate import evaluate_workdir
    from dalle2_jax.training.checkpoint import load_params, read_config
    from dalle2_jax.training.trainer import Run

    workdir = copy_workdir(trained_upsampler[0], tmp_path / "upsampler")
    cfg = read_config(workdir)
    result = evaluate_workdir(workdir)  # samples at the full 256x256 from 64x64 inputs
    for key in ("psnr", "psnr_bicubic", "ssim", "ssim_bicubic"):
        assert np.isfinite(result[key]), key
    assert result["psnr_bicubic"] > 20 and 0 < result["ssim_bicubic"] <= 1  # the baseline is sane
    assert result["num_examples"] == 2 and result["sample_files"]

    run = Run(cfg, workdir)
    _, params, _ = load_params(workdir)
    low = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    out = np.asarray(run.stage.make_sampler()(params, low, jax.random.key(0)))
    assert out.shape == (1, 256, 256, 3) and out.dtype == np.uint8


def test_upsampler_config_errors(shapes_256_data_dir):
    from dalle2_jax.training.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match="config.data.crop_size"):
        validate_config(small_upsampler_config(shapes_256_data_dir, **{"data.crop_size": 30}), num_devices=1)
    with pytest.raises(ConfigError, match="config.data.low_res_resolution"):
        validate_config(small_upsampler_config(shapes_256_data_dir, **{"data.low_res_resolution": 100}),
                        num_devices=1)
    with pytest.raises(ConfigError, match="config.model.degradation"):
        validate_config(small_upsampler_config(shapes_256_data_dir, **{"model.degradation": "jpeg"}), num_devices=1)
    with pytest.raises(ConfigError, match="config.sampling.noise_level"):
        validate_config(small_upsampler_config(shapes_256_data_dir, **{"model.max_noise_level": 50,
                                                                       "sampling.noise_level": 50}), num_devices=1)


def test_residual_upsampler_starts_at_bicubic(shapes_256_data_dir):
    """model.predict_residual: the UNet's x0 is bicubic(low) + its output, so an initialised model (zero output
    layer) samples exactly the bicubic upsampling (DDIM, x0 = bicubic at every step), and a trained one
    departs from it by what it learned. Without it, the same initialised model samples noise, not bicubic."""
    from dalle2_jax.data import degradations as G
    from dalle2_jax.stages import get_stage_class
    from dalle2_jax.stages.image_diffusion import to_model_space, to_uint8
    from dalle2_jax.training.config import ConfigError, validate_config

    cfg = small_upsampler_config(shapes_256_data_dir, **{"model.predict_residual": True,
                                                         "diffusion.model_output": "x0"})
    validate_config(cfg, num_devices=1)
    stage = get_stage_class("upsampler")(cfg, "")
    stage.setup_model()
    params = stage.init_params(jax.random.key(0))
    low = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    bicubic = np.asarray(to_uint8(jax.image.resize(to_model_space(low), (2, 64, 64, 3), "bicubic")))
    out = np.asarray(stage.make_sampler()(params, low, jax.random.key(1)))
    np.testing.assert_array_equal(out, bicubic)
    assert np.abs(out[0].astype(int) - G.upsample_bicubic(low[0], 4).astype(int)).mean() < 2  # the data's bicubic

    plain = small_upsampler_config(shapes_256_data_dir, **{"model.predict_residual": False})
    stage = get_stage_class("upsampler")(plain, "")
    stage.setup_model()
    out = np.asarray(stage.make_sampler()(stage.init_params(jax.random.key(0)), low, jax.random.key(1)))
    assert np.abs(out.astype(int) - bicubic).mean() > 20

    with pytest.raises(ConfigError, match="config.model.predict_residual"):
        validate_config(small_upsampler_config(shapes_256_data_dir, **{"model.predict_residual": True,
                                                                       "diffusion.model_output": "v"}),
                        num_devices=1)
