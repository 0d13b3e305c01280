"""Import of karlo (diffusers unCLIP) weights against diffusers' own outputs (issue 11), without torch.

tests/fixtures/karlo_tiny/ holds a tiny diffusers PriorTransformer with karlo's settings, a tiny
UNet2DConditionModel with karlo's decoder block types with its UnCLIPTextProjModel, and two tiny
UNet2DModels with karlo's super-res settings (perturbed random weights in the diffusers folder layout), and
diffusers' outputs on fixed inputs; tests/fixtures/
karlo_keys.json the full-size karlo components' tensor names and shapes. Both were made once by
scripts/make_karlo_fixtures.py in a separate environment with torch and diffusers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from configs import decoder as decoder_configs
from configs import prior as prior_configs
from configs import upsampler as upsampler_configs
from dalle2_jax.inference.errors import InputError
from dalle2_jax.models.prior import build_prior
from dalle2_jax.stages import get_stage_class
from dalle2_jax.tools import import_karlo as K

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TINY = os.path.join(FIXTURES, "karlo_tiny")
PRIOR_DIR = os.path.join(TINY, "prior")
DECODER_DIR, TEXT_PROJ_DIR = os.path.join(TINY, "decoder"), os.path.join(TINY, "text_proj")
TOL = 1e-4


@pytest.fixture(scope="module")
def ref():
    with open(os.path.join(TINY, "index.json")) as f:
        index = json.load(f)
    return index, dict(np.load(os.path.join(TINY, "reference.npz")))


@pytest.fixture(scope="module")
def full_keys():
    with open(os.path.join(FIXTURES, "karlo_keys.json")) as f:
        return json.load(f)["components"]


def run_prior(imported: K.ImportedPrior, arrays: dict, t: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Our prior (float32) on the fixture's inputs: prediction [B, E]."""
    m = imported.config.model
    m.dtype = "float32"
    model = build_prior(m, int(m.clip_embed_dim), int(m.clip_context_length))
    x_t = arrays["prior/x_t"]
    mask = arrays["prior/text_mask"] if mask is None else mask
    out = jax.jit(model.apply)(imported.variables, jnp.asarray(x_t), jnp.asarray(t),
                               jnp.asarray(arrays["prior/text_emb"]), jnp.asarray(arrays["prior/text_states"]),
                               jnp.asarray(mask), jnp.zeros((len(x_t),), bool))
    return np.asarray(out)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_tiny_prior_matches_diffusers(ref, scan_layers):
    """The imported tiny prior gives diffusers' prediction within 1e-4 (fp32) for rows with different
    timesteps and caption lengths, and un-normalising with the imported clip_mean / clip_std gives what
    diffusers' post_process_latents gives."""
    index, arrays = ref
    with open(os.path.join(PRIOR_DIR, K.WEIGHTS_NAME), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == index["components"]["prior"]["weights_sha256"]
    imported = K.load_prior(PRIOR_DIR, scan_layers=scan_layers)
    m = imported.config.model
    assert (m.width, m.depth, m.heads, m.clip_embed_dim, m.clip_text_width, m.clip_context_length) == (
        32, 2, 2, 24, 24, 12)
    assert not m.text_token_norm and not m.null_text_embedding and m.act == "gelu"
    assert imported.num_tensors == 2 * 16 + 18
    want = arrays["prior/predicted"]
    got = run_prior(imported, arrays, arrays["prior/timesteps"])
    err = float(np.abs(got - want).max())
    assert err < TOL * max(1.0, float(np.abs(want).max())), err
    unnorm = got * imported.stats["std"] + imported.stats["mean"]
    np.testing.assert_allclose(unnorm, arrays["prior/unnormalised"], atol=TOL * 5, rtol=0)
    got437 = run_prior(imported, arrays, np.full((len(got),), 437, np.int32))
    np.testing.assert_allclose(got437, arrays["prior/predicted_t437"], atol=TOL * 5, rtol=0)
    # the comparison sees the padding mask: unmasking the padding moves the padded rows far off diffusers'
    unmasked = run_prior(imported, arrays, arrays["prior/timesteps"], np.ones_like(arrays["prior/text_mask"]))
    padded = ~arrays["prior/text_mask"].all(axis=1)
    assert padded.sum() == 3 and np.abs(unmasked - want).max(axis=1)[padded].min() > 100 * TOL


def _copy_prior(tmp_path, edit) -> str:
    """The tiny prior folder with its tensors edited by `edit(dict)` (in place)."""
    folder = tmp_path / "prior"
    shutil.copytree(PRIOR_DIR, folder)
    tensors = load_file(str(folder / K.WEIGHTS_NAME))
    edit(tensors)
    save_file(tensors, str(folder / K.WEIGHTS_NAME))
    return str(folder)


def test_missing_tensor_is_refused_by_name(tmp_path):
    folder = _copy_prior(tmp_path, lambda t: t.pop("transformer_blocks.1.attn1.to_k.bias"))
    with pytest.raises(InputError, match=r"1 missing: transformer_blocks\.1\.attn1\.to_k\.bias"):
        K.load_prior(folder)


def test_misshaped_tensor_is_refused_by_name(tmp_path):
    def edit(t):
        t["proj_to_clip_embeddings.weight"] = np.zeros((24, 16), np.float32)

    folder = _copy_prior(tmp_path, edit)
    with pytest.raises(InputError, match=r"mis-shaped: proj_to_clip_embeddings\.weight \(24, 16\) \(expected "
                                         r"\(24, 32\)\)"):
        K.load_prior(folder)


def test_unexpected_tensor_is_refused_by_name(tmp_path):
    def edit(t):
        t["transformer_blocks.0.attn2.to_q.weight"] = np.zeros((32, 32), np.float32)

    folder = _copy_prior(tmp_path, edit)
    with pytest.raises(InputError, match=r"1 unexpected: transformer_blocks\.0\.attn2\.to_q\.weight"):
        K.load_prior(folder)


@pytest.mark.parametrize("key,value", [("norm_in_type", "layer"), ("added_emb_type", None),
                                       ("time_embed_dim", 64), ("clip_embed_dim", 16)])
def test_inexpressible_config_is_refused_by_key(tmp_path, key, value):
    folder = tmp_path / "prior"
    shutil.copytree(PRIOR_DIR, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=key):
        K.load_prior(str(folder))


def test_full_size_karlo_prior_mapping(full_keys):
    """The mapping reads exactly the full-size karlo prior's tensors (names and shapes from diffusers' own
    PriorTransformer()), and the params it builds have exactly the shapes configs/prior.py:karlo's model
    initialises (scanned and unscanned): shapes only, no weights."""
    entry = full_keys["prior"]
    want = {k: tuple(v) for k, v in entry["tensors"].items()}
    assert entry["num_tensors"] == len(want) == 338 and entry["num_params"] == 1_022_030_080
    config = K.karlo_prior_config(entry["config"])
    karlo = prior_configs.get_config("karlo")
    for key in ("width", "depth", "heads", "clip_embed_dim", "clip_text_width", "clip_context_length",
                "text_token_norm", "null_text_embedding", "act"):
        assert config.model[key] == karlo.model[key], key
    assert (karlo.model.width, karlo.model.depth, karlo.model.heads, karlo.model.clip_embed_dim,
            karlo.model.clip_context_length) == (2048, 20, 32, 768, 77)
    assert (karlo.diffusion.model_output, karlo.diffusion.learned_variance) == ("x0", False)
    dims = K.prior_dims(entry["config"])
    plan = K.prior_plan(dims)
    assert K.expected_tensors(plan) == want
    abstract_in = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in want.items()}
    for scan in (True, False):
        config.model.scan_layers = scan
        converted, stats = jax.eval_shape(
            lambda t: K.apply_plan(plan, t, dims.depth, scan, stack=jnp.stack), abstract_in)
        expected = K.abstract_prior_variables(config)
        shapes = lambda tree: {jax.tree_util.keystr(k): tuple(x.shape)  # noqa: E731
                               for k, x in jax.tree_util.tree_leaves_with_path(tree)}
        assert shapes(converted) == shapes(expected)
        assert {k: tuple(v.shape) for k, v in stats.items()} == {"mean": (768,), "std": (768,)}
        n = sum(int(np.prod(s)) for s in shapes(converted).values())
        assert n + 2 * 768 == entry["num_params"]


