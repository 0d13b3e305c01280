"""Import a released CLIP (OpenCLIP, OpenAI or Hugging Face weights) into a CLIP workdir, offline.

`python -m dalle2_jax.tools.import_clip --arch ViT-L-14 --weights FILE --out CLIP_WORKDIR`

FILE is a local `.safetensors` state dict, read tensor by tensor with `safetensors` (no torch); `.bin`,
`.pt`, `.pth` and `.ckpt` files (pickles, OpenAI's TorchScript archives) are read only when torch happens
to be installed. Two layouts are recognised from the key names (or `--layout`):

- `open_clip`: open_clip's and OpenAI's state dicts: packed `attn.in_proj_weight` ([Q; K; V] row blocks),
  `visual.proj` and `text_projection` applied as `x @ W`, `visual.conv1` without bias; an optional
  `module.` prefix; OpenAI's scalar entries (input_resolution, context_length, vocab_size) are dropped.
- `hf`: Hugging Face `CLIPModel`: separate q/k/v projections, `text_projection` / `visual_projection` as
  Linear layers (transposed); `position_ids` buffers are dropped.

The architecture is a `configs/clip.py` variant named as open_clip names it (`--arch`), or any CLIP config
file (`--config configs/clip.py:ViT-L-14 --config.model.text.depth=2`). The file must hold exactly the
tensors that architecture has: missing, unexpected or mis-shaped tensors are refused, listed by name.

The workdir is one the prior, the decoder, evaluation and export read like a trained CLIP's:
`config.json`, `tokenizer/` (CLIP's BPE with its merges file), `checkpoints/0/` (the params only) and
`reports/import.json` (source file, size, sha256, layout, tensor and parameter counts). It is written to
`OUT.partial` and renamed, so a refused import leaves nothing behind. Tensors are read one at a time (each
through its own mapping of the file, released after the read), converted to float32 device arrays and
written by orbax without compression (compressing, or saving numpy arrays, copies every array), so the
peak RAM stays near the file's size (benchmarks/clip_import.py measures it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from absl import flags
from ml_collections import config_flags

from dalle2_jax import fileio
from dalle2_jax.cli_util import exit_on_errors, run_program
from dalle2_jax.inference.errors import InputError

log = logging.getLogger(__name__)

LAYOUTS = ("open_clip", "hf")
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")  # scalars in OpenAI's JIT archives


# --- reading weight files --------------------------------------------------------------------------------
class WeightFile:
    """A state dict on disk, read one tensor at a time: `keys`, `shape(key)`, `dtype(key)`, `get(key)`
    (a float32 numpy array). Keys have any `module.` prefix removed."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights file {path!r} does not exist")
        self.path = path
        self._torch: dict[str, Any] | None = None
        if path.endswith(".safetensors"):
            import ml_dtypes  # noqa: F401  (lets numpy read bfloat16 tensors)
            from safetensors import safe_open

            try:
                self._st = safe_open(path, framework="np")
                raw = list(self._st.keys())
            except Exception as e:  # safetensors raises its own error types for damaged headers
                raise InputError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
        elif path.endswith(TORCH_SUFFIXES):
            self._torch = _torch_state_dict(path)
            raw = list(self._torch)
        else:
            raise InputError(f"{path}: unknown weights format; use a .safetensors file (or, with torch "
                             f"installed, one of {TORCH_SUFFIXES})")
        prefix = "module."
        strip = bool(raw) and all(k.startswith(prefix) for k in raw)
        self._raw = {(k[len(prefix):] if strip else k): k for k in raw}
        self.keys = list(self._raw)

    def shape(self, key: str) -> tuple[int, ...]:
        if self._torch is not None:
            return tuple(self._torch[self._raw[key]].shape)
        return tuple(self._st.get_slice(self._raw[key]).get_shape())

    def dtype(self, key: str) -> str:
        if self._torch is not None:
            return str(self._torch[self._raw[key]].dtype).replace("torch.", "")
        return str(self._st.get_slice(self._raw[key]).get_dtype())

    def get(self, key: str) -> np.ndarray:
        if self._torch is not None:
            t = self._torch[self._raw[key]]
            return t.detach().float().cpu().numpy()
        from safetensors import safe_open

        # A fresh mapping per tensor: the pages read are released with it, so the resident memory is the
        # converted params, not the params plus the whole mapped file.
        with safe_open(self.path, framework="np") as f:
            return np.asarray(f.get_tensor(self._raw[key]), dtype=np.float32)


