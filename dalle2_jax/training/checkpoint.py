"""orbax checkpoints: the workdir's `checkpoints/<step>/` with items `state`, `data` and `meta`, and the
one loader every frozen stage is read with."""

from __future__ import annotations

from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from dalle2_jax import fileio
from dalle2_jax.training.config import config_from_json

CHECKPOINT_DIR = "checkpoints"
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


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict, data_iter: Any | None,
         force: bool = False) -> bool:
    """Saves the train state, the JSON meta (step, examples seen, wall time) and the grain iterator."""
    args = dict(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta))
    if data_iter is not None:
        args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return mngr.save(step, args=ocp.args.Composite(**args), force=force)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any, data_iter: Any | None
            ) -> tuple[Any, dict]:
    """Restores (state laid out as `abstract_state`'s shardings, meta); sets `data_iter`'s position."""
    args = dict(state=ocp.args.PyTreeRestore(item=abstract_state,
                                             restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)),
                meta=ocp.args.JsonRestore())
    if data_iter is not None:
        args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = mngr.restore(step, args=ocp.args.Composite(**args))
    return out["state"], out["meta"]


def read_config(workdir: str):
    """The resolved config saved in `<workdir>/config.json`."""
    path = fileio.join(workdir, "config.json")
    if not fileio.exists(path):
        raise FileNotFoundError(f"{workdir!r} is not a workdir: {path} is missing")
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
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)}")
    meta = mngr.item_metadata(step)["state"]
    tree = meta.tree if hasattr(meta, "tree") else meta
    key = "ema_params" if prefer_ema and tree.get("ema_params") is not None else "params"
    sharding = NamedSharding(mesh, P()) if mesh is not None else SingleDeviceSharding(jax.devices()[0])
    abstract = {key: _abstract_from_metadata(tree[key], sharding)}
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), abstract)
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=abstract, restore_args=restore_args, partial_restore=True)))
    mngr.close()
    return config, out["state"][key], {"step": int(step), "params": "ema" if key == "ema_params" else "raw"}


def write_json(path: str, obj: Any) -> None:
    """Writes `obj` as JSON, creating the parent directory (local or remote)."""
    fileio.write_json(path, obj)
