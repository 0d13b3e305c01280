"""Import Kakao Brain's karlo unCLIP weights, published in the diffusers layout, into our modules (offline).

karlo-v1-alpha on the Hugging Face hub is a diffusers `UnCLIPPipeline` folder: one sub-folder per
component, each with a `config.json` and a `diffusion_pytorch_model.safetensors` (see
../shared/IMPORT_NOTES.md section 4). This module maps the `prior/` component (diffusers'
`PriorTransformer`) onto models/prior.py's DiffusionPrior with configs/prior.py:karlo's switches:

| diffusers                                    | ours (under 'params')                          |
|----------------------------------------------|------------------------------------------------|
| encoder_hidden_states_proj [W, E]            | text_token_proj (no LayerNorm before it)       |
| embedding_proj [W, E]                        | text_emb_proj                                  |
| time_embedding.linear_{1,2}                  | time_embed/fc{1,2}                             |
| proj_in [W, E]                               | x_proj                                         |
| prd_embedding [1, 1, W]                      | final_query [W]                                |
| positional_embedding [1, L + 4, W]           | positional_embedding [L + 4, W]                |
| transformer_blocks.i.norm1 / norm3           | transformer/block_i/ln_1 / ln_2                |
| transformer_blocks.i.attn1.to_{q,k,v}        | transformer/block_i/attn/{query,key,value}     |
| transformer_blocks.i.attn1.to_out.0          | transformer/block_i/attn/out                   |
| transformer_blocks.i.ff.net.0.proj / net.2   | transformer/block_i/mlp/fc1 / fc2 (exact GELU) |
| norm_out                                     | ln_final                                       |
| proj_to_clip_embeddings [E, W]               | out                                            |
| clip_mean, clip_std [1, E]                   | the stage's embedding statistics (stats/)      |

torch Linear weights [out, in] become Dense kernels [in, out]; with `model.scan_layers` the blocks are
stacked on a leading axis. Every size comes from the component's config.json, so smaller or larger
karlo-style priors import too; a config.json option our modules cannot express is refused naming the key.
The safetensors file is read without torch (import_clip.WeightFile); a missing, unexpected or mis-shaped
tensor is refused by name, and every tensor of the file is used.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import numpy as np

from dalle2_jax.inference.errors import InputError
from dalle2_jax.tools.import_clip import WeightFile

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
PRIOR_CLASS = "PriorTransformer"

Path = tuple[str, ...]
PARAMS, STATS = "params", "stats"  # the first element of a destination path: model params or statistics


# --- diffusers config.json -> our sizes ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PriorDims:
    """The sizes of a karlo-style prior, read from a diffusers PriorTransformer config.json."""

    heads: int
    head_dim: int
    depth: int
    embed_dim: int  # the CLIP image embedding (x_t and the output)
    text_emb_dim: int  # the CLIP text embedding (diffusers' embedding_proj_dim)
    text_width: int  # the caption token encodings (diffusers' embedding_dim)
    context_length: int  # caption tokens (num_embeddings)

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return 4 * self.width


# diffusers' PriorTransformer defaults (karlo-v1-alpha's values): what an absent config.json key means
PRIOR_DEFAULTS = {"num_attention_heads": 32, "attention_head_dim": 64, "num_layers": 20, "embedding_dim": 768,
                  "num_embeddings": 77, "additional_embeddings": 4, "dropout": 0.0, "time_embed_act_fn": "silu",
                  "norm_in_type": None, "embedding_proj_norm_type": None, "encoder_hid_proj_type": "linear",
                  "added_emb_type": "prd", "time_embed_dim": None, "embedding_proj_dim": None,
                  "clip_embed_dim": None}
# options our DiffusionPrior expresses in one way only: (config.json key, the value it must have)
_PRIOR_FIXED = (("additional_embeddings", 4), ("time_embed_act_fn", "silu"), ("norm_in_type", None),
                ("embedding_proj_norm_type", None), ("encoder_hid_proj_type", "linear"), ("added_emb_type", "prd"))


def read_component_config(folder: str, expect_class: str) -> dict:
    """A diffusers component folder's config.json as a dict; refuses a missing file or another class."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise InputError(f"{folder}: no config.json (expected a diffusers {expect_class} folder)")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    cls = cfg.get("_class_name")
    if cls is not None and cls != expect_class:
        raise InputError(f"{path}: _class_name is {cls!r}; expected {expect_class!r}")
    return cfg


