"""Elastic restore: a checkpoint written on one mesh restores onto another (8 devices, fsdp -> 4 devices, data)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_SCRIPT = """
import json, sys
import jax, numpy as np
from absl import flags
flags.FLAGS.mark_as_parsed()
sys.path.insert(0, {tests!r})
import conftest
from dalle2_jax.training import checkpoint as ckpt
from dalle2_jax.training.partitioning import global_batch
from dalle2_jax.training.trainer import Run

assert jax.device_count() == 8
cfg = conftest.small_prior_config({data!r}, {clip!r})
cfg.mesh.update(dict(data=1, fsdp=8, tensor=1))
run8 = Run(cfg, {workdir!r})
it = iter(run8.stage.train_iterator(cfg.batch_size, 0, 1))
state = run8.init_state()
step = run8.compile_step(run8.stage.load_frozen())
for _ in range(2):
    state, _ = step(state, global_batch(next(it), run8.mesh))
mngr = ckpt.make_manager({workdir!r})
ckpt.save(mngr, 2, state, {{"step": 2}}, it)
mngr.wait_until_finished()
saved = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]
fsdp_sharded = sum(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
                   for x in jax.tree.leaves(state.params))

cfg4 = conftest.small_prior_config({data!r}, {clip!r})
cfg4.mesh.update(dict(data=4, fsdp=1, tensor=1))
run4 = Run(cfg4, {workdir!r}, prepare=False, devices=jax.devices()[:4])
it4 = iter(run4.stage.train_iterator(cfg4.batch_size, 0, 1))
restored, meta = ckpt.restore(mngr, 2, run4.abstract_state, it4)
same = all(np.array_equal(a, np.asarray(b)) for a, b in zip(saved, jax.tree.leaves(jax.device_get(restored))))
device_sets = sorted({{len(x.sharding.device_set) for x in jax.tree.leaves(restored)}})
replicated_params = all(x.sharding.is_fully_replicated for x in jax.tree.leaves(restored.params))
# the data iterator continues where the 8-device run stopped: the same next batch
b8, b4 = next(it), next(it4)
same_batch = all(np.array_equal(b8[k], b4[k]) for k in b8)
step4 = run4.compile_step(run4.stage.load_frozen())
restored, metrics = step4(restored, global_batch(b4, run4.mesh))
print(json.dumps(dict(same=same, device_sets=device_sets, replicated_params=replicated_params,
                      fsdp_sharded=int(fsdp_sharded), step=int(meta["step"]), same_batch=same_batch,
                      next_step=int(restored.step), loss=float(metrics["loss"]))))
"""


@pytest.mark.slow
def test_checkpoint_from_fsdp_on_8_devices_restores_data_parallel_on_4(tmp_path, shapes_data_dir, trained_clip):
    """The prior (a frozen CLIP, EMA, Adam state) trained 2 steps with its params FSDP-sharded over 8 devices,
    checkpointed by orbax, restored onto a 4-device data-parallel mesh: every leaf equal, laid out on the
    new mesh (params replicated there), the data iterator at the same place, and a step runs."""
    tests = os.path.dirname(os.path.abspath(__file__))
    script = _SCRIPT.format(tests=tests, data=shapes_data_dir, clip=trained_clip, workdir=str(tmp_path / "prior"))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["fsdp_sharded"] > 0  # the saved params really were sharded over fsdp
    assert out["same"] and out["step"] == 2 and out["same_batch"]
    assert out["device_sets"] == [4] and out["replicated_params"]
    assert out["next_step"] == 3 and out["loss"] == out["loss"]  # finite
