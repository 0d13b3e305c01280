"""Fault injection: preemption, non-finite steps, damaged and foreign checkpoints (in-process, default
suite). The SIGKILL/SIGTERM runs of real processes are in test_reliability_slow.py (-m slow)."""

from __future__ import annotations

import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import small_config

# A read of a damaged checkpoint leaves orbax's other pending reads to fail after their event loop closed;
# Python reports them as unraisable exceptions. Expected here, so not shown as warnings.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _assert_trees_equal(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)


def _copy_workdir(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _params_of(workdir, step=None):
    from dalle2_jax.training import checkpoint as ckpt

    return ckpt.load_params(workdir, prefer_ema=False, step=step)[1]


# -- preemption -------------------------------------------------------------------------------------

def test_sigterm_saves_synchronously_and_the_rerun_finishes_identically(trained_clip, shapes_data_dir, tmp_path,
                                                                          monkeypatch, capsys):
    """A real SIGTERM after step 3 of 4: checkpoint 3 written before train() returns (preempted, no
    evaluation); the same command then resumes at 3 and ends bit-identical to the uninterrupted run."""
    from dalle2_jax.training import checkpoint as ckpt
    from dalle2_jax.training import trainer

    original = trainer.Run.compile_step

    def compile_step(self, frozen):
        run_step = original(self, frozen)
        calls = {"n": 0}

        def stepped(state, batch):
            out = run_step(state, batch)
            calls["n"] += 1
            if calls["n"] == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # handled by the trainer's watch, not the default action
            return out

        return stepped

    workdir = str(tmp_path / "w")
    monkeypatch.setattr(trainer.Run, "compile_step", compile_step)
    out = trainer.train(small_config(shapes_data_dir), workdir)
    printed = capsys.readouterr().out
    assert out["preempted"] and out["step"] == 3 and out["eval"] is None
    assert "SIGTERM received: saved checkpoint 3 synchronously" in printed
    assert ckpt.make_manager(workdir, read_only=True).all_steps() == [2, 3]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again
    monkeypatch.setattr(trainer.Run, "compile_step", original)
    out = trainer.train(small_config(shapes_data_dir), workdir)
    assert "resuming from step 3" in capsys.readouterr().out
    assert not out["preempted"] and out["eval"] is not None
    _assert_trees_equal(_params_of(workdir), _params_of(trained_clip))
    _, meta = _restore_meta(workdir)
    assert meta["examples_seen"] == 4 * 16


def _restore_meta(workdir):
    from dalle2_jax.training import checkpoint as ckpt
    from dalle2_jax.training.trainer import Run

    run = Run(ckpt.read_config(workdir), workdir, prepare=False)
    mngr = ckpt.make_manager(workdir, read_only=True)
    return ckpt.restore(mngr, mngr.latest_step(), run.abstract_state, None)


# -- non-finite guard -------------------------------------------------------------------------------

def _nan_on_steps(stage_cls, seed: int, steps: tuple[int, ...]):
    """Wraps `stage_cls.loss` so that trainer steps `steps` (1-based) get a NaN loss and NaN gradients.
    The step is recognised by its key: the train step draws fold_in(step_key, state.step)."""
    base = jax.random.split(jax.random.key(seed))[1]  # Run.step_rng
    bad = jnp.stack([jax.random.key_data(jax.random.fold_in(base, s - 1)) for s in steps])
    loss = stage_cls.loss

    def wrapped(self, params, batch, rng, frozen):
        value, metrics = loss(self, params, batch, rng, frozen)
        hit = jnp.any(jnp.all(jax.random.key_data(rng)[None] == bad, axis=-1))
        return value * jnp.where(hit, jnp.nan, 1.0), metrics

    return wrapped


NAN_STEPS = (2, 5, 6, 7)


def test_nonfinite_step_leaves_the_state_unchanged(shapes_data_dir, tmp_path, monkeypatch):
    from dalle2_jax.stages.clip import ClipStage
    from dalle2_jax.training.partitioning import global_batch
    from dalle2_jax.training.trainer import Run

    # the same injection as the next test's, so that its train step comes from the compilation cache
    monkeypatch.setattr(ClipStage, "loss", _nan_on_steps(ClipStage, 0, NAN_STEPS))
    cfg = small_config(shapes_data_dir, total_steps=10)
    run = Run(cfg, str(tmp_path))
    batch = global_batch(next(iter(run.stage.train_iterator(16, 0, 1))), run.mesh)
    step = run.compile_step(None)
    s1, m1 = step(run.init_state(), batch)
    before = jax.device_get(s1)
    s2, m2 = step(s1, batch)
    assert float(m1["nonfinite"]) == 0.0 and float(m2["nonfinite"]) == 1.0
    assert not np.isfinite(float(m2["loss"])) and not np.isfinite(float(m2["grad_norm"]))
    assert int(s2.step) == 2  # the step counter (RNG position, schedule) moves on
    _assert_trees_equal((s2.params, s2.opt_state, s2.ema_params),
                        (before.params, before.opt_state, before.ema_params))
    s3, m3 = step(s2, batch)
    assert float(m3["nonfinite"]) == 0.0 and np.isfinite(_leaves(s3.params)[0]).all()


@pytest.mark.parametrize("log_every", [1, 4])  # 4: the flags are read 3 (the limit) at a time
def test_nonfinite_steps_are_counted_and_a_streak_stops_the_run(log_every, shapes_data_dir, tmp_path, monkeypatch,
                                                                capsys):
    from dalle2_jax.stages.clip import ClipStage
    from dalle2_jax.training import checkpoint as ckpt
    from dalle2_jax.training.errors import TrainingStopped
    from dalle2_jax.training.trainer import train
    from tb_events import scalar_curves

    # step 2 alone is skipped; steps 5, 6, 7 are a streak of 3 = the limit
    monkeypatch.setattr(ClipStage, "loss", _nan_on_steps(ClipStage, 0, NAN_STEPS))
    workdir = str(tmp_path / "w")
    cfg = small_config(shapes_data_dir, total_steps=10, log_every=log_every, max_consecutive_nonfinite=3)
    with pytest.raises(TrainingStopped, match=r"3 consecutive steps \(5\.\.7\).*last good checkpoint is step 4"):
        train(cfg, workdir)
    out = capsys.readouterr().out
    assert "step 2: non-finite loss or gradients" in out and "update skipped (1 in a row, limit 3; 1 in all)" in out
    assert "(3 in a row, limit 3; 4 in all)" in out
    assert ckpt.make_manager(workdir, read_only=True).all_steps() == [4]  # step 2 was non-finite: postponed
    curves = scalar_curves(os.path.join(workdir, "tensorboard"))
    if log_every == 1:
        assert curves["train/nonfinite_steps"][1] == 0 and curves["train/nonfinite_steps"][2] == 1
    assert curves["train/nonfinite_steps"][4] == 1
    _, meta = _restore_meta(workdir)
    assert meta["nonfinite_steps"] == 1 and meta["step"] == 4


# -- damaged checkpoints ----------------------------------------------------------------------------

def _data_files(workdir, step):
    d = os.path.join(workdir, "checkpoints", str(step), "state")
    files = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs if os.sep + "d" + os.sep in os.path.join(r, f)]
    return sorted(files, key=os.path.getsize)


