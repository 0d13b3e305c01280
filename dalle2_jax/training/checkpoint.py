"""orbax checkpoints: the workdir's `checkpoints/<step>/` with items `state`, `data` and `meta`, and the
one loader every frozen stage is read with.

Every save records a content checksum of each array of the state in `meta` (`fingerprint`), so a restore
can tell a damaged checkpoint from an intact one even where the damaged bytes still decode. Restores
take the newest intact checkpoint: a damaged one (a file missing, truncated or overwritten, a step
directory missing an item) is named in a warning and skipped (and, in training, moved to
`<workdir>/damaged_checkpoints/`); a checkpoint of another stage or model is refused (CheckpointMismatch).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from dalle2_jax import fileio
from dalle2_jax.training.config import config_from_json
from dalle2_jax.training.errors import CheckpointMismatch, DamagedCheckpoint, NoIntactCheckpoint  # noqa: F401

log = logging.getLogger("dalle2_jax")

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "damaged_checkpoints"
ITEMS = ("state", "meta", "data")


def checkpoint_dir(workdir: str) -> str:
    """`<workdir>/checkpoints`, absolute (or a URI such as gs://bucket/run/checkpoints)."""
    return fileio.join(fileio.resolve(workdir), CHECKPOINT_DIR)


def make_manager(workdir: str, max_to_keep: int = 3, async_save: bool = True,
                 read_only: bool = False, compress: bool = True) -> ocp.CheckpointManager:
    """An orbax CheckpointManager over `<workdir>/checkpoints` (async saves, keep the newest N).

    `compress=False` writes the arrays uncompressed, which saves numpy arrays without copying them
    (tools.import_clip keeps a ViT-H import near its file size in RAM); readers need no option."""
    options = ocp.CheckpointManagerOptions(max_to_keep=None if read_only else max_to_keep,
                                           enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=not read_only, create=not read_only,
                                           read_only=read_only)
    # The PyTree handler (rather than Standard) lets the params-only loader restore part of the state.
    handlers = {"state": ocp.PyTreeCheckpointHandler(use_compression=compress), "meta": ocp.JsonCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler()}
    return ocp.CheckpointManager(fileio.path(checkpoint_dir(workdir)), options=options, item_handlers=handlers)


def _mix32(v, xp):
    """A 32-bit integer hash (Wellons' lowbias32) in numpy or jax.numpy; uint32 in, uint32 out (wrapping)."""
    v = v ^ (v >> 16)
    v = v * xp.uint32(0x7FEB352D)
    v = v ^ (v >> 15)
    v = v * xp.uint32(0x846CA68B)
    return v ^ (v >> 16)


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """A uint32 checksum of an array: the wrapping sum over elements of mix(bits ^ mix(index + c)). Every
    bit of every element and its position count; integer arithmetic, so it is exact and the same whatever
    the sharding (and equal to _leaf_checksum_host)."""
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(x.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride % 2**32)
        stride *= x.shape[d]
    return jnp.sum(_mix32(bits ^ _mix32(index + jnp.uint32(0x9E3779B9), jnp), jnp), dtype=jnp.uint32)


_checksums = jax.jit(lambda leaves: [_leaf_checksum(x) for x in leaves])
HOST_CHECKSUM_BYTES = 256 * 2**20  # smaller states are summed on the host (no compile); larger ones on device


def _leaf_checksum_host(x: np.ndarray) -> int:
    """_leaf_checksum in numpy (the same value: uint32 arithmetic wraps alike)."""
    x = np.ascontiguousarray(x).reshape(-1)
    bits = x.astype(np.uint32) if x.dtype == np.bool_ else x.view(f"u{x.dtype.itemsize}").astype(np.uint32)
    with np.errstate(over="ignore"):
        index = np.arange(x.size, dtype=np.uint64).astype(np.uint32) + np.uint32(0x9E3779B9)
        return int(np.sum(_mix32(bits ^ _mix32(index, np), np), dtype=np.uint32))


def fingerprint(tree: Any) -> dict[str, str]:
    """{'params/w/kernel': '0x1a2b3c4d', ...}: a checksum per array of `tree` (sharded arrays included),
    keyed by its path. Saved in `meta` with every checkpoint and checked on restore. Small states that one
    process holds whole are summed on the host one array at a time, others by one jitted reduction."""
    flat = [(jax.tree_util.keystr(p, simple=True, separator="/"), x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(x, "dtype")]
    arrays = [x for _, x in flat]
    on_host = (sum(x.size * x.dtype.itemsize for x in arrays) <= HOST_CHECKSUM_BYTES
               and all(getattr(x, "is_fully_addressable", True) for x in arrays))
    if on_host:
        sums = [_leaf_checksum_host(np.asarray(jax.device_get(x))) for x in arrays]
    else:
        sums = jax.device_get(_checksums([jnp.asarray(x) for x in arrays]))
    return {k: f"0x{int(v):08x}" for (k, _), v in zip(flat, sums)}


def _check_fingerprint(restored: Any, saved: dict | None, step: int, path: str) -> None:
    """Raises DamagedCheckpoint naming the arrays whose content differs from what was saved."""
    if not saved:
        return  # written before fingerprints existed, or an import
    got = fingerprint(restored)
    bad = sorted(k for k, v in got.items() if k in saved and saved[k] != v)
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise DamagedCheckpoint(step, path, f"the content of {', '.join(bad[:5])}{more} differs from what was "
                                "saved (checksum mismatch)")


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict, data_iter: Any | None,
         force: bool = False) -> bool:
    """Saves the train state, the JSON meta (step, examples seen, wall time, plus the state's
    `fingerprint`) and the grain iterator."""
    meta = dict(meta, fingerprint=fingerprint(state))
    args = dict(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta))
    if data_iter is not None:
        args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return mngr.save(step, args=ocp.args.Composite(**args), force=force)


