"""Diffusion math: schedules, posterior, conversions, losses, respacing, guidance, clipping, compiled loops."""

from __future__ import annotations

import math

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import io_callback
from scipy.special import ndtr

from dalle2_jax import diffusion as D


def _cos_f(t, s=0.008):
    return np.cos((t + s) / (1 + s) * math.pi / 2) ** 2


# ----------------------------------------------------------------------------------------------------- schedules

@pytest.mark.parametrize("num_steps", [1, 7, 100, 1000, 4000])
def test_cosine_schedule_closed_form(num_steps):
    d = D.make_diffusion("cosine", num_steps)
    t = np.arange(1, num_steps + 1, dtype=np.float64) / num_steps
    expected = _cos_f(t) / _cos_f(0.0)
    # Every beta but the last is below the 0.999 cap, so alphas_cumprod follows f(t)/f(0) there.
    np.testing.assert_allclose(d.alphas_cumprod[:-1], expected[:-1], rtol=2e-6, atol=1e-12)
    assert d.betas[-1] == np.float32(0.999)  # f(1) = 0: the last beta is the clipped one
    np.testing.assert_allclose(d.alphas_cumprod[-1], (expected[-2] if num_steps > 1 else 1.0) * 0.001, rtol=1e-5)
    assert np.all(d.betas > 0) and np.all(d.betas <= 0.999 + 1e-7)
    assert np.all(np.diff(d.alphas_cumprod) < 0)


@pytest.mark.parametrize("num_steps", [10, 100, 1000, 4000])
def test_linear_schedule_endpoints_and_scaling(num_steps):
    b = D.betas_for("linear", num_steps)
    scale = 1000 / num_steps
    expected = np.linspace(1e-4 * scale, 0.02 * scale, num_steps)
    assert b.shape == (num_steps,)
    np.testing.assert_allclose(b[0], 1e-4 * scale, rtol=1e-12)
    np.testing.assert_allclose(b, np.minimum(expected, 0.999), rtol=1e-12)
    if num_steps >= 21:
        np.testing.assert_allclose(b[-1], 0.02 * scale, rtol=1e-12)
    else:  # 20 / T > 1: the scaled end is capped like the cosine schedule
        assert b[-1] == 0.999
    assert np.all(np.diff(b) >= 0)
    d = D.make_diffusion("linear", num_steps)
    np.testing.assert_allclose(d.alphas_cumprod, np.cumprod(1 - b), rtol=1e-6)
    assert np.all(np.diff(d.alphas_cumprod) < 0)


@pytest.mark.parametrize("shift", [0.5, 2.0, 4.0])
def test_shifted_schedule_lowers_log_snr_by_2_log_shift(shift):
    """simple diffusion's shift: logSNR'(t) = logSNR(t) - 2 log s at every step (until the last step's 0.999
    cap), monotone, and shift 1 is the schedule itself."""
    base, d = D.make_diffusion("cosine", 1000), D.make_diffusion("cosine", 1000, shift=shift)
    log_snr = lambda a: np.log(a) - np.log1p(-a)  # noqa: E731
    np.testing.assert_allclose(log_snr(d.alphas_cumprod_f64[:-1]), log_snr(base.alphas_cumprod_f64[:-1])
                               - 2 * math.log(shift), atol=1e-6)
    assert np.all(np.diff(d.alphas_cumprod_f64) < 0) and np.all(d.betas > 0) and np.all(d.betas <= 0.999 + 1e-7)
    assert d.schedule == f"cosine@shift{shift:g}"
    np.testing.assert_array_equal(D.make_diffusion("cosine", 1000, shift=1.0).betas, base.betas)
    with pytest.raises(ValueError, match="shift"):
        D.betas_for("cosine", 10, shift=0.0)


def test_schedule_and_option_errors_name_the_value():
    with pytest.raises(ValueError, match="'quadratic'"):
        D.make_diffusion("quadratic", 10)
    with pytest.raises(ValueError, match="num_steps"):
        D.betas_for("cosine", 0)
    with pytest.raises(ValueError, match="model_output"):
        D.make_diffusion("cosine", 10, model_output="score")