# --- the decoder and text_proj -----------------------------------------------------------------------------
_TEXT_PROJ_PARTS = ("image_to_tokens", "text_states_norm", "image_to_time", "text_to_time")


@pytest.fixture(scope="module")
def tiny_decoder():
    """The imported tiny decoder and one jitted forward over it: (imported, run(mask, null_rows) -> (output
    [B, H, W, 6], {part: output of that layer}))."""
    imported = K.load_decoder(DECODER_DIR, TEXT_PROJ_DIR)
    imported.config.model.dtype = "float32"
    stage = get_stage_class("decoder")(imported.config, "")
    stage.setup_model()
    capture = lambda mdl, _: mdl.name in _TEXT_PROJ_PARTS  # noqa: E731

    @jax.jit
    def forward(variables, x, t, image_emb, text_emb, states, mask, null_rows):
        out, state = stage.unet.apply(variables, x, t, image_emb=image_emb, text_emb=text_emb, text_states=states,
                                      text_mask=mask, drop_image=null_rows, capture_intermediates=capture,
                                      mutable=["intermediates"])
        return out, {k: v["__call__"][0] for k, v in state["intermediates"].items()}

    arrays = dict(np.load(os.path.join(TINY, "reference.npz")))
    x = arrays["decoder/x_t"].transpose(0, 2, 3, 1)  # diffusers' NCHW -> our NHWC

    def run(mask, null_rows):
        out, parts = forward(imported.variables, x, arrays["decoder/timesteps"], arrays["decoder/image_emb"],
                             arrays["decoder/text_emb"], arrays["decoder/text_states"], mask, null_rows)
        return np.asarray(out), {k: np.asarray(v) for k, v in parts.items()}

    return imported, run


