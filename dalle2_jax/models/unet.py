"""The ADM / GLIDE UNet shared by the decoder and both upsamplers (channels-last: [B, H, W, C]).

Residual blocks with GroupNorm, SiLU, dropout and AdaGN (scale-shift) or additive timestep conditioning;
BigGAN-style residual up/down blocks (or plain strided conv / nearest+conv resampling); multi-head
self-attention at configured resolutions whose keys/values also include projected conditioning tokens
(GLIDE's `encoder_kv`, placed before the spatial keys); an optional GLIDE caption transformer whose last
token is added to the timestep embedding and whose tokens join the attention context; optional unCLIP
image-embedding conditioning (added to the timestep embedding and projected into extra context tokens);
optional CLIP text conditioning as karlo's decoder has it (the CLIP text embedding added to the timestep
embedding; the CLIP text token states projected and layer-normed into context tokens, masked at padding);
optional low-res conditioning (upsampled and concatenated to the noisy input) and noise-level
conditioning for the upsamplers. Learned-sigma output doubles the output channels.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from dalle2_jax.models.layers import Dense, LayerNorm, dot_product_attention, timestep_embedding
from dalle2_jax.models.transformer import REMAT_POLICIES, Transformer

Dtype = Any
ACT_AXES = ("batch", "height", "width", None)


def _zeros_init():
    return nn.initializers.zeros


class Conv(nn.Module):
    """2-D convolution, SAME padding: [B, H, W, Cin] -> [B, H/stride, W/stride, features]."""

    features: int
    kernel: int = 3
    stride: int = 1
    zero_init: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.zero_init else nn.initializers.lecun_normal()
        return nn.Conv(
            self.features, (self.kernel, self.kernel), strides=(self.stride, self.stride), padding="SAME",
            dtype=self.dtype, param_dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(init, (None, None, "channels_in", "channels_out")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("channels_out",)),
            name="conv")(x)


class GroupNorm(nn.Module):
    """GroupNorm over the channel axis with float32 statistics (ADM: 32 groups, eps 1e-5); output in `dtype`.

    Narrow layers (fewer than 4 * groups channels, i.e. tiny models) use the largest group count that
    divides the channels and leaves at least 4 channels per group: with one channel per group the norm
    would erase a per-channel additive timestep embedding entirely.
    """

    groups: int = 32
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    min_group_channels: int = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        groups = max(1, min(self.groups, c // self.min_group_channels))
        while c % groups:
            groups -= 1
        y = nn.GroupNorm(num_groups=groups, epsilon=self.epsilon, dtype=jnp.float32, param_dtype=jnp.float32,
                         scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("channels_out",)),
                         bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("channels_out",)),
                         name="norm")(x.astype(jnp.float32))
        return y.astype(self.dtype)


def upsample_nearest(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, 2H, 2W, C] by repetition."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def space_to_depth(x: jax.Array, p: int) -> jax.Array:
    """[B, H, W, C] -> [B, H/p, W/p, p*p*C]: each p x p patch becomes one position (channels (dy, dx, c))."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // p, w // p, p * p * c)


def depth_to_space(x: jax.Array, p: int) -> jax.Array:
    """The inverse of space_to_depth: [B, h, w, p*p*C] -> [B, h*p, w*p, C]."""
    b, h, w, pc = x.shape
    c = pc // (p * p)
    x = x.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, c)