def _truncate(workdir):
    f = _data_files(workdir, 4)[-1]
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 2])


def _truncate_all(workdir, step):
    for f in _data_files(workdir, step):
        open(f, "wb").close()


def _delete_file(workdir):
    os.remove(_data_files(workdir, 4)[-1])


def _garbage(workdir):
    """Bytes overwritten inside the data: still decodes (zstd frames intact), caught by the checksums."""
    f = _data_files(workdir, 4)[-1]
    data = bytearray(open(f, "rb").read())
    mid = len(data) // 2
    data[mid: mid + 64] = np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes()
    open(f, "wb").write(bytes(data))


def _half_written(workdir):
    """A step directory that lacks an item, as a copy interrupted half-way leaves it."""
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4", "meta"))


def _garbage_data_item(workdir):
    with open(os.path.join(workdir, "checkpoints", "4", "data", "process_0-of-1.json"), "w") as f:
        f.write("{\"next_index\": 4, garbage")


def _newer_empty_step(workdir):
    os.makedirs(os.path.join(workdir, "checkpoints", "6"))


@pytest.mark.parametrize("damage, step, reason", [
    (_truncate, 4, "item 'state'"),
    (_delete_file, 4, "item 'state'"),
    (_garbage, 4, "checksum mismatch"),
    (_half_written, 4, "item 'meta'"),
    (_garbage_data_item, 4, "item 'data'"),
    (_newer_empty_step, 6, "item 'meta'"),
])
def test_damaged_newest_checkpoint_falls_back(trained_clip, tmp_path, damage, step, reason, caplog):
    from dalle2_jax.training import checkpoint as ckpt
    from dalle2_jax.training.trainer import Run

    workdir = _copy_workdir(trained_clip, tmp_path / "w")
    damage(workdir)
    run = Run(ckpt.read_config(workdir), workdir, prepare=False)
    mngr = ckpt.make_manager(workdir)
    expect = 2 if step == 4 else 4
    data_iter = iter(run.stage.train_iterator(16, 0, 1))
    found_step, state, meta = ckpt.restore_newest_intact(mngr, run.abstract_state, data_iter, run.config,
                                                         move_damaged_to=os.path.join(workdir, "damaged_checkpoints"))
    assert data_iter.get_state()["next_index"] == expect  # the iterator stands where that checkpoint left it
    assert found_step == expect and meta["step"] == expect
    warning = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(warning) == 1 and f"checkpoints/{step} is damaged" in warning[0] and reason in warning[0]
    assert mngr.all_steps() == ([2] if step == 4 else [2, 4])  # the damaged one moved aside
    assert os.listdir(os.path.join(workdir, "damaged_checkpoints"))[0].startswith(f"{step}-")
    _assert_trees_equal(state.params, _params_of(trained_clip, step=expect))
    mngr.close()


