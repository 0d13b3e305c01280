"""The decoder stage on a frozen tiny CLIP: overfitting, train + evaluate, embeddings from files, 8 devices."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from conftest import copy_workdir, fixed_batch_losses, small_decoder_config, steps_on_one_and_eight_devices


@pytest.mark.slow
def test_decoder_overfits_one_batch(shapes_data_dir, trained_clip, tmp_path):
    cfg = small_decoder_config(shapes_data_dir, trained_clip, total_steps=80,
                               **{"optimizer.schedule": "constant", "optimizer.learning_rate": 3e-3,
                                  "optimizer.warmup_steps": 5, "model.dropout": 0.0, "seed": 1})
    losses, metrics = fixed_batch_losses(cfg, str(tmp_path))
    # the timestep and noise change every step, so compare window means
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10]), (losses[:3], losses[-3:])
    assert {"mse", "vb", "loss_q0", "loss_q3"} <= set(metrics)


def test_decoder_train_evaluate_and_sample(trained_decoder, tmp_path):
    from dalle2_jax.evaluate import evaluate_workdir

    workdir, out = copy_workdir(trained_decoder[0], tmp_path / "decoder"), trained_decoder[1]
    assert np.isfinite(out["train"]["loss"])
    result = evaluate_workdir(workdir)
    for key in ("clip_cosine", "shuffled_clip_cosine", "color_acc", "shape_acc", "real_color_acc"):
        assert key in result and np.isfinite(result[key]), key
    assert -1 <= result["clip_cosine"] <= 1 and 0 <= result["color_acc"] <= 1 and 0 <= result["shape_acc"] <= 1
    assert result["num_examples"] == 16 and result["step"] == 4
    (png,) = result["sample_files"]
    from PIL import Image

    grid = np.asarray(Image.open(png))
    assert grid.shape[0] > 2 * 64 and grid.shape[1] > 4 * 64  # 2 rows (real, sampled) x 4
    assert os.path.exists(os.path.join(workdir, "reports", "eval_4.json"))


def test_decoder_renoise_probe(trained_decoder):
    """make_renoiser: noised to t = 1 and sampled back, an image comes back nearly unchanged, and from
    t = 900 it does not; the conditioning probe's drops reach the model. (eval.renoise_steps in an evaluation:
    test_cli's evaluate test.)"""
    from dalle2_jax.data import pipeline
    from dalle2_jax.training.checkpoint import load_params, read_config
    from dalle2_jax.training.partitioning import make_mesh
    from dalle2_jax.stages import get_stage_class

    workdir = trained_decoder[0]
    cfg = read_config(workdir)
    stage = get_stage_class("decoder")(cfg, workdir)
    stage.setup_model()
    mesh = make_mesh(cfg)
    _, params, _ = load_params(workdir, mesh)
    d = cfg.data
    images = np.stack([r[d.image_key] for r in pipeline.read_split(d, d.eval_split, [d.image_key], 4)])
    tokens = stage.tokenizer.encode_batch(["a red circle"] * 4)
    emb = jax.jit(stage.conditioning_embedding)(stage.clip_params(), images)
    near = np.asarray(stage.make_renoiser(1)(params, emb, tokens, images, jax.random.key(0))).astype(int)
    far = np.asarray(stage.make_renoiser(900)(params, emb, tokens, images, jax.random.key(0))).astype(int)
    assert np.abs(near - images).mean() < 2.0 < np.abs(far - images).mean()
    with pytest.raises(ValueError, match="renoise timestep"):
        stage.make_renoiser(1000)
    probe = stage.make_conditioning_probe(900)
    err = np.asarray(probe(params, emb, tokens, images, jax.random.key(0)))
    assert err.shape == (4, len(stage.COND_PROBE_MODES))
    both, image, caption, none, _ = err.T
    # the drops reach the model (a 4-step model barely uses its conditions, so the differences are small)
    assert (both != none).any() and (both != caption).any() and (both != image).any()
    # an all-padding caption is what a dropped caption is: then `image` is `both` and `none` is `caption`
    pad = np.full_like(np.asarray(tokens), stage.pad_id)
    both, image, caption, none, _ = np.asarray(probe(params, emb, pad, images, jax.random.key(0))).T
    np.testing.assert_array_equal(both, image)
    np.testing.assert_array_equal(caption, none)
    with pytest.raises(ValueError, match="conditioning probe timestep"):
        stage.make_conditioning_probe(0)


