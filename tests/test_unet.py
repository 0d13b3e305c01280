"""The GLIDE/ADM UNet: shapes for every config (paper ones abstractly), conditioning, remat."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from dalle2_jax.models.unet import UNet


@pytest.mark.parametrize("variant", [
    "decoder:tiny", "decoder:shapes", pytest.param("decoder:base", marks=pytest.mark.slow), "decoder:paper",
    # the upsamplers' paper counts take 7-8 s each to trace: slow (the tiny variants check the same code)
    "upsampler:tiny_64to256", pytest.param("upsampler:paper_64to256", marks=pytest.mark.slow),
    "upsampler:tiny_256to1024", pytest.param("upsampler:paper_256to1024", marks=pytest.mark.slow),
])
def test_every_config_has_the_right_output_shape(variant):
    """Built from the config through the stage, with jax.eval_shape (no memory for the paper models); the
    paper models' parameter counts are checked against ours and the paper's (tests/test_scale.py)."""
    from test_scale import PAPER_COUNTS, check_paper_count

    import importlib

    from dalle2_jax.stages import get_stage_class

    name, arg = variant.split(":")
    cfg = importlib.import_module(f"configs.{name}").get_config(arg)
    stage = get_stage_class(cfg.stage)(cfg, "")
    params = jax.eval_shape(stage.abstract_init, jax.random.key(0))
    b, r = 2, int(cfg.data.resolution)
    t = jax.ShapeDtypeStruct((b,), jnp.int32)
    if cfg.stage == "decoder":
        x = jax.ShapeDtypeStruct((b, r, r, 3), jnp.float32)
        out = jax.eval_shape(lambda p, x, t: stage.unet.apply(
            p, x, t, image_emb=jnp.zeros((b, stage.embed_dim)), tokens=jnp.zeros((b, stage.context_length), jnp.int32),
            drop_image=jnp.zeros((b,), bool), drop_text=jnp.zeros((b,), bool)), params, x, t)
        assert out.shape == (b, r, r, 6 if cfg.diffusion.learned_variance else 3)
        assert stage.context_length == (cfg.model.caption_context_length or cfg.model.clip_context_length)
    else:
        low = int(cfg.data.low_res_resolution)
        for side in (int(cfg.data.crop_size), r):  # trained on crops, sampled at full size
            x = jax.ShapeDtypeStruct((b, side, side, 3), jnp.float32)
            lo = jax.ShapeDtypeStruct((b, side * low // r, side * low // r, 3), jnp.float32)
            out = jax.eval_shape(lambda p, x, t, lo: stage.unet.apply(p, x, t, low_res=lo), params, x, t, lo)
            assert out.shape == (b, side, side, 3)
        assert not any("attn" in k for k in meta.unbox(params)["params"])  # convolution only
    if variant in PAPER_COUNTS:
        check_paper_count(variant, {"total": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(meta.unbox(params)))})


def _micro(**kw) -> UNet:
    base = dict(model_channels=16, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(8,), image_size=16,
                head_channels=8, learned_sigma=True, image_embed_dim=12, caption_vocab_size=20,
                caption_context_length=6, caption_width=16, caption_depth=1, caption_heads=2)
    return UNet(**{**base, **kw})


def _perturbed_params(model: UNet, inputs: dict, seed: int) -> dict:
    """Init, then add noise to every param: the zero-initialised output layers would hide the conditioning.
    (An RBG key and host-side noise keep the compile small: threefry over ~200 params compiles slowly.)"""
    params = meta.unbox(jax.jit(lambda k: model.init(k, **inputs))(jax.random.key(seed, impl="rbg")))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(np.float32), params)


def _apply_twice(model: UNet, params: dict, inputs: dict, x2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The model on `inputs` and on the same inputs with x = x2, as one jitted batch (one compile)."""
    both = {k: jnp.concatenate([v, v]) for k, v in inputs.items()}
    both["x"] = jnp.concatenate([inputs["x"], x2])
    return jnp.split(jax.jit(model.apply)(params, **both), 2)


def _inputs(b=2):
    k = jax.random.split(jax.random.key(3), 3)
    return dict(x=jax.random.normal(k[0], (b, 16, 16, 3)), t=jnp.array([10, 500][:b]),
                image_emb=jax.random.normal(k[1], (b, 12)), tokens=jax.random.randint(k[2], (b, 6), 1, 20))