def test_tiny_text_proj_and_decoder_match_diffusers(ref, tiny_decoder):
    """The imported tiny text_proj gives diffusers' context tokens (4 image tokens in diffusers' interleaved
    layout, then the projected and normed text states) and additive time embedding, one row with the
    learned null image embedding; the imported decoder on them gives diffusers' UNet output within 1e-4
    (fp32) for rows with different timesteps and text lengths; and the text mask and the null are both seen."""
    index, arrays = ref
    for name, folder in (("decoder", DECODER_DIR), ("text_proj", TEXT_PROJ_DIR)):
        with open(os.path.join(folder, K.WEIGHTS_NAME), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == index["components"][name]["weights_sha256"]
    imported, run = tiny_decoder
    m = imported.config.model
    assert (m.channels, tuple(m.channel_mult), m.num_res_blocks, tuple(m.attention_resolutions), m.head_channels,
            m.groups, m.context_width, m.image_tokens, m.clip_embed_dim, m.clip_text_width) == (
        8, (1, 2, 3), 2, (8, 4), 8, 2, 20, 4, 12, 12)
    assert m.scale_shift and m.clip_text_conditioning and not m.normalize_embedding and m.caption_depth == 0
    assert imported.config.data.resolution == 16 and imported.config.diffusion.learned_variance
    mask, null = arrays["decoder/text_mask"], arrays["decoder/null_rows"]
    out, parts = run(mask, null)

    b, tokens = len(out), m.image_tokens
    context = np.concatenate([parts["image_to_tokens"].reshape(b, tokens, -1), parts["text_states_norm"]], axis=1)
    np.testing.assert_allclose(context, arrays["text_proj/context"], atol=TOL, rtol=0)
    np.testing.assert_allclose(parts["image_to_time"] + parts["text_to_time"], arrays["text_proj/additive"],
                               atol=TOL * 10, rtol=0)  # values up to 12
    want = arrays["decoder/output"].transpose(0, 2, 3, 1)
    assert out.shape == want.shape == (4, 16, 16, 6)
    err = float(np.abs(out - want).max())
    assert err < TOL * max(1.0, float(np.abs(want).max())), err

    # the comparison sees the text padding mask and the null embedding
    unmasked, _ = run(np.ones_like(mask), null)
    padded = ~mask.all(axis=1)
    assert padded.sum() == 3 and np.abs(unmasked - want).max(axis=(1, 2, 3))[padded].min() > 100 * TOL
    assert np.abs(unmasked - want).max(axis=(1, 2, 3))[~padded].max() < TOL
    no_null, _ = run(mask, np.zeros_like(null))
    moved = np.abs(no_null - want).max(axis=(1, 2, 3))
    assert moved[null].min() > 100 * TOL and moved[~null].max() < TOL


def _copy_folders(tmp_path, component: str, edit) -> tuple[str, str]:
    """The tiny decoder/ and text_proj/ folders with `component`'s tensors edited by `edit(dict)` (in place)."""
    folders = []
    for name, src in (("decoder", DECODER_DIR), ("text_proj", TEXT_PROJ_DIR)):
        shutil.copytree(src, tmp_path / name)
        folders.append(str(tmp_path / name))
    weights = str(tmp_path / component / K.WEIGHTS_NAME)
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights)
    return folders[0], folders[1]


