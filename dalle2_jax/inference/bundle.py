"""Inference bundles: trained workdirs -> one self-contained directory, and back to ready-to-run stages.

A bundle holds, per stage, the resolved config, the EMA params (orbax, optionally cast to bfloat16) and
stage extras (the CLIP's tokenizer, the prior's embedding statistics), plus `manifest.json`:

    {"format": "dalle2-jax-bundle", "schema_version": 1, "created": ..., "dalle2_jax_version": ...,
     "tokenizer": "clip/tokenizer",
     "stages": [  # cascade order: clip, prior, decoder, upsampler(s)
        {"name": "decoder", "kind": "decoder", "dir": "decoder", "config": "decoder/config.json",
         "interface": {"embed_dim": 64, "resolution": 64, ...},   # what the stage expects / gives
         "extras": {"decoder/...": sha256},                      # files besides config and params
         "models": {"main": {"params": "decoder/params", "dtype": "float32", "num_params": N,
                             "files": {"decoder/params/...": sha256}, "source": {"workdir": ..., "step": ...}}}},
        ...]}

A stage's directory looks like a workdir without checkpoints (config.json, tokenizer/, stats/), so the
training stages rebuild their models from it unchanged. `models` maps a role to a params file: this version
writes and runs the role `main`; a stage may hold more roles (a released upsampler ships a separate model for
its last step), and a loader that does not know a role refuses the bundle by name instead of running without it.

Loading needs neither the workdirs nor grain/TFDS. It checks the manifest, the files' hashes, that the stages
fit together (embedding sizes, resolutions, caption vocabularies) and that each params tree has the shapes of
the model its config builds; every failure is a `BundleError` naming the stage and the mismatch.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dalle2_jax import fileio
from dalle2_jax.inference.errors import BundleError, InputError  # noqa: F401 (re-exported)

logger = logging.getLogger("dalle2_jax.inference")

FORMAT = "dalle2-jax-bundle"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
KNOWN_ROLES = ("main", "last_step")  # last_step: a released upsampler's model for its final step (karlo)
KINDS = ("clip", "prior", "decoder", "upsampler")
DTYPES = ("float32", "bfloat16")


# --- helpers ---------------------------------------------------------------------------------------------
def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with fileio.path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_tree(root: str, directory: str) -> dict[str, str]:
    """{path relative to root: sha256} for every file under root/directory (sorted)."""
    return {f"{directory}/{rel}": sha256_file(fileio.join(root, directory, rel))
            for rel in fileio.walk_files(fileio.join(root, directory))}


def _shape_tree(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """{'/'-joined path: (shape, dtype name)} of a params tree (arrays, ShapeDtypeStructs or orbax metadata)."""
    flat = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path):
            (tuple(int(s) for s in leaf.shape), jnp.dtype(leaf.dtype).name) for path, leaf in flat}


def _cast(params: Any, dtype: str) -> Any:
    """Casts the floating-point leaves of a params tree to `dtype`."""
    dt = jnp.dtype(dtype)
    return jax.tree.map(lambda x: jnp.asarray(x, dt) if jnp.issubdtype(x.dtype, jnp.floating)
                        else jnp.asarray(x), params)


def build_stage(kind: str, config, stage_dir: str, clip_dir: str | None):
    """A training stage object with its model built (no data, no params): the prior and the decoder read
    their CLIP's config and tokenizer from `clip_dir`."""
    from dalle2_jax.stages import get_stage_class

    config = config.copy_and_resolve_references() if hasattr(config, "copy_and_resolve_references") else config
    if kind in ("prior", "decoder"):
        config.clip_workdir = clip_dir
    stage = get_stage_class(kind)(config, stage_dir)
    stage.setup_model()
    return stage


def abstract_params(stage) -> Any:
    """The unboxed params shapes (ShapeDtypeStruct tree) of a built stage's model."""
    from dalle2_jax.training.partitioning import strip_boxes

    return strip_boxes(jax.eval_shape(stage.init_params, jax.random.key(0)))


