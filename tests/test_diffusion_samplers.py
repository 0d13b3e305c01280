"""Samplers against known distributions: exact Gaussian denoisers in closed form, and a small trained MLP."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dalle2_jax import diffusion as D

MU, SIGMA = 0.3, 0.5  # data ~ N(MU, SIGMA^2 I)
FULL = D.make_diffusion("cosine", 1000)


def gaussian_eps(x: jax.Array, t: jax.Array) -> jax.Array:
    """The exact E[eps | x_t] for data N(MU, SIGMA^2 I): sqrt(1-a) / (a SIGMA^2 + 1 - a) * (x_t - sqrt(a) MU)."""
    a = jnp.asarray(FULL.alphas_cumprod)[t].reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.sqrt(1 - a) / (a * SIGMA**2 + 1 - a) * (x - jnp.sqrt(a) * MU)


def gaussian_gamma(diff: D.Diffusion) -> np.ndarray:
    """Exact E ||eps_hat||^2 / d at each step of `diff` for the Gaussian data."""
    a = diff.alphas_cumprod_f64
    return (1 - a) / (a * SIGMA**2 + 1 - a)


def _data(n: int, d: int = 16, seed: int = 0) -> jax.Array:
    return jnp.asarray(MU + SIGMA * np.random.default_rng(seed).normal(size=(n, d)), jnp.float32)


def test_ddim_is_deterministic_and_inversion_reconstructs():
    x0 = _data(256)
    errors = {}
    for steps in (25, 100):
        r, _ = D.respace(FULL, steps)
        invert = jax.jit(lambda x, r=r: D.ddim_invert(r, gaussian_eps, x))
        sample = jax.jit(lambda x_T, key, r=r: D.sample_ddim(r, gaussian_eps, x_T.shape, key, x_T=x_T))
        x_T = invert(x0)
        rec = sample(x_T, jax.random.key(1))
        np.testing.assert_array_equal(rec, sample(x_T, jax.random.key(2)))  # eta = 0: the key is irrelevant
        errors[steps] = float(jnp.mean(jnp.abs(rec - x0)))
    assert abs(float(jnp.std(x_T)) - 1.0) < 0.05 and abs(float(jnp.mean(x_T))) < 0.05  # x_T ~ N(0, I)
    # first-order scheme: 4x the steps cuts the error about 4x
    assert errors[100] < 0.02 and errors[100] < 0.4 * errors[25], errors
    # with fixed-point refinement of each inversion step the round trip is exact to float32 precision
    r, _ = D.respace(FULL, 50, kind="ddim")
    x_T = jax.jit(lambda x: D.ddim_invert(r, gaussian_eps, x, fixed_point_iters=10))(x0)
    rec = jax.jit(lambda x_T: D.sample_ddim(r, gaussian_eps, x_T.shape, jax.random.key(0), x_T=x_T))(x_T)
    assert float(jnp.max(jnp.abs(rec - x0))) < 1e-4


def test_inversion_with_the_samplers_x0_clipping_is_exact():
    """A denoiser whose x0 estimates overshoot [-1, 1] (half the optimal eps): a clipped sampler is inverted
    only by an inversion that clips too."""
    x0 = jnp.asarray(np.random.default_rng(0).uniform(-0.9, 0.9, (64, 16)), jnp.float32)
    bad = lambda x, t: 0.5 * gaussian_eps(x, t)  # noqa: E731
    r, _ = D.respace(FULL, 50, kind="ddim")
    sample = jax.jit(lambda x_T: D.sample_ddim(r, bad, x_T.shape, jax.random.key(0), x_T=x_T, clip_x0=1.0))
    errors = {}
    for clip in (None, 1.0):
        x_T = jax.jit(lambda x, c=clip: D.ddim_invert(r, bad, x, fixed_point_iters=10, clip_x0=c))(x0)
        errors[clip] = float(jnp.max(jnp.abs(sample(x_T) - x0)))
    assert errors[1.0] < 1e-3 and errors[None] > 0.1, errors


def _assert_gaussian(x: jax.Array, std_tol: float, name: str):
    mean, std = float(jnp.mean(x)), float(jnp.std(x))
    assert abs(mean - MU) < 0.02, (name, mean)
    assert abs(std - SIGMA) < std_tol, (name, std)


def test_ddpm_and_ddim_sample_the_gaussian():
    shape = (2000, 16)
    key = jax.random.key(3)
    ddpm = jax.jit(lambda k: D.sample_ddpm(FULL, gaussian_eps, shape, k))(key)
    _assert_gaussian(ddpm, 0.015, "ddpm-1000")
    # DDIM with eta = 1 is DDPM with the small variance (same keys, same draws)
    ddim1 = jax.jit(lambda k: D.sample_ddim(FULL, gaussian_eps, shape, k, eta=1.0))(key)
    np.testing.assert_allclose(ddim1, ddpm, atol=1e-4)
    r, _ = D.respace(FULL, 100)
    _assert_gaussian(jax.jit(lambda k: D.sample_ddim(r, gaussian_eps, shape, k))(key), 0.03, "ddim-100")


def test_analytic_dpm_is_exact_for_gaussian_data_in_few_steps():
    """The reverse conditionals of Gaussian data are Gaussian with Analytic-DPM's variance: 10 steps suffice."""
    r, ts = D.respace(FULL, 10)
    shape = (2000, 16)
    key = jax.random.key(4)
    estimate = jax.jit(lambda x, k, estimator, floor: D.estimate_analytic_gamma(
        r, gaussian_eps, x, k, batch_size=1024, estimator=estimator, floor_by_data_variance=floor),
        static_argnums=(2, 3))
    data = _data(4096, seed=1)
    gamma = estimate(data, jax.random.key(5), "moment", True)
    np.testing.assert_allclose(gamma, gaussian_gamma(r), atol=0.03)
    np.testing.assert_allclose(estimate(data, jax.random.key(6), "mse", True), gaussian_gamma(r), atol=0.03)
    analytic = jax.jit(lambda k, g, var_max: D.sample_analytic(r, gaussian_eps, shape, k, gamma=g,
                                                               x0_var_max=var_max))
    _assert_gaussian(analytic(key, gaussian_gamma(r), np.inf), 0.01, "analytic exact gamma")
    x = jax.jit(lambda k: D.sample_analytic(r, gaussian_eps, shape, k, gamma=gaussian_gamma(r), eta=0.0))(key)
    _assert_gaussian(x, 0.01, "analytic-ddim exact gamma")
    _assert_gaussian(analytic(key, gamma, np.inf), 0.02, "analytic estimated gamma")
    # Without the data-variance floor, a Monte Carlo error of a few 1e-3 in the last step's gamma explodes it;
    # the x0_var_max bound (Theorem 2 of the paper, for data of known range) is the other guard.
    raw = estimate(data, jax.random.key(5), "moment", False)
    assert float(raw[-1]) < float(gaussian_gamma(r)[-1]) - 1e-3  # this draw under-estimates it
    assert float(jnp.std(analytic(key, raw, np.inf))) > 2.0
    _assert_gaussian(analytic(key, raw, SIGMA**2), 0.02, "analytic raw gamma with x0_var_max")
    # the fixed small variance under-disperses with so few steps, which is what Analytic-DPM corrects
    assert float(jnp.std(jax.jit(lambda k: D.sample_ddpm(r, gaussian_eps, shape, k))(key))) < SIGMA - 0.05
    sigma2, _, _ = D.analytic_variances(r, gaussian_gamma(r))
    assert np.all(np.asarray(sigma2)[1:] >= r.posterior_variance[1:] * (1 - 1e-5))
    assert np.all(np.asarray(sigma2)[1:] <= (r.betas / (1 - r.betas))[1:] * (1 + 1e-5))


