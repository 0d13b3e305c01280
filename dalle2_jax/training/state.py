"""Train state (params, optimizer state, EMA params), optimizer, and the generic train step."""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """Everything a step updates. `ema_params` is None when config.optimizer.ema_decay == 0."""

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any


def learning_rate_schedule(config) -> optax.Schedule:
    """Linear warmup, then cosine decay to final_lr_fraction * lr at total_steps (or constant)."""
    opt = config.optimizer
    peak = float(opt.learning_rate)
    if opt.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, max(opt.warmup_steps, 1)), optax.constant_schedule(peak)],
            [opt.warmup_steps])
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=opt.warmup_steps,
        decay_steps=config.total_steps, end_value=peak * float(opt.final_lr_fraction))


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices and conv kernels only (not biases, norms, scalars)."""
    return jax.tree.map(lambda x: jnp.ndim(x) > 1, params)


def make_optimizer(config) -> optax.GradientTransformation:
    """AdamW with the config's schedule, preceded by global-norm gradient clipping."""
    opt = config.optimizer
    parts = []
    if opt.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(float(opt.grad_clip)))
    parts.append(optax.adamw(learning_rate_schedule(config), b1=float(opt.b1), b2=float(opt.b2),
                             eps=float(opt.eps), weight_decay=float(opt.weight_decay), mask=_decay_mask))
    return optax.chain(*parts)


def ema_update(ema: Any, params: Any, step: jax.Array, decay: float) -> Any:
    """EMA with the usual warm-up: decay_t = min(decay, (1 + t) / (10 + t))."""
    d = jnp.minimum(decay, (1.0 + step) / (10.0 + step)).astype(jnp.float32)
    return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)


def init_train_state(params: Any, tx: optax.GradientTransformation, use_ema: bool) -> TrainState:
    """A step-0 TrainState for `params` (boxed or plain)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=jax.tree.map(jnp.copy, params) if use_ema else None)


LossFn = Callable[[Any, dict, jax.Array, Any], tuple[jax.Array, dict]]


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, config,
                    ) -> Callable[[TrainState, dict, Any, jax.Array], tuple[TrainState, dict]]:
    """The generic step: grads of `loss_fn(params, batch, rng, frozen)`, an optimizer update, the EMA.

    The step's randomness is `fold_in(base_key, step)`, so a resumed run draws what an uninterrupted
    one would. Returns (new_state, metrics) with scalar float32 metrics, including grad_norm and lr.
    """
    schedule = learning_rate_schedule(config)
    ema_decay = float(config.optimizer.ema_decay)

    def train_step(state: TrainState, batch: dict, frozen: Any, base_key: jax.Array):
        rng = jax.random.fold_in(base_key, state.step)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng, frozen)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema_params, params, state.step, ema_decay) if state.ema_params is not None else None
        metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads), lr=schedule(state.step))
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema), metrics

    return train_step