def interface(kind: str, stage, clip_model_cfg=None) -> dict:
    """What a stage gives or expects of its neighbours. For the prior and the decoder the CLIP dims come
    from `clip_model_cfg` (the CLIP the stage was trained with) when given, else from the built stage."""
    if kind == "clip":
        m = stage.config.model
        return {"embed_dim": int(m.embed_dim), "image_size": int(m.vision.image_size),
                "context_length": int(m.text.context_length), "text_width": int(m.text.width),
                "vocab_size": int(stage.tokenizer.vocab_size)}
    if kind == "prior":
        unit = bool(stage.config.model.get("normalize_embedding", True))  # karlo's prior: raw embeddings
        if clip_model_cfg is not None:
            return {"embed_dim": int(clip_model_cfg.embed_dim), "text_width": int(clip_model_cfg.text.width),
                    "context_length": int(clip_model_cfg.text.context_length), "unit_embedding": unit}
        return {"embed_dim": stage.clip_embed_dim, "text_width": stage.text_width,
                "context_length": stage.context_length, "unit_embedding": unit}
    if kind == "decoder":
        out = {"resolution": int(stage.config.data.resolution),
               "unit_embedding": bool(stage.config.model.normalize_embedding)}
        if clip_model_cfg is not None:
            out.update(embed_dim=int(clip_model_cfg.embed_dim), context_length=int(clip_model_cfg.text.context_length))
        else:
            out.update(embed_dim=stage.embed_dim, context_length=stage.clip_context)
        return out
    if kind == "upsampler":
        return {"low_res": int(stage.config.data.low_res_resolution), "resolution": int(stage.config.data.resolution)}
    raise BundleError(f"unknown stage kind {kind!r}; known kinds: {KINDS}")


def check_cascade(stages: list[dict]) -> list[str]:
    """Problems (empty if none) with a cascade of manifest stage entries ({'name', 'kind', 'interface'})."""
    problems = []
    kinds = [s["kind"] for s in stages]
    if kinds.count("clip") != 1 or kinds[0] != "clip":
        problems.append(f"the first stage must be the one CLIP, got stages {kinds}")
        return problems
    if "decoder" not in kinds:
        problems.append(f"a bundle needs a decoder, got stages {kinds}")
    order = {"clip": 0, "prior": 1, "decoder": 2, "upsampler": 3}
    if [order.get(k, 9) for k in kinds] != sorted(order.get(k, 9) for k in kinds) or \
            kinds.count("prior") > 1 or kinds.count("decoder") > 1:
        problems.append(f"stages must be in cascade order clip, prior, decoder, upsamplers; got {kinds}")
    clip = stages[0]["interface"]
    prev_res, prev_name = None, None
    for s in stages[1:]:
        it, name = s["interface"], s["name"]
        if s["kind"] in ("prior", "decoder"):
            for key, what in (("embed_dim", "embedding size"), ("context_length", "text context length"),
                              ("text_width", "text width")):
                if key in it and it[key] != clip[key]:
                    problems.append(f"{name}: expects a CLIP {what} of {it[key]}, but the bundle's CLIP has "
                                    f"{clip[key]} (it was trained with another CLIP)")
        if s["kind"] == "decoder":
            prior = [p["interface"] for p in stages if p["kind"] == "prior"]
            if prior and bool(it["unit_embedding"]) != bool(prior[0].get("unit_embedding", True)):
                problems.append(
                    f"{name}: trained on unnormalised CLIP embeddings (model.normalize_embedding=False) but the "
                    "prior samples unit-norm embeddings" if prior[0].get("unit_embedding", True) else
                    f"{name}: takes unit-norm CLIP embeddings but the prior samples unnormalised ones "
                    "(its model.normalize_embedding=False)")
            prev_res, prev_name = it["resolution"], name
        if s["kind"] == "upsampler":
            if prev_res is not None and it["low_res"] != prev_res:
                problems.append(f"{name}: takes {it['low_res']}x{it['low_res']} inputs but {prev_name} gives "
                                f"{prev_res}x{prev_res}")
            prev_res, prev_name = it["resolution"], name
    return problems


def _shape_problems(name: str, expected: dict, stored: dict) -> list[str]:
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    out = []
    if missing:
        out.append(f"{name}: params lack {len(missing)} arrays the model needs, e.g. {missing[0]!r}")
    if extra:
        out.append(f"{name}: params hold {len(extra)} arrays the model does not have, e.g. {extra[0]!r}")
    for path in sorted(set(expected) & set(stored)):
        if expected[path][0] != stored[path][0]:
            out.append(f"{name}: param {path!r} has shape {stored[path][0]} but the model built from the "
                       f"config (and the bundle's CLIP) needs {expected[path][0]}")
            break
    return out


# --- export ----------------------------------------------------------------------------------------------
def _stage_name(kind: str, config, upsampler_names: list[str]) -> str:
    if kind != "upsampler":
        return kind
    name = f"upsampler_{int(config.data.low_res_resolution)}to{int(config.data.resolution)}"
    while name in upsampler_names:
        name += "_b"
    return name