def test_image_embedding_conditions_the_output():
    model = _micro()
    inputs = _inputs()
    params = _perturbed_params(model, inputs, 0)
    w = jax.random.normal(jax.random.key(9), (2, 16, 16, 6))

    def f(emb):
        return jnp.sum(model.apply(params, **{**inputs, "image_emb": emb}) * w)

    grad = jax.jit(jax.grad(f))(inputs["image_emb"])
    assert float(jnp.abs(grad).min()) > 0, grad  # every embedding dim moves the output

    no, yes = jnp.zeros((2,), bool), jnp.ones((2,), bool)

    @jax.jit
    def variants(params):  # five conditionings of the same two rows, as one batch of ten (one compile)
        emb = inputs["image_emb"]
        embs = [emb, jnp.zeros_like(emb), emb, emb, emb]
        drop_image = [no, no, yes, no, jnp.array([True, False])]
        drop_text = [no, no, no, yes, no]
        rep = lambda a: jnp.concatenate([a] * 5)  # noqa: E731
        out = model.apply(params, x=rep(inputs["x"]), t=rep(inputs["t"]), tokens=rep(inputs["tokens"]),
                          image_emb=jnp.concatenate(embs), drop_image=jnp.concatenate(drop_image),
                          drop_text=jnp.concatenate(drop_text))
        return jnp.split(out, 5)

    out, zeroed, dropped, no_caption, half = variants(params)
    for other in (zeroed, dropped, no_caption):
        assert float(jnp.abs(out - other).mean()) > 1e-3
    # dropping uses the learned null embedding, which is not the zero embedding
    assert float(jnp.abs(zeroed - dropped).mean()) > 1e-3
    # dropping one row's condition leaves the other row alone
    np.testing.assert_allclose(half[1], out[1], atol=1e-5)
    np.testing.assert_allclose(half[0], dropped[0], atol=1e-5)


def test_attention_layers_read_the_context_tokens():
    """With the timestep path of the conditioning cut (no caption, image_to_time zeroed), the embedding
    still changes the output, through the extra context tokens in the attention layers."""
    model = _micro(caption_depth=0)
    inputs = {k: v for k, v in _inputs().items() if k != "tokens"}
    params = _perturbed_params(model, inputs, 1)
    params["params"]["image_to_time"] = jax.tree.map(jnp.zeros_like, params["params"]["image_to_time"])
    apply = jax.jit(model.apply)
    a = apply(params, **inputs)
    b = apply(params, **{**inputs, "image_emb": inputs["image_emb"] * -1.0})
    assert float(jnp.abs(a - b).mean()) > 1e-3
    params["params"]["image_to_tokens"] = jax.tree.map(jnp.zeros_like, params["params"]["image_to_tokens"])
    a = apply(params, **inputs)
    b = apply(params, **{**inputs, "image_emb": inputs["image_emb"] * -1.0})
    np.testing.assert_allclose(a, b, atol=1e-5)



def test_image_embed_scale_multiplies_the_embedding_and_the_null():
    """image_embed_scale s (the decoder's scale_embedding: sqrt(E)) is the same as feeding s * embedding, with the
    learned null embedding scaled alike; the params are the same tree."""
    inputs = _inputs()
    scaled, plain = _micro(image_embed_scale=3.0), _micro()
    params = _perturbed_params(plain, inputs, 2)
    drop = jnp.array([False, True])
    a = jax.jit(scaled.apply)(params, **inputs, drop_image=drop)
    p3 = jax.tree.map(lambda x: x, params)
    p3["params"]["null_image_embedding"] = params["params"]["null_image_embedding"] * 3.0
    b = jax.jit(plain.apply)(p3, **{**inputs, "image_emb": inputs["image_emb"] * 3.0}, drop_image=drop)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    c = jax.jit(plain.apply)(params, **inputs, drop_image=drop)
    assert float(jnp.abs(a - c).mean()) > 1e-3

