"""Shared Flax bricks: dense layers, norms, attention, MLP, activations.

Activations that a remat policy may keep are tagged with `checkpoint_name` (query_proj, key_proj,
value_proj, attention_out, mlp_hidden; see models/transformer.py REMAT_POLICIES).

Every parameter is created with a logical partitioning (names from the design page:
batch, length, embed, heads, kv, mlp, vocab, channels_in, channels_out, height, width), so the
trainer can shard any model built from these bricks with one set of rules.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name

Dtype = Any
Axes = Sequence[str | None]

default_kernel_init = nn.initializers.lecun_normal()


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Returns the activation function called `name`.

    `gelu` is the exact (erf) GELU, as PyTorch's default; `gelu_tanh` the tanh approximation (JAX's
    default); `quick_gelu` is x * sigmoid(1.702 x) as in OpenAI's CLIP; `silu` and `relu` as usual.
    """
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name == "gelu_tanh":
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "silu":
        return jax.nn.silu
    if name == "relu":
        return jax.nn.relu
    raise ValueError(f"unknown activation {name!r}; use gelu, gelu_tanh, quick_gelu, silu or relu")


ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "silu", "relu")


class Dense(nn.Module):
    """A dense layer whose kernel [in, out] carries the logical names `axes` (and its bias axes[-1]).

    Params are float32; the matmul runs in `dtype`.
    """

    features: int
    axes: tuple[str | None, str | None] = ("embed", "mlp")
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    kernel_init: Callable = default_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(
            self.features,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(self.kernel_init, tuple(self.axes)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[-1],)),
            name="dense",
        )(x)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis; statistics in float32, output in `dtype`."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    axis_name: str | None = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.LayerNorm(
            epsilon=self.epsilon,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (self.axis_name,)),
            name="norm",
        )(x.astype(jnp.float32))
        return y.astype(self.dtype)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                          is_causal: bool = False) -> jax.Array:
    """`jax.nn.dot_product_attention` on q [B, T, N, H], k/v [B, S, N, H] -> [B, T, N, H], with cuDNN's fused
    flash attention on GPU where it takes the inputs (half-precision dtypes, its head sizes; it checks them
    while tracing and raises otherwise) and XLA's implementation everywhere else. jax's own default
    (`implementation=None`) is XLA on every backend, so the GPU path is chosen here."""
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation="cudnn")
        except (ValueError, NotImplementedError, TypeError, RuntimeError):
            pass  # a shape, dtype, mask or GPU generation cuDNN does not take: XLA's attention below
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation="xla")


class MultiHeadAttention(nn.Module):
    """Multi-head (self- or cross-) attention through `dot_product_attention` (cuDNN flash attention on GPU).

    Takes x [B, T, D] and optional context [B, S, Dc] (keys/values come from context when given,
    otherwise from x), an optional boolean mask broadcastable to [B, N, T, S] (True = attend) and
    `causal`. Returns [B, T, D].
    """

    num_heads: int
    head_dim: int | None = None
    dtype: Dtype = jnp.float32
    use_bias: bool = True
    out_features: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None, mask: jax.Array | None = None,
                 causal: bool = False) -> jax.Array:
        width = x.shape[-1]
        head_dim = self.head_dim or width // self.num_heads
        inner = self.num_heads * head_dim
        kv_in = x if context is None else context
        proj = dict(use_bias=self.use_bias, dtype=self.dtype, axes=("embed", "heads"))
        q = Dense(inner, name="query", **proj)(x)
        k = Dense(inner, name="key", **proj)(kv_in)
        v = Dense(inner, name="value", **proj)(kv_in)
        split = lambda t: t.reshape(t.shape[:-1] + (self.num_heads, head_dim))  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
        q, k, v = (checkpoint_name(q, "query_proj"), checkpoint_name(k, "key_proj"),
                   checkpoint_name(v, "value_proj"))
        out = dot_product_attention(q, k, v, mask=mask, is_causal=causal)
        out = checkpoint_name(out.reshape(out.shape[:-2] + (inner,)), "attention_out")
        return Dense(self.out_features or width, name="out", use_bias=self.use_bias, dtype=self.dtype,
                     axes=("heads", "embed"))(out)


class Mlp(nn.Module):
    """Two dense layers with an activation between: [.., D] -> [.., hidden] -> [.., D]."""

    hidden: int
    act: str = "gelu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = Dense(self.hidden, axes=("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
        h = activation(self.act)(h)
        h = checkpoint_name(nn.with_logical_constraint(h, ("batch", "length", "mlp")), "mlp_hidden")
        return Dense(x.shape[-1], axes=("mlp", "embed"), dtype=self.dtype, name="fc2")(h)


def dtype_from_name(name: str) -> Dtype:
    """Maps a config string ('float32', 'bfloat16', 'float16') to a jnp dtype."""
    table = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(table)}")
    return table[name]


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps: t [B] -> [B, dim] float32 (cos, sin halves)."""
    half = dim // 2
    freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepMlp(nn.Module):
    """Sinusoidal timestep features through a 2-layer SiLU MLP: t [B] -> [B, features]."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        h = timestep_embedding(t, self.features).astype(self.dtype)
        h = Dense(self.features, axes=(None, "mlp"), dtype=self.dtype, name="fc1")(h)
        h = jax.nn.silu(h)
        return Dense(self.features, axes=("mlp", "embed"), dtype=self.dtype, name="fc2")(h)
