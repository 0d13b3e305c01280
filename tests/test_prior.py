"""The diffusion prior stage on a frozen tiny CLIP."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from conftest import copy_workdir, fixed_batch_losses, small_prior_config, steps_on_one_and_eight_devices


def test_prior_overfits_one_batch(shapes_data_dir, trained_clip, tmp_path):
    cfg = small_prior_config(shapes_data_dir, trained_clip, total_steps=150,
                             **{"optimizer.schedule": "constant", "optimizer.weight_decay": 0.0,
                                "optimizer.learning_rate": 2e-3, "optimizer.warmup_steps": 10,
                                "model.cond_drop_prob": 0.0})
    losses, metrics = fixed_batch_losses(cfg, str(tmp_path))
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) / 5, (losses[:3], losses[-3:])
    assert {"loss_q0", "loss_q1", "loss_q2", "loss_q3"} <= set(metrics)


def test_prior_train_and_evaluate(trained_prior, tmp_path):
    from dalle2_jax.evaluate import evaluate_workdir

    workdir, out = copy_workdir(trained_prior[0], tmp_path / "prior"), trained_prior[1]
    assert np.isfinite(out["train"]["loss"])
    stats = json.load(open(os.path.join(workdir, "stats", "image_embedding_stats.json")))
    assert stats["num_examples"] == 64 and len(stats["mean"]) == len(stats["std"]) == 128
    assert min(stats["std"]) > 0
    assert os.path.exists(os.path.join(workdir, "tokenizer", "tokenizer_meta.json"))
    result = evaluate_workdir(workdir)
    for key in ("prior_cosine", "text_baseline_cosine", "shuffled_baseline_cosine", "image_retrieval_r1",
                "heldout_prior_cosine"):
        assert key in result and np.isfinite(result[key]), key
        assert -1.0 <= result[key] <= 1.0
    assert result["num_examples"] == 32 and result["step"] == 4
    assert result["sampling_seconds_per_embedding"] > 0


def test_prior_sampling_is_seeded_and_picks_the_best_candidate(shapes_data_dir, trained_clip, tmp_path):
    from dalle2_jax.training.trainer import Run

    run = Run(small_prior_config(shapes_data_dir, trained_clip), str(tmp_path))
    stage = run.stage
    params = run.init_state().params
    frozen = stage.load_frozen()
    tokens = stage.tokenizer.encode_batch(["a red circle", "a small blue star"])
    txt, states, valid = jax.jit(stage.clip_text)(frozen, tokens)
    best = stage.make_sampler(num_candidates=4)
    a = np.asarray(best(params, txt, states, valid, jax.random.key(0)))
    b = np.asarray(best(params, txt, states, valid, jax.random.key(0)))
    c = np.asarray(best(params, txt, states, valid, jax.random.key(1)))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    # with 4 candidates the kept one's dot product with the text is at least that of a single draw's
    one = stage.make_sampler(num_candidates=1)
    singles = np.stack([np.asarray(one(params, txt, states, valid, jax.random.key(s))) for s in range(3)])
    assert np.all(np.sum(a * np.asarray(txt), 1) >= np.min(np.sum(singles * np.asarray(txt), -1), 0) - 1e-6)
    # the analytic (Analytic-DPM) sampler with Gamma measured on real pairs
    images = np.zeros((2, 64, 64, 3), np.uint8)
    images[0, 20:40, 20:40, 0] = 220
    img = jax.jit(stage.clip_image)(frozen, images)
    gamma = stage.make_gamma_estimator()(params, img, txt, states, valid, jax.random.key(0))
    assert gamma.shape == (stage.config.sampling.steps,) and np.all(np.isfinite(np.asarray(gamma)))
    ana = stage.make_sampler(sampler="analytic")(params, txt, states, valid, jax.random.key(0), gamma)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(ana), axis=1), 1.0, rtol=1e-5)


def test_prior_needs_a_clip_workdir(shapes_data_dir, tmp_path):
    from dalle2_jax.training.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match="config.clip_workdir: is empty"):
        validate_config(small_prior_config(shapes_data_dir, ""), num_devices=1)
    with pytest.raises(ConfigError, match="not a CLIP workdir"):
        validate_config(small_prior_config(shapes_data_dir, str(tmp_path)), num_devices=1)


@pytest.mark.slow  # the trainer's own 8-device test (test_trainer.py) covers sharding in the default suite
def test_prior_step_on_8_devices_equals_one(shapes_data_dir, trained_clip, tmp_path):
    out = steps_on_one_and_eight_devices("small_prior_config", (shapes_data_dir, trained_clip),
                                         dict(data=2, fsdp=4, tensor=1), str(tmp_path))
    np.testing.assert_allclose(out["eight"]["losses"], out["one"]["losses"], rtol=1e-5)
    np.testing.assert_allclose(out["eight"]["params"], out["one"]["params"], atol=2e-5)


def test_embed_tool_matches_in_step_embeddings_and_feeds_the_prior(shapes_data_dir, trained_clip, tmp_path):
    from array_record.python.array_record_module import ArrayRecordReader

    from dalle2_jax.data import pipeline
    from dalle2_jax.tools.embed import deserialize, embed_split
    from dalle2_jax.training.checkpoint import read_config
    from dalle2_jax.training.trainer import Run, train

    data_cfg = read_config(trained_clip).data
    out = str(tmp_path / "emb")
    summary = embed_split(trained_clip, out, "train", batch_size=32, data_cfg=data_cfg, max_examples=40)
    assert summary["records"] == 40
    reader = ArrayRecordReader(summary["file"])
    recs = [deserialize(reader.read([i])[0]) for i in range(40)]
    reader.close()
    assert [int(r["index"]) for r in recs] == list(range(40))

    run = Run(small_prior_config(shapes_data_dir, trained_clip), str(tmp_path / "w"))
    stage, frozen = run.stage, run.stage.clip_params()
    rows = pipeline.read_split(data_cfg, "train", [data_cfg.image_key, data_cfg.text_key], max_examples=40)
    images = np.stack([r[data_cfg.image_key] for r in rows])
    tokens = stage.tokenizer.encode_batch([r[data_cfg.text_key] for r in rows])
    img = np.asarray(jax.jit(stage.clip_image)(frozen, images))
    txt, states, _ = jax.jit(stage.clip_text)(frozen, tokens)
    np.testing.assert_allclose(np.stack([r["image_emb"] for r in recs]), img, atol=1e-5)
    np.testing.assert_allclose(np.stack([r["text_emb"] for r in recs]), np.asarray(txt), atol=1e-5)
    np.testing.assert_allclose(np.stack([r["token_states"] for r in recs]), np.asarray(states), atol=1e-4)
    np.testing.assert_array_equal(np.stack([r["tokens"] for r in recs]), tokens)

    # the prior trains from the files (no CLIP forward in the step)
    result = train(small_prior_config(shapes_data_dir, trained_clip, total_steps=2, **{"data.embeddings_dir": out}),
                   str(tmp_path / "w2"))
    assert np.isfinite(result["train"]["loss"])
