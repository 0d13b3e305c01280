"""Clipping of the predicted x0 while sampling: a static range and Imagen's dynamic thresholding."""

from __future__ import annotations

import jax
import jax.numpy as jnp

ClipRange = float | tuple[float, float] | None


def clip_range(clip_x0: ClipRange) -> tuple[float, float] | None:
    """Normalise a clip option: None, c (meaning (-c, c)) or (lo, hi)."""
    if clip_x0 is None:
        return None
    if isinstance(clip_x0, (int, float)):
        if clip_x0 <= 0:
            raise ValueError(f"clip_x0 must be positive or a (lo, hi) pair, got {clip_x0!r}")
        return (-float(clip_x0), float(clip_x0))
    lo, hi = clip_x0
    if not lo < hi:
        raise ValueError(f"clip_x0 must be (lo, hi) with lo < hi, got {clip_x0!r}")
    return (float(lo), float(hi))


def dynamic_threshold(x0: jax.Array, percentile: float) -> jax.Array:
    """Saharia et al. 2022: s = max(1, quantile_p(|x0|)) per example, x0 -> clip(x0, -s, s) / s. [B, ...] -> [B, ...].

    percentile: a fraction in (0, 1] (0.995) or a percentage in (1, 100] (99.5).
    """
    p = float(percentile)
    if p > 1.0:
        p /= 100.0
    if not 0.0 < p <= 1.0:
        raise ValueError(f"dynamic_threshold percentile must be in (0, 1] or (1, 100], got {percentile!r}")
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    s = jnp.maximum(jnp.quantile(flat, p, axis=1), 1.0)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.clip(x0, -s, s) / s


def process_x0(x0: jax.Array, clip_x0: ClipRange = None, dynamic_thresh: float | None = None) -> jax.Array:
    """Apply dynamic thresholding (if a percentile is given), then the static clip range (if given)."""
    if dynamic_thresh is not None:
        x0 = dynamic_threshold(x0, dynamic_thresh)
    rng = clip_range(clip_x0)
    if rng is not None:
        x0 = jnp.clip(x0, rng[0], rng[1])
    return x0