def export_bundle(out: str, clip: str, decoder: str, prior: str | None = None, upsamplers: tuple[str, ...] = (),
                  dtype: str = "float32", overwrite: bool = False, raw_params: bool = False,
                  log: Callable[[str], None] = logger.info) -> dict:
    """Writes a bundle of the given training workdirs (newest checkpoints, EMA params) to `out`; returns the
    manifest. `out` and the workdirs may be URIs (gs://...): a remote bundle is written locally, then copied
    up with its manifest last, so a reader never takes a half-copied one for a bundle. Raises BundleError if
    a workdir is missing or of the wrong stage, or the stages do not fit."""
    from dalle2_jax.stages.base import TOKENIZER_DIR
    from dalle2_jax.training import checkpoint as ckpt
    from dalle2_jax.training.config import config_to_json

    if dtype not in DTYPES:
        raise BundleError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    sources = [("clip", clip)] + ([("prior", prior)] if prior else []) + [("decoder", decoder)]
    sources += [("upsampler", u) for u in upsamplers]
    configs = []
    for kind, workdir in sources:
        if not fileio.isdir(workdir):
            raise BundleError(f"--{kind} {workdir!r}: no such directory")
        try:
            cfg = ckpt.read_config(workdir)
        except FileNotFoundError as e:
            raise BundleError(f"--{kind}: {e}") from None
        if cfg.stage != kind:
            raise BundleError(f"--{kind} {workdir!r} is a {cfg.stage!r} workdir, not a {kind!r} one")
        configs.append(cfg)
    out = fileio.resolve(out)
    if fileio.exists(out):
        if not overwrite:
            raise BundleError(f"{out!r} exists; pass --overwrite to replace it")
        if not fileio.exists(fileio.join(out, MANIFEST)) and fileio.listdir(out):
            raise BundleError(f"{out!r} exists and is not a bundle; refusing to overwrite it")
        fileio.remove_tree(out)
    remote = fileio.is_remote(out)
    if remote:
        tmp = tempfile.mkdtemp(prefix="dalle2_jax_bundle_")
    else:
        tmp = out + ".partial"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    clip_dir = os.path.join(tmp, "clip")
    entries, names = [], []
    try:
        for (kind, workdir), cfg in zip(sources, configs):
            name = _stage_name(kind, cfg, names)
            names.append(name)
            sdir = os.path.join(tmp, name)
            os.makedirs(sdir)
            trained_clip = None
            if kind == "clip":
                fileio.copy_tree(fileio.join(workdir, TOKENIZER_DIR), os.path.join(sdir, TOKENIZER_DIR))
            if kind in ("prior", "decoder"):
                cw = cfg.clip_workdir
                if cw and fileio.exists(fileio.join(cw, "config.json")):
                    trained_clip = ckpt.read_config(cw).model
                    if _same_place(cw) != _same_place(clip):
                        log(f"warning: {name} was trained with the CLIP in {cw!r}, bundled with {clip!r}")
                else:
                    log(f"warning: {name}'s training CLIP {cw!r} is gone; checking it against --clip by shapes only")
                if kind == "prior" and fileio.isdir(fileio.join(workdir, "stats")):
                    fileio.copy_tree(fileio.join(workdir, "stats"), os.path.join(sdir, "stats"))
            saved = cfg.copy_and_resolve_references()
            if kind in ("prior", "decoder"):
                saved.clip_workdir = ""  # the bundle's CLIP: see the manifest
            with open(os.path.join(sdir, "config.json"), "w") as f:
                f.write(config_to_json(saved))
            stage = build_stage(kind, saved, sdir, clip_dir)
            log(f"{name}: loading {'raw' if raw_params else 'EMA'} params from {workdir}")
            _, params, info = ckpt.load_params(workdir, prefer_ema=not raw_params)
            entry = write_stage_models(tmp, name, kind, stage, {"main": jax.device_get(params)}, dtype,
                                       {"main": {"workdir": fileio.resolve(workdir), "step": info["step"],
                                                 "params": info["params"]}}, trained_clip)
            entries.append(entry)
            log(f"{name}: {entry['models']['main']['num_params']:,} params ({dtype}), step {info['step']}")
        manifest = finish_bundle(tmp, out, entries, log)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def role_params_dir(name: str, role: str) -> str:
    """Where a stage's model of `role` lives in a bundle: NAME/params for "main", NAME/params_ROLE otherwise."""
    return f"{name}/params" if role == "main" else f"{name}/params_{role}"