def _torch_state_dict(path: str) -> dict[str, Any]:
    """A .bin/.pt/.pth/.ckpt file's tensors (torch only, when installed)."""
    try:
        import torch
    except ImportError:
        raise InputError(
            f"{path}: reading {os.path.splitext(path)[1]} files needs torch, which dalle2-jax does not depend on. "
            "Convert it once where torch is installed:\n  python -c \"import torch, safetensors.torch as s; "
            "m = torch.load('IN', map_location='cpu'); m = getattr(m, 'state_dict', lambda: m)(); "
            "s.save_file({k: v.contiguous() for k, v in m.items() if hasattr(v, 'shape')}, 'OUT.safetensors')\"\n"
            "(OpenAI's .pt files: torch.jit.load('IN', map_location='cpu').state_dict()), then import the "
            ".safetensors file") from None
    import warnings

    try:
        with warnings.catch_warnings():  # torch warns that jit.load is deprecated; OpenAI's archives need it
            warnings.simplefilter("ignore")
            sd = torch.jit.load(path, map_location="cpu").state_dict()  # OpenAI's TorchScript archives
    except Exception:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise InputError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return {k: v for k, v in sd.items() if hasattr(v, "shape")}


def detect_layout(keys: Sequence[str]) -> str:
    """'hf' for Hugging Face CLIPModel key names, else 'open_clip'."""
    return "hf" if any(k.startswith(("text_model.", "vision_model.")) for k in keys) else "open_clip"


def is_ignored(key: str, layout: str) -> bool:
    """Buffers and metadata that are not parameters."""
    if layout == "hf":
        return key.endswith("position_ids")
    return key in OPENAI_EXTRAS or key.endswith("attn_mask")


# --- the mapping -----------------------------------------------------------------------------------------
Path = tuple[str, ...]


@dataclasses.dataclass
class Step:
    """Some source tensors (name -> expected shape) and how they become target params."""

    sources: dict[str, tuple[int, ...]]
    build: Callable[[dict[str, np.ndarray]], dict[Path, np.ndarray]]


def _copy(src: str, shape: tuple[int, ...], dst: Path, transform: Callable[[np.ndarray], np.ndarray] | None = None
          ) -> Step:
    fn = transform or (lambda a: a)
    return Step({src: shape}, lambda t: {dst: np.asarray(fn(t[src]), order="C")})


def _ln(src: str, width: int, dst: Path) -> list[Step]:
    return [_copy(f"{src}.weight", (width,), dst + ("norm", "scale")),
            _copy(f"{src}.bias", (width,), dst + ("norm", "bias"))]


def _linear(src: str, d_in: int, d_out: int, dst: Path) -> list[Step]:
    """torch Linear weight [out, in] -> Dense kernel [in, out]."""
    return [_copy(f"{src}.weight", (d_out, d_in), dst + ("dense", "kernel"), np.transpose),
            _copy(f"{src}.bias", (d_out,), dst + ("dense", "bias"))]