@pytest.mark.parametrize("component,edit,message", [
    ("decoder", lambda t: t.pop("up_blocks.0.attentions.2.add_k_proj.bias"),
     r"decoder/diffusion_pytorch_model\.safetensors does not fit.*\n  1 missing: up_blocks\.0\.attentions\.2\."
     r"add_k_proj\.bias$"),
    ("decoder", lambda t: t.update({"mid_block.attentions.0.to_q.weight": np.zeros((24, 16), np.float16)}),
     r"1 mis-shaped: mid_block\.attentions\.0\.to_q\.weight \(24, 16\) \(expected \(24, 24\)\)"),
    ("decoder", lambda t: t.update({"down_blocks.0.attentions.0.to_q.weight": np.zeros((8, 8), np.float16)}),
     r"1 unexpected: down_blocks\.0\.attentions\.0\.to_q\.weight"),
    ("text_proj", lambda t: t.pop("learned_classifier_free_guidance_embeddings"),
     r"text_proj/diffusion_pytorch_model\.safetensors does not fit.*\n  1 missing: "
     r"learned_classifier_free_guidance_embeddings$"),
])
def test_decoder_tensor_errors_are_refused_by_name(tmp_path, component, edit, message):
    folders = _copy_folders(tmp_path, component, edit)
    with pytest.raises(InputError, match=message):
        K.load_decoder(*folders)


@pytest.mark.parametrize("component,key,value", [
    ("decoder", "resnet_time_scale_shift", "ada_group"), ("decoder", "class_embed_type", "timestep"),
    ("decoder", "only_cross_attention", True), ("decoder", "norm_num_groups", 4), ("decoder", "norm_eps", 1e-6),
    ("decoder", "up_block_types", ["SimpleCrossAttnUpBlock2D"] * 3), ("decoder", "layers_per_block", [2, 2, 1]),
    ("decoder", "mid_block_type", "UNetMidBlock2DCrossAttn"), ("decoder", "out_channels", 4),
    ("text_proj", "time_embed_dim", 64), ("text_proj", "cross_attention_dim", 24),
])
def test_inexpressible_decoder_config_is_refused_by_key(tmp_path, component, key, value):
    folders = {}
    for name, src in (("decoder", DECODER_DIR), ("text_proj", TEXT_PROJ_DIR)):
        shutil.copytree(src, tmp_path / name)
        folders[name] = str(tmp_path / name)
    path = tmp_path / component / "config.json"
    cfg = json.loads(path.read_text())
    cfg[key] = value
    path.write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=rf"{component}/config\.json: {key}"):
        K.load_decoder(folders["decoder"], folders["text_proj"])