# --------------------------------------------------------------------------------- a trained MLP on a 2-D mixture

CENTERS = np.array([[1.0, 0.5], [-1.0, 0.5], [0.0, -1.0]], np.float32)
WEIGHTS = np.array([0.5, 0.3, 0.2])
MODE_STD = 0.15


def _mixture(key: jax.Array, n: int) -> jax.Array:
    k1, k2 = jax.random.split(key)
    c = jax.random.choice(k1, 3, (n,), p=jnp.asarray(WEIGHTS))
    return jnp.asarray(CENTERS)[c] + MODE_STD * jax.random.normal(k2, (n, 2))


class _MLP(nn.Module):
    out: int

    @nn.compact
    def __call__(self, x, t):
        freqs = jnp.exp(-jnp.log(1000.0) * jnp.arange(16) / 16)
        a = t.astype(jnp.float32)[:, None] * freqs[None]
        h = jnp.concatenate([x, jnp.sin(a), jnp.cos(a)], -1)
        for _ in range(3):
            h = nn.silu(nn.Dense(128)(h))
        return nn.Dense(self.out)(h)


@pytest.fixture(scope="module")
def trained_mixture_model():
    """A v-predicting MLP with learned variance, trained 2000 Adam steps with the hybrid loss (a few seconds)."""
    diff = D.make_diffusion("cosine", 1000, model_output="v", learned_variance=True)
    model = _MLP(4)
    params = model.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,), jnp.int32))
    steps = 2000
    tx = optax.adam(optax.cosine_decay_schedule(2e-3, steps, 0.05))

    def loss_fn(p, key):
        k1, k2, k3 = jax.random.split(key, 3)
        x0 = _mixture(k1, 512)
        t = jax.random.randint(k2, (512,), 0, diff.num_steps)
        noise = jax.random.normal(k3, x0.shape)
        return jnp.mean(D.training_losses(diff, lambda x, tt: model.apply(p, x, tt), x0, t, noise)["loss"])

    @jax.jit
    def train(params, key):
        def body(carry, k):
            p, o = carry
            loss, g = jax.value_and_grad(loss_fn)(p, k)
            u, o = tx.update(g, o, p)
            return (optax.apply_updates(p, u), o), loss
        (params, _), losses = jax.lax.scan(body, (params, tx.init(params)), jax.random.split(key, steps))
        return params, losses

    params, losses = train(params, jax.random.key(1))
    assert float(jnp.mean(losses[-200:])) < 0.8 * float(jnp.mean(losses[:200]))
    return diff, model, params


