"""karlo's (diffusers unCLIP) sampling against diffusers' own (issue 11, part 4), without torch.

tests/fixtures/karlo_tiny/reference.npz holds, from scripts/make_karlo_fixtures.py (run once with torch and
diffusers): UnCLIPScheduler's inference timesteps and single step() outputs for the pipeline's three
scheduler configs on fixed model outputs, samples and injected noise (sched/*).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle2_jax import diffusion as D

TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "karlo_tiny")
STEP_TOL = 1e-5

# our settings for each of the pipeline's UnCLIPScheduler configs: (model output, learned variance, clip)
KARLO_SAMPLING = {"prior": ("x0", False, 5.0), "decoder": ("eps", True, 1.0), "super_res": ("eps", False, 1.0)}


@pytest.fixture(scope="module")
def ref():
    with open(os.path.join(TINY, "index.json")) as f:
        index = json.load(f)
    return index, dict(np.load(os.path.join(TINY, "reference.npz")))


def karlo_diffusion(stage: str, steps: int) -> D.Diffusion:
    """The respaced chain karlo's `stage` samples with: cosine over 1000 steps, karlo_timesteps(steps), in
    diffusers' float32 arithmetic."""
    output, learned, _ = KARLO_SAMPLING[stage]
    return D.unclip_diffusion(steps, model_output=output, learned_variance=learned)


def nhwc(a: np.ndarray) -> np.ndarray:
    """diffusers' NCHW -> our NHWC (a [B, E] embedding unchanged)."""
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


@pytest.mark.parametrize("stage", list(KARLO_SAMPLING))
def test_scheduler_steps_match_diffusers(ref, stage):
    """UnCLIPScheduler.set_timesteps(n) == our uniform respacing's timesteps (decreasing), and one step() of
    the default-length chain (prev_timestep = the next timestep, None at the last) == our ddpm_step with the
    same model output, sample and noise, within 1e-5, at the first, second, middle, second-to-last and last
    positions: x0 clipped at the config's range (x0 output for the prior, eps for the others), the decoder's
    learned range from the conditional v, fixed small log-variance for the prior and super-res, no noise at
    t = 0."""
    index, arrays = ref
    cfg = index["schedulers"]["configs"][stage]
    output, learned, clip = KARLO_SAMPLING[stage]
    assert (cfg["prediction_type"], cfg["variance_type"], cfg["clip_sample_range"]) == (
        {"x0": "sample", "eps": "epsilon"}[output], "learned_range" if learned else "fixed_small_log", clip)
    for n in index["schedulers"]["set_timesteps"]:
        np.testing.assert_array_equal(karlo_diffusion(stage, n).timesteps[::-1], arrays[f"sched/{stage}/timesteps_{n}"])
    n = index["schedulers"]["default_steps"][stage]
    diff = karlo_diffusion(stage, n)
    g = lambda k: arrays[f"sched/{stage}/{k}"]  # noqa: E731
    step = jax.jit(lambda x, i, out, noise: D.ddpm_step(diff, x, i, out, noise, variance="small", clip_x0=clip))
    errs = []
    for j, pos in enumerate(g("positions")):
        i = n - 1 - int(pos)  # our step index: the chain runs i = n - 1 .. 0
        assert diff.timesteps[i] == g(f"timesteps_{n}")[pos]
        prev, x0 = step(jnp.asarray(nhwc(g("sample")[j])), i, jnp.asarray(nhwc(g("model_output")[j])),
                        jnp.asarray(nhwc(g("noise")[j])))
        np.testing.assert_allclose(np.asarray(x0), nhwc(g("pred_original_sample")[j]), atol=STEP_TOL, rtol=0)
        errs.append(float(np.abs(np.asarray(prev) - nhwc(g("prev_sample")[j])).max()))
    print(stage, "max |ours - diffusers| per step:", ["%.2e" % e for e in errs])
    assert max(errs) < STEP_TOL, errs
    # the same chain with float64-exact constants (our default respacing) differs only by diffusers' float32
    # rounding: most at t = 999 (1 - 0.999) and t = 0 (1 - abar_0), and by < 3e-3 of the clip range
    exact = D.respace(D.make_diffusion("cosine", 1000, model_output=output, learned_variance=learned), n)[0]
    np.testing.assert_array_equal(exact.timesteps, diff.timesteps)
    last = len(g("positions")) - 1
    prev, _ = D.ddpm_step(exact, jnp.asarray(nhwc(g("sample")[last])), 0, jnp.asarray(nhwc(g("model_output")[last])),
                          jnp.asarray(nhwc(g("noise")[last])), clip_x0=clip)
    assert 1e-5 < float(np.abs(np.asarray(prev) - nhwc(g("prev_sample")[last])).max()) < 3e-3 * clip
    # the steps really differ: the noise is used except at t = 0, and x0 is clipped somewhere
    assert np.abs(g("pred_original_sample")).max() == pytest.approx(clip)