def _short_reason(e: BaseException) -> str:
    """The innermost message of an exception chain, one line (tensorstore's errors name the array and
    the file; orbax's own wrapper dumps a whole spec)."""
    chain = [e]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 10:
        chain.append(nxt)
    inner = chain[-1]
    msg = " ".join(str(inner).split()) or type(inner).__name__
    msg = msg.split(" See full TensorStore details")[0].split(" [tensorstore_spec")[0]
    return f"{type(inner).__name__}: {msg[:300]}"


def _step_path(mngr: ocp.CheckpointManager, step: int) -> str:
    return str(fileio.path(str(mngr.directory)) / str(step))


def _restore_item(mngr: ocp.CheckpointManager, step: int, name: str, arg: Any) -> Any:
    try:
        return mngr.restore(step, args=ocp.args.Composite(**{name: arg}))[name]
    except Exception as e:  # noqa: BLE001 - any failure to read an item means the checkpoint is damaged
        raise DamagedCheckpoint(step, _step_path(mngr, step), f"item {name!r}: {_short_reason(e)}") from e


def _flat_shapes(tree: Any) -> dict[str, tuple]:
    return {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
            if hasattr(x, "shape")}


def flat_config(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def fixed_key_changes(old: dict, new: dict) -> list[str]:
    """The keys that pin a checkpoint to its model (`stage`, `model.*`) whose values differ between two
    JSON configs (dicts), as 'key: old -> new'."""
    a, b = flat_config(old), flat_config(new)
    keys = sorted(k for k in set(a) | set(b) if (k == "stage" or k.startswith("model.")) and a.get(k) != b.get(k))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys]