@pytest.mark.slow
def test_decoder_sampling_is_seeded_and_guided(shapes_data_dir, trained_clip, tmp_path):
    from dalle2_jax.training.checkpoint import load_params
    from dalle2_jax.training.trainer import Run, train

    workdir = str(tmp_path / "decoder")
    cfg = small_decoder_config(shapes_data_dir, trained_clip)
    train(cfg, workdir)
    stage = Run(cfg, workdir).stage
    _, params, _ = load_params(workdir)
    emb = jax.random.normal(jax.random.key(0), (2, stage.embed_dim))
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    tokens = stage.tokenizer.encode_batch(["a red circle", "a blue star"])
    sample = stage.make_sampler()
    a = np.asarray(sample(params, emb, tokens, jax.random.key(1))).astype(int)
    np.testing.assert_array_equal(a, np.asarray(sample(params, emb, tokens, jax.random.key(1))))  # seeded
    assert a.shape == (2, 64, 64, 3)
    c = np.asarray(stage.make_sampler(guidance_scale=1.0)(params, emb, tokens, jax.random.key(1)))
    d = np.asarray(stage.make_sampler(sampler="ddim")(params, emb, tokens, jax.random.key(1)))
    assert np.abs(a - c).mean() > 0 and np.abs(a - d).mean() > 0


def test_decoder_trains_from_embedding_files(shapes_data_dir, trained_clip, tmp_path):
    """With data.embeddings_dir the pipeline joins each stored embedding with its image (by index)."""
    from dalle2_jax.tools.embed import embed_split
    from dalle2_jax.training.checkpoint import read_config
    from dalle2_jax.training.trainer import Run

    out = str(tmp_path / "emb")
    embed_split(trained_clip, out, "train", batch_size=32, data_cfg=read_config(trained_clip).data, max_examples=24)
    cfg = small_decoder_config(shapes_data_dir, trained_clip, total_steps=2, **{"data.embeddings_dir": out})
    run = Run(cfg, str(tmp_path / "w"))
    assert run.stage.load_frozen() is None
    batch = next(iter(run.stage.train_iterator(8, 0, 1)))
    assert batch["image"].shape == (8, 64, 64, 3) and batch["image_emb"].shape == (8, 128)
    in_step = np.asarray(jax.jit(run.stage.clip_image)(run.stage.clip_params(), batch["image"]))
    np.testing.assert_allclose(batch["image_emb"], in_step, atol=1e-5)  # the right image for each embedding
    # the loss reads the stored embedding (no CLIP params given)
    params = jax.eval_shape(run.stage.init_params, jax.random.key(0))
    loss, metrics = jax.eval_shape(run.stage.loss, params, batch, jax.random.key(0), None)
    assert loss.shape == () and "mse" in metrics


def test_decoder_config_errors(shapes_data_dir, trained_clip, tmp_path):
    from dalle2_jax.training.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match="config.clip_workdir: is empty"):
        validate_config(small_decoder_config(shapes_data_dir, ""), num_devices=1)
    with pytest.raises(ConfigError, match="config.model.attention_resolutions: 8 is not a feature-map size"):
        validate_config(small_decoder_config(shapes_data_dir, trained_clip,
                                             **{"model.attention_resolutions": (8,)}), num_devices=1)
    with pytest.raises(ConfigError, match="config.model.normalize_embedding"):
        validate_config(small_decoder_config(shapes_data_dir, trained_clip, **{
            "data.embeddings_dir": str(tmp_path), "model.normalize_embedding": False}), num_devices=1)
    with pytest.raises(ConfigError, match="config.model.image_drop_prob"):
        validate_config(small_decoder_config(shapes_data_dir, trained_clip, **{"model.image_drop_prob": 1.0}),
                        num_devices=1)
    with pytest.raises(ConfigError, match="config.sampling.sampler"):
        validate_config(small_decoder_config(shapes_data_dir, trained_clip, **{"sampling.sampler": "plms"}),
                        num_devices=1)
    with pytest.raises(ConfigError, match="config.eval.renoise_steps"):
        validate_config(small_decoder_config(shapes_data_dir, trained_clip, **{"eval.renoise_steps": (1000,)}),
                        num_devices=1)
    with pytest.raises(ConfigError, match="config.diffusion.schedule_shift"):
        validate_config(small_decoder_config(shapes_data_dir, trained_clip, **{"diffusion.schedule_shift": 0.0}),
                        num_devices=1)
    with pytest.raises(ConfigError, match="config.model.context_width: 48: must be 0"):
        validate_config(small_decoder_config(shapes_data_dir, trained_clip, **{"model.context_width": 48}),
                        num_devices=1)
    with pytest.raises(ConfigError, match="config.data.embeddings_dir: a decoder with model.clip_text_conditioning"):
        validate_config(small_decoder_config(shapes_data_dir, trained_clip, **{
            "model.clip_text_conditioning": True, "model.caption_depth": 0, "data.embeddings_dir": str(tmp_path)}),
            num_devices=1)


@pytest.mark.slow
def test_decoder_step_on_8_devices_equals_one(shapes_data_dir, trained_clip, tmp_path):
    out = steps_on_one_and_eight_devices("small_decoder_config", (shapes_data_dir, trained_clip),
                                         dict(data=2, fsdp=2, tensor=2), str(tmp_path))
    np.testing.assert_allclose(out["eight"]["losses"], out["one"]["losses"], rtol=1e-5)
    np.testing.assert_allclose(out["eight"]["params"], out["one"]["params"], atol=2e-5)
    assert max(out["eight"]["shard_counts"]) > 1  # params are spread over the mesh