def downsample_avg(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, H/2, W/2, C] by 2x2 average pooling."""
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class ResBlock(nn.Module):
    """ADM residual block: x + conv(drop(act(norm(conv(act(norm(x))), emb)))), optionally resampling.

    x [B, H, W, C], emb [B, T] -> [B, H', W', out_channels]. With `scale_shift` the timestep embedding
    gives (scale, shift) applied as norm(h) * (1 + scale) + shift (AdaGN); otherwise it is added before
    the second norm. `up`/`down` resample both paths after the first norm+act (BigGAN style).
    """

    out_channels: int
    dropout: float = 0.0
    scale_shift: bool = True
    up: bool = False
    down: bool = False
    deterministic: bool = True
    groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        h = jax.nn.silu(GroupNorm(self.groups, dtype=self.dtype, name="in_norm")(x))
        if self.up:
            h, x = upsample_nearest(h), upsample_nearest(x)
        elif self.down:
            h, x = downsample_avg(h), downsample_avg(x)
        h = Conv(self.out_channels, dtype=self.dtype, name="in_conv")(h)
        e = Dense(2 * self.out_channels if self.scale_shift else self.out_channels, axes=("embed", "channels_out"),
                  dtype=self.dtype, name="emb_proj")(jax.nn.silu(emb))[:, None, None, :]
        if self.scale_shift:
            scale, shift = jnp.split(e, 2, axis=-1)
            h = GroupNorm(self.groups, dtype=self.dtype, name="out_norm")(h) * (1 + scale) + shift
        else:
            h = GroupNorm(self.groups, dtype=self.dtype, name="out_norm")(h + e)
        h = jax.nn.silu(h)
        h = nn.Dropout(self.dropout, deterministic=self.deterministic)(h)
        h = Conv(self.out_channels, zero_init=True, dtype=self.dtype, name="out_conv")(h)
        if x.shape[-1] != self.out_channels:
            x = Conv(self.out_channels, kernel=1, dtype=self.dtype, name="skip")(x)
        return nn.with_logical_constraint(x + h, ACT_AXES)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, keys/values extended by conditioning tokens.

    x [B, H, W, C], context [B, S, Dc] or None -> [B, H, W, C]. The context is projected to keys and
    values per layer (GLIDE's encoder_kv) and placed before the spatial keys. Heads = C / head_channels.
    context_mask [B, S] (True = attend) hides context tokens (caption padding); the spatial keys are always
    attended, so no query is left without keys. (Masked keys are dropped outright: diffusers' -10000 bias
    and karlo's -inf give the same softmax in float32.)
    """

    head_channels: int = 64
    groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None,
                 context_mask: jax.Array | None = None) -> jax.Array:
        b, hh, ww, c = x.shape
        heads = max(1, c // self.head_channels)
        hd = c // heads
        h = GroupNorm(self.groups, dtype=self.dtype, name="norm")(x).reshape(b, hh * ww, c)
        proj = dict(axes=("embed", "heads"), dtype=self.dtype)
        q, k, v = (Dense(c, name=n, **proj)(h) for n in ("query", "key", "value"))
        if context is not None:
            ctx = context.astype(self.dtype)
            k = jnp.concatenate([Dense(c, name="context_key", **proj)(ctx), k], axis=1)
            v = jnp.concatenate([Dense(c, name="context_value", **proj)(ctx), v], axis=1)
        mask = None
        if context is not None and context_mask is not None:
            keep = jnp.concatenate([context_mask.astype(bool), jnp.ones((b, hh * ww), bool)], axis=1)
            mask = keep[:, None, None, :]  # [B, 1 (heads), 1 (queries), S + H*W]
        split = lambda t: t.reshape(b, t.shape[1], heads, hd)  # noqa: E731
        out = dot_product_attention(split(q), split(k), split(v), mask=mask)
        out = Dense(c, axes=("heads", "embed"), dtype=self.dtype, kernel_init=_zeros_init(),
                    name="out")(out.reshape(b, hh * ww, c))
        return nn.with_logical_constraint(x + out.reshape(b, hh, ww, c), ACT_AXES)


class CaptionTransformer(nn.Module):
    """GLIDE's caption encoder: tokens [B, L] (pad_id = padding) -> token states [B, L, width].

    Padding positions take a learned per-position padding embedding (so an all-padding caption, the
    dropped caption of classifier-free guidance, is a learned null condition); causal attention; final LN.
    """

    vocab_size: int
    context_length: int
    width: int
    depth: int
    heads: int
    pad_id: int = 0
    remat: str = "none"
    scan_layers: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        emb = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, param_dtype=jnp.float32,
                       embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
                       name="token_embedding")(tokens)
        init = nn.with_logical_partitioning(nn.initializers.normal(0.01), ("length", "embed"))
        pos = self.param("positional_embedding", init, (self.context_length, self.width), jnp.float32)
        pad = self.param("padding_embedding", init, (self.context_length, self.width), jnp.float32)
        x = jnp.where((tokens == self.pad_id)[..., None], pad[None].astype(self.dtype), emb) + pos.astype(self.dtype)
        x = Transformer(self.depth, self.heads, act="gelu", causal=True, remat=self.remat,
                        scan_layers=self.scan_layers, dtype=self.dtype, name="transformer")(x)
        return LayerNorm(dtype=self.dtype, name="final_norm")(x)


