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
stacked on a leading axis.

The `decoder/` (diffusers' `UNet2DConditionModel` with karlo's block types) and `text_proj/`
(`UnCLIPTextProjModel`) components map together onto models/unet.py's UNet with configs/decoder.py:karlo's
switches (diffusers' up_blocks.b is our level L-1-b; the resample resnets are ResBlocks with up/down):

| diffusers                                                  | ours (under 'params')                          |
|------------------------------------------------------------|------------------------------------------------|
| time_embedding.linear_{1,2}                                | time_fc{1,2}                                   |
| conv_in / conv_norm_out / conv_out                         | in_conv / out_norm / out_conv                  |
| down_blocks.l.resnets.i / .attentions.i / .downsamplers.0  | down_{l}_res_{i} / _attn_{i} / down_{l}_resample |
| mid_block.resnets.0 / .attentions.0 / .resnets.1           | mid_res_0 / mid_attn / mid_res_1               |
| up_blocks.b.resnets.i / .attentions.i / .upsamplers.0      | up_{L-1-b}_res_{i} / _attn_{i} / _resample     |
| resnet norm1, conv1, time_emb_proj, norm2, conv2           | in_norm, in_conv, emb_proj, out_norm, out_conv |
| resnet conv_shortcut (1x1)                                 | skip                                           |
| attention group_norm, to_q, to_k, to_v, to_out.0           | norm, query, key, value, out                   |
| attention add_k_proj, add_v_proj (context keys first)      | context_key, context_value                     |
| text_proj learned_classifier_free_guidance_embeddings      | null_image_embedding                           |
| text_proj clip_image_embeddings_project_to_time_embeddings | image_to_time                                  |
| text_proj embedding_proj (text embedding -> time)          | text_to_time                                   |
| text_proj clip_extra_context_tokens_proj                   | image_to_tokens (rows re-ordered, below)       |
| text_proj encoder_hidden_states_proj / _norm               | text_states_proj / text_states_norm            |

The `super_res_first/` and `super_res_last/` components (diffusers' `UNet2DModel`, Resnet{Down,Up}sampleBlock2D
at every level, no attention, additive time embedding) map the same way (the UNet rows of the table above,
without attention) onto the UNet of configs/upsampler.py:karlo_64to256: one config, two sets of variables
(super_res_first for every sampling step but the last, super_res_last for the last). conv_in's 6 input
channels are the noisy image then the bicubic-upsampled low-res image, as our UNet concatenates them.

torch Conv2d weights [out, in, kh, kw] become flax kernels [kh, kw, in, out] (both cross-correlate).
diffusers reshapes clip_extra_context_tokens_proj's output to [B, D, T] and transposes it, so token j is
output row c * T + j; ours are contiguous (j * D + c), so the rows (and the bias) are re-ordered.
diffusers' class_labels (text_proj's two time projections, summed) is our image_to_time + text_to_time.

Every size comes from the components' config.json, so smaller or larger karlo-style models import too; a
config.json option our modules cannot express is refused naming the key.
The safetensors file is read without torch (import_clip.WeightFile); a missing, unexpected or mis-shaped
tensor is refused by name, and every tensor of the file is used.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np

from absl import flags

from dalle2_jax.cli_util import exit_on_errors, run_program
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


def apply_plan(plan: list[Step], tensors: Mapping[str, Any], depth: int, scan_layers: bool,
               stack: Callable | None = None, finish: Callable[[Any], Any] | None = None) -> tuple[dict, dict]:
    """Runs `plan` on `tensors` (name -> array, numpy or abstract; a _LazyTensors reads each source when its
    step runs): returns (variables {'params': ...} as nested dicts, stats {'mean': [E], 'std': [E]}). `finish`
    is applied to every built array as its step runs (numpy: a contiguous float32 copy, so the step's sources
    can be freed at once). With `scan_layers` the blocks are stacked (with `stack`, default np.stack) into
    transformer/blocks, one leaf at a time (the unstacked leaf is dropped as its stack is built)."""
    params: dict = {}
    stats: dict = {}
    for step in plan:
        built = step.build({k: tensors[k] for k in step.sources})
        for path, value in built.items():
            if finish is not None:
                value = finish(value)
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
        treedef = jax.tree.structure(blocks[0])
        leaves = [treedef.flatten_up_to(b) for b in blocks]
        del blocks
        stacked = []
        for j in range(treedef.num_leaves):
            xs = [leaves[i][j] for i in range(depth)]
            for i in range(depth):
                leaves[i][j] = None  # the stack holds the only copy
            stacked.append(stack(xs))
            del xs
        params["transformer"]["blocks"] = jax.tree.unflatten(treedef, stacked)
    return {"params": params}, stats


class _LazyTensors(Mapping):
    """name -> float32 numpy array of a WeightFile, read when looked up (not kept): apply_plan then holds one
    step's sources at a time instead of the whole file."""

    def __init__(self, wf: WeightFile, names):
        self._wf, self._names = wf, list(names)

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._names:
            raise KeyError(key)
        return self._wf.get(key)

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _contiguous_f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32)


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
    tensors = _LazyTensors(wf, expected)
    variables, stats = apply_plan(plan, tensors, d.depth, bool(config.model.scan_layers), finish=_contiguous_f32)
    import jax

    variables = jax.tree.map(lambda a: np.ascontiguousarray(a, np.float32), variables)
    stats = {k: np.ascontiguousarray(v, np.float32) for k, v in stats.items()}
    if not np.all(stats["std"] > 0):
        raise InputError(f"{weights}: clip_std has {int(np.sum(stats['std'] <= 0))} entries <= 0")
    num_params = int(sum(a.size for a in jax.tree.leaves(variables)))
    return ImportedPrior(config=config, variables=variables, stats=stats, num_tensors=len(expected),
                         num_params=num_params)