def _block(layout: str, src: str, width: int, hidden: int, dst: Path) -> list[Step]:
    attn = dst + ("attn",)
    if layout == "open_clip":
        w, b = f"{src}.attn.in_proj_weight", f"{src}.attn.in_proj_bias"

        def qkv(t: dict[str, np.ndarray]) -> dict[Path, np.ndarray]:
            out = {}
            for j, name in enumerate(("query", "key", "value")):
                rows = slice(j * width, (j + 1) * width)
                out[attn + (name, "dense", "kernel")] = np.ascontiguousarray(t[w][rows].T)
                out[attn + (name, "dense", "bias")] = np.ascontiguousarray(t[b][rows])
            return out

        steps = [Step({w: (3 * width, width), b: (3 * width,)}, qkv)]
        steps += _linear(f"{src}.attn.out_proj", width, width, attn + ("out",))
        steps += _ln(f"{src}.ln_1", width, dst + ("ln_1",)) + _ln(f"{src}.ln_2", width, dst + ("ln_2",))
        steps += _linear(f"{src}.mlp.c_fc", width, hidden, dst + ("mlp", "fc1"))
        steps += _linear(f"{src}.mlp.c_proj", hidden, width, dst + ("mlp", "fc2"))
        return steps
    steps = []
    for name, proj in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("out", "out_proj")):
        steps += _linear(f"{src}.self_attn.{proj}", width, width, attn + (name,))
    steps += _ln(f"{src}.layer_norm1", width, dst + ("ln_1",)) + _ln(f"{src}.layer_norm2", width, dst + ("ln_2",))
    steps += _linear(f"{src}.mlp.fc1", width, hidden, dst + ("mlp", "fc1"))
    steps += _linear(f"{src}.mlp.fc2", hidden, width, dst + ("mlp", "fc2"))
    return steps


def conversion_plan(model_cfg, layout: str, towers: tuple[str, ...] = ("text", "vision"),
                    logit_scale: bool = True) -> list[Step]:
    """Every source tensor of a CLIP with `model_cfg`'s architecture in `layout`, and where it goes in
    our params (under 'params'): the given towers, and the temperature when `logit_scale`. Raises ConfigError
    for an architecture a released CLIP cannot have."""
    from dalle2_jax.training.config import ConfigError

    if layout not in LAYOUTS:
        raise InputError(f"unknown layout {layout!r}; use one of {LAYOUTS}")
    t, v, e = model_cfg.text, model_cfg.vision, int(model_cfg.embed_dim)
    if "vision" in towers and v.stem != "patch":
        raise ConfigError("model.vision.stem", "released CLIPs use a patch embedding; set it to 'patch'")
    tw, vw = int(t.width), int(v.width)
    th, vh = int(tw * t.mlp_ratio), int(vw * v.mlp_ratio)
    p, grid = int(v.patch_size), int(v.image_size) // int(v.patch_size)
    T, V = ("text",), ("vision",)
    text: list[Step] = []
    vision: list[Step] = []
    if layout == "open_clip":
        text += [_copy("token_embedding.weight", (int(t.vocab_size), tw), T + ("token_embedding",)),
                 _copy("positional_embedding", (int(t.context_length), tw), T + ("positional_embedding",))]
        for i in range(int(t.depth)):
            text += _block(layout, f"transformer.resblocks.{i}", tw, th, T + ("transformer", f"block_{i}"))
        text += _ln("ln_final", tw, T + ("ln_final",))
        text += [_copy("text_projection", (tw, e), T + ("projection", "dense", "kernel"))]
        vision += [_copy("visual.conv1.weight", (vw, 3, p, p), V + ("patch_embed", "kernel"),
                         lambda a: a.transpose(2, 3, 1, 0)),
                   _copy("visual.class_embedding", (vw,), V + ("class_embedding",)),
                   _copy("visual.positional_embedding", (grid * grid + 1, vw), V + ("positional_embedding",))]
        vision += _ln("visual.ln_pre", vw, V + ("ln_pre",))
        for i in range(int(v.depth)):
            vision += _block(layout, f"visual.transformer.resblocks.{i}", vw, vh, V + ("transformer", f"block_{i}"))
        vision += _ln("visual.ln_post", vw, V + ("ln_post",))
        vision += [_copy("visual.proj", (vw, e), V + ("projection", "dense", "kernel"))]
    else:
        text += [_copy("text_model.embeddings.token_embedding.weight", (int(t.vocab_size), tw),
                       T + ("token_embedding",)),
                 _copy("text_model.embeddings.position_embedding.weight", (int(t.context_length), tw),
                       T + ("positional_embedding",))]
        for i in range(int(t.depth)):
            text += _block(layout, f"text_model.encoder.layers.{i}", tw, th, T + ("transformer", f"block_{i}"))
        text += _ln("text_model.final_layer_norm", tw, T + ("ln_final",))
        text += [_copy("text_projection.weight", (e, tw), T + ("projection", "dense", "kernel"), np.transpose)]
        vision += [_copy("vision_model.embeddings.patch_embedding.weight", (vw, 3, p, p), V + ("patch_embed", "kernel"),
                         lambda a: a.transpose(2, 3, 1, 0)),
                   _copy("vision_model.embeddings.class_embedding", (vw,), V + ("class_embedding",)),
                   _copy("vision_model.embeddings.position_embedding.weight", (grid * grid + 1, vw),
                         V + ("positional_embedding",))]
        vision += _ln("vision_model.pre_layrnorm", vw, V + ("ln_pre",))
        for i in range(int(v.depth)):
            vision += _block(layout, f"vision_model.encoder.layers.{i}", vw, vh, V + ("transformer", f"block_{i}"))
        vision += _ln("vision_model.post_layernorm", vw, V + ("ln_post",))
        vision += [_copy("visual_projection.weight", (e, vw), V + ("projection", "dense", "kernel"), np.transpose)]
    steps = (text if "text" in towers else []) + (vision if "vision" in towers else [])
    if logit_scale:
        steps += [_copy("logit_scale", (), ("logit_scale",), lambda a: np.asarray(a, np.float32).reshape(()))]
    return steps