def prior_dims(cfg: dict, where: str = "config.json") -> PriorDims:
    """The sizes of the prior a diffusers PriorTransformer config (dict) describes, with diffusers'
    defaults (karlo's values) for absent keys. Raises InputError naming a key our modules cannot express."""
    get = lambda k: PRIOR_DEFAULTS[k] if cfg.get(k) is None else cfg[k]  # noqa: E731
    for key, want in _PRIOR_FIXED:
        have = cfg.get(key, PRIOR_DEFAULTS[key])
        if have != want:
            raise InputError(f"{where}: {key} is {have!r}; karlo's prior (and ours) has {want!r}")
    heads, head_dim = int(get("num_attention_heads")), int(get("attention_head_dim"))
    width = heads * head_dim
    embedding_dim = int(get("embedding_dim"))
    if int(cfg.get("time_embed_dim") or width) != width:
        raise InputError(f"{where}: time_embed_dim is {cfg['time_embed_dim']}; ours is the width, "
                         f"num_attention_heads x attention_head_dim = {width}")
    clip_dim = int(cfg.get("clip_embed_dim") or embedding_dim)
    if clip_dim != embedding_dim:
        raise InputError(f"{where}: clip_embed_dim {clip_dim} differs from embedding_dim {embedding_dim}; the "
                         "prior's output must have the noisy embedding's width")
    return PriorDims(heads=heads, head_dim=head_dim, depth=int(get("num_layers")), embed_dim=embedding_dim,
                     text_emb_dim=int(cfg.get("embedding_proj_dim") or embedding_dim), text_width=embedding_dim,
                     context_length=int(get("num_embeddings")))


def karlo_prior_config(cfg: dict, where: str = "config.json"):
    """configs/prior.py:karlo with the model sizes of a diffusers PriorTransformer config (dict)."""
    from configs import prior as prior_configs

    d = prior_dims(cfg, where)
    if d.text_emb_dim != d.embed_dim:
        raise InputError(f"{where}: embedding_proj_dim {d.text_emb_dim} differs from embedding_dim {d.embed_dim}; "
                         "our prior conditions on a text embedding as wide as the image embedding")
    c = prior_configs.get_config("karlo")
    m = c.model
    m.width, m.depth, m.heads = d.width, d.depth, d.heads
    m.clip_embed_dim, m.clip_text_width, m.clip_context_length = d.embed_dim, d.text_width, d.context_length
    return c


# --- the mapping -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Step:
    """Some source tensors (name -> expected shape) and how they become destination arrays. `build` uses
    only array methods (.T, .reshape), so it runs on numpy arrays and, under jax.eval_shape, on shapes."""

    sources: dict[str, tuple[int, ...]]
    build: Callable[[dict[str, Any]], dict[Path, Any]]


def _copy(src: str, shape: tuple[int, ...], dst: Path, fn: Callable[[Any], Any] = lambda a: a) -> Step:
    return Step({src: tuple(shape)}, lambda t: {dst: fn(t[src])})


def _linear(src: str, d_in: int, d_out: int, dst: Path) -> list[Step]:
    """torch Linear weight [out, in] -> Dense kernel [in, out]."""
    return [_copy(f"{src}.weight", (d_out, d_in), dst + ("dense", "kernel"), lambda a: a.T),
            _copy(f"{src}.bias", (d_out,), dst + ("dense", "bias"))]


