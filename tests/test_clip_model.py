"""CLIP model and contrastive loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle2_jax.stages.clip import contrastive_loss, identical_rows


def _np_log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def _np_loss(img, txt, scale, pos):
    logits = scale * img @ txt.T
    t = pos / pos.sum(1, keepdims=True)
    a = -(t * _np_log_softmax(logits)).sum(1).mean()
    tt = pos.T / pos.T.sum(1, keepdims=True)
    b = -(tt * _np_log_softmax(logits.T)).sum(1).mean()
    return 0.5 * (a + b)


@pytest.mark.parametrize("with_duplicates", [False, True])
def test_contrastive_loss_matches_numpy(with_duplicates):
    rng = np.random.default_rng(0)
    img = rng.normal(size=(6, 5))
    txt = rng.normal(size=(6, 5))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    tokens = np.arange(6)[:, None].repeat(3, 1)
    if with_duplicates:
        tokens[4] = tokens[1]  # items 1 and 4 have the same caption
    pos = np.all(tokens[:, None] == tokens[None], -1)
    assert pos.sum() == (8 if with_duplicates else 6)
    loss, metrics = contrastive_loss(jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32), 7.5,
                                     identical_rows(jnp.asarray(tokens)))
    np.testing.assert_allclose(float(loss), _np_loss(img, txt, 7.5, pos.astype(float)), rtol=1e-5)
    # accuracy: the argmax of each row is one of its positives
    logits = img @ txt.T
    expected = np.mean(pos[np.arange(6), logits.argmax(1)])
    np.testing.assert_allclose(float(metrics["i2t_acc"]), expected)


def test_clip_towers_shapes_and_pooling():
    from configs.clip import get_config
    from dalle2_jax.models.clip import build_clip

    cfg = get_config("tiny").model
    model = build_clip(cfg, eot_id=2)
    images = jnp.zeros((2, 64, 64, 3))
    tokens = jnp.array([[1, 10, 11, 2, 0, 0] + [0] * 14, [1, 10, 2, 0, 0, 0] + [0] * 14], jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), images, tokens)
    img, txt, scale = jax.jit(model.apply)(params, images, tokens)
    assert img.shape == (2, 128) and txt.shape == (2, 128)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(txt), axis=1), 1.0, rtol=1e-5)
    assert abs(float(scale) - 1 / 0.07) < 1e-3
    # Causal text tower pooled at EOT: tokens after EOT do not change the embedding.
    tokens2 = tokens.at[0, 5].set(33)
    _, txt2, _ = jax.jit(model.apply)(params, images, tokens2)
    np.testing.assert_allclose(np.asarray(txt2[0]), np.asarray(txt[0]), atol=1e-6)
    # ...but tokens before it do.
    tokens3 = tokens.at[0, 1].set(33)
    _, txt3, _ = jax.jit(model.apply)(params, images, tokens3)
    assert np.abs(np.asarray(txt3[0]) - np.asarray(txt[0])).max() > 1e-4


def test_logit_scale_is_clamped():
    from configs.clip import get_config
    from dalle2_jax.models.clip import build_clip

    model = build_clip(get_config("tiny").model, eot_id=2)
    images = jnp.zeros((1, 64, 64, 3))
    tokens = jnp.zeros((1, 20), jnp.int32).at[0, 1].set(2)
    params = jax.jit(model.init)(jax.random.key(0), images, tokens)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.full_like(x, 10.0) if "logit_scale" in jax.tree_util.keystr(p) else x, params)
    _, _, scale = jax.jit(model.apply)(params, images, tokens)
    np.testing.assert_allclose(float(scale), 100.0, rtol=1e-5)