def test_frozen_loader_skips_a_damaged_checkpoint_and_all_damaged_is_an_error(trained_clip, tmp_path):
    from dalle2_jax.training import checkpoint as ckpt

    workdir = _copy_workdir(trained_clip, tmp_path / "w")
    _truncate_all(workdir, 4)
    _, params, info = ckpt.load_params(workdir)
    assert info["step"] == 2
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]  # read-only: nothing is moved
    _assert_trees_equal(params, ckpt.load_params(trained_clip, step=2)[1])
    # content that differs from the saved checksums, in the part the loader reads (the EMA params)
    workdir = _copy_workdir(trained_clip, tmp_path / "w2")
    meta_file = os.path.join(workdir, "checkpoints", "4", "meta", "metadata")
    meta = json.load(open(meta_file))
    key = sorted(k for k in meta["fingerprint"] if k.startswith("ema_params/"))[0]
    meta["fingerprint"][key] = "0x00000000"
    json.dump(meta, open(meta_file, "w"))
    assert ckpt.load_params(workdir)[2]["step"] == 2
    workdir = _copy_workdir(trained_clip, tmp_path / "w3")
    _truncate_all(workdir, 4)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "2", "state"))
    with pytest.raises(ckpt.NoIntactCheckpoint, match=r"checkpoints/4 is damaged.*\| .*checkpoints/2 is damaged"):
        ckpt.load_params(workdir)