def _ln(src: str, width: int, dst: Path) -> list[Step]:
    return [_copy(f"{src}.weight", (width,), dst + ("norm", "scale")),
            _copy(f"{src}.bias", (width,), dst + ("norm", "bias"))]


def prior_plan(d: PriorDims) -> list[Step]:
    """Every tensor of a diffusers PriorTransformer with sizes `d`, and where it goes: ('params', ...) paths
    of DiffusionPrior with unscanned blocks (transformer/block_i), and ('stats', 'mean' | 'std')."""
    w, e, p = d.width, d.embed_dim, (PARAMS,)
    steps: list[Step] = []
    steps += _linear("time_embedding.linear_1", w, w, p + ("time_embed", "fc1"))
    steps += _linear("time_embedding.linear_2", w, w, p + ("time_embed", "fc2"))
    steps += _linear("proj_in", e, w, p + ("x_proj",))
    steps += _linear("embedding_proj", d.text_emb_dim, w, p + ("text_emb_proj",))
    steps += _linear("encoder_hidden_states_proj", d.text_width, w, p + ("text_token_proj",))
    steps += [_copy("positional_embedding", (1, d.context_length + 4, w), p + ("positional_embedding",),
                    lambda a: a.reshape(a.shape[1:])),
              _copy("prd_embedding", (1, 1, w), p + ("final_query",), lambda a: a.reshape(a.shape[-1:]))]
    for i in range(d.depth):
        src, dst = f"transformer_blocks.{i}", p + ("transformer", f"block_{i}")
        steps += _ln(f"{src}.norm1", w, dst + ("ln_1",))
        for ours, theirs in (("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("out", "to_out.0")):
            steps += _linear(f"{src}.attn1.{theirs}", w, w, dst + ("attn", ours))
        steps += _ln(f"{src}.norm3", w, dst + ("ln_2",))
        steps += _linear(f"{src}.ff.net.0.proj", w, d.mlp_hidden, dst + ("mlp", "fc1"))
        steps += _linear(f"{src}.ff.net.2", d.mlp_hidden, w, dst + ("mlp", "fc2"))
    steps += _ln("norm_out", w, p + ("ln_final",))
    steps += _linear("proj_to_clip_embeddings", w, e, p + ("out",))
    steps += [_copy("clip_mean", (1, e), (STATS, "mean"), lambda a: a.reshape(a.shape[-1:])),
              _copy("clip_std", (1, e), (STATS, "std"), lambda a: a.reshape(a.shape[-1:]))]
    return steps


def expected_tensors(plan: list[Step]) -> dict[str, tuple[int, ...]]:
    """The state dict (name -> shape) a plan reads."""
    out: dict[str, tuple[int, ...]] = {}
    for step in plan:
        out.update(step.sources)
    return out


def check_tensors(names_shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                  where: str) -> None:
    """Raises InputError listing missing, unexpected and mis-shaped tensors, all by name."""
    missing = sorted(set(expected) - set(names_shapes))
    extra = sorted(set(names_shapes) - set(expected))
    shaped = sorted(f"{k} {tuple(names_shapes[k])} (expected {tuple(expected[k])})"
                    for k in set(expected) & set(names_shapes) if tuple(names_shapes[k]) != tuple(expected[k]))
    if missing or extra or shaped:
        parts = [f"{where} does not fit the sizes in its config.json:"]
        for title, names in (("missing", missing), ("unexpected", extra), ("mis-shaped", shaped)):
            if names:
                parts.append(f"  {len(names)} {title}: " + ", ".join(names[:40])
                             + (f", ... ({len(names) - 40} more)" if len(names) > 40 else ""))
        raise InputError("\n".join(parts))


def apply_plan(plan: list[Step], tensors: dict[str, Any], depth: int, scan_layers: bool,
               stack: Callable | None = None) -> tuple[dict, dict]:
    """Runs `plan` on `tensors` (name -> array, numpy or abstract): returns (variables {'params': ...} as
    nested dicts, stats {'mean': [E], 'std': [E]}). With `scan_layers` the blocks are stacked (with
    `stack`, default np.stack) into transformer/blocks."""
    params: dict = {}
    stats: dict = {}
    for step in plan:
        for path, value in step.build({k: tensors[k] for k in step.sources}).items():
            if path[0] == STATS:
                stats[path[1]] = value
                continue
            node = params
            for k in path[1:-1]:
                node = node.setdefault(k, {})
            node[path[-1]] = value
    if scan_layers:
        import jax

        stack = stack or np.stack
        blocks = [params["transformer"].pop(f"block_{i}") for i in range(depth)]
        params["transformer"]["blocks"] = jax.tree.map(lambda *xs: stack(xs), *blocks)
    return {"params": params}, stats


# --- the prior -------------------------------------------------------------------------------------------
def abstract_prior_variables(config) -> Any:
    """The shapes ({'params': ...} of jax.ShapeDtypeStruct) a configs/prior.py config's prior initialises
    to, from config.model's sizes (clip_embed_dim, clip_text_width, clip_context_length); nothing computed."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from dalle2_jax.models.prior import build_prior

    m = config.model
    e, n, tw = int(m.clip_embed_dim), int(m.clip_context_length), int(m.clip_text_width)
    model = build_prior(m, e, n)
    x = jnp.zeros((1, e), jnp.float32)
    return nn.unbox(jax.eval_shape(lambda: model.init(
        jax.random.key(0), x, jnp.zeros((1,), jnp.int32), x, jnp.zeros((1, n, tw), jnp.float32),
        jnp.ones((1, n), bool), jnp.zeros((1,), bool))))


@dataclasses.dataclass
class ImportedPrior:
    """A karlo-style prior read from a diffusers folder: our config, the variables, karlo's statistics."""

    config: Any  # configs/prior.py:karlo with the folder's sizes
    variables: dict  # {'params': ...} float32 numpy arrays
    stats: dict  # {'mean': [E], 'std': [E]} float32: x = (embedding - mean) / std is the diffusion's space
    num_tensors: int
    num_params: int


def load_prior(folder: str, scan_layers: bool | None = None) -> ImportedPrior:
    """Reads a diffusers `prior/` folder (config.json + diffusion_pytorch_model.safetensors) into our prior's
    variables. `scan_layers` overrides configs/prior.py:karlo's. Raises InputError for a config option
    our modules cannot express, or a missing, unexpected or mis-shaped tensor (named)."""
    cfg = read_component_config(folder, PRIOR_CLASS)
    where = os.path.join(folder, "config.json")
    config = karlo_prior_config(cfg, where)
    if scan_layers is not None:
        config.model.scan_layers = bool(scan_layers)
    d = prior_dims(cfg, where)
    weights = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise InputError(f"{folder}: no {WEIGHTS_NAME}")
    wf = WeightFile(weights)
    plan = prior_plan(d)
    expected = expected_tensors(plan)
    check_tensors({k: wf.shape(k) for k in wf.keys}, expected, weights)
    tensors = {k: wf.get(k) for k in expected}
    variables, stats = apply_plan(plan, tensors, d.depth, bool(config.model.scan_layers))
    import jax

    variables = jax.tree.map(lambda a: np.ascontiguousarray(a, np.float32), variables)
    stats = {k: np.ascontiguousarray(v, np.float32) for k, v in stats.items()}
    if not np.all(stats["std"] > 0):
        raise InputError(f"{weights}: clip_std has {int(np.sum(stats['std'] <= 0))} entries <= 0")
    num_params = int(sum(a.size for a in jax.tree.leaves(variables)))
    return ImportedPrior(config=config, variables=variables, stats=stats, num_tensors=len(expected),
                         num_params=num_params)