def expected_tensors(model_cfg, layout: str) -> dict[str, tuple[int, ...]]:
    """The state dict (name -> shape) a CLIP with this architecture has in `layout`."""
    out: dict[str, tuple[int, ...]] = {}
    for step in conversion_plan(model_cfg, layout):
        out.update(step.sources)
    return out


def check_tensors(wf: WeightFile, expected: dict[str, tuple[int, ...]], layout: str, arch: str) -> None:
    """Raises InputError listing missing, unexpected and mis-shaped tensors (all of them, by name)."""
    have = {k for k in wf.keys if not is_ignored(k, layout)}
    missing = sorted(set(expected) - have)
    extra = sorted(have - set(expected))
    shaped = sorted(f"{k} {wf.shape(k)} (expected {expected[k]})" for k in set(expected) & have
                    if wf.shape(k) != tuple(expected[k]) and not (expected[k] == () and wf.shape(k) in ((1,),)))
    if missing or extra or shaped:
        parts = [f"{wf.path} does not fit {arch} in the {layout} layout:"]
        for title, names in (("missing", missing), ("unexpected", extra), ("mis-shaped", shaped)):
            if names:
                parts.append(f"  {len(names)} {title}: " + ", ".join(names[:40])
                             + (f", ... ({len(names) - 40} more)" if len(names) > 40 else ""))
        parts.append("Check --arch (and --layout); an open_clip name with -quickgelu changes only the activation.")
        raise InputError("\n".join(parts))


def convert(wf: WeightFile, model_cfg, layout: str) -> Iterator[tuple[Path, np.ndarray]]:
    """Yields (param path under 'params', float32 array), reading one step's tensors at a time."""
    for step in conversion_plan(model_cfg, layout):
        loaded = {k: wf.get(k) for k in step.sources}
        yield from step.build(loaded).items()
        del loaded


