"""The generic training loop, shared by every stage.

`train(config, workdir)` validates the config, builds the mesh, creates the train state already sharded
under jit (or restores the newest checkpoint of the workdir, with the data iterator where it stopped),
runs the jitted step with the state donated, logs to stdout and TensorBoard (metrics fetched one logged
step behind, so the device never waits for the host), checkpoints with orbax and evaluates periodically.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from dalle2_jax import fileio
from dalle2_jax.stages import get_stage_class
from dalle2_jax.training import checkpoint as ckpt
from dalle2_jax.training.config import ConfigError, config_to_json, validate_config
from dalle2_jax.training.metrics import MetricWriter, format_progress
from dalle2_jax.training.partitioning import (LOGICAL_RULES, batch_sharding, global_batch, logical_shardings,
                                              make_mesh, replicated, strip_boxes)
from dalle2_jax.training.state import init_train_state, make_optimizer, make_train_step

log = logging.getLogger("dalle2_jax")


def sharded_abstract(boxed: Any, mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
    """(shardings by the logical rules, ShapeDtypeStructs carrying them) for a boxed abstract tree."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        shardings = logical_shardings(boxed, mesh)
    return shardings, jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                   strip_boxes(boxed), shardings)


def abstract_train_state(stage: Any, tx: Any, config, mesh: jax.sharding.Mesh, rng: jax.Array):
    """(init_fn, state shardings, abstract sharded state) of `stage`'s train state: no memory used. The
    trainer creates the state from them; the AOT tool compiles against them."""
    use_ema = config.optimizer.ema_decay > 0

    def init_fn(k):
        return init_train_state(stage.init_params(k), tx, use_ema)

    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        boxed = jax.eval_shape(init_fn, rng)
    shardings, abstract = sharded_abstract(boxed, mesh)
    return init_fn, shardings, abstract


