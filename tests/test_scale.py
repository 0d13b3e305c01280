"""Scale: the paper configs' sizes, gradient accumulation, bfloat16 optimizer moments, remat by name."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dalle2_jax.training.config import ConfigError, base_config, validate_mesh

# Our architectures' exact counts (`dalle2-jax params --config ...`) and the paper's stated sizes. docs/scale.md's
# "Paper-size configs" table explains each difference.
PAPER_COUNTS = {
    "clip:paper": ({"vision": 632_307_200, "text": 354_032_640}, {"vision": 632e6, "text": 340e6}),
    "prior:paper": ({"total": 1_225_562_112}, {"total": 1.0e9}),
    "decoder:paper": ({"total": 3_563_696_646}, {"total": 3.5e9}),
    "upsampler:paper_64to256": ({"total": 691_579_523}, {"total": 700e6}),
    "upsampler:paper_256to1024": ({"total": 267_146_691}, {"total": 300e6}),
}


def check_paper_count(variant: str, counts: dict) -> None:
    """Our exact count, and within tolerance of the paper's figure (the prior's "1B" is 1.2B with a 4x MLP;
    the 256->1024 upsampler's "300M" is 267M with the channel plan of appendix C)."""
    ours, paper = PAPER_COUNTS[variant]
    for key, want in ours.items():
        assert counts[key] == want, (key, counts[key])
        rel = abs(counts[key] - paper[key]) / paper[key]
        assert rel < (0.25 if variant == "prior:paper" else 0.12), (key, counts[key], paper[key])


@pytest.mark.parametrize("variant", ["clip:paper", "prior:paper"])
def test_paper_config_sizes_match_our_architecture_and_the_paper(variant):
    """Counted with jax.eval_shape through tools.params (the decoder's and the upsamplers' counts are checked
    in tests/test_unet.py, which builds those models abstractly anyway)."""
    from dalle2_jax.tools.params import count_params

    name, arg = variant.split(":")
    check_paper_count(variant, count_params(importlib.import_module(f"configs.{name}").get_config(arg)))


def _regression_loss(params, batch, rng, frozen):
    """A mean-over-examples loss with no randomness: 2-layer MLP regression."""
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    err = (h @ params["w2"] - batch["y"]) ** 2
    loss = jnp.mean(err)
    return loss, {"mse": loss, "max_err": jnp.mean(jnp.max(err, axis=-1))}


def _regression_problem(batch: int = 32):
    rng = np.random.default_rng(0)
    params = {"w1": rng.normal(size=(6, 16)).astype(np.float32), "b1": np.zeros(16, np.float32),
              "w2": rng.normal(size=(16, 3)).astype(np.float32)}
    data = {"x": rng.normal(size=(batch, 6)).astype(np.float32), "y": rng.normal(size=(batch, 3)).astype(np.float32)}
    return jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, data)