def test_full_size_karlo_decoder_mapping(full_keys):
    """The mapping reads exactly the full-size karlo decoder's and text_proj's tensors (names and shapes from
    diffusers' own classes with karlo's configs), and the params it builds have exactly the shapes
    configs/decoder.py:karlo's UNet initialises: shapes only, no weights. Their count is diffusers'."""
    dec, tp = full_keys["decoder"], full_keys["text_proj"]
    assert (dec["num_tensors"], dec["num_params"], tp["num_tensors"], tp["num_params"]) == (
        716, 885_439_686, 11, 7_878_400)
    config = K.karlo_decoder_config(dec["config"], tp["config"])
    karlo = decoder_configs.get_config("karlo")
    assert config.to_dict() == karlo.to_dict()  # the import of karlo-v1-alpha's configs is the karlo variant
    dims = K.decoder_dims(dec["config"], tp["config"])
    converted = {}
    for entry, plan in ((dec, K.decoder_plan(dims)), (tp, K.text_proj_plan(dims))):
        want = {k: tuple(v) for k, v in entry["tensors"].items()}
        assert K.expected_tensors(plan) == want
        abstract_in = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in want.items()}
        converted.update(jax.eval_shape(lambda t: K.apply_plan(plan, t, 0, False)[0], abstract_in)["params"])
    shapes = lambda tree: {jax.tree_util.keystr(k): tuple(x.shape)  # noqa: E731
                           for k, x in jax.tree_util.tree_leaves_with_path(tree)}
    expected = shapes(K.abstract_decoder_variables(karlo))
    assert shapes({"params": converted}) == expected
    assert sum(int(np.prod(s)) for s in expected.values()) == 885_439_686 + 7_878_400


# --- the super-res UNets (super_res_first, super_res_last) -------------------------------------------------
SR_FIRST_DIR, SR_LAST_DIR = os.path.join(TINY, "super_res_first"), os.path.join(TINY, "super_res_last")


@pytest.fixture(scope="module")
def tiny_super_res():
    """The imported tiny super-res pair and one jitted forward of our upsampler UNet (float32): (imported,
    stage, run(variables, low_res NHWC) -> output [B, H, W, 3] on the fixture's x_t and timesteps)."""
    imported = K.load_super_res(SR_FIRST_DIR, SR_LAST_DIR)
    imported.config.model.dtype = "float32"
    stage = get_stage_class("upsampler")(imported.config, "")
    stage.validate(imported.config)
    stage.setup_model()
    forward = jax.jit(lambda v, x, t, low: stage.unet.apply(v, x, t, low_res=low))
    arrays = dict(np.load(os.path.join(TINY, "reference.npz")))
    x = arrays["super_res/x_t"].transpose(0, 2, 3, 1)  # diffusers' NCHW -> our NHWC

    def run(variables, low):
        return np.asarray(forward(variables, x, arrays["super_res/timesteps"], low))

    return imported, stage, run


