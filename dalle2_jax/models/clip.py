"""CLIP: a causal text transformer and a ViT image encoder projected to one embedding space."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from dalle2_jax.models.layers import Dense, LayerNorm, activation, dtype_from_name
from dalle2_jax.models.transformer import Transformer

# OpenAI CLIP's normalisation constants (used by default, and by imported CLIPs).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

default_conv_init = nn.initializers.lecun_normal()


class TextEncoder(nn.Module):
    """Causal text transformer pooled at the end-of-text token.

    tokens [B, L] int32 -> (pooled projected embedding [B, E], token states [B, L, W]).
    The token states are the final-LayerNorm outputs, which the prior and decoder condition on.
    """

    vocab_size: int
    context_length: int
    width: int
    depth: int
    num_heads: int
    embed_dim: int
    eot_id: int
    mlp_ratio: float = 4.0
    act: str = "gelu"
    ln_eps: float = 1e-5
    remat: str = "none"
    scan_layers: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        embed = self.param("token_embedding",
                           nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
                           (self.vocab_size, self.width), jnp.float32)
        pos = self.param("positional_embedding",
                         nn.with_logical_partitioning(nn.initializers.normal(0.01), ("length", "embed")),
                         (self.context_length, self.width), jnp.float32)
        x = (jnp.take(embed, tokens, axis=0) + pos[None, : tokens.shape[1]]).astype(self.dtype)
        x = Transformer(self.depth, self.num_heads, self.mlp_ratio, self.act, causal=True, ln_eps=self.ln_eps,
                        remat=self.remat, scan_layers=self.scan_layers, dtype=self.dtype, name="transformer")(x)
        x = LayerNorm(self.ln_eps, self.dtype, name="ln_final")(x)
        eot_pos = jnp.argmax(tokens == self.eot_id, axis=-1)
        pooled = jnp.take_along_axis(x, eot_pos[:, None, None], axis=1)[:, 0]
        emb = Dense(self.embed_dim, axes=("embed", None), use_bias=False, dtype=self.dtype,
                    name="projection")(pooled)
        return emb.astype(jnp.float32), x


class ConvStem(nn.Module):
    """Stride-2 3x3 convs (LayerNorm + GELU after each) then a 1x1 projection to `width`.

    images [B, H, W, C] -> tokens [B, H / 2^n, W / 2^n, width] (Xiao et al. 2021: early convolutions
    help small ViTs learn shape).
    """

    channels: Sequence[int]
    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, c in enumerate(self.channels):
            x = nn.Conv(c, (3, 3), strides=(2, 2), padding="SAME", use_bias=False, dtype=self.dtype,
                        param_dtype=jnp.float32,
                        kernel_init=nn.with_logical_partitioning(default_conv_init, (None, None, "channels_in",
                                                                                     "channels_out")),
                        name=f"conv_{i}")(x)
            x = LayerNorm(1e-5, self.dtype, axis_name="channels_out", name=f"ln_{i}")(x)
            x = jax.nn.gelu(x, approximate=False)
        return nn.Conv(self.width, (1, 1), dtype=self.dtype, param_dtype=jnp.float32,
                       kernel_init=nn.with_logical_partitioning(default_conv_init,
                                                                (None, None, "channels_in", "embed")),
                       bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                       name="proj")(x)


class VisionTransformer(nn.Module):
    """ViT: stem (patch embedding or conv stem), class token, pre-LN blocks, LayerNorm on the class token.

    images [B, H, W, 3] float in [0, 1] -> (projected embedding [B, E], token states [B, 1 + N, W]).
    The images are normalised inside with `mean` / `std`.
    """

    image_size: int
    width: int
    depth: int
    num_heads: int
    embed_dim: int
    stem: str = "patch"
    patch_size: int = 16
    conv_channels: Sequence[int] = (32, 64, 128, 128)
    mlp_ratio: float = 4.0
    act: str = "gelu"
    ln_eps: float = 1e-5
    mean: Sequence[float] = CLIP_MEAN
    std: Sequence[float] = CLIP_STD
    remat: str = "none"
    scan_layers: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = (images.astype(jnp.float32) - jnp.asarray(self.mean)) / jnp.asarray(self.std)
        x = x.astype(self.dtype)
        if self.stem == "patch":
            x = nn.Conv(self.width, (self.patch_size, self.patch_size), strides=(self.patch_size,) * 2,
                        padding="VALID", use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                        kernel_init=nn.with_logical_partitioning(default_conv_init,
                                                                 (None, None, "channels_in", "embed")),
                        name="patch_embed")(x)
        elif self.stem == "conv":
            x = ConvStem(tuple(self.conv_channels), self.width, self.dtype, name="conv_stem")(x)
        else:
            raise ValueError(f"unknown stem {self.stem!r}")
        b, gh, gw, w = x.shape
        x = x.reshape(b, gh * gw, w)
        scale = self.width ** -0.5
        cls = self.param("class_embedding",
                         nn.with_logical_partitioning(nn.initializers.normal(scale), ("embed",)),
                         (self.width,), jnp.float32)
        pos = self.param("positional_embedding",
                         nn.with_logical_partitioning(nn.initializers.normal(scale), ("length", "embed")),
                         (gh * gw + 1, self.width), jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, w)), x], axis=1)
        x = x + pos[None].astype(self.dtype)
        x = LayerNorm(self.ln_eps, self.dtype, name="ln_pre")(x)
        x = Transformer(self.depth, self.num_heads, self.mlp_ratio, self.act, causal=False, ln_eps=self.ln_eps,
                        remat=self.remat, scan_layers=self.scan_layers, dtype=self.dtype, name="transformer")(x)
        pooled = LayerNorm(self.ln_eps, self.dtype, name="ln_post")(x[:, 0])
        emb = Dense(self.embed_dim, axes=("embed", None), use_bias=False, dtype=self.dtype,
                    name="projection")(pooled)
        return emb.astype(jnp.float32), x


def num_stem_tokens(image_size: int, stem: str, patch_size: int, conv_channels: Sequence[int]) -> int:
    """Number of image tokens (without the class token) the stem produces."""
    side = image_size // patch_size if stem == "patch" else image_size // (2 ** len(conv_channels))
    return side * side


class CLIP(nn.Module):
    """Both towers and the learned temperature.

    `__call__(images [B,H,W,3] in [0,1], tokens [B,L])` returns (image_emb [B,E], text_emb [B,E],
    logit_scale []) with unit-normalised embeddings and logit_scale = exp(clamped log scale).
    """

    text: TextEncoder
    vision: VisionTransformer | None  # None: a text encoder alone (model.image_tower False)
    init_logit_scale: float = float(np.log(1 / 0.07))
    max_logit_scale: float = float(np.log(100.0))

    def setup(self):
        self.logit_scale = self.param("logit_scale", nn.with_logical_partitioning(
            nn.initializers.constant(self.init_logit_scale), ()), (), jnp.float32)

    def encode_text(self, tokens: jax.Array, normalize: bool = True) -> jax.Array:
        """tokens [B, L] -> text embedding [B, E] (unit norm if `normalize`)."""
        emb, _ = self.text(tokens)
        return _l2_normalize(emb) if normalize else emb

    def encode_text_full(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """tokens [B, L] -> (unnormalised text embedding [B, E], token states [B, L, W])."""
        return self.text(tokens)

    def encode_image(self, images: jax.Array, normalize: bool = True) -> jax.Array:
        """images [B, H, W, 3] float in [0, 1] -> image embedding [B, E] (unit norm if `normalize`)."""
        if self.vision is None:
            raise ValueError("this CLIP has no image tower (model.image_tower is False)")
        emb, _ = self.vision(images)
        return _l2_normalize(emb) if normalize else emb

    def temperature_scale(self) -> jax.Array:
        """exp of the learned log scale, clamped to `max_logit_scale` (CLIP's 100)."""
        return jnp.exp(jnp.minimum(self.logit_scale, self.max_logit_scale))

    def __call__(self, images: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        return self.encode_image(images), self.encode_text(tokens), self.temperature_scale()


def _l2_normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


def build_clip(model_cfg: Any, eot_id: int) -> CLIP:
    """Builds a CLIP module from a `config.model` group (see configs/clip.py) and the tokenizer's EOT id."""
    dtype = dtype_from_name(model_cfg.dtype)
    t, v = model_cfg.text, model_cfg.vision
    activation(t.act), activation(v.act)  # validate names early
    text = TextEncoder(vocab_size=t.vocab_size, context_length=t.context_length, width=t.width, depth=t.depth,
                       num_heads=t.heads, embed_dim=model_cfg.embed_dim, eot_id=eot_id, mlp_ratio=t.mlp_ratio,
                       act=t.act, ln_eps=model_cfg.ln_eps, remat=model_cfg.remat,
                       scan_layers=model_cfg.scan_layers, dtype=dtype)
    vision = VisionTransformer(image_size=v.image_size, width=v.width, depth=v.depth, num_heads=v.heads,
                               embed_dim=model_cfg.embed_dim, stem=v.stem, patch_size=v.patch_size,
                               conv_channels=tuple(v.conv_channels), mlp_ratio=v.mlp_ratio, act=v.act,
                               ln_eps=model_cfg.ln_eps, mean=tuple(v.mean), std=tuple(v.std),
                               remat=model_cfg.remat, scan_layers=model_cfg.scan_layers, dtype=dtype)
    if not model_cfg.get("image_tower", True):
        vision = None
    return CLIP(text=text, vision=vision, init_logit_scale=float(model_cfg.init_logit_scale),
                max_logit_scale=float(model_cfg.max_logit_scale))


def _init_text_only(model: CLIP, tokens: jax.Array):
    model.temperature_scale()
    return model.encode_text_full(tokens)


def init_clip(model: CLIP, rng: jax.Array) -> Any:
    """Fresh (logically boxed) params of `model`, initialised on a [1, R, R, 3] image and one [1, L] caption."""
    length = model.text.context_length
    tokens = jnp.zeros((1, length), jnp.int32).at[:, 1].set(model.text.eot_id)
    if model.vision is None:
        return model.init(rng, tokens, method=_init_text_only)
    size = model.vision.image_size
    return model.init(rng, jnp.zeros((1, size, size, 3), jnp.float32), tokens)
