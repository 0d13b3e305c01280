"""karlo's (diffusers unCLIP) sampling against diffusers' own (issue 11, part 4), without torch.

tests/fixtures/karlo_tiny/reference.npz holds, from scripts/make_karlo_fixtures.py (run once with torch and
diffusers): UnCLIPScheduler's inference timesteps and single step() outputs for the pipeline's three
scheduler configs on fixed model outputs, samples and injected noise (sched/*); one classifier-free-guided
step of the pipeline's prior and decoder loops on the tiny components (guided/*); and the pipeline's three
loops chained at 2/2/2 steps with every random draw injected (chain/*, with chain_prior/: a tiny prior sized
for the tiny decoder).
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


def _both_halves(arrays: dict, name: str, b: int) -> dict:
    """{emb, states, mask}: the doubled batch [uncond rows (the one empty-caption row repeated), cond rows]."""
    g = lambda k: arrays[f"guided/{name}/{k}"]  # noqa: E731
    return {k: np.concatenate([np.repeat(g(f"uncond_text_{k}"), b, 0), g(f"text_{k}")])
            for k in ("emb", "states", "mask")}


def test_guided_prior_step_matches_diffusers(ref):
    """One step of UnCLIPPipeline's prior loop on the tiny prior: the doubled batch [empty caption, caption]
    through our imported prior, guidance 4 on its x0 output (combine_guidance), then ddpm_step on
    unclip_diffusion(25) with x0 clipped at 5 and the injected noise: diffusers' guided x0 and next sample
    within 1e-5 of their scale."""
    from dalle2_jax.models.prior import build_prior
    from dalle2_jax.tools import import_karlo as K

    index, arrays = ref
    g = lambda k: arrays[f"guided/prior/{k}"]  # noqa: E731
    imported = K.load_prior(os.path.join(TINY, "prior"))
    m = imported.config.model
    m.dtype = "float32"
    model = build_prior(m, int(m.clip_embed_dim), int(m.clip_context_length))
    x, b = g("x_t"), len(g("x_t"))
    t, _ = g("timesteps")
    both = _both_halves(arrays, "prior", b)
    out = jax.jit(model.apply)(imported.variables, jnp.asarray(np.concatenate([x, x])), jnp.full((2 * b,), t),
                               jnp.asarray(both["emb"]), jnp.asarray(both["states"]), jnp.asarray(both["mask"]),
                               jnp.zeros((2 * b,), bool))
    guided = D.combine_guidance(out[b:], out[:b], 4.0)
    n, pos = index["schedulers"]["default_steps"]["prior"], index["guided"]["position"]
    diff = karlo_diffusion("prior", n)
    i = n - 1 - pos
    assert diff.timesteps[i] == t
    prev, _ = D.ddpm_step(diff, jnp.asarray(x), i, guided, jnp.asarray(g("noise")), clip_x0=5.0)
    err_x0 = float(np.abs(np.asarray(guided) - g("guided_x0")).max())
    err = float(np.abs(np.asarray(prev) - g("prev_sample")).max())
    print(f"guided prior step: x0 {err_x0:.2e} (max {np.abs(g('guided_x0')).max():.2f}), next sample {err:.2e}")
    assert err_x0 < 1e-5 * np.abs(g("guided_x0")).max() and err < 1e-5 * max(1.0, np.abs(g("prev_sample")).max())
    assert np.abs(g("guided_x0")).max() > 5.0  # the clip acts


def test_guided_decoder_step_matches_diffusers(ref):
    """One step of UnCLIPPipeline's decoder loop on the tiny text_proj + decoder: the doubled batch [the
    learned null image embedding with the empty caption's encodings, the image embedding with the caption's]
    through our imported UNet, guidance 8 on eps with the variance value from the conditional half, then
    ddpm_step on unclip_diffusion(25) (learned range, x0 clipped at 1) with the injected noise: diffusers'
    guided output and next sample within 1e-5 of their scale."""
    from dalle2_jax.stages import get_stage_class
    from dalle2_jax.tools import import_karlo as K

    index, arrays = ref
    g = lambda k: arrays[f"guided/decoder/{k}"]  # noqa: E731
    imported = K.load_decoder(os.path.join(TINY, "decoder"), os.path.join(TINY, "text_proj"))
    imported.config.model.dtype = "float32"
    stage = get_stage_class("decoder")(imported.config, "")
    stage.setup_model()
    x, b = nhwc(g("x_t")), len(g("x_t"))
    t, _ = g("timesteps")
    both = _both_halves(arrays, "decoder", b)
    forward = jax.jit(lambda v, x2, t2, img, emb, st, mask, drop: stage.unet.apply(
        v, x2, t2, image_emb=img, text_emb=emb, text_states=st, text_mask=mask, drop_image=drop))
    out = forward(imported.variables, np.concatenate([x, x]), np.full((2 * b,), t, np.int32),
                  np.concatenate([g("image_emb")] * 2), both["emb"], both["states"], both["mask"],
                  np.arange(2 * b) < b)
    guided = D.combine_guidance(out[b:], out[:b], 8.0, learned_variance=True)
    n, pos = index["schedulers"]["default_steps"]["decoder"], index["guided"]["position"]
    diff = karlo_diffusion("decoder", n)
    i = n - 1 - pos
    assert diff.timesteps[i] == t
    prev, _ = D.ddpm_step(diff, jnp.asarray(x), i, guided, jnp.asarray(nhwc(g("noise"))), clip_x0=1.0)
    want_out, want_prev = nhwc(g("guided_output")), nhwc(g("prev_sample"))
    err_out = float(np.abs(np.asarray(guided) - want_out).max())
    err = float(np.abs(np.asarray(prev) - want_prev).max())
    print(f"guided decoder step: output {err_out:.2e} (max {np.abs(want_out).max():.2f}), next sample {err:.2e}")
    assert err_out < 1e-5 * np.abs(want_out).max() and err < 1e-5 * max(1.0, np.abs(want_prev).max())


def test_two_step_chain_matches_diffusers(ref):
    """UnCLIPPipeline's loops after the text encoder, 2/2/2 steps on the tiny components (a prior sized for
    the tiny decoder, chain_prior/), every random draw injected: our imported models through sample_ddpm on
    unclip_diffusion (the fixture's starting latents as x_T and its scheduler noise as step_noise) -- prior
    with guidance 4 on x0 clipped at 5, un-normalised with karlo's stats; text_proj + decoder with guidance 8
    on eps, the learned range from the conditional half, clamped to [-1, 1]; super_res_first then
    super_res_last on the final step -- give diffusers' image embeddings, 16 px decoder image and super-res
    sample within 1e-3 (measured <= 2e-5)."""
    from dalle2_jax.models.prior import build_prior
    from dalle2_jax.stages import get_stage_class
    from dalle2_jax.tools import import_karlo as K

    index, arrays = ref
    g = lambda k: arrays[f"chain/{k}"]  # noqa: E731
    steps = index["chain"]["steps"]
    b = index["chain"]["batch"]
    rep = lambda a: np.repeat(a, b, 0)  # noqa: E731
    emb2 = np.concatenate([g("text_emb"), rep(g("uncond_text_emb"))])  # our order: [cond, uncond]
    states2 = np.concatenate([g("text_states"), rep(g("uncond_text_states"))])
    mask2 = np.concatenate([g("text_mask"), rep(g("uncond_text_mask"))])

    def noises(stage):
        """(x_T, step_noise [N, ...]): the fixture's starting latents and each step's noise (the last unused)."""
        nz = np.stack([nhwc(a) for a in g(f"{stage}/noise")])
        return jnp.asarray(nz[0]), jnp.asarray(np.concatenate([nz[1:], np.zeros_like(nz[:1])]))

    key = jax.random.key(0)  # unused: every draw is given
    errs = {}

    # prior
    imported = K.load_prior(os.path.join(TINY, "chain_prior"))
    m = imported.config.model
    m.dtype = "float32"
    prior = build_prior(m, int(m.clip_embed_dim), int(m.clip_context_length))

    def prior_denoise(params, x, t):
        out = prior.apply(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]), emb2, states2, mask2,
                          jnp.zeros((2 * b,), bool))
        return D.combine_guidance(out[:b], out[b:], 4.0)

    x_T, step_noise = noises("prior")
    diff = karlo_diffusion("prior", steps["prior"])
    x = jax.jit(lambda p: D.sample_ddpm(diff, lambda x, t: prior_denoise(p, x, t), x_T.shape, key, clip_x0=5.0,
                                        x_T=x_T, step_noise=step_noise))(imported.variables)
    image_emb = np.asarray(x) * imported.stats["std"] + imported.stats["mean"]
    errs["prior/image_emb"] = float(np.abs(image_emb - g("prior/image_emb")).max())

    # text_proj + decoder
    imported = K.load_decoder(os.path.join(TINY, "decoder"), os.path.join(TINY, "text_proj"))
    imported.config.model.dtype = "float32"
    stage = get_stage_class("decoder")(imported.config, "")
    stage.setup_model()
    img2 = np.concatenate([image_emb, image_emb]).astype(np.float32)
    drop = np.arange(2 * b) >= b

    def decoder_denoise(params, x, t):
        out = stage.unet.apply(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]), image_emb=img2,
                               text_emb=emb2, text_states=states2, text_mask=mask2, drop_image=drop)
        return D.combine_guidance(out[:b], out[b:], 8.0, learned_variance=True)

    x_T, step_noise = noises("decoder")
    diff = karlo_diffusion("decoder", steps["decoder"])
    x = jax.jit(lambda p: D.sample_ddpm(diff, lambda x, t: decoder_denoise(p, x, t), x_T.shape, key, clip_x0=1.0,
                                        x_T=x_T, step_noise=step_noise))(imported.variables)
    image_small = np.clip(np.asarray(x), -1.0, 1.0)
    errs["decoder/image"] = float(np.abs(image_small - nhwc(g("decoder/image"))).max())

    # super-res: super_res_first on every step but the last (t = 0), super_res_last on the last
    imported = K.load_super_res(os.path.join(TINY, "super_res_first"), os.path.join(TINY, "super_res_last"))
    imported.config.model.dtype = "float32"
    stage = get_stage_class("upsampler")(imported.config, "")
    stage.setup_model()
    low = jnp.asarray(image_small)

    def sr_denoise(first, last, x, t):
        return jax.lax.cond(t[0] == 0, lambda: stage.unet.apply(last, x, t, low_res=low),
                            lambda: stage.unet.apply(first, x, t, low_res=low))

    x_T, step_noise = noises("super_res")
    diff = karlo_diffusion("super_res", steps["super_res"])
    run_sr = jax.jit(lambda f, la: D.sample_ddpm(diff, lambda x, t: sr_denoise(f, la, x, t), x_T.shape, key,
                                                 clip_x0=1.0, x_T=x_T, step_noise=step_noise))
    x = run_sr(imported.first, imported.last)
    # the last step's model is seen: super_res_first throughout gives another sample
    assert float(np.abs(np.asarray(run_sr(imported.first, imported.first)) - nhwc(g("super_res/sample"))).max()) > 1e-3
    errs["super_res/sample"] = float(np.abs(np.asarray(x) - nhwc(g("super_res/sample"))).max())
    image = np.clip(np.asarray(x) * 0.5 + 0.5, 0.0, 1.0)
    errs["image"] = float(np.abs(image - g("image")).max())
    print("2/2/2-step chain, max |ours - diffusers|:", {k: f"{v:.2e}" for k, v in errs.items()})
    assert max(errs.values()) < 1e-3, errs


def test_two_step_chain_through_the_stages_matches_diffusers(ref):
    """The same 2/2/2-step chain through the stages' own sampling entry points (the karlo configs'
    diffusion.schedule_arithmetic="unclip", the prior's sampling.clip_x0=5 and raw output, the empty caption's
    encodings as the unconditional inputs of the prior and the decoder, the decoder's eps-only guidance with the
    conditional variance, the super-res stage's {"main", "last_step"} params with the last on the final step):
    make_sampler(...)(..., x_T, step_noise) gives diffusers' image embeddings, decoder image, super-res sample
    and final image within 1e-3 (measured <= 2e-5)."""
    from dalle2_jax.stages import get_stage_class
    from dalle2_jax.tools import import_karlo as K

    index, arrays = ref
    g = lambda k: arrays[f"chain/{k}"]  # noqa: E731
    steps = index["chain"]["steps"]
    text = tuple(jnp.asarray(g(f"text_{k}")) for k in ("emb", "states", "mask"))
    uncond = tuple(jnp.asarray(g(f"uncond_text_{k}")) for k in ("emb", "states", "mask"))

    def noises(stage):
        nz = np.stack([nhwc(a) for a in g(f"{stage}/noise")])
        return jnp.asarray(nz[0]), jnp.asarray(np.concatenate([nz[1:], np.zeros_like(nz[:1])]))

    key = jax.random.key(0)
    errs = {}

    imported = K.load_prior(os.path.join(TINY, "chain_prior"))
    cfg = imported.config
    cfg.model.dtype = "float32"
    assert cfg.diffusion.schedule_arithmetic == "unclip" and cfg.sampling.clip_x0 == 5.0
    prior = get_stage_class("prior")(cfg, "")
    m = cfg.model
    prior.clip_embed_dim, prior.text_width, prior.context_length = (
        int(m.clip_embed_dim), int(m.clip_text_width), int(m.clip_context_length))
    prior._build_prior()
    prior.emb_mean, prior.emb_std = (np.asarray(imported.stats[k], np.float32).reshape(-1) for k in ("mean", "std"))
    x_T, step_noise = noises("prior")
    sample = prior.make_sampler(steps=steps["prior"], guidance_scale=4.0)
    image_emb = np.asarray(sample(imported.variables, *text, key, None, uncond, x_T, step_noise))
    errs["prior/image_emb"] = float(np.abs(image_emb - g("prior/image_emb")).max())
    with pytest.raises(ValueError, match="no learned null embedding"):
        sample(imported.variables, *text, key)

    imported = K.load_decoder(os.path.join(TINY, "decoder"), os.path.join(TINY, "text_proj"))
    imported.config.model.dtype = "float32"
    assert imported.config.diffusion.schedule_arithmetic == "unclip"
    stage = get_stage_class("decoder")(imported.config, "")
    stage.setup_model()
    x_T, step_noise = noises("decoder")
    sample = stage.make_sampler(steps=steps["decoder"], guidance_scale=8.0, output="model")
    image_small = np.asarray(sample(imported.variables, jnp.asarray(image_emb), None, key, x_T, text, uncond,
                                    step_noise))
    errs["decoder/image"] = float(np.abs(image_small - nhwc(g("decoder/image"))).max())

    imported = K.load_super_res(os.path.join(TINY, "super_res_first"), os.path.join(TINY, "super_res_last"))
    imported.config.model.dtype = "float32"
    assert imported.config.model.last_step_model
    stage = get_stage_class("upsampler")(imported.config, "")
    stage.setup_model()
    x_T, step_noise = noises("super_res")
    # the tiny chain's decoder and super-res are both 16 px (the pipeline samples at super_res_first's
    # sample_size); karlo's are 64 and 256, the stage's factor 4
    sample = stage.make_sampler(steps=steps["super_res"], output="model", size=x_T.shape[1])
    x = np.asarray(sample({"main": imported.first, "last_step": imported.last}, jnp.asarray(image_small), key, x_T,
                          step_noise))
    errs["super_res/sample"] = float(np.abs(x - nhwc(g("super_res/sample"))).max())
    errs["image"] = float(np.abs(np.clip(x * 0.5 + 0.5, 0.0, 1.0) - g("image")).max())
    # the last step's weights are used: main on every step gives another sample
    same = np.asarray(sample({"main": imported.first, "last_step": imported.first}, jnp.asarray(image_small), key,
                             x_T, step_noise))
    assert float(np.abs(same - nhwc(g("super_res/sample"))).max()) > 1e-3
    print("2/2/2-step chain through the stages, max |ours - diffusers|:", {k: f"{v:.2e}" for k, v in errs.items()})
    assert max(errs.values()) < 1e-3, errs


def test_schedule_arithmetic_config_key():
    """diffusion.schedule_arithmetic: "unclip" (the karlo configs) samples on unclip_diffusion, the default
    on our float64 respacing; unknown values and "unclip" on another schedule are refused by key."""
    import configs.decoder as dc
    import configs.prior as pc
    import configs.upsampler as uc
    from dalle2_jax.stages.base import sampling_chain, validate_diffusion_keys
    from dalle2_jax.training.config import ConfigError

    for cfg in (pc.get_config("karlo"), dc.get_config("karlo"), uc.get_config("karlo_64to256")):
        assert cfg.diffusion.schedule_arithmetic == "unclip"
        d = cfg.diffusion
        base = D.make_diffusion(d.schedule, d.num_steps, model_output=d.model_output,
                                learned_variance=d.learned_variance)
        got = sampling_chain(base, cfg, 7)
        want = D.unclip_diffusion(7, model_output=d.model_output, learned_variance=d.learned_variance)
        np.testing.assert_array_equal(got.timesteps, want.timesteps)
        np.testing.assert_array_equal(np.asarray(got.sqrt_alphas_cumprod), np.asarray(want.sqrt_alphas_cumprod))
        validate_diffusion_keys(cfg, ("ddpm", "ddim"))
        d.schedule_arithmetic = "exact"
        np.testing.assert_array_equal(sampling_chain(base, cfg, 7).timesteps, D.respace(base, 7)[0].timesteps)
        d.schedule_arithmetic = "float16"
        with pytest.raises(ConfigError, match="schedule_arithmetic"):
            validate_diffusion_keys(cfg, ("ddpm", "ddim"))
        d.schedule_arithmetic, d.schedule = "unclip", "linear"
        with pytest.raises(ConfigError, match="schedule_arithmetic"):
            validate_diffusion_keys(cfg, ("ddpm", "ddim"))
    assert "schedule_arithmetic" not in pc.get_config("tiny").diffusion  # other configs unchanged


def test_bundle_stage_loads_both_super_res_models(ref, tmp_path):
    """An upsampler bundle stage with model.last_step_model (karlo_64to256) holds two params trees, roles
    "main" (super_res_first) and "last_step" (super_res_last): load_stage_params restores both exactly as
    {"main", "last_step"}, which the stage's sampler runs to diffusers' super-res sample (the chain fixture's
    decoder image in, within 1e-3); a manifest without the last_step role is refused naming the roles."""
    from dalle2_jax.inference.bundle import BundleError, _save_params, build_stage, load_stage_params
    from dalle2_jax.tools import import_karlo as K
    from dalle2_jax.training.config import config_to_json

    index, arrays = ref
    g = lambda k: arrays[f"chain/{k}"]  # noqa: E731
    imported = K.load_super_res(os.path.join(TINY, "super_res_first"), os.path.join(TINY, "super_res_last"))
    cfg = imported.config
    cfg.model.dtype = "float32"
    sdir = tmp_path / "sr"
    sdir.mkdir()
    (sdir / "config.json").write_text(config_to_json(cfg))
    for role, tree in (("main", imported.first), ("last_step", imported.last)):
        _save_params(str(sdir / role), jax.device_get(tree))
    entry = {"name": "sr", "kind": "upsampler", "dir": "sr",
             "models": {r: {"params": f"sr/{r}", "dtype": "float32"} for r in ("main", "last_step")}}
    stage = build_stage("upsampler", cfg, str(sdir), None)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params = load_stage_params(str(tmp_path), entry, stage, sharding)
    assert set(params) == {"main", "last_step"}
    for role, tree in (("main", imported.first), ("last_step", imported.last)):
        for a, b in zip(jax.tree.leaves(params[role]), jax.tree.leaves(tree)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    nz = np.stack([nhwc(a) for a in g("super_res/noise")])
    x_T, step_noise = jnp.asarray(nz[0]), jnp.asarray(np.concatenate([nz[1:], np.zeros_like(nz[:1])]))
    sample = stage.make_sampler(steps=index["chain"]["steps"]["super_res"], output="model", size=x_T.shape[1])
    x = np.asarray(sample(params, jnp.asarray(nhwc(g("decoder/image"))), jax.random.key(0), x_T, step_noise))
    err = float(np.abs(x - nhwc(g("super_res/sample"))).max())
    print(f"bundle super-res stage: max |ours - diffusers| {err:.2e}")
    assert err < 1e-3
    del entry["models"]["last_step"]
    with pytest.raises(BundleError, match=r"'sr': its config runs the models \['main', 'last_step'\] but the "
                                          r"manifest holds \['main'\]"):
        load_stage_params(str(tmp_path), entry, stage, sharding)


def test_cascade_check_pairs_raw_prior_with_raw_decoder():
    """check_cascade: karlo's prior (model.normalize_embedding=False, raw embeddings) fits karlo's decoder (raw
    embeddings) and not a unit-norm decoder; a unit-norm prior still refuses a raw decoder."""
    from dalle2_jax.inference.bundle import check_cascade

    clip = {"name": "clip", "kind": "clip", "interface": {"embed_dim": 8, "context_length": 4, "text_width": 8}}

    def cascade(prior_unit, decoder_unit):
        return [clip, {"name": "prior", "kind": "prior", "interface": {"embed_dim": 8, "unit_embedding": prior_unit}},
                {"name": "decoder", "kind": "decoder",
                 "interface": {"embed_dim": 8, "resolution": 64, "unit_embedding": decoder_unit}}]

    assert check_cascade(cascade(False, False)) == [] and check_cascade(cascade(True, True)) == []
    assert check_cascade(cascade(False, True)) == ["decoder: takes unit-norm CLIP embeddings but the prior samples "
                                                   "unnormalised ones (its model.normalize_embedding=False)"]
    assert "prior samples unit-norm embeddings" in check_cascade(cascade(True, False))[0]


def test_pipeline_feeds_karlo_stages_the_empty_caption(ref):
    """UnCLIPPipeline over the tiny karlo stages (a bundle assembled in memory; the CLIP text tower stubbed with
    the chain fixture's encodings, the empty caption -> its unconditional row): sample_prior passes the empty
    caption's encodings as the prior's unconditional half and decode the captions' and the empty caption's
    encodings to the clip_text_conditioning decoder -- the same outputs as the stages' samplers given them
    with the same keys -- and upsample runs the super-res stage's {"main", "last_step"} params."""
    from types import SimpleNamespace

    from dalle2_jax.inference.bundle import Bundle, LoadedStage
    from dalle2_jax.inference.pipeline import UnCLIPPipeline
    from dalle2_jax.stages import get_stage_class
    from dalle2_jax.tools import import_karlo as K

    index, arrays = ref
    g = lambda k: arrays[f"chain/{k}"]  # noqa: E731
    b = index["chain"]["batch"]
    text = tuple(g(f"text_{k}") for k in ("emb", "states", "mask"))
    uncond = tuple(g(f"uncond_text_{k}") for k in ("emb", "states", "mask"))

    class Tok:  # caption i -> [[i]], "" -> [[-1]]
        context_length = 1

        def encode_batch(self, prompts):
            return np.asarray([[-1 if p == "" else int(p)] for p in prompts], np.int32)

    imp = K.load_prior(os.path.join(TINY, "chain_prior"))
    imp.config.model.dtype = "float32"
    prior = get_stage_class("prior")(imp.config, "")
    m = imp.config.model
    prior.clip_embed_dim, prior.text_width, prior.context_length = (
        int(m.clip_embed_dim), int(m.clip_text_width), int(m.clip_context_length))
    prior._build_prior()
    prior.emb_mean, prior.emb_std = (np.asarray(imp.stats[k], np.float32).reshape(-1) for k in ("mean", "std"))
    imd = K.load_decoder(os.path.join(TINY, "decoder"), os.path.join(TINY, "text_proj"))
    imd.config.model.dtype = "float32"
    dec = get_stage_class("decoder")(imd.config, "")
    dec.setup_model()
    ims = K.load_super_res(os.path.join(TINY, "super_res_first"), os.path.join(TINY, "super_res_last"))
    ims.config.model.dtype = "float32"
    sr = get_stage_class("upsampler")(ims.config, "")
    sr.setup_model()
    sr_params = {"main": ims.first, "last_step": ims.last}
    res = int(ims.config.data.resolution)
    stages = [LoadedStage("clip", "clip", {}, SimpleNamespace(tokenizer=Tok()), None),
              LoadedStage("prior", "prior", {}, prior, imp.variables),
              LoadedStage("decoder", "decoder", {}, dec, imd.variables),
              LoadedStage("sr", "upsampler", {"interface": {"resolution": res}}, sr, sr_params)]
    pipe = UnCLIPPipeline(Bundle("mem", {}, stages), log=lambda _: None)

    def encode_text(tokens):
        rows = [uncond if i < 0 else tuple(a[i: i + 1] for a in text) for i in tokens[:, 0]]
        return tuple(np.concatenate([r[j] for r in rows]) for j in range(3))

    pipe.encode_text = encode_text
    settings = {"prior": {"steps": 2, "sampler": "ddpm", "guidance_scale": 4.0, "eta": 0.0, "num_candidates": 1},
                "decoder": {"steps": 2, "sampler": "ddpm", "guidance_scale": 8.0, "eta": 0.0},
                "sr": {"steps": 2, "sampler": "ddpm", "eta": 0.0}}
    key = jax.random.key(3)
    emb = pipe.sample_prior(*text, settings, key, b)
    want = prior.make_sampler(steps=2, guidance_scale=4.0, sampler="ddpm", num_candidates=1)(
        imp.variables, *text, jax.random.fold_in(key, 0), None, uncond)
    np.testing.assert_allclose(emb, np.asarray(want), atol=1e-6, rtol=0)
    tokens = np.arange(b, dtype=np.int32)[:, None]
    images = pipe.decode(emb, tokens, settings, key, b)  # float: karlo's super-res takes the float image
    assert pipe.float_handoff
    want = dec.make_sampler(steps=2, guidance_scale=8.0, sampler="ddpm", output="model")(
        imd.variables, emb, tokens, jax.random.fold_in(key, 0), None, text, uncond)
    np.testing.assert_array_equal(images, np.asarray(want))
    assert images.dtype == np.float32 and images.shape == (b, 16, 16, 3) and np.abs(images).max() <= 1.0
    up = pipe.upsample(images, settings, lambda i: jax.random.fold_in(key, i), b, {})["sr"]
    assert up.dtype == np.uint8 and up.shape == (b, 16 * sr.factor, 16 * sr.factor, 3)
