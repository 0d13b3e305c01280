"""The generic training loop, shared by every stage.

`train(config, workdir)` validates the config, builds the mesh, creates the train state already sharded
under jit (or restores the newest checkpoint of the workdir, with the data iterator where it stopped),
runs the jitted step with the state donated, logs to stdout and TensorBoard (metrics fetched one logged
step behind, so the device never waits for the host), checkpoints with orbax and evaluates periodically.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from dalle2_jax import fileio
from dalle2_jax.data.pipeline import close_iterator
from dalle2_jax.stages import get_stage_class
from dalle2_jax.training import checkpoint as ckpt
from dalle2_jax.training.config import ConfigError, clamp_short_run, config_to_json, validate_config
from dalle2_jax.training.errors import TrainingStopped
from dalle2_jax.training.metrics import MetricWriter, RateWindow, format_progress
from dalle2_jax.training.preemption import PreemptionWatch
from dalle2_jax.training.profiling import StepProfiler
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
        """A fresh state, created directly in its sharded layout (never whole on one device).

        On CPU the init function is compiled with XLA's backend optimisation off: it runs once, and
        optimising its thousands of random-number ops took most of its compile (23 s -> 7 s for the tests'
        tiny decoder). Its values are then those of that compile (they differ from an optimised one in the
        last bits), the same on every run."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(LOGICAL_RULES):
            init = jax.jit(lambda k: nn.meta.unbox(self._init_fn(k)), out_shardings=self.state_shardings)
            if all(d.platform == "cpu" for d in self.mesh.devices.flat):
                init = init.lower(self.init_rng).compile(compiler_options={"xla_backend_optimization_level": 0})
            return init(self.init_rng)

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
            batch = {k: v for k, v in batch.items() if k != "bad_records"}  # a host-side count, not an input
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


def _write_config(config, workdir: str) -> None:
    """Writes config.json; on resume, logs the run keys that changed and refuses a changed stage/model,
    naming every key that differs."""
    path = fileio.join(workdir, "config.json")
    if fileio.exists(path):
        old = json.loads(config_to_json(ckpt.read_config(workdir)))
        new = json.loads(config_to_json(config))
        fixed = ckpt.fixed_key_changes(old, new)
        if fixed:
            raise ConfigError(fixed[0].split(":")[0], f"this workdir ({path}) was trained with another stage or "
                              f"model: {'; '.join(fixed[:10])}{'; ...' if len(fixed) > 10 else ''}; use a new "
                              "workdir, or config.init_from to start from its params")
        a, b = ckpt.flat_config(old), ckpt.flat_config(new)
        changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if changed:
            log.warning("resuming with changed config keys: %s", ", ".join(changed))
            print("resuming with changed config keys: " + ", ".join(
                f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in changed), flush=True)
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


def write_sample_grids(workdir: str, step: int, images: dict, writer: MetricWriter | None,
                       suffix: str = "") -> list[str]:
    """Writes each uint8 [H, W, 3] grid as <workdir>/samples/<name>_<step><suffix>.png and to TensorBoard."""
    from dalle2_jax.images import save_png

    paths = []
    for name, grid in images.items():
        path = fileio.join(workdir, "samples", f"{name}_{step}{suffix}.png")
        save_png(path, np.asarray(grid, np.uint8))
        paths.append(path)
        if writer is not None:
            writer.image(step, f"samples/{name}{suffix}", np.asarray(grid, np.uint8))
    return paths