def check_compatible(meta: dict, params_metadata: Any, abstract_params: Any, config: Any, path: str) -> None:
    """Refuses (CheckpointMismatch) a checkpoint whose saved config has another stage or model, or whose
    params differ in names or shapes from `abstract_params`; the message names the mismatching keys."""
    from dalle2_jax.training.config import config_to_json

    if config is not None and isinstance(meta.get("config"), dict):
        changes = fixed_key_changes(meta["config"], json.loads(config_to_json(config)))
        if changes:
            key = changes[0].split(":")[0]
            raise CheckpointMismatch(key, f"the checkpoint {path} was written by another stage or model ("
                                     + "; ".join(changes[:10]) + ("; ..." if len(changes) > 10 else "")
                                     + "); use a new workdir, or config.init_from to start from its params")
    if params_metadata is None or abstract_params is None:
        return
    want, got = _flat_shapes(abstract_params), _flat_shapes(params_metadata)
    problems = [f"{k}: missing" for k in sorted(set(want) - set(got))]
    problems += [f"{k}: not in this model" for k in sorted(set(got) - set(want))]
    problems += [f"{k}: shape {got[k]} vs {want[k]}" for k in sorted(set(want) & set(got)) if got[k] != want[k]]
    if problems:
        raise CheckpointMismatch("model", f"the params in {path} do not match this config's model ("
                                 + "; ".join(problems[:10]) + (f"; {len(problems) - 10} more" if len(problems) > 10
                                                              else "") + ")")


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any, data_iter: Any | None,
            config: Any = None) -> tuple[Any, dict]:
    """Restores checkpoint `step`: (state laid out as `abstract_state`'s shardings, meta), and sets
    `data_iter`'s position. Raises DamagedCheckpoint (naming the item and what was wrong) if it cannot
    be read as saved, CheckpointMismatch if it belongs to another stage/model than `config`."""
    path = _step_path(mngr, step)
    meta = _restore_item(mngr, step, "meta", ocp.args.JsonRestore())
    if not isinstance(meta, dict):
        raise DamagedCheckpoint(step, path, f"item 'meta' holds {type(meta).__name__}, not a JSON object")
    try:
        tree = mngr.item_metadata(step)["state"]
        tree = tree.tree if hasattr(tree, "tree") else tree
        params_md = tree.get("params") if isinstance(tree, dict) else None
    except Exception as e:  # noqa: BLE001
        raise DamagedCheckpoint(step, path, f"item 'state' metadata: {_short_reason(e)}") from e
    abstract_params = (abstract_state.get("params") if isinstance(abstract_state, dict)
                       else getattr(abstract_state, "params", None))
    check_compatible(meta, params_md, abstract_params, config, path)
    state = _restore_item(mngr, step, "state", ocp.args.PyTreeRestore(
        item=abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)))
    _check_fingerprint(state, meta.get("fingerprint"), step, path)
    if data_iter is not None:
        _restore_item(mngr, step, "data", grain.checkpoint.CheckpointRestore(data_iter))
    return state, meta


def restore_newest_intact(mngr: ocp.CheckpointManager, abstract_state: Any, data_iter: Any | None,
                          config: Any = None, move_damaged_to: str | None = None
                          ) -> tuple[int, Any, dict] | None:
    """(step, state, meta) of the newest checkpoint that restores intact, or None if there is none.

    Each damaged newer checkpoint is named in a warning (and moved under `move_damaged_to` by process 0
    when given, so that later saves of that step do not collide with it). Raises NoIntactCheckpoint
    when checkpoints exist but every one is damaged, CheckpointMismatch for another stage's/model's."""
    problems = []
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            state, meta = restore(mngr, step, abstract_state, data_iter, config)
        except DamagedCheckpoint as e:
            problems.append(str(e))
            where = ""
            if move_damaged_to is not None:
                where = "; moved to " + _move_aside(mngr, step, move_damaged_to)
            log.warning("%s; falling back to an older checkpoint%s", e, where)
            print(f"warning: {e}; falling back to an older checkpoint{where}", flush=True)
            continue
        return step, state, meta
    if problems:
        raise NoIntactCheckpoint(f"no intact checkpoint in {mngr.directory}: " + " | ".join(problems)
                                 + "; restore a backup, or start over in a new workdir")
    return None