def write_stage_models(root: str, name: str, kind: str, stage, models: dict, dtype: str, sources: dict,
                       trained_clip=None) -> dict:
    """Saves the params trees `models` ({role: host params}) of the built `stage` under root/NAME (cast to
    `dtype`, checked against the shapes its config builds) and returns the stage's manifest entry; the stage
    folder already holds its config.json and extras (tokenizer/, stats/). `sources`: {role: provenance}."""
    sdir = os.path.join(root, name)
    expected = _shape_tree(abstract_params(stage))
    entry_models = {}
    for role, params in models.items():
        what = name if role == "main" else f"{name} ({role})"
        params = _cast(params, dtype)
        problems = _shape_problems(what, expected, _shape_tree(params))
        if problems:
            raise BundleError("; ".join(problems))
        rel = role_params_dir(name, role)
        _save_params(os.path.join(root, rel), params)
        del params
        entry_models[role] = {"params": rel, "dtype": dtype,
                              "num_params": int(sum(np.prod(s) for s, _ in expected.values())),
                              "files": hash_tree(root, rel), "source": sources.get(role, {})}
    extras = {}
    for sub in sorted(os.listdir(sdir)):
        if sub != "config.json" and not sub.startswith("params"):
            extras.update(hash_tree(root, os.path.join(name, sub)))
    return {"name": name, "kind": kind, "dir": name, "config": f"{name}/config.json",
            "config_sha256": sha256_file(os.path.join(sdir, "config.json")),
            "interface": interface(kind, stage, trained_clip), "extras": extras, "models": entry_models}


def finish_bundle(tmp: str, out: str, entries: list[dict], log: Callable[[str], None] = logger.info) -> dict:
    """Checks that the stage entries fit together, writes the manifest into the bundle built in `tmp` and moves
    it to `out` (a gs:// `out`: copied up with the manifest last). Returns the manifest."""
    problems = check_cascade(entries)
    if problems:
        raise BundleError("the stages do not fit together: " + "; ".join(problems))
    from dalle2_jax import __version__
    from dalle2_jax.stages.base import TOKENIZER_DIR

    manifest = {"format": FORMAT, "schema_version": SCHEMA_VERSION,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "dalle2_jax_version": __version__, "tokenizer": f"clip/{TOKENIZER_DIR}", "stages": entries}
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    if fileio.is_remote(out):
        log(f"copying the bundle to {out}")
        fileio.copy_tree(tmp, out, last=(MANIFEST,))
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return manifest


def _same_place(path: str) -> str:
    """A URI as is; a local path with its symlinks resolved (to compare two workdir paths)."""
    return fileio.resolve(path) if fileio.is_remote(path) else os.path.realpath(path)


def _save_params(path: str, params: Any) -> None:
    import orbax.checkpoint as ocp

    ck = ocp.StandardCheckpointer()
    ck.save(os.path.abspath(path), params)
    ck.wait_until_finished()
    ck.close()


# --- load ------------------------------------------------------------------------------------------------
@dataclass
class LoadedStage:
    """One bundle stage ready to run: the manifest entry, the built training-stage object and its params."""

    name: str
    kind: str
    entry: dict
    stage: Any
    params: Any
    extra_models: dict = field(default_factory=dict)


@dataclass
class Bundle:
    path: str
    manifest: dict
    stages: list[LoadedStage]

    def get(self, kind: str) -> list[LoadedStage]:
        return [s for s in self.stages if s.kind == kind]


def read_manifest(path: str) -> dict:
    """The checked manifest of the bundle at `path` (BundleError if missing or not a known schema)."""
    if not fileio.isdir(path):
        raise BundleError(f"no bundle at {path!r} (no such directory); make one with `dalle2-jax export`")
    mpath = fileio.join(path, MANIFEST)
    if not fileio.exists(mpath):
        hint = ("it is a training workdir: make a bundle from it with `dalle2-jax export`"
                if fileio.exists(fileio.join(path, "config.json")) else "make one with `dalle2-jax export`")
        raise BundleError(f"{path!r} is not a bundle ({MANIFEST} is missing); {hint}")
    try:
        manifest = fileio.read_json(mpath)
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"{mpath}: unreadable manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{mpath}: not a dalle2-jax bundle manifest (format {manifest.get('format')!r})")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(f"{mpath}: schema version {manifest.get('schema_version')!r}; this dalle2-jax reads "
                          f"version {SCHEMA_VERSION}")
    if not isinstance(manifest.get("stages"), list) or not manifest["stages"]:
        raise BundleError(f"{mpath}: no stages")
    return manifest


