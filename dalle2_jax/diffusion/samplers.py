"""Samplers: DDPM ancestral, DDIM (and its deterministic inversion) and Analytic-DPM.

Each sampler is one `jax.lax.scan` over the steps of a (possibly respaced) `Diffusion`: no Python runs per step,
and `denoise_fn` is traced once whatever the step count. Call them under `jax.jit`, passing the model's params
as arguments of the jitted function (closing over large arrays makes XLA constant-fold them):

    sample = jax.jit(lambda params, key: sample_ddim(diff, partial(denoise, params), (16, 64, 64, 3), key))

`denoise_fn(x_t [B, ...], t [B] int32) -> model output` always receives the ORIGINAL timesteps
(`diff.timesteps[i]`), so a model trained on the full chain works on a respaced one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from dalle2_jax.diffusion.clipping import ClipRange, process_x0
from dalle2_jax.diffusion.gaussian import (
    FIXED_VARIANCES,
    extract,
    mean_flat,
    model_output_to_x0_eps,
    p_mean_variance,
    predict_eps_from_x0,
    q_sample,
    split_output,
)
from dalle2_jax.diffusion.schedules import Diffusion

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]
GAMMA_ESTIMATORS = ("moment", "mse")


def _initial_noise(shape: tuple[int, ...], key: jax.Array, x_T: jax.Array | None) -> jax.Array:
    if x_T is not None:
        if tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"x_T has shape {tuple(x_T.shape)} but the sampler was asked for {tuple(shape)}")
        return x_T.astype(jnp.float32)
    return jax.random.normal(key, shape, jnp.float32)


def _call(diff: Diffusion, denoise_fn: DenoiseFn, x: jax.Array, i: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Model output at step index i (scalar), called with the original timestep. Returns (t [B], output)."""
    t = jnp.full((x.shape[0],), i, jnp.int32)
    return t, denoise_fn(x, jnp.asarray(diff.timesteps)[t])


def _x0_eps(diff: Diffusion, x: jax.Array, t: jax.Array, out: jax.Array, clip_x0: ClipRange,
            dynamic_threshold: float | None) -> tuple[jax.Array, jax.Array]:
    """(x0, eps) from a model output; eps is recomputed from x0 when x0 was clipped."""
    mean_out, _ = split_output(diff, out, x.shape)
    x0, eps = model_output_to_x0_eps(diff, x, t, mean_out)
    if clip_x0 is not None or dynamic_threshold is not None:
        x0 = process_x0(x0, clip_x0, dynamic_threshold)
        eps = predict_eps_from_x0(diff, x, t, x0)
    return x0, eps


def _reverse_indices(diff: Diffusion) -> jax.Array:
    return jnp.arange(diff.num_steps - 1, -1, -1, dtype=jnp.int32)


def ddpm_step(diff: Diffusion, x: jax.Array, i: jax.Array | int, out: jax.Array, noise: jax.Array, *,
              variance: str = "small", clip_x0: ClipRange = None,
              dynamic_threshold: float | None = None) -> tuple[jax.Array, jax.Array]:
    """One DDPM ancestral step x_i -> x_{i-1} at step index i (scalar) of `diff` from the model output `out`
    (at the original timestep diff.timesteps[i]) and the given noise [B, ...]. Returns (x_{i-1}, the predicted
    x0 after clipping). Mean: the posterior mean at the clipped x0; std: exp(log_var / 2) from
    `p_mean_variance` (learned range or fixed `variance`), 0 at i = 0 (the noise is then unused).

    On `respace(make_diffusion("cosine", 1000, ...), n)` (karlo_timesteps) this is diffusers' UnCLIPScheduler.
    step with prev_timestep = the next kept timestep: both recompute beta = 1 - abar_t / abar_prev and clip x0
    before the posterior mean, and the clipped log-variances used here differ from its unclipped ones only at
    i = 0, where neither adds noise (checked against diffusers in tests/test_karlo_sampling.py).
    """
    t = jnp.full((x.shape[0],), i, jnp.int32)
    mean, log_var, x0 = p_mean_variance(diff, x, t, out, variance=variance, clip_x0=clip_x0,
                                        dynamic_threshold=dynamic_threshold)
    std = jnp.where(i > 0, jnp.exp(0.5 * log_var), 0.0)
    return mean + std * noise, x0