def _assert_matches_mixture(x: jax.Array, name: str):
    x = np.asarray(x)
    data = np.asarray(_mixture(jax.random.key(9), 50_000))
    assert np.all(np.isfinite(x)), name
    np.testing.assert_allclose(x.mean(0), data.mean(0), atol=0.08, err_msg=f"{name} mean")
    np.testing.assert_allclose(np.cov(x.T), np.cov(data.T), atol=0.08, err_msg=f"{name} covariance")
    nearest = np.argmin(((x[:, None] - CENTERS[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_allclose(np.bincount(nearest, minlength=3) / len(x), WEIGHTS, atol=0.06, err_msg=name)
    residual = x - CENTERS[nearest]
    # within-mode spread (robust, so a few between-mode samples do not dominate): 1.4826 * MAD = std for a normal
    spread = 1.4826 * np.median(np.abs(residual - np.median(residual, 0)), axis=0)
    np.testing.assert_allclose(spread, MODE_STD, rtol=0.3, err_msg=f"{name} within-mode spread")


def test_trained_mlp_samples_the_mixture(trained_mixture_model):
    diff, model, params = trained_mixture_model
    r, _ = D.respace(diff, 50)
    shape = (4000, 2)

    def run(sampler, **kw):
        return jax.jit(lambda p, k: sampler(r, lambda x, t: model.apply(p, x, t), shape, k, **kw))(
            params, jax.random.key(3))

    _assert_matches_mixture(run(D.sample_ddpm), "ddpm learned variance")
    _assert_matches_mixture(run(D.sample_ddim), "ddim eta=0")
    gamma = jax.jit(lambda p, k: D.estimate_analytic_gamma(r, lambda x, t: model.apply(p, x, t),
                                                           _mixture(k, 4096), k))(params, jax.random.key(5))
    _assert_matches_mixture(run(D.sample_analytic, gamma=gamma), "analytic-dpm")


def test_repaint_schedule_and_known_region():
    is_down, index = D.repaint_schedule(10, resample=3, jump_length=2)
    # every jump point (0, 2, 4, 6) sends the chain 2 steps back up twice: 10 + 4 * 2 * 2 down moves
    assert int(is_down.sum()) == 10 + 4 * 2 * 2 and int((~is_down).sum()) == 4 * 2 * 2
    assert bool(is_down[-1]) and index[-1] == 0 and index[0] == 9
    level = 9  # the chain's level stays in [-1, 9] and each move changes it by one
    for d, i in zip(is_down, index):
        assert i == (level if d else level + 1)
        level += -1 if d else 1
    assert level == -1
    plain = D.repaint_schedule(7)
    assert plain[0].all() and list(plain[1]) == list(range(6, -1, -1))

    r, _ = D.respace(FULL, 20)
    known = _data(512)
    mask = jnp.zeros((512, 16)).at[:, :8].set(1.0)
    out = jax.jit(lambda k: D.sample_repaint(r, gaussian_eps, known, mask, k, resample=2, jump_length=3))(
        jax.random.key(0))
    np.testing.assert_array_equal(out[:, :8], known[:, :8])  # kept exactly
    assert float(jnp.mean(jnp.abs(out[:, 8:] - known[:, 8:]))) > 0.1  # regenerated
    _assert_gaussian(out[:, 8:], 0.15, "repaint")