# --- the workdir -----------------------------------------------------------------------------------------
def _sha256(path: str, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _nest(flat: dict[Path, np.ndarray]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return out


def _stack_scanned(tower: dict, depth: int) -> None:
    """block_0..block_{n-1} -> one `blocks` subtree stacked on a leading axis (config.model.scan_layers)."""
    import jax

    blocks = [tower["transformer"].pop(f"block_{i}") for i in range(depth)]
    tower["transformer"]["blocks"] = jax.tree.map(lambda *xs: jax.numpy.stack(xs), *blocks)


def import_clip(weights: str, config, out: str, layout: str = "auto", bpe_path: str | None = None,
                overwrite: bool = False) -> dict:
    """Imports `weights` as a CLIP with `config` (a configs/clip.py config) into the workdir `out`.

    Returns the import report (also written to out/reports/import.json). Raises InputError for a file
    that does not fit the architecture, ConfigError for a config a released CLIP cannot have.
    """
    import jax
    import jax.numpy as jnp
    import flax

    from dalle2_jax.models.clip import build_clip
    from dalle2_jax.text import ClipBpeTokenizer
    from dalle2_jax.training.config import ConfigError

    t0 = time.time()
    if config.stage != "clip":
        raise ConfigError("stage", f"is {config.stage!r}; import_clip needs a CLIP config (configs/clip.py)")
    if config.model.text.get("tokenizer", "bpe") != "clip_bpe":
        raise ConfigError("model.text.tokenizer", "released CLIPs use CLIP's BPE; set it to 'clip_bpe'")
    out = fileio.resolve(out)
    if fileio.exists(out) and fileio.listdir(out) and not overwrite:
        raise InputError(f"{out!r} exists and is not empty; choose another --out or pass --overwrite")
    arch = config.model.get("arch", "") or "the given config"
    wf = WeightFile(weights)
    layout = detect_layout(wf.keys) if layout == "auto" else layout
    expected = expected_tensors(config.model, layout)
    check_tensors(wf, expected, layout, arch)

    tok = ClipBpeTokenizer(bpe_path, int(config.model.text.context_length))
    model = build_clip(config.model, tok.eot_id)
    v, t = config.model.vision, config.model.text
    abstract = flax.linen.unbox(jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, v.image_size, v.image_size, 3)), jnp.zeros((1, t.context_length), jnp.int32))))

    flat: dict[Path, np.ndarray] = {}
    file_dtypes: dict[str, int] = {}
    for k in expected:
        file_dtypes[wf.dtype(k)] = file_dtypes.get(wf.dtype(k), 0) + 1
    for path, value in convert(wf, config.model, layout):
        flat[path] = jax.device_put(value)  # orbax writes device arrays without a host copy
    params = _nest(flat)
    if config.model.scan_layers:
        _stack_scanned(params["text"], int(t.depth))
        _stack_scanned(params["vision"], int(v.depth))
    variables = {"params": params}
    want = {jax.tree_util.keystr(k): tuple(x.shape) for k, x in jax.tree_util.tree_leaves_with_path(abstract)}
    got = {jax.tree_util.keystr(k): tuple(x.shape) for k, x in jax.tree_util.tree_leaves_with_path(variables)}
    if want != got:  # the mapping and the model disagree: a bug here, not in the file
        diff = sorted(set(want.items()) ^ set(got.items()))[:10]
        raise RuntimeError(f"internal: converted params do not match the model ({arch}, {layout}): {diff}")

    num_params = int(sum(a.size for a in flat.values()))
    del flat, params
    report = {
        "arch": arch, "layout": layout, "source": os.path.abspath(weights),
        "source_bytes": os.path.getsize(weights), "source_sha256": _sha256(weights),
        "num_tensors": len(expected), "ignored_tensors": sorted(k for k in wf.keys if is_ignored(k, layout)),
        "file_dtypes": file_dtypes, "num_params": num_params, "embed_dim": int(config.model.embed_dim),
        "image_size": int(v.image_size),
    }
    return write_workdir(out, config, tok, variables, report, t0)


def write_workdir(out: str, config, tok, variables: dict, report: dict, t0: float,
                  json_files: dict | None = None) -> dict:
    """Writes an imported model's workdir: config.json, tokenizer/ (when `tok` is given), checkpoints/0 (the
    params only, through orbax without compression), `json_files` ({relative path: object}, e.g. a prior's
    stats/) and reports/import.json (`report` plus the seconds taken), to `out.partial` (or a local temporary
    folder for a gs:// `out`), then moved into place. Returns the report with "workdir"."""
    from dalle2_jax.training import checkpoint as ckpt
    from dalle2_jax.training.config import config_to_json

    remote = fileio.is_remote(out)  # a gs:// workdir is written locally, then copied up (config.json last)
    tmp = tempfile.mkdtemp(prefix="dalle2_jax_import_") if remote else out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        f.write(config_to_json(config))
    if tok is not None:
        tok.save(os.path.join(tmp, "tokenizer"))
    for rel, obj in (json_files or {}).items():
        ckpt.write_json(os.path.join(tmp, rel), obj)
    meta = {"step": 0, "imported": True, "examples_seen": 0, "wall_time": 0.0}
    mngr = ckpt.make_manager(tmp, async_save=False, compress=False)  # compression would copy every array
    ckpt.save(mngr, 0, {"params": variables}, meta, None, force=True)
    mngr.wait_until_finished()
    mngr.close()
    report = dict(report, seconds=round(time.time() - t0, 2))
    ckpt.write_json(os.path.join(tmp, "reports", "import.json"), report)
    if fileio.exists(out):
        fileio.remove_tree(out)
    if remote:
        fileio.copy_tree(tmp, out, last=("config.json",))
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, out)
    report["workdir"] = out
    log.info("imported %s (%s, %d tensors, %.1fM params) into %s", report.get("arch"), report.get("layout"),
             report.get("num_tensors", 0), report.get("num_params", 0) / 1e6, out)
    return report