def sample_ddpm(diff: Diffusion, denoise_fn: DenoiseFn, shape: tuple[int, ...], key: jax.Array, *,
                variance: str = "small", clip_x0: ClipRange = None, dynamic_threshold: float | None = None,
                x_T: jax.Array | None = None, step_noise: jax.Array | None = None) -> jax.Array:
    """DDPM ancestral sampling (Ho et al. 2020) -> x0 [*shape] float32.

    The reverse variance is learned (Improved-DDPM range, from the output's second half) when
    `diff.learned_variance`, else fixed: ``small`` (posterior variance) or ``large`` (beta_t). No noise is added
    at the last step. clip_x0: None, c or (lo, hi); dynamic_threshold: a percentile (0.995 or 99.5).
    step_noise: [N, *shape], the noise of each step in the order they run (row j at step index N - 1 - j; the
    last row is unused), instead of draws from `key` (then `key` only draws x_T when x_T is not given).
    """
    if variance not in FIXED_VARIANCES:
        raise ValueError(f"unknown fixed variance {variance!r}; choose one of {FIXED_VARIANCES}")
    key_init, key_loop = jax.random.split(key)
    x = _initial_noise(shape, key_init, x_T)
    if step_noise is not None and tuple(step_noise.shape) != (diff.num_steps,) + tuple(shape):
        raise ValueError(f"step_noise has shape {tuple(step_noise.shape)}, want {(diff.num_steps,) + tuple(shape)}")

    def step(x, inp):
        i, k = inp
        _, out = _call(diff, denoise_fn, x, i)
        noise = jax.random.normal(k, x.shape, jnp.float32) if step_noise is None else k.astype(jnp.float32)
        return ddpm_step(diff, x, i, out, noise, variance=variance, clip_x0=clip_x0,
                         dynamic_threshold=dynamic_threshold)[0], None

    per_step = jax.random.split(key_loop, diff.num_steps) if step_noise is None else step_noise
    x, _ = jax.lax.scan(step, x, (_reverse_indices(diff), per_step))
    return x


def sample_ddim(diff: Diffusion, denoise_fn: DenoiseFn, shape: tuple[int, ...], key: jax.Array, *,
                eta: float = 0.0, clip_x0: ClipRange = None, dynamic_threshold: float | None = None,
                x_T: jax.Array | None = None) -> jax.Array:
    """DDIM sampling (Song et al. 2021) -> x0 [*shape] float32.

    sigma_i = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev); eta = 0 is deterministic given
    x_T, eta = 1 is DDPM with the small variance. A learned variance half of the output is ignored.
    """
    key_init, key_loop = jax.random.split(key)
    x = _initial_noise(shape, key_init, x_T)
    stochastic = not (isinstance(eta, (int, float)) and eta == 0)

    def step(x, inp):
        i, k = inp
        t, out = _call(diff, denoise_fn, x, i)
        x0, eps = _x0_eps(diff, x, t, out, clip_x0, dynamic_threshold)
        abar = extract(diff.alphas_cumprod, t, x.ndim)
        abar_prev = extract(diff.alphas_cumprod_prev, t, x.ndim)
        x_prev = jnp.sqrt(abar_prev) * x0
        if stochastic:
            sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
            x_prev = x_prev + jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma**2, 0.0)) * eps
            x_prev = x_prev + jnp.where(i > 0, sigma, 0.0) * jax.random.normal(k, x.shape, jnp.float32)
        else:
            x_prev = x_prev + jnp.sqrt(1.0 - abar_prev) * eps
        return x_prev, None

    x, _ = jax.lax.scan(step, x, (_reverse_indices(diff), jax.random.split(key_loop, diff.num_steps)))
    return x