# --- the decoder (UNet2DConditionModel) and text_proj (UnCLIPTextProjModel) ------------------------------
DECODER_CLASS = "UNet2DConditionModel"
TEXT_PROJ_CLASS = "UnCLIPTextProjModel"
_DOWN_PLAIN, _DOWN_ATTN = "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"
_UP_PLAIN, _UP_ATTN = "ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D"
_MID_ATTN = "UNetMidBlock2DSimpleCrossAttn"
# UNet2DConditionModel options our UNet expresses in one way only: (config.json key, diffusers' default,
# the value it must have). Training-only keys (dropout) are not checked.
_DECODER_FIXED = (
    ("in_channels", 4, 3), ("center_input_sample", False, False), ("flip_sin_to_cos", True, True),
    ("freq_shift", 0, 0), ("act_fn", "silu", "silu"), ("norm_eps", 1e-5, 1e-5),
    ("class_embed_type", None, "identity"), ("mid_block_type", "UNetMidBlock2DCrossAttn", _MID_ATTN),
    ("only_cross_attention", False, False), ("mid_block_only_cross_attention", None, None),
    ("cross_attention_norm", None, None), ("dual_cross_attention", False, False),
    ("use_linear_projection", False, False), ("upcast_attention", False, False),
    ("transformer_layers_per_block", 1, 1), ("reverse_transformer_layers_per_block", None, None),
    ("encoder_hid_dim", None, None), ("encoder_hid_dim_type", None, None), ("num_attention_heads", None, None),
    ("addition_embed_type", None, None), ("num_class_embeds", None, None), ("class_embeddings_concat", False, False),
    ("time_embedding_type", "positional", "positional"), ("time_embedding_act_fn", None, None),
    ("timestep_post_act", None, None), ("time_cond_proj_dim", None, None), ("conv_in_kernel", 3, 3),
    ("conv_out_kernel", 3, 3), ("projection_class_embeddings_input_dim", None, None),
    ("resnet_skip_time_act", False, False), ("resnet_out_scale_factor", 1.0, 1.0), ("mid_block_scale_factor", 1, 1),
    ("attention_type", "default", "default"))
_SCALE_SHIFT = {"scale_shift": True, "default": False}