# --- Hugging Face tower folders (karlo's text_encoder/, image_encoder/) ------------------------------------
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # what transformers' save_pretrained writes
HF_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}


def _hf_tower_file(folder: str) -> str:
    for name in HF_WEIGHTS:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    if os.path.isfile(os.path.join(folder, "model.safetensors.index.json")):
        raise InputError(f"{folder}: sharded weights (model.safetensors.index.json); save the model as one file")
    raise InputError(f"{folder}: no {' or '.join(HF_WEIGHTS)}")


def _hf_config(folder: str, expect: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise InputError(f"{folder}: no config.json (expected a Hugging Face {expect} folder)")
    with open(path) as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e})") from None
    archs = cfg.get("architectures") or []
    if archs and expect not in archs:
        raise InputError(f"{path}: architectures is {archs}; expected {expect!r}")
    return cfg


def _hf_tower_sizes(cfg: dict, where: str, what: str) -> dict:
    act = cfg.get("hidden_act", "quick_gelu")
    if act not in HF_ACTS:
        raise InputError(f"{where}: hidden_act {act!r}; the {what} tower supports {sorted(HF_ACTS)}")
    width, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    if width % heads:
        raise InputError(f"{where}: hidden_size {width} is not divisible by num_attention_heads {heads}")
    return dict(width=width, depth=int(cfg["num_hidden_layers"]), heads=heads,
                mlp_ratio=int(cfg["intermediate_size"]) / width, act=HF_ACTS[act])


def hf_towers_config(text_cfg: dict, vision_cfg: dict | None = None, text_where: str = "text_encoder/config.json",
                     vision_where: str = "image_encoder/config.json"):
    """configs/clip.py:ViT-L-14 with the sizes of a Hugging Face CLIPTextModelWithProjection config (dict) and,
    when given, a CLIPVisionModelWithProjection config; without one the image tower is off
    (model.image_tower False) and model.vision keeps ViT-L/14's sizes."""
    from configs import clip as clip_configs

    c = clip_configs.get_config("ViT-L-14")
    m = c.model
    m.arch = "hf-towers"
    t = _hf_tower_sizes(text_cfg, text_where, "text")
    m.text.update(t)
    m.text.update(dict(context_length=int(text_cfg.get("max_position_embeddings", 77)),
                       vocab_size=int(text_cfg.get("vocab_size", 49408))))
    m.embed_dim = int(text_cfg.get("projection_dim", 512))
    eps = float(text_cfg.get("layer_norm_eps", 1e-5))
    m.ln_eps = eps
    if vision_cfg is None:
        m.image_tower = False
        return c
    v = _hf_tower_sizes(vision_cfg, vision_where, "image")
    m.vision.update(v)
    m.vision.update(dict(image_size=int(vision_cfg["image_size"]), patch_size=int(vision_cfg["patch_size"])))
    if int(vision_cfg.get("num_channels", 3)) != 3:
        raise InputError(f"{vision_where}: num_channels {vision_cfg['num_channels']}; CLIP's image tower reads RGB")
    if int(vision_cfg.get("projection_dim", 512)) != m.embed_dim:
        raise InputError(f"{vision_where}: projection_dim {vision_cfg.get('projection_dim', 512)} differs from the "
                         f"text encoder's {m.embed_dim}; the two towers must embed into one space")
    if float(vision_cfg.get("layer_norm_eps", 1e-5)) != eps:
        raise InputError(f"{vision_where}: layer_norm_eps differs from the text encoder's; ours is one value")
    if m.vision.image_size % m.vision.patch_size:
        raise InputError(f"{vision_where}: image_size {m.vision.image_size} is not divisible by patch_size "
                         f"{m.vision.patch_size}")
    c.data.resolution = int(m.vision.image_size)
    return c