def evaluate_and_report(run: Run, params: Any, step: int, params_kind: str, writer: MetricWriter | None,
                        suffix: str = "", extra: dict | None = None) -> dict:
    """Runs the stage's evaluation and writes reports/eval_<step><suffix>.json and TensorBoard scalars (under
    eval<suffix>/); `extra` is added to the result (e.g. the sampling overrides it was run with)."""
    t0 = time.time()
    metrics = dict(run.stage.evaluate(params, run.mesh))
    images = metrics.pop("images", {})  # {name: uint8 [H, W, 3]} sample grids, if the stage makes any
    result = {"step": int(step), "params": params_kind, **(extra or {}), **metrics}
    result.setdefault("num_examples", 0)
    if jax.process_index() == 0:
        if images:
            result["sample_files"] = write_sample_grids(run.workdir, step, images, writer, suffix)
        ckpt.write_json(fileio.join(run.workdir, "reports", f"eval_{step}{suffix}.json"), result)
        if writer is not None:
            writer.scalars(step, {f"eval{suffix}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    log.info("evaluation at step %d took %.1fs", step, time.time() - t0)
    return result


def _global_sum(value: int) -> int:
    """Sum of a per-process count over all processes (every process must call it at the same point)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.sum(multihost_utils.process_allgather(np.asarray(value, np.int64))))


def _check_writable(workdir: str) -> None:
    try:
        fileio.makedirs(workdir)
        probe = fileio.path(fileio.join(workdir, f".write_test_{jax.process_index()}"))
        probe.write_text("")
        probe.unlink()
    except (OSError, ImportError) as e:  # ImportError: the URI's filesystem package (gcsfs) is missing
        raise ConfigError("workdir", f"cannot write to {workdir!r} ({e}); choose a writable directory") from e


def train(config, workdir: str) -> dict:
    """Trains `config.stage` in `workdir` until config.total_steps, resuming from the newest intact
    checkpoint of the workdir (state, EMA, RNG position, data iterator and counters).

    A SIGTERM (or JAX's preemption sync point, multi-process) ends the run after the current step with a
    synchronous checkpoint. Steps with a non-finite loss or gradients are skipped and counted;
    `config.max_consecutive_nonfinite` of them in a row raise TrainingStopped. Returns the last logged
    training metrics, the final evaluation (if any), the step reached and whether the run was preempted.
    """
    clamped = clamp_short_run(config)
    if clamped:
        log.info("a run of %d steps is shorter than its config expects; clamped: %s", config.total_steps,
                 "; ".join(clamped))
    validate_config(config)
    workdir = fileio.resolve(workdir)
    _check_writable(workdir)
    _write_config(config, workdir)
    _check_workdir_shared(workdir)
    t_start = time.time()
    run = Run(config, workdir)
    is_chief = jax.process_index() == 0
    writer = None
    mngr = ckpt.make_manager(workdir, max_to_keep=int(config.keep_checkpoints))
    max_bad_streak = int(config.get("max_consecutive_nonfinite", 20))

    local_bs = config.batch_size // jax.process_count()
    data_iter = None
    watch = PreemptionWatch()
    profiler = None
    try:
        watch.__enter__()
        data_iter = iter(run.stage.train_iterator(local_bs, jax.process_index(), jax.process_count()))
        found = ckpt.restore_newest_intact(mngr, run.abstract_state, data_iter, config,
                                           move_damaged_to=fileio.join(workdir, ckpt.DAMAGED_DIR))
        latest = None
        meta: dict = {}
        if found is not None:
            latest, state, meta = found
            log.info("resumed from %s at step %d", ckpt.checkpoint_dir(workdir), latest)
            print(f"resuming from step {latest} ({ckpt.checkpoint_dir(workdir)}; {int(meta.get('examples_seen', 0)):,} "
                  f"examples seen, {float(meta.get('wall_time_s', 0.0)) / 3600:.3f} wall hours)", flush=True)
        else:
            state = run.init_state()
            if config.init_from:
                state = _init_from(run, state, config.init_from)
        frozen = run.stage.load_frozen()
        step_fn = run.compile_step(frozen)
        step = int(jax.device_get(state.step))
        total = int(config.total_steps)
        if is_chief:
            # purge_step: TensorBoard hides what an interrupted run logged after the step resumed from
            writer = MetricWriter(fileio.join(workdir, "tensorboard"), purge_step=step + 1)
            print(f"{config.stage}: {run.num_params():,} params, mesh {dict(run.mesh.shape)}, global batch "
                  f"{config.batch_size}, steps {step}->{total}, workdir {workdir}", flush=True)

        wall_before = float(meta.get("wall_time_s", meta.get("wall_time", 0.0)))
        examples = int(meta.get("examples_seen", 0))
        nonfinite_total = int(meta.get("nonfinite_steps", 0))
        bad_records_before = int(meta.get("bad_records", 0))
        bad_records_local = 0  # this process, this session
        bad_streak: list[int] = []  # the current run of consecutive non-finite steps
        session_start = time.time()
        last_log_time, last_log_step = None, step
        pace = RateWindow(10)  # the printed steps/s and ETA; TensorBoard gets each interval's own rate
        pending = None  # (step, metrics) of the last logged step, fetched one step later
        # (step, metrics) of steps whose `nonfinite` flag the host has not read yet: read together every
        # `check_every` steps, one step behind (no host round-trip per step), and before every save
        unchecked: list = []
        check_every = max(1, min(int(config.log_every), max_bad_streak))
        last_metrics: dict = {}
        eval_result: dict | None = None
        preempted = False

        def wall_time() -> float:
            return wall_before + time.time() - session_start

        def check_finite(keep_newest: bool = False) -> None:
            """Fetches the `nonfinite` flags of the unchecked steps in one transfer (all but the newest when
            `keep_newest`: that one may still run), logs each skipped step and stops a long streak."""
            nonlocal nonfinite_total
            items = unchecked[:-1] if keep_newest else list(unchecked)
            del unchecked[:len(items)]
            flags = jax.device_get([m["nonfinite"] for _, m in items])
            for (s, m), flag in zip(items, flags):
                if not float(flag):
                    bad_streak.clear()
                    continue
                nonfinite_total += 1
                bad_streak.append(s)
                loss, gnorm = (float(x) for x in jax.device_get((m["loss"], m["grad_norm"])))
                msg = (f"step {s}: non-finite loss or gradients (loss {loss}, grad_norm {gnorm}); update skipped "
                       f"({len(bad_streak)} in a row, limit {max_bad_streak}; {nonfinite_total} in all)")
                log.warning(msg)
                if is_chief:
                    print("warning: " + msg, flush=True)
                if len(bad_streak) >= max_bad_streak:
                    good = mngr.latest_step()
                    raise TrainingStopped(
                        f"{len(bad_streak)} consecutive steps ({bad_streak[0]}..{bad_streak[-1]}) had a non-finite "
                        f"loss or gradients; stopped. The last good checkpoint is step {good} in "
                        f"{ckpt.checkpoint_dir(workdir)}. Lower optimizer.learning_rate or raise "
                        "optimizer.warmup_steps, check the data, or raise config.max_consecutive_nonfinite")

        def flush_pending():
            nonlocal pending, last_log_time, last_log_step, last_metrics
            if pending is None:
                return
            p_step, p_metrics = pending
            pending = None
            values = {k: float(v) for k, v in jax.device_get(p_metrics).items()}
            values.pop("nonfinite", None)
            now = time.time()
            rate = (p_step - last_log_step) / (now - last_log_time) if last_log_time and now > last_log_time else 0.0
            smooth = pace.add(now, p_step)
            last_log_time, last_log_step = now, p_step
            counters = {"nonfinite_steps": nonfinite_total, "bad_records": bad_records_before + _global_sum(
                bad_records_local)}
            seen = examples - (step - p_step) * config.batch_size  # at the logged step, not the newest one
            values_tb = dict(values, **counters, examples_seen=seen, wall_hours=wall_time() / 3600)
            if rate:
                values_tb["steps_per_sec"] = rate
                values_tb["examples_per_sec"] = rate * config.batch_size
            last_metrics = dict(values, **counters, step=p_step, steps_per_sec=rate)
            if is_chief:
                writer.scalars(p_step, {f"train/{k}": v for k, v in values_tb.items()})
                shown = dict(values, **{k: v for k, v in counters.items() if v})
                print(format_progress(p_step, total, shown, smooth), flush=True)

        config_json = json.loads(config_to_json(config))

        def current_meta():
            return {"step": step, "examples_seen": examples, "stage": config.stage, "wall_time_s": wall_time(),
                    "nonfinite_steps": nonfinite_total, "bad_records": bad_records_before + _global_sum(
                        bad_records_local), "config": config_json}

        def save(force: bool = False) -> None:
            ckpt.save(mngr, step, state, current_meta(), data_iter, force=force)

        profiler = StepProfiler(config, fileio.join(workdir, "tensorboard"))
        while step < total:
            profiler.before_step(step + 1)
            local = next(data_iter)
            bad = local.pop("bad_records", None) if isinstance(local, dict) else None
            if bad is not None and int(np.sum(bad)):
                bad_records_local += int(np.sum(bad))
                log.warning("step %d: %d undecodable records skipped in this batch (%d by this process so far)",
                            step + 1, int(np.sum(bad)), bad_records_local)
            batch = global_batch(local, run.mesh)
            state, metrics = step_fn(state, batch)
            step += 1
            examples += config.batch_size
            profiler.after_step(step, (state, metrics))
            unchecked.append((step, metrics))
            if len(unchecked) > check_every:
                check_finite(keep_newest=True)  # the steps before this one, which is already dispatched
            flush_pending()  # the previous logged step's metrics, likewise one step behind
            if last_log_time is None:
                last_log_time, last_log_step = time.time(), step  # rates exclude the first (compiling) step
                pace.add(last_log_time, step)
            if step % config.log_every == 0 or step == total:
                pending = (step, metrics)
            if watch.reached(step):
                check_finite()
                flush_pending()
                if mngr.latest_step() != step:
                    save(force=True)
                mngr.wait_until_finished()
                preempted = True
                msg = (f"{watch.signal_name or 'preemption'} received: saved checkpoint {step} synchronously "
                       f"({ckpt.checkpoint_dir(workdir)}); run the same command to resume")
                log.warning(msg)
                if is_chief:
                    print(msg, flush=True)
                break
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total:
                check_finite()  # a save is a sync point anyway
                if bad_streak:
                    log.warning("step %d: checkpoint postponed, the last %d steps were non-finite", step,
                                len(bad_streak))
                else:
                    save()
            if config.eval_every and step % config.eval_every == 0 and step < total:
                flush_pending()
                eval_result = _evaluate_state(run, state, step, writer)
        if not preempted:
            check_finite()
            flush_pending()
            if mngr.latest_step() != step:
                save(force=True)
            mngr.wait_until_finished()
            report = fileio.join(run.workdir, "reports", f"eval_{step}.json")
            if not fileio.exists(report):  # also after a run killed between its last save and evaluation
                eval_result = _evaluate_state(run, state, step, writer)
    except BaseException as e:
        # the frames of the failed call (a train step, the data iterator) hold the last batch, whose shared
        # memory close_iterator can then not release: the resource tracker reports it leaked at exit.
        # The traceback keeps its lines; only the finished frames' local variables are dropped.
        traceback.clear_frames(e.__traceback__)
        raise
    finally:  # release the grain workers, flush async checkpoints and event files, even on errors
        if profiler is not None:
            profiler.stop()
        watch.__exit__(None, None, None)
        mngr.close()
        if writer is not None:
            writer.close()
        local = batch = None  # noqa: F841 - the last batch's shared memory is released below
        close_iterator(data_iter)
    log.info("training took %.1fs", time.time() - t_start)
    return {"train": last_metrics, "eval": eval_result, "step": step, "preempted": preempted}


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
    try:
        ckpt.check_compatible({}, params, run.abstract_state.params, None, source_workdir)
    except ckpt.CheckpointMismatch as e:
        raise ConfigError("init_from", str(e).split(": ", 1)[1]) from None
    want = jax.tree.map(lambda x: str(x.dtype), run.abstract_state.params)
    got = jax.tree.map(lambda x: str(x.dtype), params)
    if jax.tree.leaves(want) != jax.tree.leaves(got):
        raise ConfigError("init_from", f"the params in {source_workdir!r} have other dtypes than this config's")
    params = jax.device_put(params, run.state_shardings.params)
    ema = jax.tree.map(lambda x: x.copy(), params) if state.ema_params is not None else None
    print(f"initialised params from {source_workdir} (step {info['step']}, {info['params']} params)", flush=True)
    return state.replace(params=params, ema_params=ema)