def ddim_invert(diff: Diffusion, denoise_fn: DenoiseFn, x0: jax.Array, *, fixed_point_iters: int = 0,
                clip_x0: ClipRange = None, dynamic_threshold: float | None = None) -> jax.Array:
    """Deterministic DDIM encoding x0 [B, ...] -> x_T [B, ...] (the noise that eta=0 `sample_ddim` maps back).

    Step i moves x from noise level abar_prev[i] to abar[i]: x <- sqrt(abar / abar_prev) (x - sqrt(1 - abar_prev)
    eps) + sqrt(1 - abar) eps, the exact inverse of the sampling step if eps were the model's output at the NEW x.
    The plain inversion uses eps at (x_old, t_i), a first-order approximation; each of `fixed_point_iters` extra
    model calls per step re-evaluates eps at the current estimate of the new x, which converges to the exact
    inverse of the sampling step where the step is small. The first step starts from the data (abar_prev = 1).
    clip_x0 / dynamic_threshold: the same x0 processing as the sampler's (eps recomputed from the processed x0),
    so the fixed point inverts a clipped sampler too.
    """
    x = x0.astype(jnp.float32)

    def eps_at(x, t, i):
        _, out = _call(diff, denoise_fn, x, i)
        return _x0_eps(diff, x, t, out, clip_x0, dynamic_threshold)[1]

    def step(x, i):
        t = jnp.full((x.shape[0],), i, jnp.int32)
        abar = extract(diff.alphas_cumprod, t, x.ndim)
        abar_prev = extract(diff.alphas_cumprod_prev, t, x.ndim)
        move = lambda eps: (jnp.sqrt(abar / abar_prev) * (x - jnp.sqrt(1.0 - abar_prev) * eps)
                            + jnp.sqrt(1.0 - abar) * eps)
        x_new = move(eps_at(x, t, i))
        if fixed_point_iters:
            x_new = jax.lax.fori_loop(0, fixed_point_iters, lambda _, y: move(eps_at(y, t, i)), x_new)
        return x_new, None

    x, _ = jax.lax.scan(step, x, jnp.arange(diff.num_steps, dtype=jnp.int32))
    return x


def _gamma_one_batch(diff: Diffusion, denoise_fn: DenoiseFn, x0: jax.Array, key: jax.Array,
                     estimator: str) -> jax.Array:
    """Per-step Monte Carlo estimate [N] over one batch x0 [B, ...] (one scan over the steps)."""
    x0 = x0.astype(jnp.float32)

    def step(_, inp):
        i, k = inp
        t = jnp.full((x0.shape[0],), i, jnp.int32)
        noise = jax.random.normal(k, x0.shape, jnp.float32)
        x_t = q_sample(diff, x0, t, noise)
        mean_out, _ = split_output(diff, denoise_fn(x_t, jnp.asarray(diff.timesteps)[t]), x0.shape)
        _, eps = model_output_to_x0_eps(diff, x_t, t, mean_out)
        if estimator == "moment":
            value = jnp.mean(mean_flat(eps**2))
        else:
            value = 1.0 - jnp.mean(mean_flat((eps - noise) ** 2))
        return None, value

    steps = jnp.arange(diff.num_steps, dtype=jnp.int32)
    _, gamma = jax.lax.scan(step, None, (steps, jax.random.split(key, diff.num_steps)))
    return gamma


def _gamma_floor(diff: Diffusion, data_var: jax.Array) -> jax.Array:
    """Lower bound [N] of the exact Gamma: 1 - abar / (1 - abar) * Var(x0), as E[Var(x0 | x_t)] <= Var(x0)."""
    snr = jnp.asarray(diff.alphas_cumprod_f64 / (1.0 - diff.alphas_cumprod_f64), jnp.float32)
    return 1.0 - snr * data_var