def _move_aside(mngr: ocp.CheckpointManager, step: int, dest_root: str) -> str:
    """Moves checkpoint `step` to `dest_root/<step>-<time>` (process 0; every process then reloads)."""
    dest = fileio.join(dest_root, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0:
        fileio.move_tree(_step_path(mngr, step), dest)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"damaged_checkpoint_{step}")
    mngr.reload()
    return dest


def read_config(workdir: str):
    """The resolved config saved in `<workdir>/config.json`."""
    path = fileio.join(workdir, "config.json")
    if not fileio.exists(path):
        what = "no such directory" if not fileio.isdir(workdir) else f"{path} is missing"
        hint = ("; it is an inference bundle, not a workdir" if fileio.exists(fileio.join(workdir, "manifest.json"))
                else "; pass the --workdir of a `dalle2-jax train` (or import-clip) run")
        raise FileNotFoundError(f"{workdir!r} is not a workdir ({what}){hint}")
    return config_from_json(fileio.read_text(path))


def _abstract_from_metadata(tree: Any, sharding) -> Any:
    def one(m):
        return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding)

    return jax.tree.map(one, tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))


def load_params(workdir: str, mesh: jax.sharding.Mesh | None = None, prefer_ema: bool = True,
                step: int | None = None) -> tuple[Any, Any, dict]:
    """The frozen-stage loader: (config, params, info) from the newest checkpoint of `workdir`.

    Restores only the params part of the `state` item: the EMA params when present (and
    `prefer_ema`), else the raw params, so a workdir with no optimizer or data state (an import) loads
    the same. Params are replicated over `mesh` (or put on the first device). `info` holds `step` and
    `params` ('ema' or 'raw').
    """
    config = read_config(workdir)
    mngr = make_manager(workdir, read_only=True)
    try:
        steps = sorted(mngr.all_steps(), reverse=True) if step is None else [step]
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)}")
        problems = []
        for s in steps:
            try:
                params, key = _load_params_at(mngr, s, mesh, prefer_ema)
            except DamagedCheckpoint as e:
                if len(steps) == 1:
                    raise
                problems.append(str(e))
                log.warning("%s; trying an older checkpoint", e)
                continue
            return config, params, {"step": int(s), "params": "ema" if key == "ema_params" else "raw"}
        raise NoIntactCheckpoint(f"no intact checkpoint in {checkpoint_dir(workdir)}: " + " | ".join(problems))
    finally:
        mngr.close()


def _load_params_at(mngr: ocp.CheckpointManager, step: int, mesh, prefer_ema: bool) -> tuple[Any, str]:
    """(params, 'ema_params' | 'params') of checkpoint `step`, checked against its saved fingerprint."""
    path = _step_path(mngr, step)
    try:
        md = mngr.item_metadata(step)["state"]
        tree = md.tree if hasattr(md, "tree") else md
        tree.get("params")
    except Exception as e:  # noqa: BLE001
        raise DamagedCheckpoint(step, path, f"item 'state' metadata: {_short_reason(e)}") from e
    key = "ema_params" if prefer_ema and tree.get("ema_params") is not None else "params"
    sharding = NamedSharding(mesh, P()) if mesh is not None else SingleDeviceSharding(jax.devices()[0])
    abstract = {key: _abstract_from_metadata(tree[key], sharding)}
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), abstract)
    out = _restore_item(mngr, step, "state", ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args,
                                                                     partial_restore=True))
    saved = None
    if "meta" in _item_names(mngr, step):
        meta = _restore_item(mngr, step, "meta", ocp.args.JsonRestore())
        saved = meta.get("fingerprint") if isinstance(meta, dict) else None
    _check_fingerprint(out, saved, step, path)
    return out[key], key


def _item_names(mngr: ocp.CheckpointManager, step: int) -> list[str]:
    return [p.name for p in fileio.path(_step_path(mngr, step)).iterdir() if p.is_dir()]


def write_json(path: str, obj: Any) -> None:
    """Writes `obj` as JSON, creating the parent directory (local or remote)."""
    fileio.write_json(path, obj)
