"""Fault injection on real training processes (-m slow): SIGKILL at random steps and SIGTERM, each run
resumed by the same command and compared bit for bit with an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tb_events import logged_steps, scalar_curves

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 12


def _command(workdir: str, data_dir: str, workers: int = 0, total: int = TOTAL) -> list[str]:
    return [sys.executable, "-m", "dalle2_jax.train", "--config", "configs/clip.py:tiny", "--workdir", workdir,
            f"--config.data.data_dir={data_dir}", "--config.data.num_train=256", "--config.data.num_test=64",
            "--config.batch_size=16", f"--config.total_steps={total}", "--config.log_every=1",
            "--config.checkpoint_every=2", "--config.optimizer.warmup_steps=1", "--config.eval.batch_size=64",
            f"--config.data.num_workers={workers}", "--config.data.read_threads=1"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    # one compilation cache for every process of this module: restarts do not recompile
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
                JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def _run(cmd, env) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _run_until(cmd, env, kill_at_step: int | None = None, kill_after_s: float | None = None,
               sig: int = signal.SIGKILL, group: bool = False) -> tuple[int, str]:
    """Starts `cmd` and sends `sig` once its progress line for `kill_at_step` appears (the line for step k is
    printed after step k + 1 is dispatched, so the kill lands while later steps run) or after `kill_after_s`
    seconds of training. Returns (exit code, stdout)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    out = []
    started = None
    for line in proc.stdout:
        out.append(line)
        if line.startswith("clip: ") and started is None:
            started = time.time()
        due = (kill_at_step is not None and line.startswith(f"step {kill_at_step}/")) or (
            kill_after_s is not None and started is not None and time.time() - started > kill_after_s)
        if due:
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
            break
    rest, err = proc.communicate(timeout=600)
    return proc.returncode, "".join(out) + rest + "\n" + err


def _state(workdir: str):
    from dalle2_jax.training import checkpoint as ckpt
    from dalle2_jax.training.trainer import Run

    run = Run(ckpt.read_config(workdir), workdir, prepare=False)
    mngr = ckpt.make_manager(workdir, read_only=True)
    state, meta = ckpt.restore(mngr, mngr.latest_step(), run.abstract_state, None)
    data = open(os.path.join(workdir, "checkpoints", str(mngr.latest_step()), "data",
                             "process_0-of-1.json")).read()
    return jax.device_get(state), meta, json.loads(data)


def _assert_same_run(workdir: str, reference: str, same_pipeline: bool = True) -> None:
    state, meta, data = _state(workdir)
    ref_state, ref_meta, ref_data = _state(reference)
    assert int(state.step) == TOTAL
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):  # params, Adam moments, EMA, step
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the grain iterator stands at the same record: each example seen as often
    assert data == ref_data or not same_pipeline
    assert meta["examples_seen"] == ref_meta["examples_seen"] == TOTAL * 16
    assert meta["wall_time_s"] > 0
    curves, ref_curves = (scalar_curves(os.path.join(w, "tensorboard")) for w in (workdir, reference))
    assert logged_steps(os.path.join(workdir, "tensorboard"), "train/loss") == list(range(1, TOTAL + 1))
    assert curves["train/loss"] == ref_curves["train/loss"]  # the same loss curve, each step once
    assert curves["train/examples_seen"] == ref_curves["train/examples_seen"]
    hours = [curves["train/wall_hours"][s] for s in sorted(curves["train/wall_hours"])]
    assert hours == sorted(hours)  # elapsed time carried across restarts


@pytest.fixture(scope="module")
def reference(shapes_data_dir, tmp_path_factory, env) -> str:
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    _run(_command(workdir, shapes_data_dir), env)
    return workdir


def test_sigkill_at_random_steps_resumes_bit_identical(reference, shapes_data_dir, tmp_path, env):
    rng = random.Random(20261202)
    kill_steps = sorted(rng.sample(range(1, TOTAL - 1), 2))
    workdir = str(tmp_path / "killed")
    cmd = _command(workdir, shapes_data_dir)
    history = []
    for k in kill_steps:
        code, out = _run_until(cmd, env, kill_at_step=k)
        assert code == -signal.SIGKILL, out[-2000:]
        history.append(out)
    # and once at a random moment (possibly inside a save, or before the first step)
    code, out = _run_until(cmd, env, kill_after_s=rng.uniform(0.0, 3.0))
    history.append(out)
    final = _run(cmd, env).stdout
    assert "resuming from step" in final
    _assert_same_run(workdir, reference)
    assert os.path.exists(os.path.join(workdir, "reports", f"eval_{TOTAL}.json"))


def test_sigterm_to_the_process_group_saves_and_resumes(reference, shapes_data_dir, tmp_path, env):
    """SIGTERM to the whole process group (what SLURM and Kubernetes do), with grain worker processes:
    exit 0 with a synchronous checkpoint of the current step; the rerun finishes identically."""
    workdir = str(tmp_path / "terminated")
    cmd = _command(workdir, shapes_data_dir, workers=2)
    code, out = _run_until(cmd, env, kill_at_step=5, sig=signal.SIGTERM, group=True)
    assert code == 0, out[-3000:]
    assert "SIGTERM received: saved checkpoint" in out
    saved = int(out.split("SIGTERM received: saved checkpoint ")[1].split()[0])
    assert saved >= 5 and os.path.isdir(os.path.join(workdir, "checkpoints", str(saved)))
    final = _run(cmd, env).stdout
    assert f"resuming from step {saved}" in final
    _assert_same_run(workdir, reference, same_pipeline=False)  # worker processes keep another iterator state


