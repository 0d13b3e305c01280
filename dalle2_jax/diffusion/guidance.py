"""Classifier-free guidance (Ho & Salimans 2021) as wrappers that turn conditional models into a denoise_fn."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]
MaskedModelFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _is_static_one(scale) -> bool:
    return isinstance(scale, (int, float)) and scale == 1


def combine_guidance(cond: jax.Array, uncond: jax.Array, scale: float | jax.Array, *,
                     learned_variance: bool = False) -> jax.Array:
    """uncond + scale * (cond - uncond) on the mean part; [B, ...] -> [B, ...].

    With learned_variance the last axis holds [mean part, variance part] and the variance part is taken from
    `cond` unchanged. scale: a scalar or [B]. The result equals `cond` exactly at scale 1 and `uncond`'s mean part
    exactly at scale 0 (each end is computed from its own side).
    """
    cond = cond.astype(jnp.float32)
    uncond = uncond.astype(jnp.float32)
    if learned_variance:
        cond_mean, cond_var = jnp.split(cond, 2, axis=-1)
        uncond_mean, _ = jnp.split(uncond, 2, axis=-1)
    else:
        cond_mean, cond_var, uncond_mean = cond, None, uncond
    s = jnp.asarray(scale, jnp.float32)
    s = s.reshape(s.shape + (1,) * (cond_mean.ndim - s.ndim))
    diff = cond_mean - uncond_mean
    mean = jnp.where(s >= 0.5, cond_mean + (s - 1.0) * diff, uncond_mean + s * diff)
    return mean if cond_var is None else jnp.concatenate([mean, cond_var], axis=-1)


def cfg_denoiser(model_fn_cond: DenoiseFn, model_fn_uncond: DenoiseFn, scale: float | jax.Array, *,
                 learned_variance: bool = False) -> DenoiseFn:
    """A denoise_fn(x_t [B, ...], t [B]) applying guidance to two model calls (conditional and unconditional).

    A Python scale of exactly 1 returns the conditional model alone (no unconditional call).
    """
    if _is_static_one(scale):
        return lambda x, t: model_fn_cond(x, t).astype(jnp.float32)

    def denoise(x: jax.Array, t: jax.Array) -> jax.Array:
        return combine_guidance(model_fn_cond(x, t), model_fn_uncond(x, t), scale, learned_variance=learned_variance)

    return denoise


def cfg_denoiser_batched(model_fn: MaskedModelFn, scale: float | jax.Array, *,
                         learned_variance: bool = False) -> DenoiseFn:
    """A denoise_fn that runs the conditional and unconditional passes as ONE model call on a doubled batch.

    model_fn(x [2B, ...], t [2B], drop_mask [2B] bool) -> output [2B, ...]: drop_mask True means "drop the
    condition" (the model substitutes its null condition for those rows); the first B rows are conditional, the
    last B unconditional. A Python scale of exactly 1 makes a single undoubled conditional call.
    """
    if _is_static_one(scale):
        return lambda x, t: model_fn(x, t, jnp.zeros((x.shape[0],), bool)).astype(jnp.float32)

    def denoise(x: jax.Array, t: jax.Array) -> jax.Array:
        b = x.shape[0]
        drop = jnp.concatenate([jnp.zeros((b,), bool), jnp.ones((b,), bool)])
        out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), drop)
        return combine_guidance(out[:b], out[b:], scale, learned_variance=learned_variance)

    return denoise