def check_hf_tokenizer(folder: str, tok) -> None:
    """Refuses a Hugging Face CLIPTokenizer folder whose vocabulary or merges differ from CLIP's BPE (`tok`, a
    ClipBpeTokenizer), naming the first difference; our tokenizer then encodes exactly as it does."""
    vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    for path in (vocab_path, merges_path):
        if not os.path.isfile(path):
            raise InputError(f"{folder}: no {os.path.basename(path)} (expected a CLIPTokenizer folder)")
    with open(vocab_path, encoding="utf-8") as f:
        vocab = json.load(f)
    specials = {"<|startoftext|>": tok.sot_id, "<|endoftext|>": tok.eot_id}
    if len(vocab) != tok.vocab_size:
        raise InputError(f"{vocab_path}: {len(vocab)} tokens; CLIP's BPE has {tok.vocab_size}")
    for token, i in vocab.items():
        want = specials.get(token, tok.encoder.get(token))
        if want != i:
            raise InputError(f"{vocab_path}: token {token!r} has id {i}, CLIP's BPE gives {want}; this is not "
                             "CLIP's vocabulary")
    with open(merges_path, encoding="utf-8") as f:
        lines = [ln for ln in f.read().split("\n") if ln and not ln.startswith("#version")]
    ours = sorted(tok.ranks, key=tok.ranks.get)
    for i, (line, merge) in enumerate(zip(lines, ours)):
        if tuple(line.split()) != merge:
            raise InputError(f"{merges_path}: merge {i} is {line!r}, CLIP's BPE has {' '.join(merge)!r}")
    if len(lines) != len(ours):
        raise InputError(f"{merges_path}: {len(lines)} merges; CLIP's BPE has {len(ours)}")


def import_hf_towers(text_folder: str, out: str, vision_folder: str | None = None,
                     tokenizer_folder: str | None = None, overwrite: bool = False) -> dict:
    """Imports Hugging Face CLIP tower folders (a CLIPTextModelWithProjection, as karlo's text_encoder/, and
    optionally a CLIPVisionModelWithProjection, as karlo-image-variations' image_encoder/) into a CLIP workdir.
    Without an image tower the workdir's CLIP has model.image_tower False (text -> image generation only). The
    tokenizer is CLIP's BPE (the packaged merges file); a `tokenizer_folder` (karlo's tokenizer/) is checked to
    hold exactly that vocabulary. The temperature is not in these files: it is set to log(100), OpenAI's trained
    value, and unused by generation. Raises InputError for a folder that does not fit (named)."""
    import jax

    from dalle2_jax.models.clip import build_clip, init_clip
    from dalle2_jax.text import ClipBpeTokenizer

    t0 = time.time()
    out = fileio.resolve(out)
    if fileio.exists(out) and fileio.listdir(out) and not overwrite:
        raise InputError(f"{out!r} exists and is not empty; choose another --out or pass --overwrite")
    tw = os.path.join(text_folder, "config.json")
    text_cfg = _hf_config(text_folder, "CLIPTextModelWithProjection")
    vision_cfg = _hf_config(vision_folder, "CLIPVisionModelWithProjection") if vision_folder else None
    config = hf_towers_config(text_cfg, vision_cfg, tw, os.path.join(vision_folder or "", "config.json"))
    tok = ClipBpeTokenizer(None, int(config.model.text.context_length))
    if int(config.model.text.vocab_size) != tok.vocab_size:
        raise InputError(f"{tw}: vocab_size {config.model.text.vocab_size}; CLIP's BPE has {tok.vocab_size}")
    if tokenizer_folder:
        check_hf_tokenizer(tokenizer_folder, tok)
    sources = [("text", text_folder)] + ([("vision", vision_folder)] if vision_folder else [])
    flat: dict[Path, np.ndarray] = {}
    files, num_tensors, ignored = {}, 0, []
    for tower, folder in sources:
        path = _hf_tower_file(folder)
        wf = WeightFile(path)
        expected = expected_tensors_for(config.model, "hf", (tower,))
        check_tensors(wf, expected, "hf", f"the {tower} tower its config.json describes")
        for step in conversion_plan(config.model, "hf", (tower,), logit_scale=False):
            loaded = {k: wf.get(k) for k in step.sources}
            flat.update({k: jax.device_put(a) for k, a in step.build(loaded).items()})
        files[tower] = {"source": os.path.abspath(path), "source_bytes": os.path.getsize(path),
                        "source_sha256": _sha256(path)}
        num_tensors += len(expected)
        ignored += sorted(k for k in wf.keys if is_ignored(k, "hf"))
    flat[("logit_scale",)] = jax.device_put(np.asarray(np.log(100.0), np.float32))
    params = _nest(flat)
    model = build_clip(config.model, tok.eot_id)
    abstract = jax.eval_shape(lambda: init_clip(model, jax.random.key(0)))
    import flax

    want = {jax.tree_util.keystr(k): tuple(x.shape)
            for k, x in jax.tree_util.tree_leaves_with_path(flax.linen.unbox(abstract))}
    got = {jax.tree_util.keystr(k): tuple(x.shape) for k, x in jax.tree_util.tree_leaves_with_path({"params": params})}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:10]
        raise RuntimeError(f"internal: converted params do not match the model: {diff}")
    report = {"arch": "hf-towers", "layout": "hf", "towers": [t for t, _ in sources], "files": files,
              "num_tensors": num_tensors, "ignored_tensors": ignored,
              "num_params": int(sum(a.size for a in flat.values())), "embed_dim": int(config.model.embed_dim),
              "image_size": int(config.model.vision.image_size) if vision_folder else None,
              "logit_scale": "not in the files: log(100), OpenAI's trained value (unused by generation)"}
    del flat
    return write_workdir(out, config, tok, {"params": params}, report, t0)


