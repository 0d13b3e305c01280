"""Sampling sharded over the mesh's batch axes: evaluation (run_batched) and the inference pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_RUN_BATCHED = """
import json
import jax, jax.numpy as jnp, numpy as np
from dalle2_jax.stages.image_diffusion import run_batched
from dalle2_jax.training.partitioning import data_parallel_mesh

mesh = data_parallel_mesh()
seen = []

@jax.jit
def double(x):
    return x * 2

def fn(x, i):
    seen.append((len(x.sharding.device_set), str(x.sharding.spec), x.shape[0]))
    return double(x)

x = np.arange(20 * 3, dtype=np.float32).reshape(20, 3)
out = run_batched(fn, 6, x, mesh=mesh)  # 6 rounds up to 8 rows per batch: 3 batches, the last padded
print(json.dumps(dict(seen=seen, equal=bool(np.array_equal(out, x * 2)), shape=list(out.shape))))
"""

_PIPELINE = """
import json
import jax, numpy as np
from dalle2_jax.inference.pipeline import UnCLIPPipeline
from dalle2_jax.training.partitioning import data_parallel_mesh

one = UnCLIPPipeline.from_bundle({bundle!r}, log=lambda m: None)
eight = UnCLIPPipeline.from_bundle({bundle!r}, log=lambda m: None, mesh=data_parallel_mesh())
a = one.generate(["a red circle"], num_images=8, seed=3, num_upsamplers=0)
b = eight.generate(["a red circle"], num_images=8, seed=3, num_upsamplers=0)
shard_counts = sorted({{len(x.sharding.device_set) for x in jax.tree.leaves(eight.decoder.params)}})
diff = np.abs(a.images.astype(int) - b.images.astype(int))
print(json.dumps(dict(max_diff=int(diff.max()), mean_diff=float(diff.mean()), shard_counts=shard_counts,
                      emb_diff=float(np.abs(a.image_embeddings - b.image_embeddings).max()))))
"""


def _run8(script: str) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_evaluation_batches_are_split_over_every_device():
    out = _run8(_RUN_BATCHED)
    assert out["equal"] and out["shape"] == [20, 3]
    assert [s[2] for s in out["seen"]] == [8, 8, 8]
    assert all(s[0] == 8 and "data" in s[1] for s in out["seen"])  # each batch on all 8 devices, rows split


@pytest.mark.slow
def test_pipeline_sampling_on_8_devices_matches_one_device(tiny_bundle):
    """The same seed and batch give the same images whether one device samples all 8 rows or 8 devices one
    row each (the random draws do not depend on the sharding); params replicated on all 8."""
    out = _run8(_PIPELINE.format(bundle=tiny_bundle))
    assert out["shard_counts"] == [8]
    assert out["emb_diff"] < 1e-4
    assert out["max_diff"] <= 2 and out["mean_diff"] < 0.05, out