def test_scanned_caption_transformer_matches_the_unrolled_one():
    """caption_scan_layers (the paper config's compile-time switch) stacks the caption blocks on a leading
    axis: the same params, restacked, give the same token states; the UNet passes the switch down."""
    from dalle2_jax.models.unet import CaptionTransformer

    tokens = jax.random.randint(jax.random.key(5), (2, 6), 0, 20)
    plain, scanned = (CaptionTransformer(20, 6, 16, 2, 2, scan_layers=s) for s in (False, True))
    params = meta.unbox(plain.init(jax.random.key(0), tokens))
    tr = params["params"]["transformer"]
    restacked = {"params": {**params["params"], "transformer": {
        "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), tr["block_0"], tr["block_1"])}}}
    abstract = jax.eval_shape(lambda k: meta.unbox(scanned.init(k, tokens)), jax.random.key(0))
    assert jax.tree.structure(abstract) == jax.tree.structure(restacked)
    np.testing.assert_allclose(scanned.apply(restacked, tokens), plain.apply(params, tokens), atol=1e-5)
    unet = jax.eval_shape(lambda k: meta.unbox(_micro(caption_depth=2, caption_scan_layers=True).init(k, **_inputs())),
                          jax.random.key(0))
    assert jax.tree.structure(unet["params"]["caption"]) == jax.tree.structure(abstract["params"])


@pytest.mark.slow
def test_remat_keeps_params_outputs_and_gradients():
    inputs = _inputs()
    plain, remat = _micro(), _micro(remat="full")
    params = _perturbed_params(plain, inputs, 2)
    assert jax.tree.structure(meta.unbox(remat.init(jax.random.key(0), **inputs))) == jax.tree.structure(params)

    def loss(model, p):
        return jnp.mean(model.apply(p, **inputs) ** 2)

    l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(plain, p)))(params)
    l2, g2 = jax.jit(jax.value_and_grad(lambda p: loss(remat, p)))(params)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_upsampler_unet_is_size_agnostic_and_uses_the_low_res_input():
    model = UNet(model_channels=8, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(), image_size=32,
                 low_res=True, noise_level_cond=True, scale_shift=False, resblock_updown=False)
    k = jax.random.split(jax.random.key(0), 3)
    x16, lo4 = jax.random.normal(k[0], (1, 16, 16, 3)), jax.random.normal(k[1], (1, 4, 4, 3))
    params = _perturbed_params(model, dict(x=x16, t=jnp.array([3]), low_res=lo4, noise_level=jnp.array([0])), 3)
    x32, lo8 = jax.random.normal(k[0], (1, 32, 32, 3)), jax.random.normal(k[1], (1, 8, 8, 3))
    apply = jax.jit(lambda p, lo, n: model.apply(p, x32, jnp.array([3]), low_res=lo, noise_level=n))
    out = apply(params, lo8, jnp.array([0]))
    assert out.shape == (1, 32, 32, 3)
    other = apply(params, -lo8, jnp.array([0]))
    noisier = apply(params, lo8, jnp.array([200]))
    assert float(jnp.abs(out - other).mean()) > 1e-3 and float(jnp.abs(out - noisier).mean()) > 1e-3
    with pytest.raises(ValueError, match="low_res"):
        model.apply(params, x32, jnp.array([3]), noise_level=jnp.array([0]))


def test_patch_size_folds_patches_into_channels():
    """space_to_depth / depth_to_space are inverses with each patch in one position; a patched UNet maps
    [B, R, R, 3] to [B, R, R, 6] (learned sigma), its first conv sees p*p*3 channels, each output patch
    depends on the input, and attention sits at the same image-pixel resolutions; bad sizes are refused."""
    from configs.decoder import get_config

    from dalle2_jax.models.unet import depth_to_space, space_to_depth
    from dalle2_jax.stages import get_stage_class
    from dalle2_jax.training.config import ConfigError

    x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
    s = space_to_depth(x, 2)
    assert s.shape == (2, 2, 2, 12)
    np.testing.assert_array_equal(s[0, 1, 0].reshape(2, 2, 3), x[0, 2:4, 0:2])
    np.testing.assert_array_equal(depth_to_space(s, 2), x)

    model = _micro(patch_size=2, attention_resolutions=(8,))
    inputs = _inputs()
    params = _perturbed_params(model, inputs, 0)
    assert params["params"]["in_conv"]["conv"]["kernel"].shape[2] == 12
    assert params["params"]["out_conv"]["conv"]["kernel"].shape[3] == 24
    assert any("attn" in k for k in params["params"])  # 8 px at image size 16 = the first level of a p=2 UNet
    x2 = inputs["x"].at[:, 8:10, 8:10].add(1.0)  # one 2x2 patch changed
    out, out2 = _apply_twice(model, params, inputs, x2)
    assert out.shape == (2, 16, 16, 6)
    assert not np.allclose(out2, out)

    # a full-resolution level around the folded UNet: stem and head blocks at 16 px, out_conv at 16 px
    model = _micro(patch_size=2, attention_resolutions=(8,), full_res_channels=8)
    params = _perturbed_params(model, inputs, 0)
    p = params["params"]
    assert p["full_res_in_conv"]["conv"]["kernel"].shape[2:] == (3, 8)
    assert p["in_conv"]["conv"]["kernel"].shape[2] == 32  # 2x2 patches of the 8-channel stem
    assert p["out_conv"]["conv"]["kernel"].shape[2:] == (8, 6) and "full_res_up" in p and "full_res_down" in p
    out, out2 = _apply_twice(model, params, inputs, x2)
    assert out.shape == (2, 16, 16, 6) and np.isfinite(out).all()
    assert not np.allclose(out2, out)

    cfg = get_config("tiny")
    cfg.model.full_res_channels = 8  # patch_size 1: refused
    with pytest.raises(ConfigError, match="full_res_channels"):
        get_stage_class("decoder").validate_unet(cfg)
    cfg.model.full_res_channels = 0
    cfg.model.patch_size = 3
    with pytest.raises(ConfigError, match="patch_size"):
        get_stage_class("decoder").validate_unet(cfg)
    cfg.model.patch_size, cfg.model.attention_resolutions = 2, (64,)  # no 64 px feature map with 2x2 patches
    with pytest.raises(ConfigError, match="attention_resolutions"):
        get_stage_class("decoder").validate_unet(cfg)