def expected_tensors_for(model_cfg, layout: str, towers: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """The tensors (name -> shape) of the given towers of a CLIP in `layout`, without the temperature."""
    out: dict[str, tuple[int, ...]] = {}
    for step in conversion_plan(model_cfg, layout, towers, logit_scale=False):
        out.update(step.sources)
    return out


# --- CLI -------------------------------------------------------------------------------------------------
def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("arch", None, "Architecture, an open_clip name from configs/clip.py (ViT-B-32, ViT-B-16, "
                        "ViT-L-14, ViT-L-14-336, ViT-H-14, each also -quickgelu).", flag_values=fv)
    config_flags.DEFINE_config_file("config", None, "Or a CLIP config file, e.g. configs/clip.py:ViT-L-14, "
                                    "with --config.key=value overrides.", flag_values=fv, lock_config=True)
    flags.DEFINE_string("weights", None, "The state dict: .safetensors (or .bin/.pt with torch installed).",
                        flag_values=fv)
    flags.DEFINE_string("out", None, "The CLIP workdir to write.", flag_values=fv)
    flags.DEFINE_enum("layout", "auto", ("auto",) + LAYOUTS, "Key layout of the file (auto: from the names).",
                      flag_values=fv)
    flags.DEFINE_string("bpe", None, "CLIP's merges file (bpe_simple_vocab_16e6.txt.gz); default: the packaged "
                        "copy.", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Replace an existing --out.", flag_values=fv)


def main(fv: flags.FlagValues) -> None:
    from configs import clip as clip_configs

    with exit_on_errors():
        if (fv.arch is None) == (fv.config is None):
            raise InputError("give exactly one of --arch NAME or --config FILE[:ARG]")
        if fv.arch is not None:
            if fv.arch not in clip_configs.arch_names():
                raise InputError(f"unknown --arch {fv.arch!r}; known: {', '.join(clip_configs.arch_names())}")
            config = clip_configs.get_config(fv.arch)
        else:
            config = fv.config
        report = import_clip(fv.weights, config, fv.out, fv.layout, fv.bpe, fv.overwrite)
    print(json.dumps(report))


def run(argv: list[str] | None = None) -> None:
    run_program(__doc__, define_flags, main, argv, required=("weights", "out"))


if __name__ == "__main__":
    run()