def test_constants_are_readonly_float32_numpy():
    d = D.make_diffusion("cosine", 50)
    assert isinstance(d.betas, np.ndarray) and d.betas.dtype == np.float32
    assert d.alphas_cumprod_f64.dtype == np.float64
    with pytest.raises(ValueError):
        d.betas[0] = 0.5
    assert hash(d) == hash(d)  # usable as a static jit argument


# ----------------------------------------------------------------------------------------------------- posterior

@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_posterior_matches_bayes_rule_in_float64(schedule):
    """q(x_{t-1} | x_t, x0) from the product of q(x_t | x_{t-1}) and q(x_{t-1} | x0), computed in numpy float64."""
    T = 1000
    d = D.make_diffusion(schedule, T)
    betas = D.betas_for(schedule, T)
    alphas = 1 - betas
    abar = np.cumprod(alphas)
    rng = np.random.default_rng(0)
    t = np.array([0, 1, 2, 10, 500, 998, 999])
    x0 = rng.normal(size=(len(t), 3, 2))
    x_t = rng.normal(size=(len(t), 3, 2))
    mean, var, log_var = D.q_posterior(d, jnp.asarray(x0, jnp.float32), jnp.asarray(x_t, jnp.float32),
                                       jnp.asarray(t))
    for i, ti in enumerate(t):
        if ti == 0:
            exp_mean, exp_var, exp_log_var = x0[i], 0.0, None
        else:
            prec = alphas[ti] / betas[ti] + 1 / (1 - abar[ti - 1])
            exp_var = 1 / prec
            exp_mean = exp_var * (np.sqrt(alphas[ti]) / betas[ti] * x_t[i] + np.sqrt(abar[ti - 1]) / (1 - abar[ti - 1])
                                  * x0[i])
            exp_log_var = np.log(exp_var)
        np.testing.assert_allclose(np.asarray(mean[i]), exp_mean, rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(float(var[i].squeeze()), exp_var, rtol=2e-5, atol=1e-12)
        if exp_log_var is not None:
            np.testing.assert_allclose(float(log_var[i].squeeze()), exp_log_var, rtol=1e-5)
    # log-variance at t=0 is clipped to the value of t=1 (the variance there is 0)
    assert float(log_var[0].squeeze()) == pytest.approx(float(log_var[1].squeeze()))


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_x0_eps_v_conversions_round_trip(schedule):
    d = D.make_diffusion(schedule, 1000)
    k1, k2 = jax.random.split(jax.random.key(0))
    n = 512
    x0 = jax.random.normal(k1, (n, 4, 3))
    eps = jax.random.normal(k2, (n, 4, 3))
    t = jnp.concatenate([jnp.array([0, 1, 998, 999]), jnp.arange(n - 4) * 997 // (n - 4)])
    x_t = D.q_sample(d, x0, t, eps)
    np.testing.assert_allclose(x_t, np.sqrt(d.alphas_cumprod[t])[:, None, None] * x0
                               + np.sqrt(1 - d.alphas_cumprod[t])[:, None, None] * eps, atol=1e-5)
    # x0 from eps divides by sqrt(abar_T) (about 5e-5 for cosine): float32 error grows to ~1e-3 at t = T-1.
    atol = 3e-3 if schedule == "cosine" else 1e-4
    np.testing.assert_allclose(D.predict_x0_from_eps(d, x_t, t, eps), x0, atol=atol)
    np.testing.assert_allclose(D.predict_eps_from_x0(d, x_t, t, x0), eps, atol=1e-4)
    v = D.v_from_x0_eps(d, x0, t, eps)
    np.testing.assert_allclose(D.predict_x0_from_v(d, x_t, t, v), x0, atol=1e-5)
    np.testing.assert_allclose(D.predict_eps_from_v(d, x_t, t, v), eps, atol=1e-5)
    for kind, out in [("eps", eps), ("x0", x0), ("v", v)]:
        dk = D.make_diffusion(schedule, 1000, model_output=kind)
        got_x0, got_eps = D.model_output_to_x0_eps(dk, x_t, t, out)
        mid = (t > 0) & (t < 998)
        np.testing.assert_allclose(np.asarray(got_x0)[mid], np.asarray(x0)[mid], atol=2e-4)
        np.testing.assert_allclose(np.asarray(got_eps)[mid], np.asarray(eps)[mid], atol=2e-4)


# ----------------------------------------------------------------------------------------------------- losses

@pytest.mark.parametrize("model_output", ["eps", "x0", "v"])
def test_training_loss_targets(model_output):
    d = D.make_diffusion("cosine", 1000, model_output=model_output)
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    x0 = jax.random.normal(k1, (8, 5))
    noise = jax.random.normal(k2, (8, 5))
    t = jax.random.randint(k3, (8,), 0, 1000)
    target = {"eps": noise, "x0": x0, "v": D.v_from_x0_eps(d, x0, t, noise)}[model_output]
    exact = D.training_losses(d, lambda x_t, tt: target, x0, t, noise)
    np.testing.assert_allclose(exact["loss"], 0.0, atol=1e-12)
    zero = D.training_losses(d, lambda x_t, tt: jnp.zeros_like(x_t), x0, t, noise)
    np.testing.assert_allclose(zero["mse"], np.mean(np.asarray(target) ** 2, axis=1), rtol=1e-5)
    l1 = D.training_losses(d, lambda x_t, tt: jnp.zeros_like(x_t), x0, t, noise, loss_type="l1")
    np.testing.assert_allclose(l1["loss"], np.mean(np.abs(np.asarray(target)), axis=1), rtol=1e-5)
    assert "vb" not in zero
    with pytest.raises(ValueError, match="loss_type"):
        D.training_losses(d, lambda x_t, tt: x_t, x0, t, noise, loss_type="huber")
    with pytest.raises(ValueError, match="learned_variance"):
        D.training_losses(d, lambda x_t, tt: jnp.concatenate([x_t, x_t], -1), x0, t, noise)



@pytest.mark.parametrize("gamma,floor", [(1.0, 0.0), (5.0, 0.0), (5.0, 1.0)])
def test_min_snr_weighting_is_one_objective_across_targets(gamma, floor):
    """Min-SNR-gamma weighs each target so the loss is the same function of the implied x0 error: an eps (or
    v) prediction and the x0 prediction it implies give equal weighted losses, max(floor, min(SNR, g)) *
    |x0 - x0_hat|^2."""
    k1, k2, k3, k4 = jax.random.split(jax.random.key(3), 4)
    x0 = jax.random.normal(k1, (16, 6))
    noise = jax.random.normal(k2, (16, 6))
    t = jnp.concatenate([jnp.array([0, 1, 500, 999]), jax.random.randint(k3, (12,), 0, 1000)])
    guess = jax.random.normal(k4, (16, 6))  # an arbitrary model output
    d = {mo: D.make_diffusion("cosine", 1000, model_output=mo) for mo in ("eps", "x0", "v")}
    abar = np.asarray(d["eps"].alphas_cumprod_f64)[np.asarray(t)]
    snr = abar / (1 - abar)
    x_t = D.q_sample(d["eps"], x0, t, noise)
    x0_hat = {mo: D.model_output_to_x0_eps(d[mo], x_t, t, guess)[0] for mo in d}  # what each target implies
    losses = {}
    for mo in d:
        losses[mo] = D.training_losses(d[mo], lambda xt, tt: guess, x0, t, noise, min_snr_gamma=gamma,
                                       min_snr_floor=floor)
        err = np.mean((np.asarray(x0) - np.asarray(x0_hat[mo])) ** 2, axis=1)
        want = np.maximum(np.minimum(snr, gamma), floor) * err
        np.testing.assert_allclose(losses[mo]["loss"], want, rtol=2e-3, atol=1e-6)
        # the 'mse' metric stays the unweighted regression error
        unweighted = D.training_losses(d[mo], lambda xt, tt: guess, x0, t, noise)
        np.testing.assert_allclose(losses[mo]["mse"], unweighted["mse"], rtol=1e-6)
    # x0 weights are min(SNR, g) itself: below 1 at the noisiest step (or the floor), g at the cleanest
    w = np.asarray(D.min_snr_weight(d["x0"], t, gamma, floor))
    assert w[0] == pytest.approx(gamma)
    if floor:
        assert w[3] == pytest.approx(floor) and w[2] == pytest.approx(max(floor, min(snr[2], gamma)), rel=1e-5)
    else:
        assert w[3] < 1e-3
    # a gamma above every SNR leaves the eps loss unweighted
    big = D.training_losses(d["eps"], lambda xt, tt: guess, x0, t, noise, min_snr_gamma=1e12)
    np.testing.assert_allclose(big["loss"], big["mse"], rtol=1e-5)

def _np_vb_bits(d, x0, x_t, t, mean_out, v, discretized):
    """The hybrid-loss VLB term [B] in bits/dim, computed independently in numpy float64 (eps model)."""
    betas = D.betas_for(d.schedule, d.num_steps)
    abar = np.cumprod(1 - betas)
    out = []
    for i, ti in enumerate(t):
        ab, ab_prev = abar[ti], (abar[ti - 1] if ti > 0 else 1.0)
        x0_pred = (x_t[i] - np.sqrt(1 - ab) * mean_out[i]) / np.sqrt(ab)
        c1 = betas[ti] * np.sqrt(ab_prev) / (1 - ab)
        c2 = (1 - ab_prev) * np.sqrt(1 - betas[ti]) / (1 - ab)
        model_mean = c1 * x0_pred + c2 * x_t[i]
        true_mean = c1 * x0[i] + c2 * x_t[i]
        post_var = lambda s: betas[s] * (1 - (abar[s - 1] if s > 0 else 1.0)) / (1 - abar[s])
        min_log = np.log(post_var(ti) if ti > 0 else post_var(1))
        frac = (v[i] + 1) / 2
        lv = frac * np.log(betas[ti]) + (1 - frac) * min_log
        if ti == 0:
            if discretized:
                std = np.exp(0.5 * lv)
                hi = np.where(x0[i] > 0.999, np.inf, x0[i] + 1 / 255)
                lo = np.where(x0[i] < -0.999, -np.inf, x0[i] - 1 / 255)
                ll = np.log(np.maximum(ndtr((hi - model_mean) / std) - ndtr((lo - model_mean) / std), 1e-12))
            else:
                ll = -0.5 * (np.log(2 * np.pi) + lv + (x0[i] - model_mean) ** 2 / np.exp(lv))
            out.append(-ll.mean() / np.log(2))
        else:
            kl = 0.5 * (-1 + lv - min_log + np.exp(min_log - lv) + (true_mean - model_mean) ** 2 / np.exp(lv))
            out.append(kl.mean() / np.log(2))
    return np.array(out)


@pytest.mark.parametrize("discretized", [False, True])
def test_hybrid_vb_matches_numpy_reference(discretized):
    d = D.make_diffusion("cosine", 1000, learned_variance=True)
    rng = np.random.default_rng(2)
    t = np.array([0, 0, 0, 1, 5, 300, 999])
    x0 = np.clip(rng.normal(size=(7, 6)) * 0.6, -1, 1)
    x0[:, 0] = -1.0  # the edge bins of the discretised likelihood
    x0[:, 1] = 1.0
    noise = rng.normal(size=(7, 6))
    mean_out = noise + 0.05 * rng.normal(size=(7, 6))
    v = rng.uniform(-1, 1, size=(7, 6))
    out = jnp.asarray(np.concatenate([mean_out, v], -1), jnp.float32)
    terms = D.training_losses(d, lambda x_t, tt: out, jnp.asarray(x0, jnp.float32), jnp.asarray(t),
                              jnp.asarray(noise, jnp.float32), discretized=discretized)
    abar = np.cumprod(1 - D.betas_for("cosine", 1000))[t][:, None]
    x_t = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise
    expected = _np_vb_bits(d, x0, x_t, t, mean_out, v, discretized)
    np.testing.assert_allclose(terms["vb"], expected, rtol=2e-3, atol=2e-4)
    np.testing.assert_allclose(terms["loss"], terms["mse"] + terms["vb"] * d.num_steps / 1000, rtol=1e-6)


def test_hybrid_loss_gradients_split_between_halves():
    """The MSE trains only the mean half, the VLB only the variance half (stop-gradient on the mean)."""
    d = D.make_diffusion("cosine", 1000, learned_variance=True)
    rng = np.random.default_rng(3)
    x0, noise, out = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(16, 4), (16, 4), (16, 8)])
    t = jnp.asarray(rng.integers(0, 1000, 16))
    t = t.at[0].set(0)

    @jax.jit
    def grads(o):
        terms = lambda o: D.training_losses(d, lambda *_: o, x0, t, noise)
        return jax.jacrev(lambda o: jnp.stack([jnp.sum(terms(o)["mse"]), jnp.sum(terms(o)["vb"])]))(o)

    g_mse, g_vb = grads(out)
    assert np.all(np.asarray(g_mse[:, 4:]) == 0) and np.any(np.asarray(g_mse[:, :4]) != 0)
    assert np.all(np.asarray(g_vb[:, :4]) == 0) and np.any(np.asarray(g_vb[:, 4:]) != 0)


@pytest.mark.parametrize("model_output,discretized", [("eps", True), ("x0", False), ("v", True)])
def test_hybrid_loss_stays_finite_under_stress(model_output, discretized):
    """10k draws: t including 0 and T-1, outputs up to |1e4|, variance values far outside [-1, 1]."""
    d = D.make_diffusion("cosine", 1000, model_output=model_output, learned_variance=True)
    n = 10_000
    rng = np.random.default_rng(4)
    t = rng.integers(0, 1000, n)
    t[:500], t[500:1000] = 0, 999
    x0 = np.clip(rng.normal(size=(n, 6)), -1, 1)
    x0 = np.where(rng.uniform(size=(n, 6)) < 0.2, np.sign(x0), x0)  # data on the edge bins too
    noise = rng.normal(size=(n, 6))
    out = rng.normal(size=(n, 12)) * 10.0 ** rng.uniform(-3, 4, size=(n, 1))
    t, x0, noise, out = jnp.asarray(t), *(jnp.asarray(a, jnp.float32) for a in (x0, noise, out))

    def total(o):
        terms = D.training_losses(d, lambda *_: o, x0, t, noise, discretized=discretized)
        return jnp.sum(terms["loss"]), terms

    (loss, terms), grad = jax.jit(jax.value_and_grad(total, has_aux=True))(out)
    assert np.isfinite(float(loss))
    assert np.all(np.isfinite(np.asarray(grad)))
    assert np.all(np.isfinite(np.asarray(terms["vb"])))
    assert float(jnp.max(jnp.abs(out[:, 6:]))) > 1e3  # the stress really reached |v| >> 1
    kl = np.asarray(terms["vb"])[np.asarray(t) > 0]
    assert kl.min() >= -1e-4  # a KL is never negative


# ----------------------------------------------------------------------------------------------------- respacing

def test_respace_keeps_alphas_cumprod_and_maps_timesteps():
    d = D.make_diffusion("cosine", 1000, model_output="v", learned_variance=True)
    r, ts = D.respace(d, 25)
    np.testing.assert_array_equal(ts, D.karlo_timesteps(25, 1000))
    np.testing.assert_array_equal(ts, np.round(np.arange(25) * 999 / 24))
    assert ts[0] == 0 and ts[-1] == 999 and r.num_steps == 25 and r.original_num_steps == 1000
    np.testing.assert_allclose(r.alphas_cumprod, d.alphas_cumprod[ts], rtol=1e-6)
    acp64 = np.cumprod(1 - D.betas_for("cosine", 1000))[ts]
    np.testing.assert_allclose(r.betas, 1 - acp64 / np.append(1.0, acp64[:-1]), rtol=1e-6)
    assert r.model_output == "v" and r.learned_variance
    # ddim-style stride, explicit steps, and respacing a respaced chain composes the mappings
    _, ts_ddim = D.respace(d, 50, kind="ddim")
    np.testing.assert_array_equal(ts_ddim, np.arange(0, 1000, 20))
    r2, ts2 = D.respace(r, [0, 3, 24])
    np.testing.assert_array_equal(ts2, ts[[0, 3, 24]])
    np.testing.assert_allclose(r2.alphas_cumprod, d.alphas_cumprod[ts2], rtol=1e-6)
    full, ts_full = D.respace(d, 1000)
    np.testing.assert_allclose(full.betas, d.betas, rtol=1e-6)
    with pytest.raises(ValueError, match="1001"):
        D.respace(d, 1001)
    with pytest.raises(ValueError, match="kind"):
        D.respace(d, 10, kind="quad")


def _recording_denoiser(log: list):
    def record(t):
        log.append(np.asarray(t).copy())

    def denoise(x, t):
        io_callback(record, None, t, ordered=True)
        return 0.1 * x

    return denoise


def test_samplers_call_the_model_with_original_timesteps():
    d = D.make_diffusion("linear", 1000)
    r, ts = D.respace(d, 7)
    shape = (3, 2)
    runs = {
        "ddpm": lambda f: D.sample_ddpm(r, f, shape, jax.random.key(0)),
        "ddim": lambda f: D.sample_ddim(r, f, shape, jax.random.key(0), eta=0.5),
        "analytic": lambda f: D.sample_analytic(r, f, shape, jax.random.key(0), gamma=jnp.full((7,), 0.5)),
    }
    for name, run in runs.items():
        log = []
        jax.block_until_ready(jax.jit(lambda: run(_recording_denoiser(log)))())
        got = np.stack(log)
        assert got.shape == (7, 3), name
        np.testing.assert_array_equal(got, np.repeat(ts[::-1, None], 3, 1), err_msg=name)
    log = []
    jax.block_until_ready(D.ddim_invert(r, _recording_denoiser(log), jnp.ones(shape)))
    np.testing.assert_array_equal(np.stack(log)[:, 0], ts)
    log = []
    D.estimate_analytic_gamma(r, _recording_denoiser(log), jnp.ones(shape), jax.random.key(0))
    np.testing.assert_array_equal(np.stack(log)[:, 0], ts)
    log = []
    D.estimate_analytic_gamma(r, _recording_denoiser(log), [jnp.ones(shape), jnp.zeros(shape)], jax.random.key(0))
    np.testing.assert_array_equal(np.stack(log)[:, 0], np.concatenate([ts, ts]))  # one pass per batch
    log = []
    D.training_losses(r, _recording_denoiser(log), jnp.ones(shape), jnp.array([0, 3, 6]), jnp.zeros(shape))
    np.testing.assert_array_equal(log[0], ts[[0, 3, 6]])


def _count_scans(jaxpr) -> list:
    """Every scan equation of a jaxpr, at any depth outside another scan."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            found.append(eqn)
            continue
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                if isinstance(sub, jex.ClosedJaxpr):
                    found += _count_scans(sub.jaxpr)
                elif isinstance(sub, jex.Jaxpr):
                    found += _count_scans(sub)
    return found


def test_each_sampler_is_one_compiled_loop():
    """Tracing the denoiser once and compiling once per step count, whatever the number of steps."""
    base = D.make_diffusion("cosine", 1000, learned_variance=True)
    traces = {}

    def make_denoiser(name):
        def denoise(x, t):
            traces[name] = traces.get(name, 0) + 1
            return jnp.concatenate([0.1 * x, jnp.zeros_like(x)], -1)
        return denoise

    samplers = {
        "ddpm": lambda r, f, k: D.sample_ddpm(r, f, (2, 3), k),
        "ddim": lambda r, f, k: D.sample_ddim(r, f, (2, 3), k, eta=1.0, dynamic_threshold=0.9),
        "analytic": lambda r, f, k: D.sample_analytic(r, f, (2, 3), k, gamma=jnp.zeros((r.num_steps,))),
        "invert": lambda r, f, k: D.ddim_invert(r, f, jax.random.normal(k, (2, 3))),
    }
    for name, sampler in samplers.items():
        for steps in (10, 50):
            r, _ = D.respace(base, steps)
            key = f"{name}{steps}"
            fn = jax.jit(lambda k, r=r, f=make_denoiser(key): sampler(r, f, k))
            fn(jax.random.key(0))
            fn(jax.random.key(1))
            assert traces[key] == 1, (key, traces[key])
            assert fn._cache_size() == 1
            scans = _count_scans(jax.make_jaxpr(fn)(jax.random.key(0)).jaxpr)
            assert len(scans) == 1 and scans[0].params["length"] == steps, key


# ----------------------------------------------------------------------------------------------------- guidance

@pytest.mark.parametrize("learned_variance", [False, True])
def test_classifier_free_guidance(learned_variance):
    x = jnp.asarray(np.random.default_rng(5).normal(size=(4, 3, 2)), jnp.float32)
    # elementwise models, so a doubled batch computes bit-identical rows
    cond = lambda x, t: jnp.concatenate([jnp.tanh(1.3 * x) * (1 + t[:, None, None] / 1000)]
                                        + ([jnp.cos(x)] if learned_variance else []), -1)
    uncond = lambda x, t: jnp.concatenate([jnp.sin(x)] + ([0.5 * x] if learned_variance else []), -1)
    t = jnp.array([0, 10, 500, 999])
    c, u = cond(x, t), uncond(x, t)
    half = slice(0, 2)

    def check(out, scale):
        if learned_variance:
            np.testing.assert_array_equal(out[..., 2:], c[..., 2:])  # the variance half comes from cond
        if scale == 1:
            np.testing.assert_array_equal(out, c)
        elif scale == 0:
            np.testing.assert_array_equal(out[..., half], u[..., half])
        else:
            np.testing.assert_allclose(out[..., half], u[..., half] + scale * (c[..., half] - u[..., half]),
                                       rtol=1e-5, atol=1e-6)

    for scale in (0.0, 1.0, 4.0):
        check(D.cfg_denoiser(cond, uncond, scale, learned_variance=learned_variance)(x, t), scale)
        traced = jax.jit(lambda x, t, s: D.cfg_denoiser(cond, uncond, s, learned_variance=learned_variance)(x, t))
        check(traced(x, t, scale), scale)

        def masked(xx, tt, drop):
            assert xx.shape[0] == tt.shape[0] == drop.shape[0]
            return jnp.where(drop[:, None, None], uncond(xx, tt), cond(xx, tt))

        batched = D.cfg_denoiser_batched(masked, scale, learned_variance=learned_variance)
        check(batched(x, t), scale)
    # per-example scales [B]
    s = jnp.array([0.0, 1.0, 2.0, 3.0])
    out = D.cfg_denoiser(cond, uncond, s, learned_variance=learned_variance)(x, t)
    np.testing.assert_array_equal(out[0, ..., half], u[0, ..., half])
    np.testing.assert_array_equal(out[1], c[1])
    expected = u[..., half] + s[:, None, None] * (c[..., half] - u[..., half])
    np.testing.assert_allclose(out[2:, ..., half], expected[2:], rtol=1e-5, atol=1e-6)


def test_guidance_scale_one_skips_the_unconditional_call():
    calls = []
    cond = lambda x, t: (calls.append("c"), x)[1]
    uncond = lambda x, t: (calls.append("u"), -x)[1]
    D.cfg_denoiser(cond, uncond, 1.0)(jnp.ones((2, 3)), jnp.zeros((2,), jnp.int32))
    assert calls == ["c"]
    sizes = []
    D.cfg_denoiser_batched(lambda x, t, m: (sizes.append(x.shape[0]), x)[1], 1)(jnp.ones((2, 3)), jnp.zeros(2))
    D.cfg_denoiser_batched(lambda x, t, m: (sizes.append(x.shape[0]), x)[1], 3.0)(jnp.ones((2, 3)), jnp.zeros(2))
    assert sizes == [2, 4]


# ----------------------------------------------------------------------------------------------------- clipping

def test_dynamic_threshold_and_static_clip():
    x0 = jnp.stack([jnp.linspace(-0.5, 0.5, 100), jnp.linspace(-4.0, 4.0, 100)]).reshape(2, 10, 10)
    out = D.dynamic_threshold(x0, 0.9)
    np.testing.assert_allclose(out[0], x0[0])  # quantile below 1: s = 1, nothing changes
    s = np.quantile(np.abs(np.asarray(x0[1])).ravel(), 0.9)
    np.testing.assert_allclose(out[1], np.clip(np.asarray(x0[1]), -s, s) / s, rtol=1e-5)
    assert float(jnp.max(jnp.abs(out))) <= 1.0 + 1e-6
    np.testing.assert_allclose(D.dynamic_threshold(x0, 90.0), out)  # a percentage works too
    np.testing.assert_allclose(D.process_x0(x0, clip_x0=1.0), np.clip(x0, -1, 1))
    np.testing.assert_allclose(D.process_x0(x0, clip_x0=(-2.0, 0.5)), np.clip(x0, -2, 0.5))
    with pytest.raises(ValueError, match="clip_x0"):
        D.process_x0(x0, clip_x0=(1.0, -1.0))
    with pytest.raises(ValueError, match="percentile"):
        D.dynamic_threshold(x0, 0.0)


def test_timestep_sampling():
    """uniform covers [0, N) evenly; logit_normal (SD3) stays in range and puts more of the batch in the middle
    half (about 0.73 of it for N(0, 1), against uniform's 0.5), shifted by its mean; unknown kinds fail."""
    from dalle2_jax.diffusion import sample_timesteps

    key, n = jax.random.key(0), 1000
    u = np.asarray(sample_timesteps(key, 20000, n))
    ln = np.asarray(sample_timesteps(key, 20000, n, "logit_normal"))
    shifted = np.asarray(sample_timesteps(key, 20000, n, "logit_normal", mean=1.0))
    for t in (u, ln, shifted):
        assert t.dtype == np.int32 and t.min() >= 0 and t.max() <= n - 1
    middle = lambda t: np.mean((t >= 250) & (t < 750))  # noqa: E731
    assert abs(middle(u) - 0.5) < 0.02 and abs(np.mean(u) - 499.5) < 10
    assert abs(middle(ln) - 0.728) < 0.02 and abs(np.mean(ln) - 499.5) < 10
    assert np.mean(shifted) > 650
    with pytest.raises(ValueError, match="unknown timestep sampling"):
        sample_timesteps(key, 4, n, "beta")

    from configs.decoder import get_config
    from dalle2_jax.stages.base import validate_diffusion_keys
    from dalle2_jax.training.config import ConfigError

    cfg = get_config("shapes")
    validate_diffusion_keys(cfg, ("ddpm", "ddim"))
    for key_, bad in (("timestep_sampling", "beta"), ("logit_normal_std", 0.0), ("min_snr_floor", -1.0),
                      ("min_snr_floor", 6.0)):  # the floor must not exceed shapes' gamma of 5
        c = get_config("shapes")
        c.diffusion[key_] = bad
        with pytest.raises(ConfigError, match=f"config.diffusion.{key_}"):
            validate_diffusion_keys(c, ("ddpm", "ddim"))