def test_tiny_super_res_match_diffusers(ref, tiny_super_res):
    """Both imported tiny super-res UNets give diffusers' output within 1e-4 (fp32) for rows with different
    timesteps, from the 4 px low-res image through our own bicubic upsampling (which gives the pipeline's
    F.interpolate(bicubic, antialias) image) and from the pipeline's upsampled image itself; the two weight
    sets are really different models under one config."""
    index, arrays = ref
    imported, stage, run = tiny_super_res
    for name, folder in (("super_res_first", SR_FIRST_DIR), ("super_res_last", SR_LAST_DIR)):
        with open(os.path.join(folder, K.WEIGHTS_NAME), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == index["components"][name]["weights_sha256"]
    assert json.loads(open(os.path.join(SR_LAST_DIR, "config.json")).read())["sample_size"] is None  # as on the hub
    m, d = imported.config.model, imported.config.data
    assert (m.channels, tuple(m.channel_mult), m.num_res_blocks, tuple(m.attention_resolutions), m.groups) == (
        8, (1, 1, 2), 2, (), 2)
    assert not m.scale_shift and m.resblock_updown and not m.predict_residual and not m.max_noise_level
    assert (d.resolution, d.low_res_resolution) == (16, 4) and not imported.config.diffusion.learned_variance
    assert m.low_res_upsample == stage.unet.low_res_upsample == "bicubic"
    assert imported.num_tensors == 240 and imported.num_params == 74_203  # diffusers' count

    low = arrays["super_res/low_res"].transpose(0, 2, 3, 1)
    upscaled = arrays["super_res/upscaled"].transpose(0, 2, 3, 1)
    ours_up = jax.image.resize(jnp.asarray(low), upscaled.shape, method=m.low_res_upsample)
    np.testing.assert_allclose(np.asarray(ours_up), upscaled, atol=1e-5, rtol=0)
    outs = {}
    for name, variables in (("super_res_first", imported.first), ("super_res_last", imported.last)):
        want = arrays[f"{name}/output"].transpose(0, 2, 3, 1)
        tol = TOL * max(1.0, float(np.abs(want).max()))
        outs[name] = out = run(variables, low)
        assert out.shape == want.shape == (4, 16, 16, 3)
        err = float(np.abs(out - want).max())
        assert err < tol, (name, err)
        # the pipeline's own upsampled image (our UNet's 16 -> 16 bicubic resize is the identity)
        err = float(np.abs(run(variables, upscaled) - want).max())
        assert err < tol, (name, err)
    assert np.abs(outs["super_res_first"] - outs["super_res_last"]).max(axis=(1, 2, 3)).min() > 100 * TOL


def _copy_super_res(tmp_path, component: str | None = None, edit=None, config_edit=None) -> tuple[str, str]:
    """The tiny super_res_first/ and super_res_last/ folders, `component`'s tensors edited by `edit(dict)` or
    its config.json by `config_edit(dict)` (in place)."""
    folders = []
    for name, src in (("super_res_first", SR_FIRST_DIR), ("super_res_last", SR_LAST_DIR)):
        shutil.copytree(src, tmp_path / name)
        folders.append(str(tmp_path / name))
    if edit is not None:
        weights = str(tmp_path / component / K.WEIGHTS_NAME)
        tensors = load_file(weights)
        edit(tensors)
        save_file(tensors, weights)
    if config_edit is not None:
        path = tmp_path / component / "config.json"
        cfg = json.loads(path.read_text())
        config_edit(cfg)
        path.write_text(json.dumps(cfg))
    return folders[0], folders[1]


@pytest.mark.parametrize("component,edit,message", [
    ("super_res_last", lambda t: t.pop("up_blocks.1.upsamplers.0.conv2.bias"),
     r"super_res_last/diffusion_pytorch_model\.safetensors does not fit.*\n  1 missing: up_blocks\.1\.upsamplers\.0\."
     r"conv2\.bias$"),
    ("super_res_first", lambda t: t.update({"conv_in.weight": np.zeros((8, 3, 3, 3), np.float16)}),
     r"super_res_first/diffusion_pytorch_model\.safetensors does not fit.*\n  1 mis-shaped: conv_in\.weight "
     r"\(8, 3, 3, 3\) \(expected \(8, 6, 3, 3\)\)$"),
    ("super_res_first", lambda t: t.update({"mid_block.attentions.0.to_q.weight": np.zeros((16, 16), np.float16)}),
     r"1 unexpected: mid_block\.attentions\.0\.to_q\.weight$"),
])
def test_super_res_tensor_errors_are_refused_by_name(tmp_path, component, edit, message):
    folders = _copy_super_res(tmp_path, component, edit=edit)
    with pytest.raises(InputError, match=message):
        K.load_super_res(*folders)


@pytest.mark.parametrize("component,key,value", [
    ("super_res_first", "add_attention", True), ("super_res_first", "in_channels", 3),
    ("super_res_first", "resnet_time_scale_shift", "ada_group"), ("super_res_first", "class_embed_type", "timestep"),
    ("super_res_first", "time_embedding_type", "fourier"), ("super_res_first", "norm_num_groups", 4),
    ("super_res_last", "down_block_types", ["ResnetDownsampleBlock2D", "DownBlock2D", "ResnetDownsampleBlock2D"]),
    ("super_res_last", "mid_block_type", None), ("super_res_last", "layers_per_block", [2, 2, 1]),
    ("super_res_first", "sample_size", None),  # the output side: the pipeline's comes from super_res_first
    ("super_res_last", "sample_size", 32),  # the two UNets share one config
])
def test_inexpressible_super_res_config_is_refused_by_key(tmp_path, component, key, value):
    folders = _copy_super_res(tmp_path, component, config_edit=lambda cfg: cfg.update({key: value}))
    with pytest.raises(InputError, match=rf"{component}/config\.json: {key}"):
        K.load_super_res(*folders)


def test_full_size_karlo_super_res_mapping(full_keys):
    """The mapping reads exactly the full-size karlo super_res_first's and super_res_last's tensors (names and
    shapes from diffusers' own UNet2DModel with karlo's configs), both import to configs/upsampler.py:
    karlo_64to256, and the params they build have exactly the shapes its UNet initialises: shapes only, no
    weights. The count is diffusers' 691,579,523 per model."""
    karlo = upsampler_configs.get_config("karlo_64to256")
    expected = None
    for name in ("super_res_first", "super_res_last"):
        entry = full_keys[name]
        assert (entry["class"], entry["num_tensors"], entry["num_params"]) == ("UNet2DModel", 408, 691_579_523)
        config = K.karlo_super_res_config(entry["config"], sample_size=256)
        assert config.to_dict() == karlo.to_dict()  # the import of karlo-v1-alpha's configs is the karlo variant
        plan = K.super_res_plan(K.super_res_dims(entry["config"]))
        want = {k: tuple(v) for k, v in entry["tensors"].items()}
        assert K.expected_tensors(plan) == want
        abstract_in = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in want.items()}
        converted = jax.eval_shape(lambda t: K.apply_plan(plan, t, 0, False)[0], abstract_in)
        shapes = lambda tree: {jax.tree_util.keystr(k): tuple(x.shape)  # noqa: E731
                               for k, x in jax.tree_util.tree_leaves_with_path(tree)}
        if expected is None:
            expected = shapes(K.abstract_super_res_variables(karlo))
        assert shapes(converted) == expected
    assert full_keys["super_res_first"]["config"]["sample_size"] == 256
    assert full_keys["super_res_last"]["config"]["sample_size"] is None
    assert sum(int(np.prod(s)) for s in expected.values()) == 691_579_523