class UNet(nn.Module):
    """The ADM/GLIDE UNet: noisy images x_t [B, H, W, in_channels] and timesteps t [B] -> [B, H, W,
    out_channels] (x2 with learned sigma: prediction then variance interpolation values).

    Optional conditions (each enabled by its config field):
      image_emb [B, E] (image_embed_dim > 0): projected into the timestep embedding and into
        `image_tokens` context tokens; rows with drop_image=True use a learned null embedding instead.
      tokens [B, L] (caption_depth > 0): the caption transformer; rows with drop_text=True use an
        all-padding caption.
      text_emb [B, Et] (text_embed_width > 0): a CLIP text embedding, projected into the timestep embedding
        (karlo's decoder; with image_emb its projection is added too).
      text_states [B, L, Wt] and text_mask [B, L] (text_states_width > 0): CLIP text token states, projected
        to the context width and layer-normed (karlo's text_seq_proj), appended to the context after the
        image tokens (and the caption); attention ignores the positions where text_mask is False. There is
        no learned null here: an unconditional row gets the empty caption's encodings from the caller
        (drop_text acts on the caption transformer only).
      low_res [B, h, w, 3] (low_res=True): upsampled to H x W (`low_res_upsample` mode) and concatenated to x;
        with residual_low_res also added to the output (the first out_channels), which then predicts x0 as
        upsampled low-res + correction.
      noise_level [B] (noise_level_cond=True): the low-res augmentation level in [0, 1000), embedded like t.

    `patch_size` p > 1 folds each p x p patch of the input (after the low-res concatenation) into channels
    before the first convolution and unfolds the output the same way (space-to-depth, as in Hoogeboom et
    al. 2023's "simple diffusion"), so every level runs at 1/p of the image side for about 1/p^2 of the
    compute; attention_resolutions stay in image pixels. `full_res_channels` c > 0 (with p > 1) adds a cheap
    level at the image's own resolution around the folded UNet: a c-channel convolution and residual block
    before the folding, and after the unfolding a residual block over [unfolded features, that stem's
    output] before the output convolution, so edges inside a patch are drawn by full-resolution
    convolutions rather than by one linear unfolding.
    """

    model_channels: int = 64
    out_channels: int = 3
    num_res_blocks: int = 2
    channel_mult: Sequence[int] = (1, 2, 3, 4)
    attention_resolutions: Sequence[int] = (32, 16, 8)
    image_size: int = 64
    head_channels: int = 64
    dropout: float = 0.0
    scale_shift: bool = True
    resblock_updown: bool = True
    groups: int = 32
    learned_sigma: bool = False
    image_embed_dim: int = 0
    image_tokens: int = 4
    image_embed_scale: float = 1.0  # the embedding (or the null) is multiplied by it before its projections
    # The context tokens' width (image tokens and CLIP text states; 0 = the caption width with a caption
    # transformer, otherwise 4 x model_channels). karlo: 1536.
    context_width: int = 0
    text_embed_width: int = 0  # > 0: a CLIP text embedding this wide joins the timestep embedding (karlo: 768)
    text_states_width: int = 0  # > 0: CLIP text token states this wide join the context (karlo: 768)
    caption_vocab_size: int = 0
    caption_context_length: int = 0
    caption_width: int = 0
    caption_depth: int = 0
    caption_heads: int = 1
    caption_pad_id: int = 0
    caption_scan_layers: bool = False  # stack the caption blocks on a `layers` axis (one compiled block)
    low_res: bool = False
    low_res_upsample: str = "bicubic"
    # With low_res: add the upsampled low-res input to the (x0-predicting) output, so the UNet predicts x0's
    # residual over bicubic; with the zero-initialised output layer an untrained upsampler returns bicubic.
    residual_low_res: bool = False
    noise_level_cond: bool = False
    remat: str = "none"
    patch_size: int = 1
    full_res_channels: int = 0
    dtype: Dtype = jnp.float32

    def _block(self, cls: Callable, **kw) -> nn.Module:
        if self.remat != "none":
            cls = nn.remat(cls, policy=REMAT_POLICIES[self.remat])
        return cls(dtype=self.dtype, groups=self.groups, **kw)

    @property
    def context_dim(self) -> int:
        if self.context_width:
            if self.caption_depth and self.context_width != self.caption_width:
                raise ValueError(f"context_width {self.context_width} differs from caption_width "
                                 f"{self.caption_width}: the caption states join the context unprojected")
            return self.context_width
        return self.caption_width if self.caption_depth else 4 * self.model_channels

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, *, image_emb: jax.Array | None = None,
                 tokens: jax.Array | None = None, low_res: jax.Array | None = None,
                 noise_level: jax.Array | None = None, drop_image: jax.Array | None = None,
                 drop_text: jax.Array | None = None, text_emb: jax.Array | None = None,
                 text_states: jax.Array | None = None, text_mask: jax.Array | None = None,
                 train: bool = False) -> jax.Array:
        b = x.shape[0]
        mc, ted = self.model_channels, 4 * self.model_channels
        emb = timestep_embedding(t, mc).astype(self.dtype)
        emb = Dense(ted, axes=(None, "mlp"), dtype=self.dtype, name="time_fc1")(emb)
        emb = Dense(ted, axes=("mlp", "embed"), dtype=self.dtype, name="time_fc2")(jax.nn.silu(emb))
        context, context_mask = [], []
        if self.noise_level_cond:
            if noise_level is None:
                raise ValueError("this UNet conditions on the low-res noise level: pass noise_level [B]")
            n = timestep_embedding(noise_level, mc).astype(self.dtype)
            n = Dense(ted, axes=(None, "mlp"), dtype=self.dtype, name="noise_fc1")(n)
            emb = emb + Dense(ted, axes=("mlp", "embed"), dtype=self.dtype, name="noise_fc2")(jax.nn.silu(n))
        if self.image_embed_dim:
            if image_emb is None:
                raise ValueError("this UNet conditions on a CLIP image embedding: pass image_emb [B, E]")
            null = self.param("null_image_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                                  ("embed",)),
                              (self.image_embed_dim,), jnp.float32)
            e = image_emb.astype(jnp.float32)
            if drop_image is not None:
                e = jnp.where(drop_image[:, None], null[None], e)
            if self.image_embed_scale != 1.0:
                e = e * self.image_embed_scale
            e = e.astype(self.dtype)
            emb = emb + Dense(ted, axes=("embed", "mlp"), dtype=self.dtype, name="image_to_time")(e)
            toks = Dense(self.image_tokens * self.context_dim, axes=("embed", "mlp"), dtype=self.dtype,
                         name="image_to_tokens")(e)
            context.append(toks.reshape(b, self.image_tokens, self.context_dim))
            context_mask.append(jnp.ones((b, self.image_tokens), bool))
        if self.text_embed_width:
            if text_emb is None:
                raise ValueError("this UNet conditions on a CLIP text embedding: pass text_emb [B, E]")
            emb = emb + Dense(ted, axes=("embed", "mlp"), dtype=self.dtype, name="text_to_time")(
                text_emb.astype(self.dtype))
        if self.caption_depth:
            if tokens is None:
                raise ValueError("this UNet has a caption transformer: pass tokens [B, L]")
            if drop_text is not None:
                tokens = jnp.where(drop_text[:, None], self.caption_pad_id, tokens)
            states = CaptionTransformer(self.caption_vocab_size, self.caption_context_length, self.caption_width,
                                        self.caption_depth, self.caption_heads, pad_id=self.caption_pad_id,
                                        remat=self.remat, scan_layers=self.caption_scan_layers,
                                        dtype=self.dtype, name="caption")(tokens)
            emb = emb + Dense(ted, axes=("embed", "mlp"), dtype=self.dtype, name="caption_to_time")(states[:, -1])
            context.append(states)
            context_mask.append(jnp.ones(states.shape[:2], bool))
        masked = False
        if self.text_states_width:
            if text_states is None or text_mask is None:
                raise ValueError("this UNet conditions on CLIP text token states: pass text_states [B, L, W] "
                                 "and text_mask [B, L]")
            s = Dense(self.context_dim, axes=("embed", "mlp"), dtype=self.dtype,
                      name="text_states_proj")(text_states.astype(self.dtype))
            context.append(LayerNorm(dtype=self.dtype, axis_name="mlp", name="text_states_norm")(s))
            context_mask.append(text_mask.astype(bool))
            masked = True
        ctx = jnp.concatenate(context, axis=1) if context else None
        ctx_mask = jnp.concatenate(context_mask, axis=1) if masked else None

        h = x.astype(self.dtype)
        up = None
        if self.low_res:
            if low_res is None:
                raise ValueError("this UNet is an upsampler: pass low_res [B, h, w, 3]")
            up = jax.image.resize(low_res.astype(jnp.float32), (b,) + x.shape[1:3] + (low_res.shape[-1],),
                                  method=self.low_res_upsample)
            h = jnp.concatenate([h, up.astype(self.dtype)], axis=-1)
        p, fc = int(self.patch_size), int(self.full_res_channels)
        if fc and p == 1:
            raise ValueError("full_res_channels needs patch_size > 1 (without patches every level is full-res)")
        attn_ds = {self.image_size // r for r in self.attention_resolutions}
        det = not train
        res = lambda ch, **kw: self._block(ResBlock, out_channels=ch, dropout=self.dropout,  # noqa: E731
                                           scale_shift=self.scale_shift, deterministic=det, **kw)
        full = None
        if fc:
            h = Conv(fc, dtype=self.dtype, name="full_res_in_conv")(h)
            h = full = res(fc, name="full_res_down")(h, emb)
        if p > 1:
            h = space_to_depth(h, p)
        def attn(name: str) -> Callable:
            block = self._block(AttentionBlock, head_channels=self.head_channels, name=name)
            return lambda h, c: block(h, c, ctx_mask)

        # Explicit names: the param tree is the same with and without remat.
        h = Conv(mc, dtype=self.dtype, name="in_conv")(h)
        skips, ds = [h], p
        for level, mult in enumerate(self.channel_mult):
            for i in range(self.num_res_blocks):
                h = res(mult * mc, name=f"down_{level}_res_{i}")(h, emb)
                if ds in attn_ds:
                    h = attn(name=f"down_{level}_attn_{i}")(h, ctx)
                skips.append(h)
            if level != len(self.channel_mult) - 1:
                if self.resblock_updown:
                    h = res(mult * mc, down=True, name=f"down_{level}_resample")(h, emb)
                else:
                    h = Conv(mult * mc, stride=2, dtype=self.dtype, name=f"down_{level}_resample")(h)
                ds *= 2
                skips.append(h)
        ch = self.channel_mult[-1] * mc
        h = res(ch, name="mid_res_0")(h, emb)
        if attn_ds:
            h = attn(name="mid_attn")(h, ctx)
        h = res(ch, name="mid_res_1")(h, emb)
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = res(mult * mc, name=f"up_{level}_res_{i}")(h, emb)
                if ds in attn_ds:
                    h = attn(name=f"up_{level}_attn_{i}")(h, ctx)
                if level and i == self.num_res_blocks:
                    if self.resblock_updown:
                        h = res(mult * mc, up=True, name=f"up_{level}_resample")(h, emb)
                    else:
                        h = Conv(mult * mc, dtype=self.dtype, name=f"up_{level}_resample")(upsample_nearest(h))
                    ds //= 2
        out_ch = self.out_channels * (2 if self.learned_sigma else 1)
        if full is not None:
            h = depth_to_space(Conv(fc * p * p, kernel=1, dtype=self.dtype, name="full_res_unfold")(h), p)
            h = res(fc, name="full_res_up")(jnp.concatenate([h, full], axis=-1), emb)
            p = 1
        h = jax.nn.silu(GroupNorm(self.groups, dtype=self.dtype, name="out_norm")(h))
        out = Conv(out_ch * p * p, zero_init=True, dtype=self.dtype, name="out_conv")(h).astype(jnp.float32)
        out = depth_to_space(out, p) if p > 1 else out
        if self.residual_low_res:
            if up is None:
                raise ValueError("residual_low_res needs low_res=True (an upsampler UNet)")
            n = up.shape[-1]
            out = jnp.concatenate([out[..., :n] + up, out[..., n:]], axis=-1)
        return out
