"""One pre-LN transformer stack, shared by the CLIP text tower, the ViT and the prior."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from dalle2_jax.models.layers import LayerNorm, Mlp, MultiHeadAttention

_cp = jax.checkpoint_policies
# Rematerialisation policies by name (config model.remat). "none" keeps every activation; "full" keeps
# only each block's input; the dots policies keep matmul outputs; the save_* policies keep the activations
# tagged with checkpoint_name in models/layers.py and recompute the rest (norms, activations, softmax).
REMAT_POLICIES = {
    "none": None,
    "full": _cp.nothing_saveable,
    "dots_saveable": _cp.dots_saveable,
    "dots_with_no_batch_dims_saveable": _cp.dots_with_no_batch_dims_saveable,
    "save_qkv": _cp.save_only_these_names("query_proj", "key_proj", "value_proj"),
    "save_attention_out": _cp.save_only_these_names("query_proj", "key_proj", "value_proj", "attention_out"),
    "save_mlp_hidden": _cp.save_only_these_names("mlp_hidden"),
}


class TransformerBlock(nn.Module):
    """Pre-LN block: x + attn(ln(x)); x + mlp(ln(x)). x: [B, T, D] -> [B, T, D]."""

    num_heads: int
    mlp_ratio: float = 4.0
    act: str = "gelu"
    causal: bool = False
    ln_eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, None]:
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        h = LayerNorm(self.ln_eps, self.dtype, name="ln_1")(x)
        x = x + MultiHeadAttention(self.num_heads, dtype=self.dtype, name="attn")(
            h, mask=mask, causal=self.causal)
        h = LayerNorm(self.ln_eps, self.dtype, name="ln_2")(x)
        x = x + Mlp(int(x.shape[-1] * self.mlp_ratio), self.act, self.dtype, name="mlp")(h)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return x, None  # (carry, output) so the block can be scanned


class Transformer(nn.Module):
    """A stack of `depth` TransformerBlocks: [B, T, D] -> [B, T, D].

    `scan_layers` stacks the blocks' params on a leading `layers` axis and compiles one block;
    `remat` is a policy name from REMAT_POLICIES.
    """

    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    act: str = "gelu"
    causal: bool = False
    ln_eps: float = 1e-5
    remat: str = "none"
    scan_layers: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        block_cls = TransformerBlock
        if self.remat != "none":
            block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan_layers)
        kwargs = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, act=self.act, causal=self.causal,
                      ln_eps=self.ln_eps, dtype=self.dtype)
        if self.scan_layers:
            stack = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=nn.broadcast, length=self.depth,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = stack(name="blocks", **kwargs)(x, mask)
            return x
        for i in range(self.depth):
            x, _ = block_cls(name=f"block_{i}", **kwargs)(x, mask)
        return x
