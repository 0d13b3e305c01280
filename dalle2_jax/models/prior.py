"""The diffusion prior: a decoder-only causal transformer from CLIP text to CLIP image embeddings.

The sequence is [caption token encodings (projected), text embedding, timestep embedding, noised image
embedding, learned final query]; the output at the final query is the prediction (the clean image
embedding by default, as in the paper). Dropped conditioning (for classifier-free guidance) masks the
caption tokens and replaces the text embedding with a learned null embedding.

Two switches express Kakao Brain's karlo prior (diffusers' `PriorTransformer`, imported by
tools/import_karlo.py): `text_token_norm=False` projects the caption token encodings without a LayerNorm
first, and `null_text_embedding=False` has no learned null embedding: `drop` is then ignored, and the caller
feeds the unconditional inputs (karlo's are the empty caption's encodings) itself.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from dalle2_jax.models.layers import Dense, LayerNorm, TimestepMlp, dtype_from_name
from dalle2_jax.models.transformer import Transformer


class DiffusionPrior(nn.Module):
    """x_t [B, E], t [B], text_emb [B, E], text_tokens [B, L, Wt], text_valid bool [B, L], drop bool [B]
    -> prediction [B, E] (float32)."""

    embed_dim: int
    width: int
    depth: int
    num_heads: int
    context_length: int
    mlp_ratio: float = 4.0
    act: str = "gelu"
    ln_eps: float = 1e-5
    remat: str = "none"
    scan_layers: bool = False
    text_token_norm: bool = True
    null_text_embedding: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_t: jax.Array, t: jax.Array, text_emb: jax.Array, text_tokens: jax.Array,
                 text_valid: jax.Array, drop: jax.Array) -> jax.Array:
        b, length = text_tokens.shape[:2]
        dense = lambda name: Dense(self.width, axes=(None, "embed"), dtype=self.dtype, name=name)  # noqa: E731
        if self.null_text_embedding:
            null_text = self.param("null_text_embedding",
                                   nn.with_logical_partitioning(nn.initializers.normal(0.02), (None,)),
                                   (self.embed_dim,), jnp.float32)
            text_emb = jnp.where(drop[:, None], null_text[None], text_emb)
        else:
            drop = jnp.zeros_like(drop)
        if self.text_token_norm:
            text_tokens = LayerNorm(self.ln_eps, self.dtype, axis_name=None, name="text_token_norm")(text_tokens)
        tokens = dense("text_token_proj")(text_tokens.astype(self.dtype))
        query = self.param("final_query", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                           (self.width,), jnp.float32)
        seq = jnp.concatenate([
            tokens,
            dense("text_emb_proj")(text_emb.astype(self.dtype))[:, None],
            TimestepMlp(self.width, self.dtype, name="time_embed")(t)[:, None],
            dense("x_proj")(x_t.astype(self.dtype))[:, None],
            jnp.broadcast_to(query.astype(self.dtype), (b, 1, self.width)),
        ], axis=1)
        pos = self.param("positional_embedding",
                         nn.with_logical_partitioning(nn.initializers.normal(0.01), ("length", "embed")),
                         (self.context_length + 4, self.width), jnp.float32)
        seq = seq + pos[None, : length + 4].astype(self.dtype)
        valid = jnp.concatenate([text_valid & ~drop[:, None], jnp.ones((b, 4), bool)], axis=1)  # [B, L+4]
        mask = valid[:, None, None, :]  # keys; combined with the causal mask inside attention
        h = Transformer(self.depth, self.num_heads, self.mlp_ratio, self.act, causal=True, ln_eps=self.ln_eps,
                        remat=self.remat, scan_layers=self.scan_layers, dtype=self.dtype, name="transformer")(
            seq, mask)
        h = LayerNorm(self.ln_eps, self.dtype, name="ln_final")(h[:, -1])
        out = Dense(self.embed_dim, axes=("embed", None), dtype=self.dtype, name="out")(h)
        return out.astype(jnp.float32)


def build_prior(model_cfg: Any, embed_dim: int, context_length: int) -> DiffusionPrior:
    """The prior for a `config.model` group (configs/prior.py), the CLIP's embedding width and text context."""
    m = model_cfg
    return DiffusionPrior(embed_dim=int(embed_dim), width=int(m.width), depth=int(m.depth), num_heads=int(m.heads),
                          context_length=int(context_length), mlp_ratio=float(m.mlp_ratio), act=m.act,
                          ln_eps=float(m.ln_eps), remat=m.remat, scan_layers=bool(m.scan_layers),
                          text_token_norm=bool(m.get("text_token_norm", True)),
                          null_text_embedding=bool(m.get("null_text_embedding", True)),
                          dtype=dtype_from_name(m.dtype))
