"""Forward process, conversions between model outputs, posterior, reverse-step moments and training losses.

Arrays are [B, ...] of any trailing shape; `t` is an int [B] of indices into the (possibly respaced) `Diffusion`.
All math runs in float32 whatever the model's compute dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr

from dalle2_jax.diffusion.clipping import ClipRange, process_x0
from dalle2_jax.diffusion.schedules import Diffusion

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]

# The model's log-std may differ from the true posterior's by at most this much inside the loss (a variance
# ratio of e^20). Legitimate learned-range variances stay within log(beta / posterior_variance) < 11 of it even
# for a 2-step chain, so the clamp only acts on runaway outputs, where it keeps the KL and its gradient finite.
MAX_LOG_STD_DIFF = 10.0
LOSS_TYPES = ("mse", "l1")


def min_snr_weight(diff: Diffusion, t: jax.Array, gamma: float, floor: float = 0.0) -> jax.Array:
    """Min-SNR-gamma loss weights [B] (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
    Strategy") for `diff.model_output`'s regression: the x0-space weight min(SNR_t, gamma), expressed for the
    target the model regresses (x0: w; eps: w / SNR; v: w / (SNR + 1)). It caps the weight of the nearly clean
    steps, which dominate an eps loss and teach little about layout. `floor` > 0 also bounds the x0-space
    weight from below, max(floor, min(SNR, gamma)): plain Min-SNR leaves the noisiest steps, where the number,
    place and size of the objects are decided, with the x0 weight SNR (under 0.06 above t = 0.85 T on the
    cosine schedule), as an eps loss does; a floor of 1 gives them the weight of an unweighted x0 loss."""
    acp = np.asarray(diff.alphas_cumprod_f64, np.float64)
    snr = acp / (1.0 - acp)
    w = np.maximum(np.minimum(snr, gamma), floor)
    if diff.model_output == "eps":
        w = w / snr
    elif diff.model_output == "v":
        w = w / (snr + 1.0)
    return jnp.asarray(w.astype(np.float32))[t]


TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


def sample_timesteps(key: jax.Array, batch: int, num_steps: int, kind: str = "uniform", mean: float = 0.0,
                     std: float = 1.0) -> jax.Array:
    """Training timesteps int [batch] in [0, num_steps): `uniform`, or `logit_normal` (Esser et al. 2024,
    "Scaling Rectified Flow Transformers", SD3): t / num_steps = sigmoid(u), u ~ N(mean, std^2), which puts
    more of the batch at the middle noise levels (mean 0) than at the nearly clean and nearly pure-noise ends.
    The loss is not reweighted, so the middle steps also count more in the objective."""
    if kind == "uniform":
        return jax.random.randint(key, (batch,), 0, num_steps)
    if kind == "logit_normal":
        u = jax.nn.sigmoid(mean + std * jax.random.normal(key, (batch,), jnp.float32))
        return jnp.clip(jnp.floor(u * num_steps).astype(jnp.int32), 0, num_steps - 1)
    raise ValueError(f"unknown timestep sampling {kind!r}; use one of {TIMESTEP_SAMPLINGS}")


FIXED_VARIANCES = ("small", "large")
_LOG_PROB_FLOOR = math.log(1e-12)
_MAX_Z = 1e4


def extract(const: np.ndarray, t: jax.Array, ndim: int) -> jax.Array:
    """const[t] for a numpy constant [N] and int t [B] (or scalar), reshaped to [B, 1, ..., 1] of rank `ndim`."""
    v = jnp.asarray(const, jnp.float32)[t]
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def mean_flat(x: jax.Array) -> jax.Array:
    """Mean over every axis but the first: [B, ...] -> [B]."""
    return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def q_sample(diff: Diffusion, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise. x0, noise [B, ...], t [B] -> [B, ...] float32."""
    x0 = x0.astype(jnp.float32)
    return (extract(diff.sqrt_alphas_cumprod, t, x0.ndim) * x0
            + extract(diff.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise.astype(jnp.float32))


def predict_x0_from_eps(diff: Diffusion, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """x0 = x_t / sqrt(abar_t) - sqrt(1 / abar_t - 1) eps. [B, ...] -> [B, ...]."""
    return (extract(diff.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
            - extract(diff.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)


def predict_eps_from_x0(diff: Diffusion, x_t: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
    """eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t). [B, ...] -> [B, ...]."""
    return ((x_t - extract(diff.sqrt_alphas_cumprod, t, x_t.ndim) * x0)
            / extract(diff.sqrt_one_minus_alphas_cumprod, t, x_t.ndim))


def predict_x0_from_v(diff: Diffusion, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v (Salimans & Ho). [B, ...] -> [B, ...]."""
    return (extract(diff.sqrt_alphas_cumprod, t, x_t.ndim) * x_t
            - extract(diff.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * v)


def predict_eps_from_v(diff: Diffusion, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v. [B, ...] -> [B, ...]."""
    return (extract(diff.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * x_t
            + extract(diff.sqrt_alphas_cumprod, t, x_t.ndim) * v)


def v_from_x0_eps(diff: Diffusion, x0: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0. [B, ...] -> [B, ...]."""
    return (extract(diff.sqrt_alphas_cumprod, t, x0.ndim) * eps
            - extract(diff.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)


def model_output_to_x0_eps(diff: Diffusion, x_t: jax.Array, t: jax.Array,
                           out: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x0, eps) [B, ...] implied by the mean part `out` [B, ...] of a model predicting `diff.model_output`."""
    out = out.astype(jnp.float32)
    if diff.model_output == "eps":
        return predict_x0_from_eps(diff, x_t, t, out), out
    if diff.model_output == "x0":
        return out, predict_eps_from_x0(diff, x_t, t, out)
    if diff.model_output == "v":
        return predict_x0_from_v(diff, x_t, t, out), predict_eps_from_v(diff, x_t, t, out)
    raise ValueError(f"unknown model_output {diff.model_output!r}")


def split_output(diff: Diffusion, out: jax.Array, x_shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array | None]:
    """Split a model output into (mean part [B, ...], variance value v [B, ...] or None), checking its shape.

    With learned variance the output has twice x's channels on the last axis: first half the mean part, second
    half the Improved-DDPM interpolation value.
    """
    out = out.astype(jnp.float32)
    if diff.learned_variance:
        want = tuple(x_shape[:-1]) + (2 * x_shape[-1],)
        if out.shape != want:
            raise ValueError(f"with learned_variance the model output must have shape {want} (2x channels on the "
                             f"last axis), got {out.shape}")
        mean_out, var_out = jnp.split(out, 2, axis=-1)
        return mean_out, var_out
    if out.shape != tuple(x_shape):
        raise ValueError(f"the model output must have the input's shape {tuple(x_shape)}, got {out.shape}"
                         " (does the model learn its variance? then make the Diffusion with learned_variance=True)")
    return out, None


def q_posterior(diff: Diffusion, x0: jax.Array, x_t: jax.Array,
                t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean [B, ...], variance and clipped log-variance ([B, 1, ...]) of q(x_{t-1} | x_t, x0)."""
    nd = x_t.ndim
    mean = extract(diff.posterior_mean_coef1, t, nd) * x0 + extract(diff.posterior_mean_coef2, t, nd) * x_t
    return mean, extract(diff.posterior_variance, t, nd), extract(diff.posterior_log_variance_clipped, t, nd)


def learned_range_log_variance(diff: Diffusion, t: jax.Array, v: jax.Array) -> jax.Array:
    """Improved DDPM: log var = frac log(beta_t) + (1 - frac) log(posterior var), frac = (v + 1) / 2. [B, ...]."""
    min_log = extract(diff.posterior_log_variance_clipped, t, v.ndim)
    max_log = extract(np.log(diff.betas.astype(np.float64)), t, v.ndim)
    frac = (v.astype(jnp.float32) + 1.0) / 2.0
    return frac * max_log + (1.0 - frac) * min_log


def fixed_log_variance(diff: Diffusion, t: jax.Array, ndim: int, variance: str = "small") -> jax.Array:
    """Fixed reverse log-variance [B, 1, ...]: ``small`` = posterior variance, ``large`` = beta_t."""
    if variance == "small":
        return extract(diff.posterior_log_variance_clipped, t, ndim)
    if variance == "large":
        return extract(diff.log_betas_clipped, t, ndim)
    raise ValueError(f"unknown fixed variance {variance!r}; choose one of {FIXED_VARIANCES}")


def p_mean_variance(diff: Diffusion, x_t: jax.Array, t: jax.Array, out: jax.Array, *, variance: str = "small",
                    clip_x0: ClipRange = None,
                    dynamic_threshold: float | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Moments of the reverse step p(x_{t-1} | x_t) from a model output.

    Returns (mean [B, ...], log-variance broadcastable to [B, ...], predicted x0 [B, ...] after clipping). The
    variance is learned when `diff.learned_variance`, else the fixed `variance` (``small`` or ``large``).
    """
    mean_out, var_out = split_output(diff, out, x_t.shape)
    x0, _ = model_output_to_x0_eps(diff, x_t, t, mean_out)
    x0 = process_x0(x0, clip_x0, dynamic_threshold)
    mean, _, _ = q_posterior(diff, x0, x_t, t)
    if var_out is not None:
        log_var = learned_range_log_variance(diff, t, var_out)
    else:
        log_var = fixed_log_variance(diff, t, x_t.ndim, variance)
    return mean, log_var, x0


def normal_kl(mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array, logvar2: jax.Array) -> jax.Array:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def gaussian_log_likelihood(x: jax.Array, mean: jax.Array, log_var: jax.Array) -> jax.Array:
    """Elementwise continuous log N(x; mean, e^log_var) in nats."""
    return -0.5 * (math.log(2 * math.pi) + log_var + (x - mean) ** 2 * jnp.exp(-log_var))


def _log_ndtr_diff(lo: jax.Array, hi: jax.Array) -> jax.Array:
    """log(Phi(hi) - Phi(lo)) for lo < hi, accurate in both tails (an interval right of 0 is mirrored left)."""
    flip = (lo + hi) > 0
    a = jnp.where(flip, -hi, lo)
    b = jnp.where(flip, -lo, hi)
    log_a, log_b = log_ndtr(a), log_ndtr(b)
    # log_a < log_b; keep the difference strictly negative so log(-expm1(.)) and its gradient stay finite.
    r = jnp.minimum(log_a - log_b, -1e-12)
    return log_b + jnp.log(-jnp.expm1(r))


def discretized_gaussian_log_likelihood(x: jax.Array, mean: jax.Array, log_scale: jax.Array, *,
                                        num_bins: int = 256) -> jax.Array:
    """Elementwise log-probability of data x in [-1, 1] quantised to `num_bins` levels under N(mean, e^(2 log_scale)).

    The edge bins take the whole tail (as in Ho et al.); each log-probability is floored at log(1e-12).
    """
    half_bin = 1.0 / (num_bins - 1)
    inv_std = jnp.exp(-log_scale)
    centered = x - mean
    upper = jnp.clip(inv_std * (centered + half_bin), -_MAX_Z, _MAX_Z)
    lower = jnp.clip(inv_std * (centered - half_bin), -_MAX_Z, _MAX_Z)
    log_cdf_upper = log_ndtr(upper)
    log_sf_lower = log_ndtr(-lower)
    log_bin = _log_ndtr_diff(lower, upper)
    log_probs = jnp.where(x < -1.0 + 0.5 * half_bin, log_cdf_upper,
                          jnp.where(x > 1.0 - 0.5 * half_bin, log_sf_lower, log_bin))
    return jnp.maximum(log_probs, _LOG_PROB_FLOOR)


def vb_terms_bpd(diff: Diffusion, x0: jax.Array, x_t: jax.Array, t: jax.Array, model_mean: jax.Array,
                 model_log_var: jax.Array, *, discretized: bool = False) -> jax.Array:
    """One term of the variational bound, in bits per dimension [B].

    t > 0: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)). t = 0: -log p(x0 | x_1), a continuous Gaussian NLL or,
    with `discretized`, the 256-bin likelihood of data in [-1, 1]. The model's log-variance is clamped to within
    2 * MAX_LOG_STD_DIFF of the true posterior's, so the term and its gradient stay finite for any output.
    """
    true_mean, _, true_log_var = q_posterior(diff, x0, x_t, t)
    true_log_var = jnp.broadcast_to(true_log_var, model_log_var.shape)
    model_log_var = true_log_var + jnp.clip(model_log_var - true_log_var,
                                            -2 * MAX_LOG_STD_DIFF, 2 * MAX_LOG_STD_DIFF)
    kl = mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / math.log(2.0)
    if discretized:
        log_lik = discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
    else:
        log_lik = gaussian_log_likelihood(x0, model_mean, model_log_var)
    nll = -mean_flat(log_lik) / math.log(2.0)
    return jnp.where(t == 0, nll, kl)


def training_losses(diff: Diffusion, model_fn: ModelFn, x0: jax.Array, t: jax.Array, noise: jax.Array, *,
                    loss_type: str = "mse", discretized: bool = False,
                    min_snr_gamma: float = 0.0, min_snr_floor: float = 0.0) -> dict[str, jax.Array]:
    """Per-example training losses for x0 [B, ...] at step indices t [B] with noise [B, ...].

    `model_fn(x_t, t_original) -> output` is called with the ORIGINAL timesteps (`diff.timesteps[t]`). The mean
    part regresses noise, x0 or v (by `diff.model_output`) with ``mse`` or ``l1``. With learned variance the
    Improved-DDPM hybrid loss is used: loss = mean_term + (N / 1000) * vb, where vb is the VLB term in bits/dim
    computed from the stop-gradient mean (so only the variance half learns from it).
    `min_snr_gamma` > 0 weights the mean term by min_snr_weight (the 'mse' metric stays unweighted).
    Returns {'loss': [B], 'mse': [B]} plus 'vb': [B] (unscaled) with learned variance and 'l1': [B] for l1.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown diffusion loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
    x0 = x0.astype(jnp.float32)
    noise = noise.astype(jnp.float32)
    t = jnp.asarray(t, jnp.int32)
    x_t = q_sample(diff, x0, t, noise)
    out = model_fn(x_t, jnp.asarray(diff.timesteps)[t])
    mean_out, var_out = split_output(diff, out, x0.shape)
    if diff.model_output == "eps":
        target = noise
    elif diff.model_output == "x0":
        target = x0
    else:
        target = v_from_x0_eps(diff, x0, t, noise)
    terms = {"mse": mean_flat((mean_out - target) ** 2)}
    if loss_type == "l1":
        terms["l1"] = mean_flat(jnp.abs(mean_out - target))
    loss = terms[loss_type]
    if min_snr_gamma > 0:
        loss = loss * min_snr_weight(diff, t, float(min_snr_gamma), float(min_snr_floor))
    if var_out is not None:
        frozen = jax.lax.stop_gradient(mean_out)
        x0_pred, _ = model_output_to_x0_eps(diff, x_t, t, frozen)
        model_mean, _, _ = q_posterior(diff, x0_pred, x_t, t)
        model_log_var = learned_range_log_variance(diff, t, var_out)
        terms["vb"] = vb_terms_bpd(diff, x0, x_t, t, model_mean, model_log_var, discretized=discretized)
        loss = loss + terms["vb"] * (diff.num_steps / 1000.0)
    terms["loss"] = loss
    return terms
