"""Import of karlo (diffusers unCLIP) weights against diffusers' own outputs (issue 11), without torch.

tests/fixtures/karlo_tiny/ holds a tiny diffusers PriorTransformer with karlo's settings (perturbed random
weights in the diffusers folder layout) and diffusers' outputs on fixed inputs; tests/fixtures/
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

from configs import prior as prior_configs
from dalle2_jax.inference.errors import InputError
from dalle2_jax.models.prior import build_prior
from dalle2_jax.tools import import_karlo as K

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TINY = os.path.join(FIXTURES, "karlo_tiny")
PRIOR_DIR = os.path.join(TINY, "prior")
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