@dataclasses.dataclass(frozen=True)
class DecoderDims:
    """The sizes of a karlo-style decoder, from a diffusers UNet2DConditionModel config.json and its
    UnCLIPTextProjModel config.json."""

    channels: int  # block_out_channels[0]
    channel_mult: tuple[int, ...]
    num_res_blocks: int  # layers_per_block
    attention: tuple[bool, ...]  # per level: SimpleCrossAttn blocks (else plain resnet blocks)
    image_size: int  # sample_size
    head_channels: int  # attention_head_dim
    groups: int  # norm_num_groups
    scale_shift: bool  # resnet_time_scale_shift
    out_channels: int  # 6 = eps + learned-range variance, 3 = eps
    context_width: int  # cross_attention_dim
    image_tokens: int  # text_proj's clip_extra_context_tokens
    clip_dim: int  # text_proj's clip_embeddings_dim: image embedding, text embedding and text token width

    @property
    def time_dim(self) -> int:
        return 4 * self.channels

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.channels * m for m in self.channel_mult)

    @property
    def attention_resolutions(self) -> tuple[int, ...]:
        return tuple(self.image_size // 2 ** lvl for lvl, a in enumerate(self.attention) if a)


def _norm_and_time_options(cfg: dict, mc: int, where: str) -> tuple[int, str]:
    """(norm_num_groups, resnet_time_scale_shift) of a diffusers UNet config, refusing what our UNet cannot
    express (shared by the decoder and the super-res models)."""
    groups = int(cfg.get("norm_num_groups", 32))
    if mc < 4 * groups:
        raise InputError(f"{where}: norm_num_groups {groups} with block_out_channels[0] = {mc}: our GroupNorm "
                         "keeps at least 4 channels per group (use >= 4 x norm_num_groups channels)")
    shift = cfg.get("resnet_time_scale_shift", "default")
    if shift not in _SCALE_SHIFT:
        raise InputError(f"{where}: resnet_time_scale_shift is {shift!r}; our UNet has {sorted(_SCALE_SHIFT)}")
    ted = cfg.get("time_embedding_dim")
    if ted is not None and int(ted) != 4 * mc:
        raise InputError(f"{where}: time_embedding_dim is {ted}; ours is 4 x block_out_channels[0] = {4 * mc}")
    return groups, shift


def decoder_dims(cfg: dict, text_cfg: dict, where: str = "decoder/config.json",
                 text_where: str = "text_proj/config.json") -> DecoderDims:
    """The sizes of the decoder a diffusers UNet2DConditionModel config (dict) and its UnCLIPTextProjModel
    config describe. Raises InputError naming a key our UNet cannot express."""
    for key, default, want in _DECODER_FIXED:
        have = cfg.get(key, default)
        if have != want and not (isinstance(want, float) and isinstance(have, (int, float)) and float(have) == want):
            raise InputError(f"{where}: {key} is {have!r}; karlo's decoder (and our UNet) has {want!r}")
    for key in ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
                "attention_head_dim", "cross_attention_dim", "sample_size", "out_channels"):
        if cfg.get(key) is None:
            raise InputError(f"{where}: {key} is missing (diffusers' default is not karlo's)")
    boc = [int(c) for c in cfg["block_out_channels"]]
    mc = boc[0]
    if any(c % mc for c in boc):
        raise InputError(f"{where}: block_out_channels {boc} are not multiples of the first; our UNet's are "
                         "channels x channel_mult")
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    if len(down) != len(boc) or len(up) != len(boc):
        raise InputError(f"{where}: down_block_types / up_block_types need one entry per block_out_channels")
    attention = []
    for lvl, (d, u) in enumerate(zip(down, reversed(up))):
        if d not in (_DOWN_PLAIN, _DOWN_ATTN):
            raise InputError(f"{where}: down_block_types[{lvl}] is {d!r}; our UNet has {_DOWN_PLAIN} or {_DOWN_ATTN}")
        want_up = _UP_ATTN if d == _DOWN_ATTN else _UP_PLAIN
        if u != want_up:
            raise InputError(f"{where}: up_block_types[{len(up) - 1 - lvl}] is {u!r}; our UNet mirrors "
                             f"down_block_types[{lvl}] ({d}) with {want_up}")
        attention.append(d == _DOWN_ATTN)
    if not any(attention):
        raise InputError(f"{where}: mid_block_type {_MID_ATTN} with no attention level; our UNet has middle "
                         "attention exactly when some level has attention")
    lpb, head = cfg["layers_per_block"], cfg["attention_head_dim"]
    if not isinstance(lpb, int):
        raise InputError(f"{where}: layers_per_block is {lpb!r}; our UNet has one count for every level")
    if not isinstance(head, int):
        raise InputError(f"{where}: attention_head_dim is {head!r}; our UNet has one head width")
    for lvl, c in enumerate(boc):
        if attention[lvl] and (c < head or c % head):
            raise InputError(f"{where}: attention_head_dim {head} does not divide block_out_channels[{lvl}] = {c}")
    groups, shift = _norm_and_time_options(cfg, mc, where)
    out = int(cfg["out_channels"])
    if out not in (3, 6):
        raise InputError(f"{where}: out_channels is {out}; our UNet has 3 (eps) or 6 (eps + learned variance)")
    size = int(cfg["sample_size"])
    if size % 2 ** (len(boc) - 1):
        raise InputError(f"{where}: sample_size {size} does not halve {len(boc) - 1} times")

    tp_defaults = {"clip_extra_context_tokens": 4, "clip_embeddings_dim": 768, "time_embed_dim": None,
                   "cross_attention_dim": None}
    tget = lambda k: tp_defaults[k] if text_cfg.get(k) is None else text_cfg[k]  # noqa: E731
    for key in ("time_embed_dim", "cross_attention_dim"):
        if tget(key) is None:
            raise InputError(f"{text_where}: {key} is missing")
    if int(tget("time_embed_dim")) != 4 * mc:
        raise InputError(f"{text_where}: time_embed_dim is {tget('time_embed_dim')}; the decoder's time embedding "
                         f"is 4 x block_out_channels[0] = {4 * mc}")
    if int(tget("cross_attention_dim")) != int(cfg["cross_attention_dim"]):
        raise InputError(f"{text_where}: cross_attention_dim is {tget('cross_attention_dim')}; the decoder's is "
                         f"{cfg['cross_attention_dim']}")
    return DecoderDims(channels=mc, channel_mult=tuple(c // mc for c in boc), num_res_blocks=lpb,
                       attention=tuple(attention), image_size=size, head_channels=head, groups=groups,
                       scale_shift=_SCALE_SHIFT[shift], out_channels=out,
                       context_width=int(cfg["cross_attention_dim"]),
                       image_tokens=int(tget("clip_extra_context_tokens")), clip_dim=int(tget("clip_embeddings_dim")))


def karlo_decoder_config(cfg: dict, text_cfg: dict, where: str = "decoder/config.json",
                         text_where: str = "text_proj/config.json"):
    """configs/decoder.py:karlo with the sizes of a diffusers decoder config and its text_proj config (dicts)."""
    from configs import decoder as decoder_configs

    d = decoder_dims(cfg, text_cfg, where, text_where)
    c = decoder_configs.get_config("karlo")
    m = c.model
    m.channels, m.channel_mult, m.num_res_blocks = d.channels, d.channel_mult, d.num_res_blocks
    m.attention_resolutions, m.head_channels, m.groups = d.attention_resolutions, d.head_channels, d.groups
    m.scale_shift, m.resblock_updown = d.scale_shift, True
    m.context_width, m.image_tokens = d.context_width, d.image_tokens
    m.clip_embed_dim, m.clip_text_width = d.clip_dim, d.clip_dim
    c.data.resolution = d.image_size
    c.diffusion.learned_variance = d.out_channels == 6
    return c


def _conv(src: str, c_in: int, c_out: int, dst: Path, kernel: int = 3) -> list[Step]:
    """torch Conv2d weight [out, in, kh, kw] -> flax kernel [kh, kw, in, out] (both cross-correlate)."""
    return [_copy(f"{src}.weight", (c_out, c_in, kernel, kernel), dst + ("conv", "kernel"),
                  lambda a: a.transpose(2, 3, 1, 0)),
            _copy(f"{src}.bias", (c_out,), dst + ("conv", "bias"))]


def _gn(src: str, c: int, dst: Path) -> list[Step]:
    return [_copy(f"{src}.weight", (c,), dst + ("norm", "scale")), _copy(f"{src}.bias", (c,), dst + ("norm", "bias"))]


def _resnet(src: str, c_in: int, c_out: int, d, dst: Path) -> list[Step]:
    """A diffusers ResnetBlock2D (also the resnet down/up samplers) -> our ResBlock."""
    steps = _gn(f"{src}.norm1", c_in, dst + ("in_norm",)) + _conv(f"{src}.conv1", c_in, c_out, dst + ("in_conv",))
    steps += _linear(f"{src}.time_emb_proj", d.time_dim, 2 * c_out if d.scale_shift else c_out, dst + ("emb_proj",))
    steps += _gn(f"{src}.norm2", c_out, dst + ("out_norm",)) + _conv(f"{src}.conv2", c_out, c_out, dst + ("out_conv",))
    if c_in != c_out:
        steps += _conv(f"{src}.conv_shortcut", c_in, c_out, dst + ("skip",), kernel=1)
    return steps


def _attention(src: str, c: int, d: DecoderDims, dst: Path) -> list[Step]:
    """A diffusers Attention with AttnAddedKVProcessor (context keys/values before the spatial ones) -> our
    AttentionBlock."""
    steps = _gn(f"{src}.group_norm", c, dst + ("norm",))
    for theirs, ours, c_in in (("to_q", "query", c), ("to_k", "key", c), ("to_v", "value", c),
                               ("add_k_proj", "context_key", d.context_width),
                               ("add_v_proj", "context_value", d.context_width), ("to_out.0", "out", c)):
        steps += _linear(f"{src}.{theirs}", c_in, c, dst + (ours,))
    return steps


def unet_plan(d, in_channels: int = 3) -> list[Step]:
    """Every tensor of a diffusers UNet2DConditionModel with karlo's block types, or of a UNet2DModel with
    Resnet{Down,Up}sampleBlock2D blocks and no attention, with sizes `d` (DecoderDims or SuperResDims), and
    where it goes in our UNet's params (diffusers' up_blocks.b is our level L-1-b). The middle has
    attention exactly when some level has it (as our UNet)."""
    p, mc, levels = (PARAMS,), d.channels, len(d.channel_mult)
    steps = _linear("time_embedding.linear_1", mc, d.time_dim, p + ("time_fc1",))
    steps += _linear("time_embedding.linear_2", d.time_dim, d.time_dim, p + ("time_fc2",))
    steps += _conv("conv_in", in_channels, mc, p + ("in_conv",))
    h, skips = mc, [mc]
    for lvl, c in enumerate(d.level_channels):
        for i in range(d.num_res_blocks):
            steps += _resnet(f"down_blocks.{lvl}.resnets.{i}", h, c, d, p + (f"down_{lvl}_res_{i}",))
            if d.attention[lvl]:
                steps += _attention(f"down_blocks.{lvl}.attentions.{i}", c, d, p + (f"down_{lvl}_attn_{i}",))
            h = c
            skips.append(h)
        if lvl != levels - 1:
            steps += _resnet(f"down_blocks.{lvl}.downsamplers.0", h, h, d, p + (f"down_{lvl}_resample",))
            skips.append(h)
    steps += _resnet("mid_block.resnets.0", h, h, d, p + ("mid_res_0",))
    if any(d.attention):
        steps += _attention("mid_block.attentions.0", h, d, p + ("mid_attn",))
    steps += _resnet("mid_block.resnets.1", h, h, d, p + ("mid_res_1",))
    for b, lvl in enumerate(reversed(range(levels))):
        c = d.level_channels[lvl]
        for i in range(d.num_res_blocks + 1):
            steps += _resnet(f"up_blocks.{b}.resnets.{i}", h + skips.pop(), c, d, p + (f"up_{lvl}_res_{i}",))
            if d.attention[lvl]:
                steps += _attention(f"up_blocks.{b}.attentions.{i}", c, d, p + (f"up_{lvl}_attn_{i}",))
            h = c
        if lvl:
            steps += _resnet(f"up_blocks.{b}.upsamplers.0", h, h, d, p + (f"up_{lvl}_resample",))
    steps += _gn("conv_norm_out", mc, p + ("out_norm",))
    steps += _conv("conv_out", mc, d.out_channels, p + ("out_conv",))
    return steps


def decoder_plan(d: DecoderDims) -> list[Step]:
    """Every tensor of a diffusers UNet2DConditionModel with karlo's block types and sizes `d`, and where it
    goes in our UNet's params (diffusers' up_blocks.b is our level L-1-b)."""
    return unet_plan(d, in_channels=3)


def _interleaved_tokens_to_ours(a, tokens: int):
    """clip_extra_context_tokens_proj's rows (or bias) [T * D, ...] -> ours: diffusers reshapes the output to
    [B, D, T] and transposes, so token j is output row c * T + j; our tokens are contiguous (row j * D + c)."""
    d = a.shape[0] // tokens
    return a.reshape((d, tokens) + a.shape[1:]).swapaxes(0, 1).reshape(a.shape)


def text_proj_plan(d: DecoderDims) -> list[Step]:
    """Every tensor of a diffusers UnCLIPTextProjModel sized for `d`, and where it goes in our UNet's params."""
    p, e, w, t = (PARAMS,), d.clip_dim, d.context_width, d.image_tokens
    steps = [_copy("learned_classifier_free_guidance_embeddings", (e,), p + ("null_image_embedding",))]
    steps += _linear("clip_image_embeddings_project_to_time_embeddings", e, d.time_dim, p + ("image_to_time",))
    steps += _linear("embedding_proj", e, d.time_dim, p + ("text_to_time",))
    steps += [_copy("clip_extra_context_tokens_proj.weight", (t * w, e), p + ("image_to_tokens", "dense", "kernel"),
                    lambda a: _interleaved_tokens_to_ours(a, t).T),
              _copy("clip_extra_context_tokens_proj.bias", (t * w,), p + ("image_to_tokens", "dense", "bias"),
                    lambda a: _interleaved_tokens_to_ours(a, t))]
    steps += _linear("encoder_hidden_states_proj", e, w, p + ("text_states_proj",))
    steps += _ln("text_encoder_hidden_states_norm", w, p + ("text_states_norm",))
    return steps


def abstract_decoder_variables(config) -> Any:
    """The shapes ({'params': ...} of jax.ShapeDtypeStruct) a configs/decoder.py config's UNet initialises to,
    built through the decoder stage from config.model's sizes (no CLIP workdir); nothing computed."""
    import flax.linen as nn
    import jax

    from dalle2_jax.stages import get_stage_class

    stage = get_stage_class("decoder")(config, workdir="")
    return nn.unbox(jax.eval_shape(stage.abstract_init, jax.random.key(0)))


@dataclasses.dataclass
class ImportedDecoder:
    """A karlo-style decoder read from diffusers decoder/ and text_proj/ folders: our config and variables."""

    config: Any  # configs/decoder.py:karlo with the folders' sizes
    variables: dict  # {'params': ...} float32 numpy arrays
    num_tensors: int  # decoder + text_proj
    num_params: int


def _read_weights(folder: str, plan: list[Step]) -> Mapping[str, np.ndarray]:
    weights = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise InputError(f"{folder}: no {WEIGHTS_NAME}")
    wf = WeightFile(weights)
    expected = expected_tensors(plan)
    check_tensors({k: wf.shape(k) for k in wf.keys}, expected, weights)
    return _LazyTensors(wf, expected)


def load_decoder(decoder_folder: str, text_proj_folder: str) -> ImportedDecoder:
    """Reads diffusers `decoder/` (UNet2DConditionModel) and `text_proj/` (UnCLIPTextProjModel) folders (each
    config.json + diffusion_pytorch_model.safetensors, float32 or float16) into our UNet's variables. Raises
    InputError for a config option our UNet cannot express (named), or a missing, unexpected or mis-shaped
    tensor (named)."""
    import jax

    cfg = read_component_config(decoder_folder, DECODER_CLASS)
    text_cfg = read_component_config(text_proj_folder, TEXT_PROJ_CLASS)
    where, text_where = (os.path.join(f, "config.json") for f in (decoder_folder, text_proj_folder))
    config = karlo_decoder_config(cfg, text_cfg, where, text_where)
    d = decoder_dims(cfg, text_cfg, where, text_where)
    params: dict = {}
    num_tensors = 0
    for folder, plan in ((decoder_folder, decoder_plan(d)), (text_proj_folder, text_proj_plan(d))):
        tensors = _read_weights(folder, plan)
        num_tensors += len(tensors)
        params.update(apply_plan(plan, tensors, 0, False, finish=_contiguous_f32)[0]["params"])
    variables = jax.tree.map(lambda a: np.ascontiguousarray(a, np.float32), {"params": params})
    num_params = int(sum(a.size for a in jax.tree.leaves(variables)))
    return ImportedDecoder(config=config, variables=variables, num_tensors=num_tensors, num_params=num_params)


# --- the super-resolution UNets (super_res_first, super_res_last: UNet2DModel) ----------------------------
SUPER_RES_CLASS = "UNet2DModel"
SUPER_RES_FACTOR = 4  # karlo's decoder output (64 px) to the super-res output (sample_size, 256 px)
# UNet2DModel options our UNet expresses in one way only: (config.json key, diffusers' default, the value it
# must have). Training-only keys (dropout) are not checked, nor keys UNet2DModel does not pass to
# Resnet{Down,Up}sampleBlock2D blocks without attention (downsample_padding, downsample_type, upsample_type,
# attention_head_dim, attn_norm_num_groups).
_SUPER_RES_FIXED = (
    ("in_channels", 3, 6), ("out_channels", 3, 3), ("center_input_sample", False, False),
    ("time_embedding_type", "positional", "positional"), ("flip_sin_to_cos", True, True), ("freq_shift", 0, 0),
    ("mid_block_type", "UNetMidBlock2D", "UNetMidBlock2D"), ("mid_block_scale_factor", 1, 1),
    ("act_fn", "silu", "silu"), ("norm_eps", 1e-5, 1e-5), ("add_attention", True, False),
    ("class_embed_type", None, None), ("num_class_embeds", None, None))


@dataclasses.dataclass(frozen=True)
class SuperResDims:
    """The sizes of a karlo-style super-resolution UNet, from a diffusers UNet2DModel config.json."""

    channels: int  # block_out_channels[0]
    channel_mult: tuple[int, ...]
    num_res_blocks: int  # layers_per_block
    image_size: int | None  # sample_size (None: the hub's super_res_last has none)
    groups: int  # norm_num_groups
    scale_shift: bool  # resnet_time_scale_shift
    out_channels: int = 3

    @property
    def time_dim(self) -> int:
        return 4 * self.channels

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.channels * m for m in self.channel_mult)

    @property
    def attention(self) -> tuple[bool, ...]:
        return (False,) * len(self.channel_mult)