def verify_files(path: str, manifest: dict, hashes: bool = True) -> None:
    """Every file the manifest names exists (and, with `hashes`, has its recorded sha256)."""
    for s in manifest["stages"]:
        files = dict(s.get("extras", {}))
        files[s["config"]] = s.get("config_sha256")
        for role, model in s["models"].items():
            if role not in KNOWN_ROLES:
                raise BundleError(f"stage {s['name']!r} has a model of role {role!r}, which this version of "
                                  f"dalle2-jax cannot run (known roles: {KNOWN_ROLES})")
            files.update(model["files"])
        for rel, digest in files.items():
            full = fileio.join(path, rel)
            if not fileio.exists(full):
                raise BundleError(f"incomplete bundle: stage {s['name']!r} misses {rel}")
            if hashes and digest and sha256_file(full) != digest:
                raise BundleError(f"damaged bundle: {rel} does not match its sha256 in the manifest")


def stage_roles(kind: str, config) -> tuple[str, ...]:
    """The model roles a stage of this config runs: "main", and "last_step" for an upsampler with
    model.last_step_model (karlo's super_res_last, run on the final step only)."""
    if kind == "upsampler" and config.model.get("last_step_model", False):
        return ("main", "last_step")
    return ("main",)


def load_stage_params(path: str, s: dict, stage, sharding) -> Any:
    """The params of manifest stage entry `s` (its built `stage`), restored with `sharding`: the "main" model's
    tree, or {role: tree} for a stage that runs several roles (stage_roles; every role has the model's shapes).
    BundleError when the manifest's roles are not the ones the stage's config runs, or a tree's shapes differ."""
    import orbax.checkpoint as ocp

    roles = stage_roles(s["kind"], stage.config)
    if set(s["models"]) != set(roles):
        raise BundleError(f"stage {s['name']!r}: its config runs the models {list(roles)} but the manifest holds "
                          f"{sorted(s['models'])}")
    abstract = abstract_params(stage)
    out = {}
    for role in roles:
        model = s["models"][role]
        ck = ocp.StandardCheckpointer()
        params_dir = fileio.path(fileio.join(path, model["params"]))
        try:
            stored = ck.metadata(params_dir).item_metadata.tree
        except Exception as e:  # noqa: BLE001 - orbax raises several kinds for a damaged directory
            raise BundleError(f"stage {s['name']!r}: unreadable params in {model['params']} ({e})") from None
        what = s["name"] if role == "main" else f"{s['name']} ({role})"
        problems = _shape_problems(what, _shape_tree(abstract), _shape_tree(stored))
        if problems:
            raise BundleError("; ".join(problems))
        dt = jnp.dtype(model["dtype"])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
            x.shape, dt if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype, sharding=sharding), abstract)
        out[role] = ck.restore(params_dir, target)
        ck.close()
    return out["main"] if roles == ("main",) else out


def load_bundle(path: str, verify_hashes: bool = True, device: Any = None, mesh: Any = None) -> Bundle:
    """Loads every stage of a bundle: params on `device` (default the first device), or replicated over every
    device of `mesh` (for sampling sharded over its batch axes)."""
    from dalle2_jax.training.config import config_from_json

    path = fileio.resolve(path)
    manifest = read_manifest(path)
    verify_files(path, manifest, hashes=verify_hashes)
    problems = check_cascade(manifest["stages"])
    if problems:
        raise BundleError("the bundle's stages do not fit together: " + "; ".join(problems))
    clip_dir = fileio.join(path, manifest["stages"][0]["dir"])
    if mesh is not None:
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    else:
        sharding = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
    loaded = []
    for s in manifest["stages"]:
        config = config_from_json(fileio.read_text(fileio.join(path, s["config"])))
        stage = build_stage(s["kind"], config, fileio.join(path, s["dir"]), clip_dir)
        actual = interface(s["kind"], stage)
        for key, value in s["interface"].items():
            if key in actual and actual[key] != value:
                raise BundleError(f"stage {s['name']!r}: the manifest says {key}={value} but its config and the "
                                  f"bundle's CLIP give {actual[key]}")
        params = load_stage_params(path, s, stage, sharding)
        loaded.append(LoadedStage(s["name"], s["kind"], s, stage, params))
    return Bundle(path, manifest, loaded)