def test_training_resumes_from_the_newest_intact_checkpoint(trained_clip, shapes_data_dir, tmp_path, capsys):
    """Step 4 damaged: the same command falls back to 2, retrains 3 and 4, and ends equal to the original."""
    from dalle2_jax.training.errors import NoIntactCheckpoint
    from dalle2_jax.training.trainer import train

    workdir = _copy_workdir(trained_clip, tmp_path / "w")
    _truncate(workdir)
    train(small_config(shapes_data_dir), workdir)
    out = capsys.readouterr().out
    assert "checkpoints/4 is damaged" in out and "resuming from step 2" in out
    _assert_trees_equal(_params_of(workdir), _params_of(trained_clip))
    from tb_events import logged_steps  # step 4, logged by the original run too, is shown once (purge_step)
    assert logged_steps(os.path.join(workdir, "tensorboard"), "train/loss") == [2, 4]
    # every checkpoint damaged: a clear error, nothing trained over it
    for step in (2, 4):
        shutil.rmtree(os.path.join(workdir, "checkpoints", str(step), "meta"))
    with pytest.raises(NoIntactCheckpoint, match="no intact checkpoint in .*restore a backup"):
        train(small_config(shapes_data_dir), workdir)


def test_checkpoint_of_another_model_is_refused_naming_the_keys(trained_clip, shapes_data_dir, tmp_path):
    from dalle2_jax.training import checkpoint as ckpt
    from dalle2_jax.training.config import ConfigError
    from dalle2_jax.training.trainer import Run, train

    cfg = small_config(shapes_data_dir, **{"model.text.width": 64, "model.text.depth": 1})
    # checkpoints copied into a workdir whose config.json is this model's: refused by the checkpoint check
    workdir = str(tmp_path / "w")
    os.makedirs(workdir)
    shutil.copytree(os.path.join(trained_clip, "checkpoints"), os.path.join(workdir, "checkpoints"))
    shutil.copytree(os.path.join(trained_clip, "tokenizer"), os.path.join(workdir, "tokenizer"))
    with pytest.raises(ckpt.CheckpointMismatch) as e:
        train(cfg, workdir)
    msg = str(e.value)
    assert "model.text.depth: 2 -> 1" in msg and "model.text.width: 128 -> 64" in msg and "init_from" in msg
    assert ckpt.make_manager(workdir, read_only=True).all_steps() == [2, 4]  # nothing moved or deleted
    # without a saved config (an import), the params themselves are compared, by name and shape
    run = Run(cfg, workdir, prepare=False)
    with pytest.raises(ckpt.CheckpointMismatch, match=r"not match this config.s model \(.*block_1.*: not in this"):
        ckpt.restore(ckpt.make_manager(workdir, read_only=True), 4, run.abstract_state, None, config=None)
    # the same workdir with its own config.json: the config check names every changed model key
    with pytest.raises(ConfigError) as e:
        train(cfg, trained_clip)
    assert "model.text.depth: 2 -> 1" in str(e.value) and "model.text.width: 128 -> 64" in str(e.value)


def test_checksums_on_host_and_on_device_agree(monkeypatch):
    """Small states are summed in numpy, large or multi-host ones by a jitted reduction: the same values."""
    from dalle2_jax.training import checkpoint as ckpt

    tree = {"f32": jnp.linspace(-3.0, 3.0, 257).reshape(1, 257), "bf16": jnp.ones((2, 3, 5), jnp.bfloat16),
            "i32": jnp.int32(-7), "bool": jnp.array([True, False, True]), "u8": jnp.arange(300, dtype=jnp.uint8)}
    host = ckpt.fingerprint(tree)
    monkeypatch.setattr(ckpt, "HOST_CHECKSUM_BYTES", 0)
    assert ckpt.fingerprint(tree) == host
    changed = dict(tree, f32=tree["f32"].at[0, 100].set(0.5))
    assert ckpt.fingerprint(changed)["f32"] != host["f32"]
    swapped = dict(tree, f32=tree["f32"][:, ::-1])  # same values, other positions
    assert ckpt.fingerprint(swapped)["f32"] != host["f32"]