class Run:
    """A stage, its mesh, and its sharded train state and step, ready to train or evaluate."""

    def __init__(self, config, workdir: str, prepare: bool = True, devices: list | None = None):
        self.config = config
        self.workdir = fileio.resolve(workdir)
        self.stage = get_stage_class(config.stage)(config, self.workdir)
        self.mesh = make_mesh(config, devices)
        if prepare:
            self.stage.prepare()
        else:
            self.stage.setup_model()
        self.tx = make_optimizer(config)
        self.init_rng, self.step_rng = jax.random.split(jax.random.key(config.seed))
        self._init_fn, self.state_shardings, self.abstract_state = abstract_train_state(
            self.stage, self.tx, config, self.mesh, self.init_rng)

    def init_state(self):
        """A fresh state, created directly in its sharded layout (never whole on one device)."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(LOGICAL_RULES):
            return jax.jit(lambda k: nn.meta.unbox(self._init_fn(k)), out_shardings=self.state_shardings)(
                self.init_rng)

    def num_params(self) -> int:
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.abstract_state.params)))

    def frozen_shardings(self, frozen: Any) -> Any:
        """Shardings for the frozen params: by the logical rules (FSDP/tensor, like trained params) when
        the stage describes them (`abstract_frozen`), else replicated."""
        rep = replicated(self.mesh)
        abstract = self.stage.abstract_frozen() if frozen is not None else None
        if abstract is not None:
            with jax.set_mesh(self.mesh), nn.logical_axis_rules(LOGICAL_RULES):
                shardings = logical_shardings(abstract, self.mesh)
            if jax.tree.structure(shardings) == jax.tree.structure(frozen):
                return shardings
            log.warning("frozen params do not match the stage's abstract tree; replicating them")
        return jax.tree.map(lambda _: rep, frozen)

    def compile_step(self, frozen: Any):
        """run_step(state, batch) -> (state, metrics): the jitted train step (state donated), sharded over
        the mesh, with `frozen` laid out on the mesh once (see frozen_shardings)."""
        frozen_sh = self.frozen_shardings(frozen)
        frozen = jax.device_put(frozen, frozen_sh) if frozen is not None else None
        self._jitted = {}

        def run_step(state, batch):
            # one compiled function per batch signature (one in training): no recompilation per step
            sig = tuple(sorted((k, v.shape) for k, v in batch.items()))
            if sig not in self._jitted:
                self._jitted[sig] = jit_train_step(self.stage, self.tx, self.config, self.mesh, self.state_shardings,
                                                   {k: v.ndim for k, v in batch.items()}, frozen_sh)
            with jax.set_mesh(self.mesh):
                return self._jitted[sig](state, batch, frozen, self.step_rng)

        return run_step


def jit_train_step(stage, tx, config, mesh, state_shardings: Any, batch_ndims: dict, frozen_shardings: Any):
    """The train step jitted with its shardings: (state, batch, frozen, key) -> (state, metrics), the state
    donated. Shared by the trainer and launch/aot_compile.py (which lowers it for a TPU topology)."""
    step_fn = make_train_step(stage.loss, tx, config)
    rep = replicated(mesh)

    def wrapped(state, batch, frozen, key):
        with nn.logical_axis_rules(LOGICAL_RULES):
            return step_fn(state, batch, frozen, key)

    batch_sh = {k: batch_sharding(mesh, nd) for k, nd in batch_ndims.items()}
    return jax.jit(wrapped, in_shardings=(state_shardings, batch_sh, frozen_shardings, rep),
                   out_shardings=(state_shardings, rep), donate_argnums=(0,))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _write_config(config, workdir: str) -> None:
    """Writes config.json; on resume, logs the run keys that changed and refuses a changed stage/model."""
    path = fileio.join(workdir, "config.json")
    if fileio.exists(path):
        old = _flatten(json.loads(config_to_json(ckpt.read_config(workdir))))
        new = _flatten(json.loads(config_to_json(config)))
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        fixed = [k for k in changed if k == "stage" or k.startswith("model.")]
        if fixed:
            raise ConfigError(fixed[0], f"differs from the one this workdir was trained with ({path}): "
                              f"{old.get(fixed[0])!r} -> {new.get(fixed[0])!r}; use a new workdir, or "
                              "config.init_from to start from its params")
        if changed:
            log.warning("resuming with changed config keys: %s", ", ".join(changed))
            print("resuming with changed config keys: " + ", ".join(
                f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed), flush=True)
    if jax.process_index() == 0:
        fileio.write_text(path, config_to_json(config))


def _check_workdir_shared(workdir: str) -> None:
    """With several processes, every one must see the config.json process 0 wrote: orbax writes one
    checkpoint from all of them, so the workdir must be shared (gs://, or a shared filesystem)."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("config_written")
    seen = multihost_utils.process_allgather(np.asarray(fileio.exists(fileio.join(workdir, "config.json"))))
    missing = [i for i, ok in enumerate(np.asarray(seen).reshape(-1)) if not ok]
    if missing:
        raise ConfigError("workdir", f"{workdir!r} is not shared: processes {missing} do not see the config.json "
                          "process 0 wrote there; use a gs:// workdir or a filesystem every host mounts")


def write_sample_grids(workdir: str, step: int, images: dict, writer: MetricWriter | None) -> list[str]:
    """Writes each uint8 [H, W, 3] grid as <workdir>/samples/<name>_<step>.png and to TensorBoard."""
    from dalle2_jax.images import save_png

    paths = []
    for name, grid in images.items():
        path = fileio.join(workdir, "samples", f"{name}_{step}.png")
        save_png(path, np.asarray(grid, np.uint8))
        paths.append(path)
        if writer is not None:
            writer.image(step, f"samples/{name}", np.asarray(grid, np.uint8))
    return paths


def evaluate_and_report(run: Run, params: Any, step: int, params_kind: str, writer: MetricWriter | None) -> dict:
    """Runs the stage's evaluation and writes reports/eval_<step>.json and TensorBoard scalars."""
    t0 = time.time()
    metrics = dict(run.stage.evaluate(params, run.mesh))
    images = metrics.pop("images", {})  # {name: uint8 [H, W, 3]} sample grids, if the stage makes any
    result = {"step": int(step), "params": params_kind, **metrics}
    result.setdefault("num_examples", 0)
    if jax.process_index() == 0:
        if images:
            result["sample_files"] = write_sample_grids(run.workdir, step, images, writer)
        ckpt.write_json(fileio.join(run.workdir, "reports", f"eval_{step}.json"), result)
        if writer is not None:
            writer.scalars(step, {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    log.info("evaluation at step %d took %.1fs", step, time.time() - t0)
    return result


def train(config, workdir: str) -> dict:
    """Trains `config.stage` in `workdir` until config.total_steps, resuming if the workdir has a
    checkpoint. Returns the last logged training metrics and the final evaluation (if any)."""
    validate_config(config)
    workdir = fileio.resolve(workdir)
    try:
        fileio.makedirs(workdir)
        probe = fileio.path(fileio.join(workdir, f".write_test_{jax.process_index()}"))
        probe.write_text("")
        probe.unlink()
    except (OSError, ImportError) as e:  # ImportError: the URI's filesystem package (gcsfs) is missing
        raise ConfigError("workdir", f"cannot write to {workdir!r} ({e}); choose a writable directory") from e
    _write_config(config, workdir)
    _check_workdir_shared(workdir)
    t_start = time.time()
    run = Run(config, workdir)
    is_chief = jax.process_index() == 0
    writer = MetricWriter(fileio.join(workdir, "tensorboard")) if is_chief else None
    mngr = ckpt.make_manager(workdir, max_to_keep=int(config.keep_checkpoints))

    local_bs = config.batch_size // jax.process_count()
    data_iter = None
    try:
        data_iter = iter(run.stage.train_iterator(local_bs, jax.process_index(), jax.process_count()))
        latest = mngr.latest_step()
        meta = {"step": 0, "examples_seen": 0, "wall_time_s": 0.0, "stage": config.stage}
        if latest is not None:
            state, meta = ckpt.restore(mngr, latest, run.abstract_state, data_iter)
            log.info("resumed from %s at step %d", ckpt.checkpoint_dir(workdir), latest)
            print(f"resuming from step {latest} ({ckpt.checkpoint_dir(workdir)})", flush=True)
        else:
            state = run.init_state()
            if config.init_from:
                state = _init_from(run, state, config.init_from)
        frozen = run.stage.load_frozen()
        step_fn = run.compile_step(frozen)
        step = int(jax.device_get(state.step))
        total = int(config.total_steps)
        if is_chief:
            print(f"{config.stage}: {run.num_params():,} params, mesh {dict(run.mesh.shape)}, global batch "
                  f"{config.batch_size}, steps {step}->{total}, workdir {workdir}", flush=True)

        wall_before = float(meta.get("wall_time_s", 0.0))
        examples = int(meta.get("examples_seen", 0))
        session_start = time.time()
        last_log_time, last_log_step = None, step
        pending = None
        last_metrics: dict = {}
        eval_result: dict | None = None

        def flush_pending():
            nonlocal pending, last_log_time, last_log_step, last_metrics
            if pending is None:
                return
            p_step, p_metrics = pending
            pending = None
            values = {k: float(v) for k, v in jax.device_get(p_metrics).items()}
            now = time.time()
            rate = (p_step - last_log_step) / (now - last_log_time) if last_log_time and now > last_log_time else 0.0
            last_log_time, last_log_step = now, p_step
            values_tb = dict(values)
            if rate:
                values_tb["steps_per_sec"] = rate
                values_tb["examples_per_sec"] = rate * config.batch_size
            last_metrics = dict(values, step=p_step, steps_per_sec=rate)
            if is_chief:
                writer.scalars(p_step, {f"train/{k}": v for k, v in values_tb.items()})
                print(format_progress(p_step, total, values, rate), flush=True)
            if not all(math.isfinite(v) for v in values.values()):
                log.warning("non-finite metrics at step %d: %s", p_step, values)

        config_json = json.loads(config_to_json(config))

        def current_meta():
            return {"step": step, "examples_seen": examples, "stage": config.stage,
                    "wall_time_s": wall_before + time.time() - session_start, "config": config_json}

        while step < total:
            batch = global_batch(next(data_iter), run.mesh)
            state, metrics = step_fn(state, batch)
            step += 1
            examples += config.batch_size
            flush_pending()  # the previous logged step's metrics: fetched after this step is dispatched
            if last_log_time is None:
                last_log_time, last_log_step = time.time(), step  # rates exclude the first (compiling) step
            if step % config.log_every == 0 or step == total:
                pending = (step, metrics)
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total:
                ckpt.save(mngr, step, state, current_meta(), data_iter)
            if config.eval_every and step % config.eval_every == 0 and step < total:
                flush_pending()
                eval_result = _evaluate_state(run, state, step, writer)
        flush_pending()
        if mngr.latest_step() != step:
            ckpt.save(mngr, step, state, current_meta(), data_iter, force=True)
        mngr.wait_until_finished()
        if latest is None or latest < total:
            eval_result = _evaluate_state(run, state, step, writer)
    finally:  # release the grain workers, flush async checkpoints and event files, even on errors
        mngr.close()
        if writer is not None:
            writer.close()
        if data_iter is not None and hasattr(data_iter, "close"):
            data_iter.close()
    log.info("training took %.1fs", time.time() - t_start)
    return {"train": last_metrics, "eval": eval_result}


def _evaluate_state(run: Run, state, step: int, writer) -> dict:
    use_ema = state.ema_params is not None
    result = evaluate_and_report(run, state.ema_params if use_ema else state.params, step,
                                 "ema" if use_ema else "raw", writer)
    if jax.process_index() == 0:
        print("eval " + json.dumps(result, sort_keys=True), flush=True)
    return result


def _init_from(run: Run, state, source_workdir: str):
    """Params-only start: copies another workdir's (EMA) params into a fresh state."""
    src_config, params, info = ckpt.load_params(source_workdir, run.mesh)
    if src_config.stage != run.config.stage:
        raise ConfigError("init_from", f"{source_workdir!r} is a {src_config.stage!r} workdir, this run trains "
                          f"{run.config.stage!r}")
    want = jax.tree.map(lambda x: (x.shape, str(x.dtype)), run.abstract_state.params)
    got = jax.tree.map(lambda x: (x.shape, str(x.dtype)), params)
    if jax.tree.structure(want) != jax.tree.structure(got) or jax.tree.leaves(want) != jax.tree.leaves(got):
        raise ConfigError("init_from", f"the params in {source_workdir!r} do not match this config's model")
    params = jax.device_put(params, run.state_shardings.params)
    ema = jax.tree.map(lambda x: x.copy(), params) if state.ema_params is not None else None
    print(f"initialised params from {source_workdir} (step {info['step']}, {info['params']} params)", flush=True)
    return state.replace(params=params, ema_params=ema)