def super_res_dims(cfg: dict, where: str = "super_res_first/config.json") -> SuperResDims:
    """The sizes of the super-res UNet a diffusers UNet2DModel config (dict) describes. Raises InputError
    naming a key our UNet cannot express."""
    for key, default, want in _SUPER_RES_FIXED:
        have = cfg.get(key, default)
        if have != want and not (isinstance(want, float) and isinstance(have, (int, float)) and float(have) == want):
            raise InputError(f"{where}: {key} is {have!r}; karlo's super-res UNets (and our upsampler) have {want!r}")
    for key in ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block"):
        if cfg.get(key) is None:
            raise InputError(f"{where}: {key} is missing (diffusers' default is not karlo's)")
    boc = [int(c) for c in cfg["block_out_channels"]]
    mc = boc[0]
    if any(c % mc for c in boc):
        raise InputError(f"{where}: block_out_channels {boc} are not multiples of the first; our UNet's are "
                         "channels x channel_mult")
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    if len(down) != len(boc) or len(up) != len(boc):
        raise InputError(f"{where}: down_block_types / up_block_types need one entry per block_out_channels")
    for key, types, want in (("down_block_types", down, _DOWN_PLAIN), ("up_block_types", up, _UP_PLAIN)):
        for i, t in enumerate(types):
            if t != want:
                raise InputError(f"{where}: {key}[{i}] is {t!r}; karlo's super-res UNets (and our upsampler) have "
                                 f"{want} at every level")
    lpb = cfg["layers_per_block"]
    if not isinstance(lpb, int):
        raise InputError(f"{where}: layers_per_block is {lpb!r}; our UNet has one count for every level")
    groups, shift = _norm_and_time_options(cfg, mc, where)
    size = cfg.get("sample_size")
    if size is not None:
        if not isinstance(size, int):
            raise InputError(f"{where}: sample_size is {size!r}; our upsampler makes square images (one int)")
        if size % (SUPER_RES_FACTOR * 2 ** (len(boc) - 1)):
            raise InputError(f"{where}: sample_size {size} is not divisible by {SUPER_RES_FACTOR} (karlo's "
                             f"upsampling factor) x 2^{len(boc) - 1} (the UNet's downsampling)")
    return SuperResDims(channels=mc, channel_mult=tuple(c // mc for c in boc), num_res_blocks=lpb,
                        image_size=size, groups=groups, scale_shift=_SCALE_SHIFT[shift])


def karlo_super_res_config(cfg: dict, where: str = "super_res_first/config.json", sample_size: int | None = None):
    """configs/upsampler.py:karlo_64to256 with the sizes of a diffusers UNet2DModel config (dict). The output
    side is its sample_size (or `sample_size` where it has none); the low-res side a quarter of it."""
    from configs import upsampler as upsampler_configs

    d = super_res_dims(cfg, where)
    size = d.image_size if d.image_size is not None else sample_size
    if size is None:
        raise InputError(f"{where}: sample_size is missing (the output side; the pipeline takes super_res_first's)")
    c = upsampler_configs.get_config("karlo_64to256")
    m = c.model
    m.channels, m.channel_mult, m.num_res_blocks = d.channels, d.channel_mult, d.num_res_blocks
    m.attention_resolutions, m.groups = (), d.groups
    m.scale_shift, m.resblock_updown = d.scale_shift, True
    c.data.resolution, c.data.low_res_resolution = size, size // SUPER_RES_FACTOR
    c.data.crop_size = size // SUPER_RES_FACTOR
    return c


def super_res_plan(d: SuperResDims) -> list[Step]:
    """Every tensor of a diffusers UNet2DModel with karlo's super-res block types and sizes `d`, and where it
    goes in our UNet's params: conv_in reads the noisy image then the upsampled low-res image (6 channels),
    in our concatenation's order."""
    return unet_plan(d, in_channels=6)


def abstract_super_res_variables(config) -> Any:
    """The shapes ({'params': ...} of jax.ShapeDtypeStruct) a configs/upsampler.py config's UNet initialises
    to, built through the upsampler stage; nothing computed."""
    import flax.linen as nn
    import jax

    from dalle2_jax.stages import get_stage_class

    stage = get_stage_class("upsampler")(config, workdir="")
    return nn.unbox(jax.eval_shape(stage.abstract_init, jax.random.key(0)))


@dataclasses.dataclass
class ImportedSuperRes:
    """karlo's two super-res UNets read from diffusers super_res_first/ and super_res_last/ folders: one config
    (the same architecture), two sets of variables."""

    config: Any  # configs/upsampler.py:karlo_64to256 with the folders' sizes
    first: dict  # {'params': ...} float32 numpy arrays: every sampling step but the last
    last: dict  # {'params': ...}: the last step
    num_tensors: int  # per model
    num_params: int  # per model


def load_super_res_unet(folder: str, sample_size: int | None = None) -> tuple[Any, dict, int]:
    """Reads one diffusers super-res folder (UNet2DModel: config.json + diffusion_pytorch_model.safetensors,
    float32 or float16) into (configs/upsampler.py:karlo_64to256 with its sizes, our UNet's variables, the
    tensor count). `sample_size` is the output side where its config.json has none. Raises InputError for a
    config option our UNet cannot express (named), or a missing, unexpected or mis-shaped tensor (named)."""
    import jax

    cfg = read_component_config(folder, SUPER_RES_CLASS)
    where = os.path.join(folder, "config.json")
    config = karlo_super_res_config(cfg, where, sample_size)
    plan = super_res_plan(super_res_dims(cfg, where))
    tensors = _read_weights(folder, plan)
    variables = apply_plan(plan, tensors, 0, False, finish=_contiguous_f32)[0]
    variables = jax.tree.map(lambda a: np.ascontiguousarray(a, np.float32), variables)
    return config, variables, len(tensors)


def load_super_res(first_folder: str, last_folder: str) -> ImportedSuperRes:
    """Reads diffusers `super_res_first/` and `super_res_last/` folders into one config and two sets of our
    UNet's variables. Both must describe the same UNet (super_res_last may lack sample_size: the pipeline
    sizes both from super_res_first). Raises InputError as load_super_res_unet does, or naming the
    first key where the two configs differ."""
    import jax

    config, first, n = load_super_res_unet(first_folder)
    last_config, last, _ = load_super_res_unet(last_folder, sample_size=int(config.data.resolution))
    if last_config.to_dict() != config.to_dict():
        a, b = (read_component_config(f, SUPER_RES_CLASS) for f in (first_folder, last_folder))
        keys = sorted(k for k in set(a) | set(b) if not k.startswith("_") and a.get(k) != b.get(k)
                      and not (k == "sample_size" and b.get(k) is None))
        raise InputError(f"{os.path.join(last_folder, 'config.json')}: {keys[0] if keys else 'its sizes'} differs "
                         f"from {os.path.join(first_folder, 'config.json')}; both super-res UNets share one config")
    num_params = int(sum(a.size for a in jax.tree.leaves(first)))
    return ImportedSuperRes(config=config, first=first, last=last, num_tensors=n, num_params=num_params)


# --- the bundle and the workdirs -------------------------------------------------------------------------
COMPONENTS = ("prior", "text_proj", "decoder", "super_res_first", "super_res_last", "text_encoder", "tokenizer")
TEXT_CLASS, VISION_CLASS = "CLIPTextModelWithProjection", "CLIPVisionModelWithProjection"


def _cross_check(prior_config, clip_config, decoder_config, where: dict) -> None:
    """Refuses components of different karlo-style models before anything is written, naming the files."""
    cm, pm, dm = clip_config.model, prior_config.model, decoder_config.model
    pairs = (("the CLIP embedding", int(pm.clip_embed_dim), int(cm.embed_dim), "prior", "embedding_dim",
              "projection_dim"),
             ("the caption length", int(pm.clip_context_length), int(cm.text.context_length), "prior",
              "num_embeddings", "max_position_embeddings"),
             ("the caption token width", int(pm.clip_text_width), int(cm.text.width), "prior", "embedding_dim",
              "hidden_size"),
             ("the CLIP embedding", int(dm.clip_embed_dim), int(cm.embed_dim), "text_proj", "clip_embeddings_dim",
              "projection_dim"),
             ("the caption token width", int(dm.clip_text_width), int(cm.text.width), "text_proj",
              "clip_embeddings_dim", "hidden_size"))
    for what, theirs, clip_value, comp, key, clip_key in pairs:
        if theirs != clip_value:
            raise InputError(f"{where[comp]}: {key} {theirs} does not fit {where['text_encoder']}'s {clip_key} "
                             f"{clip_value} ({what}): the folders come from different models")


def _to_device(tree: dict) -> dict:
    """Replaces the numpy leaves of nested dicts by jax arrays in place, one leaf at a time, so each numpy
    array is freed as its copy is made: the bundle's cast (a no-op in float32) and the workdir's device_put
    then reuse these arrays instead of copying the whole component again."""
    import jax

    for k, v in tree.items():
        tree[k] = _to_device(v) if isinstance(v, dict) else jax.device_put(v)
    return tree


def write_karlo(weights: str, out: str, workdirs: str | None = None, image_encoder: str | None = None,
                dtype: str = "float32", overwrite: bool = False, log: Callable[[str], None] = print) -> dict:
    """Imports a karlo-style diffusers UnCLIPPipeline folder `weights` into an inference bundle `out` (clip, prior,
    decoder, upsampler_64to256 with super_res_last as its last-step model) and, with `workdirs`, one training
    workdir per model for fine-tuning through config.init_from (clip, prior, decoder, upsampler = super_res_first,
    upsampler_last = super_res_last). `image_encoder`: a CLIPVisionModelWithProjection folder (default:
    weights/image_encoder when present) for variations and fine-tuning; without one the CLIP is its text tower.
    One component is held in memory at a time, once (float32 while converting, then as jax arrays that the
    bundle and the workdir both save; a bfloat16 bundle adds its half-size cast).
    Returns the report (also out/import_report.json)."""
    import gc
    import time

    import jax

    from dalle2_jax.inference import bundle as B
    from dalle2_jax.tools import import_clip
    from dalle2_jax.training import checkpoint as ckpt
    from dalle2_jax.training.config import config_to_json

    t0 = time.time()
    if dtype not in B.DTYPES:
        raise InputError(f"--dtype must be one of {B.DTYPES}, got {dtype!r}")
    if not os.path.isdir(weights):
        raise InputError(f"--weights {weights!r}: no such directory (a diffusers karlo folder: "
                         f"{', '.join(COMPONENTS)})")
    folders = {c: os.path.join(weights, c) for c in COMPONENTS}
    missing = [c for c, f in folders.items() if not os.path.isdir(f)]
    if missing:
        raise InputError(f"--weights {weights!r} lacks {', '.join(f'{m}/' for m in missing)} (a karlo folder has "
                         f"{', '.join(COMPONENTS)})")
    if image_encoder is None and os.path.isdir(os.path.join(weights, "image_encoder")):
        image_encoder = os.path.join(weights, "image_encoder")
    if image_encoder is not None and not os.path.isdir(image_encoder):
        raise InputError(f"--image_encoder {image_encoder!r}: no such directory")
    out = os.path.abspath(out)
    for path, flag in ((out, "--out"),) + (((os.path.abspath(workdirs), "--workdirs"),) if workdirs else ()):
        if os.path.exists(path) and os.listdir(path) and not overwrite:
            raise InputError(f"{flag} {path!r} exists and is not empty; choose another or pass --overwrite")

    # every config first (cheap): a folder that does not fit is refused before anything is written
    where = {c: os.path.join(f, "config.json") for c, f in folders.items()}
    prior_config = karlo_prior_config(read_component_config(folders["prior"], PRIOR_CLASS), where["prior"])
    decoder_config = karlo_decoder_config(read_component_config(folders["decoder"], DECODER_CLASS),
                                          read_component_config(folders["text_proj"], TEXT_PROJ_CLASS),
                                          where["decoder"], where["text_proj"])
    sr_config = karlo_super_res_config(read_component_config(folders["super_res_first"], SUPER_RES_CLASS),
                                       where["super_res_first"])
    text_cfg = import_clip._hf_config(folders["text_encoder"], TEXT_CLASS)
    vision_cfg = import_clip._hf_config(image_encoder, VISION_CLASS) if image_encoder else None
    clip_config = import_clip.hf_towers_config(text_cfg, vision_cfg, where["text_encoder"],
                                               os.path.join(image_encoder or "", "config.json"))
    _cross_check(prior_config, clip_config, decoder_config, where)
    if int(sr_config.data.low_res_resolution) != int(decoder_config.data.resolution):
        raise InputError(f"{where['super_res_first']}: sample_size {sr_config.data.resolution} is not 4 x the "
                         f"decoder's {decoder_config.data.resolution} (karlo's super-res upsamples 4x)")

    tmp = out + ".partial"
    wtmp = os.path.abspath(workdirs) + ".partial" if workdirs else None
    for d in (tmp, wtmp):
        if d:
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
    report: dict = {"source": os.path.abspath(weights), "dtype": dtype, "components": {}}
    try:
        # the CLIP: a workdir (the bundle's clip stage is read from it)
        clip_wd = os.path.join(wtmp, "clip") if wtmp else os.path.join(tmp, "_clip_workdir")  # removed below
        log(f"clip: importing {folders['text_encoder']}" + (f" and {image_encoder}" if image_encoder else
                                                           " (text tower only: no image encoder)"))
        clip_report = import_clip.import_hf_towers(folders["text_encoder"], clip_wd, image_encoder,
                                                   folders["tokenizer"], overwrite=True)
        report["components"]["clip"] = {k: clip_report[k] for k in ("towers", "num_tensors", "num_params", "files")}
        entries = []
        sdir = os.path.join(tmp, "clip")
        os.makedirs(sdir)
        shutil.copytree(os.path.join(clip_wd, "tokenizer"), os.path.join(sdir, "tokenizer"))
        shutil.copy(os.path.join(clip_wd, "config.json"), os.path.join(sdir, "config.json"))
        stage = B.build_stage("clip", ckpt.read_config(clip_wd), sdir, None)
        _, clip_params, _ = ckpt.load_params(clip_wd)
        entries.append(B.write_stage_models(tmp, "clip", "clip", stage, {"main": jax.device_get(clip_params)}, dtype,
                                            {"main": {"diffusers": folders["text_encoder"]}}))
        del clip_params, stage
        gc.collect()
        clip_dir = os.path.join(tmp, "clip")

        def bundle_stage(name: str, config, models: dict, sources: dict, json_files: dict | None = None) -> None:
            """The bundle's stage folder: its JSON files, config (computing in the bundle's dtype), models."""
            d = os.path.join(tmp, name)
            os.makedirs(d)
            for rel, obj in (json_files or {}).items():
                ckpt.write_json(os.path.join(d, rel), obj)
            saved = config.copy_and_resolve_references()
            if "clip_workdir" in saved:
                saved.clip_workdir = ""
            saved.model.dtype = dtype  # computes in the params' dtype: float32 runs as diffusers does in fp32
            with open(os.path.join(d, "config.json"), "w") as f:
                f.write(config_to_json(saved))
            stage = B.build_stage(stage_kind[name], saved, d, clip_dir)
            entries.append(B.write_stage_models(tmp, name, stage_kind[name], stage, models, dtype, sources))

        def workdir(name: str, config, variables: dict, json_files: dict | None = None, tok: bool = True) -> None:
            if not wtmp:
                return
            config = config.copy_and_resolve_references()
            if "clip_workdir" in config:
                config.clip_workdir = os.path.join(os.path.abspath(workdirs), "clip")
            tokenizer = None
            if tok:
                from dalle2_jax.text import load_tokenizer

                tokenizer = load_tokenizer(os.path.join(clip_wd, "tokenizer"))
            import_clip.write_workdir(os.path.join(wtmp, name), config, tokenizer,
                                      jax.tree.map(jax.device_put, variables),
                                      {"arch": f"karlo {name}", "layout": "diffusers",
                                       "source": os.path.abspath(weights),
                                       "num_tensors": len(jax.tree.leaves(variables)),
                                       "num_params": int(sum(a.size for a in jax.tree.leaves(variables)))},
                                      time.time(), json_files)

        stage_kind = {"prior": "prior", "decoder": "decoder", "upsampler_64to256": "upsampler"}
        # the prior
        log(f"prior: importing {folders['prior']}")
        prior = load_prior(folders["prior"])
        _to_device(prior.variables)
        prior.config.data.resolution = int(clip_config.model.vision.image_size)  # the prior's images feed the CLIP
        stats = {"num_examples": 0, "source": "karlo clip_mean / clip_std", "mean": prior.stats["mean"].tolist(),
                 "std": prior.stats["std"].tolist()}
        json_files = {os.path.join("stats", "image_embedding_stats.json"): stats}
        bundle_stage("prior", prior.config, {"main": prior.variables}, {"main": {"diffusers": folders["prior"]}},
                     json_files)
        workdir("prior", prior.config, prior.variables, json_files)
        report["components"]["prior"] = {"num_tensors": prior.num_tensors, "num_params": prior.num_params}
        del prior
        gc.collect()
        # the decoder (+ text_proj)
        log(f"decoder: importing {folders['decoder']} and {folders['text_proj']}")
        dec = load_decoder(folders["decoder"], folders["text_proj"])
        _to_device(dec.variables)
        bundle_stage("decoder", dec.config, {"main": dec.variables},
                     {"main": {"diffusers": [folders["decoder"], folders["text_proj"]]}})
        workdir("decoder", dec.config, dec.variables)
        report["components"]["decoder"] = {"num_tensors": dec.num_tensors, "num_params": dec.num_params}
        del dec
        gc.collect()
        # the super-res UNets: one stage, two models
        log(f"upsampler: importing {folders['super_res_first']} and {folders['super_res_last']}")
        sr = load_super_res(folders["super_res_first"], folders["super_res_last"])
        _to_device(sr.first)
        _to_device(sr.last)
        name = f"upsampler_{int(sr.config.data.low_res_resolution)}to{int(sr.config.data.resolution)}"
        stage_kind[name] = "upsampler"
        bundle_stage(name, sr.config, {"main": sr.first, "last_step": sr.last},
                     {"main": {"diffusers": folders["super_res_first"]},
                      "last_step": {"diffusers": folders["super_res_last"]}})
        one = sr.config.copy_and_resolve_references()
        one.model.last_step_model = False  # each super-res UNet fine-tunes on its own
        workdir("upsampler", one, sr.first, tok=False)
        workdir("upsampler_last", one, sr.last, tok=False)
        report["components"]["upsampler"] = {"num_tensors": 2 * sr.num_tensors, "num_params": 2 * sr.num_params}
        del sr
        gc.collect()
        report["num_params"] = int(sum(c["num_params"] for c in report["components"].values()))
        report["seconds"] = round(time.time() - t0, 1)
        with open(os.path.join(tmp, "import_report.json"), "w") as f:
            json.dump(report, f, indent=2)
        if not wtmp:
            shutil.rmtree(clip_wd, ignore_errors=True)
        for final, partial in ((out, tmp),) + (((os.path.abspath(workdirs), wtmp),) if wtmp else ()):
            if os.path.exists(final):
                shutil.rmtree(final)
        if wtmp:
            os.replace(wtmp, os.path.abspath(workdirs))
        B.finish_bundle(tmp, out, entries, log)
    except BaseException:
        for d in (tmp, wtmp):
            if d:
                shutil.rmtree(d, ignore_errors=True)
        raise
    report["bundle"] = out
    if workdirs:
        report["workdirs"] = {n: os.path.join(os.path.abspath(workdirs), n)
                              for n in ("clip", "prior", "decoder", "upsampler", "upsampler_last")}
    return report


# --- CLI -------------------------------------------------------------------------------------------------
def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("weights", None, "A diffusers karlo folder (kakaobrain/karlo-v1-alpha as downloaded): prior/, "
                        "text_proj/, decoder/, super_res_first/, super_res_last/, text_encoder/, tokenizer/.",
                        flag_values=fv)
    flags.DEFINE_string("out", None, "The inference bundle to write.", flag_values=fv)
    flags.DEFINE_string("workdirs", None, "Also write one training workdir per model here (clip, prior, decoder, "
                        "upsampler, upsampler_last), to fine-tune through --config.init_from.", flag_values=fv)
    flags.DEFINE_string("image_encoder", None, "A CLIPVisionModelWithProjection folder (karlo-v1-alpha-image-"
                        "variations' image_encoder/) for variations and fine-tuning; default WEIGHTS/image_encoder "
                        "when present, else the CLIP is its text tower only.", flag_values=fv)
    flags.DEFINE_enum("dtype", "float32", ("float32", "bfloat16"), "The bundle's params dtype (the workdirs stay "
                      "float32).", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Replace an existing --out / --workdirs.", flag_values=fv)


def main(fv: flags.FlagValues) -> None:
    with exit_on_errors():
        report = write_karlo(fv.weights, fv.out, fv.workdirs, fv.image_encoder, fv.dtype, fv.overwrite)
    print(json.dumps({k: report[k] for k in ("bundle", "num_params", "seconds", "dtype") if k in report}))


def run(argv: list[str] | None = None) -> None:
    run_program(__doc__, define_flags, main, argv, required=("weights", "out"))


if __name__ == "__main__":
    run()