def test_trainer_counts_undecodable_records(trained_clip, shapes_data_dir, tmp_path, monkeypatch):
    """Records whose image cannot be decoded: training goes on, and their count reaches the train() result,
    TensorBoard and the checkpoint's meta (so it survives a resume)."""
    from test_data_bad_records import _corrupt

    from dalle2_jax.training.trainer import train
    from tb_events import scalar_curves

    _corrupt(monkeypatch, range(0, 256, 16))  # 16 of the 256 records
    workdir = str(tmp_path / "w")
    out = train(small_config(shapes_data_dir), workdir)
    _, meta = _restore_meta(workdir)
    curve = scalar_curves(os.path.join(workdir, "tensorboard"))["train/bad_records"]
    # 4 steps x 16 rows = 64 records read, about 1 in 16 of them bad (the shuffle decides how many exactly)
    assert meta["bad_records"] == out["train"]["bad_records"] == curve[4] > 0
    assert curve[2] <= curve[4] <= 16


# -- worker processes die with their parent (dalle2_jax.procs) ---------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A parent with every kind of worker the project starts: grain prefetch workers (procs.mp_prefetch) and
# multiprocessing pools with procs.die_with_parent as initializer, forked (captioned_shapes without JAX)
# and spawned (with JAX), and through a forkserver (whose pid is the workers' getppid()); and a forked
# child with a forked grandchild, both calling die_with_parent (the grandchild inherits its parent's
# module state); then it waits to be killed.
_PARENT = """
import multiprocessing as mp, os, time
import grain
from absl import flags
from dalle2_jax import procs
flags.FLAGS.mark_as_parsed()  # grain reads its absl flags when it starts a worker
fork = mp.get_context("fork")
started = fork.Event()
def grandchild():
    procs.die_with_parent()
    started.set()
    time.sleep(600)
def child():
    procs.die_with_parent()
    fork.Process(target=grandchild).start()
    time.sleep(600)
fork.Process(target=child).start()
started.wait(60)
pools = [mp.get_context(m).Pool(2, initializer=procs.die_with_parent) for m in ("fork", "spawn", "forkserver")]
for pool in pools:
    pool.map(abs, range(8))
it = iter(procs.mp_prefetch(grain.MapDataset.range(10**6).to_iter_dataset(), 2))
next(it)
print("ready", flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads the process tree from Linux's /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_workers_exit_when_their_parent_is_killed(sig):
    """SIGKILL (or an unhandled SIGTERM) of a process holding grain workers, pools and a child with a
    grandchild: every process below it (workers, multiprocessing's resource tracker and forkserver) is gone
    within 10 s."""
    import subprocess
    import sys

    from proctree import describe, descendants, wait_gone

    proc = subprocess.Popen([sys.executable, "-c", _PARENT], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line == "ready\n", line + proc.stderr.read()[-3000:]
        kids = descendants(proc.pid)
        assert len(kids) >= 10, describe(kids)  # 2 grain workers, 3 x 2 pool workers, child, grandchild, ...
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == -sig
        left = wait_gone(kids, 10)
        assert not left, f"still running 10 s after the parent's {signal.Signals(sig).name}:\n{describe(left)}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_worker_outlives_the_thread_that_started_it():
    """die_with_parent watches the parent process, not the thread that started the worker (what
    PR_SET_PDEATHSIG would do): grain starts its workers from threads it ends while the run goes on."""
    import multiprocessing as mp
    import threading
    import time

    from dalle2_jax import procs

    pools = []
    starter = threading.Thread(target=lambda: pools.append(
        mp.get_context("spawn").Pool(1, initializer=procs.die_with_parent)))
    starter.start()
    starter.join()
    pool = pools[0]
    try:
        pid = pool.apply(os.getpid)
        time.sleep(3 * procs.POLL_S)
        assert pool.apply(os.getpid, ()) == pid  # the same worker, still serving
    finally:
        pool.terminate()
        pool.join()