@pytest.mark.parametrize("accum", [2, 4, 8])
def test_accumulated_gradients_equal_full_batch_gradients(accum):
    from dalle2_jax.training.state import loss_and_grads

    params, batch = _regression_problem()
    key = jax.random.key(0)
    (loss1, m1), g1 = jax.jit(lambda p, b: loss_and_grads(_regression_loss, p, b, key, None, 1))(params, batch)
    (loss_k, mk), gk = jax.jit(lambda p, b: loss_and_grads(_regression_loss, p, b, key, None, accum))(params, batch)
    np.testing.assert_allclose(loss_k, loss1, rtol=1e-6)
    np.testing.assert_allclose(mk["mse"], m1["mse"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(gk), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
    # and it is not the trivial answer: a single microbatch's gradient differs
    (_, _), g_half = loss_and_grads(_regression_loss, params, jax.tree.map(lambda x: x[::accum], batch), key, None)
    assert not np.allclose(g_half["w1"], g1["w1"], atol=1e-3)


def test_microbatches_are_strided_so_no_device_sends_data():
    from dalle2_jax.training.state import split_microbatches

    x = jnp.arange(12)
    np.testing.assert_array_equal(split_microbatches({"x": x}, 3)["x"], [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]])
    with pytest.raises(ValueError, match="does not split into 5"):
        split_microbatches({"x": x}, 5)


def test_train_step_with_accumulation_matches_one_big_step():
    """Through make_train_step and the optimizer: the same new params (Adam + clipping + EMA)."""
    from dalle2_jax.training.state import init_train_state, make_optimizer, make_train_step

    params, batch = _regression_problem()
    states = []
    for accum in (1, 4):
        c = base_config()
        c.optimizer.grad_accum_steps = accum
        tx = make_optimizer(c)
        step = jax.jit(make_train_step(_regression_loss, tx, c))
        state = init_train_state(params, tx, use_ema=True)
        for _ in range(3):
            state, metrics = step(state, batch, None, jax.random.key(1))
        states.append((state, metrics))
    (s1, m1), (s4, m4) = states
    for a, b in zip(jax.tree.leaves(s4.params), jax.tree.leaves(s1.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)


def test_accumulation_must_divide_the_per_device_batch():
    c = base_config()
    c.stage = "clip"
    c.batch_size = 16
    c.optimizer.grad_accum_steps = 4
    with pytest.raises(ConfigError, match="grad_accum_steps.*multiple of 32"):
        validate_mesh(c, 8)
    c.batch_size = 32
    validate_mesh(c, 8)


def test_bfloat16_moments_halve_the_optimizer_state_and_track_float32():
    from dalle2_jax.training.state import make_optimizer

    params, batch = _regression_problem()
    grad = jax.grad(lambda p: _regression_loss(p, batch, None, None)[0])
    results = {}
    for dtype in ("float32", "bfloat16"):
        c = base_config()
        c.optimizer.moments_dtype = dtype
        c.optimizer.warmup_steps = 0
        tx = make_optimizer(c)
        opt_state = tx.init(params)
        p = params
        for _ in range(20):
            updates, opt_state = jax.jit(tx.update)(grad(p), opt_state, p)
            p = optax.apply_updates(p, updates)
        leaves = [x for x in jax.tree.leaves(opt_state) if x.ndim > 0]
        results[dtype] = (p, {str(x.dtype) for x in leaves}, sum(x.nbytes for x in leaves))
    (p32, d32, b32), (p16, d16, b16) = results["float32"], results["bfloat16"]
    assert d32 == {"float32"} and d16 == {"bfloat16"}
    assert b16 * 2 == b32
    for a, b in zip(jax.tree.leaves(p16), jax.tree.leaves(p32)):
        assert jnp.all(jnp.isfinite(a))
        np.testing.assert_allclose(a, b, atol=2e-3)  # 20 steps of lr <= 1e-3: bf16 moments stay close
        assert a.dtype == jnp.float32  # master params stay float32


@pytest.mark.slow  # 12 s of compiles, one per policy
def test_named_remat_policies_give_the_same_gradients():
    """Each policy recomputes a different set of activations; the gradients are the same as without remat,
    and the tagged names are what the save_* policies keep (a name that does not exist would save nothing)."""
    from dalle2_jax.models.transformer import REMAT_POLICIES, Transformer

    x = jax.random.normal(jax.random.key(0), (2, 6, 16))
    model = Transformer(depth=1, num_heads=2, causal=True, scan_layers=True)
    params = model.init(jax.random.key(1), x)
    jaxpr = str(jax.make_jaxpr(lambda p: model.apply(p, x))(params))
    for name in ("query_proj", "key_proj", "value_proj", "attention_out", "mlp_hidden"):
        assert f"name={name}" in jaxpr, name
    grads = {}
    for remat in ("none", "save_attention_out", "save_mlp_hidden"):
        assert remat in REMAT_POLICIES
        m = Transformer(depth=1, num_heads=2, causal=True, remat=remat, scan_layers=True)
        grads[remat] = jax.jit(jax.grad(lambda p: jnp.sum(m.apply(p, x) ** 2)))(params)
    for remat in ("save_attention_out", "save_mlp_hidden"):
        for a, b in zip(jax.tree.leaves(grads[remat]), jax.tree.leaves(grads["none"])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