class _Crash(Exception):
    pass


@pytest.mark.parametrize("stage", ["prior", "decoder", "upsampler"])
def test_every_stage_resumes_bit_identical_after_a_crash(stage, request, tmp_path, monkeypatch):
    """The other stages (frozen CLIP, prior statistics, degradation RNG): a run that dies after step 3 of 4
    (checkpoint 2 on disk) and is started again ends bit-identical to the session's uninterrupted run."""
    from dalle2_jax.training import checkpoint as ckpt
    from dalle2_jax.training import trainer

    reference, _ = request.getfixturevalue(f"trained_{stage}")
    cfg = ckpt.read_config(reference)
    original = trainer.Run.compile_step

    def crashing(self, frozen):
        run_step, calls = original(self, frozen), [0]

        def stepped(state, batch):
            calls[0] += 1
            if calls[0] == 4:
                raise _Crash()
            return run_step(state, batch)

        return stepped

    workdir = str(tmp_path / stage)
    monkeypatch.setattr(trainer.Run, "compile_step", crashing)
    with pytest.raises(_Crash):
        trainer.train(cfg, workdir)
    assert ckpt.make_manager(workdir, read_only=True).all_steps() == [2]
    monkeypatch.setattr(trainer.Run, "compile_step", original)
    trainer.train(ckpt.read_config(reference), workdir)
    for key in ("params", "ema_params"):
        got = ckpt.load_params(workdir, prefer_ema=key == "ema_params")[1]
        want = ckpt.load_params(reference, prefer_ema=key == "ema_params")[1]
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# -- no process outlives the trainer (dalle2_jax.procs) ---------------------------------------------

# `python -m dalle2_jax.train ARGS` whose 4th training step raises: an exception in the main process
_CRASHING_TRAIN = """
import sys
from dalle2_jax.training import trainer
original = trainer.Run.compile_step
def crashing(self, frozen):
    run_step, calls = original(self, frozen), [0]
    def stepped(state, batch):
        calls[0] += 1
        if calls[0] == 4:
            raise RuntimeError("injected failure")
        return run_step(state, batch)
    return stepped
trainer.Run.compile_step = crashing
from dalle2_jax.train import run
run(["train"] + sys.argv[1:])
"""


def _start_and_watch(cmd, env, tmp_path, until):
    """Starts `cmd` (stdout and stderr to files) and records its process tree every 0.1 s until
    `until(proc)` is true or it exits. Returns (proc, {pid: start time} of every descendant seen)."""
    from proctree import descendants

    out, err = open(tmp_path / "stdout", "w"), open(tmp_path / "stderr", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err)
    seen: dict[int, int] = {}
    deadline = time.time() + 600
    while proc.poll() is None and not until(proc) and time.time() < deadline:
        seen.update(descendants(proc.pid))
        time.sleep(0.1)
    seen.update(descendants(proc.pid))
    return proc, seen


def _first_checkpoint(workdir):
    return lambda proc: os.path.isdir(os.path.join(workdir, "checkpoints", "2"))


def _assert_tree_gone(seen, tmp_path, within: float = 10.0) -> None:
    from proctree import describe, wait_gone

    left = wait_gone(seen, within)
    err = (tmp_path / "stderr").read_text()
    assert not left, f"{len(left)} of the trainer's processes still running {within:.0f} s after its end:\n" \
                     f"{describe(left)}\n{err[-2000:]}"


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads the process tree from Linux's /proc")
def test_sigkill_after_the_first_checkpoint_leaves_no_process(shapes_data_dir, tmp_path, env):
    """A trainer with 2 grain workers killed with SIGKILL after its first checkpoint: none of the processes
    it started (workers, resource tracker) is alive 10 s later."""
    workdir = str(tmp_path / "w")
    proc, seen = _start_and_watch(_command(workdir, shapes_data_dir, workers=2, total=1000), env, tmp_path,
                                  _first_checkpoint(workdir))
    assert proc.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
    assert len(seen) >= 2, seen  # the grain workers ran
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    _assert_tree_gone(seen, tmp_path)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads the process tree from Linux's /proc")
@pytest.mark.parametrize("end", ["sigterm", "exception"])
def test_sigterm_or_an_exception_leaves_no_process_and_no_leaked_memory(end, shapes_data_dir, tmp_path, env):
    """A trainer with 2 grain workers ended by SIGTERM after its first checkpoint (saves, exit 0) or by an
    exception in its 4th step (exit 1): its workers are gone when it has exited, and no shared memory is
    reported leaked."""
    workdir = str(tmp_path / "w")
    cmd = _command(workdir, shapes_data_dir, workers=2, total=1000)
    if end == "exception":
        cmd = [sys.executable, "-c", _CRASHING_TRAIN] + cmd[3:]  # the flags after `-m dalle2_jax.train`
    proc, seen = _start_and_watch(cmd, env, tmp_path, _first_checkpoint(workdir))
    if end == "sigterm":
        assert proc.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
        proc.terminate()
    code = proc.wait(timeout=300)
    err = (tmp_path / "stderr").read_text()
    assert len(seen) >= 2, seen
    if end == "sigterm":
        assert code == 0 and "SIGTERM received: saved checkpoint" in (tmp_path / "stdout").read_text(), err[-3000:]
    else:
        assert code == 1 and "injected failure" in err, err[-3000:]
    _assert_tree_gone(seen, tmp_path, within=5.0)
    assert "leaked" not in err, err[-3000:]