def estimate_analytic_gamma(diff: Diffusion, denoise_fn: DenoiseFn, data: jax.Array | Iterable[jax.Array],
                            key: jax.Array, *, batch_size: int | None = None, estimator: str = "moment",
                            floor_by_data_variance: bool = True) -> jax.Array:
    """Monte Carlo estimate of Analytic-DPM's Gamma_i = E ||eps_theta(x_{t_i}, t_i)||^2 / d, one value per step [N].

    data: x0 [M, ...] (cut into batches of `batch_size`, all in one traced computation, so this can be jitted) or
    an iterable of batches [B, ...] (one scan per batch, averaged). Each example gets fresh noise at every step.
    estimator: ``moment`` (Bao et al. 2022, the definition above) or ``mse``, 1 - E ||eps - eps_theta||^2 / d,
    which is equal for the optimal model, has far lower Monte Carlo variance near t = T, and gives the optimal
    variance for the model's own (imperfect) mean (Bao et al. 2022b).
    floor_by_data_variance: clip the estimate from below at its exact lower bound 1 - abar/(1 - abar) * v, with v
    the data's per-dimension variance averaged over dimensions (E[Var(x0 | x_t)] <= Var(x0)). Near t = T the
    bound is within ~1e-8 of 1, and without it a Monte Carlo error of 1e-3 there would multiply the last step's
    variance by orders of magnitude.
    """
    if estimator not in GAMMA_ESTIMATORS:
        raise ValueError(f"unknown gamma estimator {estimator!r}; choose one of {GAMMA_ESTIMATORS}")
    if isinstance(data, (jax.Array, np.ndarray)):
        x0 = jnp.asarray(data, jnp.float32)
        m = x0.shape[0]
        bs = m if batch_size is None else int(batch_size)
        if bs < 1 or m % bs:
            raise ValueError(f"batch_size {batch_size} must divide the number of examples {m}")
        batches = x0.reshape((m // bs, bs) + x0.shape[1:])
        keys = jax.random.split(key, m // bs)
        gammas = jax.lax.map(lambda a: _gamma_one_batch(diff, denoise_fn, a[0], a[1], estimator), (batches, keys))
        gamma = jnp.mean(gammas, axis=0)
        data_var = jnp.mean(jnp.var(x0, axis=0))
    else:
        total, count, s1, s2, n = None, 0, 0.0, 0.0, 0
        for batch in data:
            batch = jnp.asarray(batch, jnp.float32)
            key, sub = jax.random.split(key)
            g = _gamma_one_batch(diff, denoise_fn, batch, sub, estimator)
            total = g if total is None else total + g
            count += 1
            s1, s2, n = s1 + jnp.sum(batch, axis=0), s2 + jnp.sum(batch**2, axis=0), n + batch.shape[0]
        if count == 0:
            raise ValueError("estimate_analytic_gamma got no data batches")
        gamma = total / count
        data_var = jnp.mean(s2 / n - (s1 / n) ** 2)
    if floor_by_data_variance:
        gamma = jnp.maximum(gamma, _gamma_floor(diff, data_var))
    return gamma


def analytic_variances(diff: Diffusion, gamma: jax.Array, *, eta: float = 1.0,
                       x0_var_max: float | jax.Array | None = None) -> tuple[jax.Array, np.ndarray, np.ndarray]:
    """Analytic-DPM's optimal reverse variance per step (Bao et al. 2022, Theorem 1, with Theorem 2's bounds).

    With lambda_i^2 = eta^2 * posterior_variance_i and the x0 coefficient c_i of the lambda-family mean,
    sigma_i^2 = lambda_i^2 + c_i^2 * Var_i, where Var_i = (1 - abar_i) / abar_i * (1 - Gamma_i) estimates the mean
    per-dimension variance of x0 given x_{t_i}, clipped to [0, (1 - abar_i) / abar_i] (the bounds of Theorem 2,
    i.e. (1 - Gamma) in [0, 1]) and to x0_var_max when given (the paper's ((b - a) / 2)^2 for data in [a, b]; or
    the data's per-dimension variance, an upper bound of the mean posterior variance).
    Returns (sigma^2 [N] float32, coefficient of x0 [N], coefficient of eps_hat [N]) for
    mean = c_x0 * x0 + c_eps * eps_hat.
    """
    gamma = jnp.asarray(gamma, jnp.float32)
    if gamma.shape != (diff.num_steps,):
        raise ValueError(f"gamma must have shape ({diff.num_steps},) (one value per step), got {gamma.shape}")
    abar = diff.alphas_cumprod_f64
    abar_prev = np.append(1.0, abar[:-1])
    post_var = (1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev)
    lam2 = float(eta) ** 2 * post_var
    c_eps = np.sqrt(np.maximum(1.0 - abar_prev - lam2, 0.0))
    c_x0_total = np.sqrt(abar_prev) - c_eps * np.sqrt(abar / (1.0 - abar))  # coefficient of x0 at fixed x_t
    snr_inv = jnp.asarray((1.0 - abar) / abar, jnp.float32)
    var_max = snr_inv if x0_var_max is None else jnp.minimum(snr_inv, jnp.asarray(x0_var_max, jnp.float32))
    var_x0 = jnp.clip(snr_inv * (1.0 - gamma), 0.0, var_max)
    sigma2 = jnp.asarray(lam2, jnp.float32) + jnp.asarray(c_x0_total**2, jnp.float32) * var_x0
    return sigma2, np.sqrt(abar_prev).astype(np.float32), c_eps.astype(np.float32)


def sample_analytic(diff: Diffusion, denoise_fn: DenoiseFn, shape: tuple[int, ...], key: jax.Array, *,
                    gamma: jax.Array, eta: float = 1.0, x0_var_max: float | jax.Array | None = None,
                    clip_x0: ClipRange = None, dynamic_threshold: float | None = None,
                    x_T: jax.Array | None = None) -> jax.Array:
    """Analytic-DPM sampling (Bao et al. 2022) -> x0 [*shape] float32.

    gamma [N]: from `estimate_analytic_gamma` on the same (respaced) diffusion. eta = 1 is Analytic-DDPM, eta = 0
    Analytic-DDIM (the mean of the DDIM family, plus the optimal variance). Mean: sqrt(abar_prev) x0 +
    sqrt(1 - abar_prev - lambda^2) eps_hat with eps_hat recomputed from the (clipped) x0; variance from
    `analytic_variances`. No noise at the last step. For data of unknown range, passing x0_var_max (e.g. the data's
    per-dimension variance) guards the steps near T against a noisy gamma estimate.
    """
    sigma2, c_x0, c_eps = analytic_variances(diff, gamma, eta=eta, x0_var_max=x0_var_max)
    key_init, key_loop = jax.random.split(key)
    x = _initial_noise(shape, key_init, x_T)

    def step(x, inp):
        i, k = inp
        t, out = _call(diff, denoise_fn, x, i)
        x0, eps = _x0_eps(diff, x, t, out, clip_x0, dynamic_threshold)
        mean = extract(c_x0, t, x.ndim) * x0 + extract(c_eps, t, x.ndim) * eps
        std = jnp.where(i > 0, jnp.sqrt(sigma2[i]), 0.0)
        return mean + std * jax.random.normal(k, x.shape, jnp.float32), None

    x, _ = jax.lax.scan(step, x, (_reverse_indices(diff), jax.random.split(key_loop, diff.num_steps)))
    return x


def repaint_schedule(num_steps: int, resample: int = 1, jump_length: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """RePaint's time travel (Lugmayr et al. 2022) as a list of moves over step indices.

    Returns (is_down [K] bool, index [K] int32): a down move at index i denoises x_i -> x_{i-1} (i = 0 gives
    x0) with the model at step i; an up move at index i re-noises x_{i-1} -> x_i with the forward process.
    Every `jump_length` steps on the way down, the chain jumps `jump_length` steps back up and comes down
    again, `resample - 1` times, so the known and generated regions harmonise. resample = 1 is plain
    sampling (num_steps down moves).
    """
    if resample < 1 or jump_length < 1:
        raise ValueError(f"resample ({resample}) and jump_length ({jump_length}) must be >= 1")
    jumps = {j: resample - 1 for j in range(0, num_steps - jump_length, jump_length)}
    is_down, index = [], []
    level = num_steps - 1  # the chain holds x_level; it starts at pure noise
    while level >= 0:
        is_down.append(True)
        index.append(level)
        level -= 1
        if jumps.get(level + 1, 0) > 0:
            jumps[level + 1] -= 1
            for _ in range(jump_length):
                level += 1
                is_down.append(False)
                index.append(level)
    return np.asarray(is_down, bool), np.asarray(index, np.int32)


def sample_repaint(diff: Diffusion, denoise_fn: DenoiseFn, known_x0: jax.Array, known_mask: jax.Array,
                   key: jax.Array, *, resample: int = 1, jump_length: int = 1, variance: str = "small",
                   clip_x0: ClipRange = None, x_T: jax.Array | None = None) -> jax.Array:
    """RePaint inpainting (Lugmayr et al. 2022) over the DDPM reverse process -> x0 [B, ...] float32.

    known_x0 [B, ...]: the image whose known region is kept; known_mask [B, ...] (broadcastable, 1 = keep the
    known value, 0 = generate). After every down move the known region is replaced by the forward-noised known
    image at the new noise level (the known image itself at the end), so the returned x0 equals known_x0
    exactly where the mask is 1. The reverse variance is learned when `diff.learned_variance`, else `variance`.
    One `lax.scan` over `repaint_schedule(...)` moves; up moves call no model.
    """
    is_down, index = repaint_schedule(diff.num_steps, resample, jump_length)
    known_x0 = known_x0.astype(jnp.float32)
    mask = jnp.broadcast_to(jnp.asarray(known_mask, jnp.float32), known_x0.shape)
    key_init, key_loop = jax.random.split(key)
    x = _initial_noise(known_x0.shape, key_init, x_T)
    abar_prev_all = jnp.asarray(diff.alphas_cumprod_prev, jnp.float32)
    abar_all = jnp.asarray(diff.alphas_cumprod, jnp.float32)

    def down(x, i, k):
        k_step, k_known = jax.random.split(k)
        t, out = _call(diff, denoise_fn, x, i)
        mean, log_var, _ = p_mean_variance(diff, x, t, out, variance=variance, clip_x0=clip_x0)
        std = jnp.where(i > 0, jnp.exp(0.5 * log_var), 0.0)
        x_new = mean + std * jax.random.normal(k_step, x.shape, jnp.float32)
        # the known image at the new level (abar_prev[i]; 1 at i = 0, i.e. the known image itself)
        abar = abar_prev_all[i]
        known = jnp.sqrt(abar) * known_x0 + jnp.sqrt(1.0 - abar) * jax.random.normal(k_known, x.shape, jnp.float32)
        return mask * known + (1.0 - mask) * x_new

    def up(x, i, k):
        ratio = abar_all[i] / abar_prev_all[i]  # x_{i-1} -> x_i
        return jnp.sqrt(ratio) * x + jnp.sqrt(1.0 - ratio) * jax.random.normal(k, x.shape, jnp.float32)

    def step(x, inp):
        d, i, k = inp
        return jax.lax.cond(d, down, up, x, i, k), None

    keys = jax.random.split(key_loop, len(index))
    x, _ = jax.lax.scan(step, x, (jnp.asarray(is_down), jnp.asarray(index), keys))
    return x