def test_pipeline_tokenizer_matches_clip_bpe(ref):
    """pipeline/tokenizer/ (HF's CLIPTokenizer files, built offline from the package's merges) is CLIP's
    vocabulary in the package's order, and HF's ids for the fixture's prompts (padding 'max_length' 10,
    truncation) equal ClipBpeTokenizer's up to and including the EOT; after it HF pads with 49407 (the mask
    is 0 there) where the package pads with 0."""
    from dalle2_jax.text import ClipBpeTokenizer

    index, arrays = ref
    with open(os.path.join(TINY, "pipeline", "tokenizer", "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    ours = ClipBpeTokenizer(None, 10)
    assert len(vocab) == ours.vocab_size == 49408
    special = {"<|startoftext|>": ours.special_tokens[0], "<|endoftext|>": ours.special_tokens[1]}
    assert all(ours.encoder[special.get(tok, tok)] == i for tok, i in vocab.items())
    prompts = [str(p) for p in arrays["pipe/prompts"]] + [""]
    hf = np.concatenate([arrays["pipe/input_ids"], arrays["pipe/uncond_input_ids"]])
    mask = np.concatenate([arrays["pipe/attention_mask"], arrays["pipe/uncond_attention_mask"]])
    pkg = ours.encode_batch(prompts)
    np.testing.assert_array_equal(np.where(mask, hf, 0), pkg)
    np.testing.assert_array_equal(mask, np.cumsum(pkg == ours.eot_id, axis=1) - (pkg == ours.eot_id) == 0)
    assert (hf[~mask] == ours.eot_id).all()
    assert 0 in pkg[0][mask[0]]  # a real '!' token (id 0) inside the first prompt
    assert mask[1].all() and hf[1, -1] == ours.eot_id  # the second prompt is cut at 10 tokens, EOT last
    np.testing.assert_array_equal(arrays["var/uncond_input_ids"], arrays["pipe/uncond_input_ids"])
