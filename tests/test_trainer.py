"""The generic trainer on the CLIP stage: overfitting, sharding equivalence, checkpoints and resume."""

from __future__ import annotations

import glob
import json
import os

import jax
import numpy as np
import pytest

from conftest import small_config, steps_on_one_and_eight_devices



def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_overfits_a_fixed_batch(shapes_data_dir, tmp_path):
    from dalle2_jax.training.partitioning import global_batch
    from dalle2_jax.training.trainer import Run

    cfg = small_config(shapes_data_dir, total_steps=120, **{"optimizer.schedule": "constant",
                                                             "optimizer.warmup_steps": 10,
                                                             "optimizer.weight_decay": 0.0})
    run = Run(cfg, str(tmp_path))
    it = iter(run.stage.train_iterator(16, 0, 1))
    batch = global_batch(next(it), run.mesh)
    step = run.compile_step(None)
    state = run.init_state()
    losses = []
    for _ in range(120):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] / 8, (losses[0], losses[-1])
    assert float(metrics["i2t_acc"]) == 1.0
    (jitted,) = run._jitted.values()
    assert jitted._cache_size() == 1  # compiled once, never again


def test_sharded_step_equals_single_device(shapes_data_dir, tmp_path):
    out = steps_on_one_and_eight_devices("small_config", (shapes_data_dir,), dict(data=2, fsdp=4, tensor=1),
                                         str(tmp_path), steps=2)
    np.testing.assert_allclose(out["eight"]["losses"], out["one"]["losses"], rtol=1e-5)
    np.testing.assert_allclose(out["eight"]["params"], out["one"]["params"], atol=2e-5)
    assert out["one"]["shard_counts"] == [1]
    assert max(out["eight"]["shard_counts"]) == 8  # params are really spread over the mesh


def test_checkpoint_round_trip_is_exact(trained_clip, tmp_path):
    from dalle2_jax.training import checkpoint as ckpt
    from dalle2_jax.training.trainer import Run

    cfg = ckpt.read_config(trained_clip)
    run = Run(cfg, trained_clip, prepare=False)
    mngr = ckpt.make_manager(trained_clip, read_only=True)
    assert mngr.all_steps() == [2, 4]
    state, meta = ckpt.restore(mngr, 4, run.abstract_state, None)
    assert meta["step"] == 4 and meta["examples_seen"] == 4 * cfg.batch_size
    assert meta["config"] == json.load(open(os.path.join(trained_clip, "config.json")))  # config saved too
    # save the restored state elsewhere and read it back: bit-identical
    other = ckpt.make_manager(str(tmp_path), async_save=True)
    ckpt.save(other, 4, state, meta, None)
    other.wait_until_finished()
    again, meta2 = ckpt.restore(other, 4, run.abstract_state, None)
    for a, b in zip(_leaves(state), _leaves(again)):
        np.testing.assert_array_equal(a, b)
    assert meta2 == meta
    # the frozen-stage loader returns the EMA params
    _, params, info = ckpt.load_params(trained_clip)
    assert info == {"step": 4, "params": "ema"}
    for a, b in zip(_leaves(state.ema_params), _leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_resume_continues_where_it_stopped(trained_clip, shapes_data_dir, tmp_path, capsys):
    """2 steps, stop, rerun to 4: identical to the uninterrupted 4-step run (data order and RNG too)."""
    from dalle2_jax.training import checkpoint as ckpt
    from dalle2_jax.training.trainer import train

    workdir = str(tmp_path / "w")
    train(small_config(shapes_data_dir, total_steps=2, **{"profile.start_step": 2, "profile.num_steps": 1}), workdir)
    assert "profiled steps 2..2: trace in" in capsys.readouterr().out  # and the trace does not change the run
    traces = glob.glob(os.path.join(workdir, "tensorboard", "plugins", "profile", "*", "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 1000
    train(small_config(shapes_data_dir, total_steps=4), workdir)
    out = capsys.readouterr().out
    assert "resuming from step 2" in out
    assert "total_steps 2 -> 4" in out  # the changed run key is reported
    _, resumed, _ = ckpt.load_params(workdir, prefer_ema=False)
    _, straight, _ = ckpt.load_params(trained_clip, prefer_ema=False)
    for a, b in zip(_leaves(resumed), _leaves(straight)):
        np.testing.assert_array_equal(a, b)


def test_changed_model_is_refused_on_resume(trained_clip, shapes_data_dir):
    from dalle2_jax.training.config import ConfigError
    from dalle2_jax.training.trainer import train

    with pytest.raises(ConfigError, match="model.text.depth"):
        train(small_config(shapes_data_dir, **{"model.text.depth": 3}), trained_clip)


def test_init_from_loads_params_only(trained_clip, shapes_data_dir, tmp_path):
    from dalle2_jax.training import checkpoint as ckpt
    from dalle2_jax.training.trainer import Run, _init_from

    run = Run(small_config(shapes_data_dir), str(tmp_path))
    state = _init_from(run, run.init_state(), trained_clip)
    _, source, _ = ckpt.load_params(trained_clip)  # the EMA params
    for a, b in zip(_leaves(state.params), _leaves(source)):
        np.testing.assert_array_equal(a, b)
    assert int(state.step) == 0  # optimizer state and step start fresh
