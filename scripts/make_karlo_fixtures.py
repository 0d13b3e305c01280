"""Builds the karlo (diffusers unCLIP) import fixtures, tests/fixtures/karlo_tiny/ and karlo_keys.json.

Run once, in an environment with torch (CPU build) and diffusers (see ../shared/STACK_NOTES.md, "Reference
environments"), never in the package's:

    python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install torch==2.13.0
    /tmp/refenv/bin/pip install diffusers transformers safetensors accelerate
    /tmp/refenv/bin/python scripts/make_karlo_fixtures.py

It writes
- tests/fixtures/karlo_tiny/prior/ (config.json + diffusion_pytorch_model.safetensors): a diffusers
  `PriorTransformer` with karlo's settings at tiny sizes (TINY_PRIOR below), every parameter perturbed
  away from its initial value (no zeros, no unit norms, a non-trivial clip_mean / clip_std), saved with
  `save_pretrained`;
- tests/fixtures/karlo_tiny/decoder/ and text_proj/: a diffusers `UNet2DConditionModel` with karlo's
  decoder block types and settings at tiny sizes (TINY_DECODER: 3 levels of 8/16/24 channels, GroupNorm
  with 2 groups so every group has >= 4 channels, as our GroupNorm needs) and an `UnCLIPTextProjModel`
  sized to it (TINY_TEXT_PROJ), perturbed the same way; the decoder's weights are stored as float16 (to
  keep the fixture small; the reference runs the float32 model holding exactly those values);
- tests/fixtures/karlo_tiny/super_res_first/ and super_res_last/: two diffusers `UNet2DModel`s with karlo's
  super-resolution settings at tiny sizes (TINY_SUPER_RES: 3 levels of 8/8/16 channels, no attention,
  additive time embedding, 6 inputs, 3 outputs; the last without a sample_size, as on the hub), perturbed
  differently, float16 weights;
- tests/fixtures/karlo_tiny/reference.npz: fixed inputs (timesteps, noisy embeddings, text embeddings,
  text token states, a text padding mask with a different length per row) and diffusers' outputs on them:
  `prior/predicted` (the raw x0 prediction, in the standardised space) and `prior/unnormalised`
  (`post_process_latents` of it: predicted * clip_std + clip_mean, as the pipeline returns embeddings);
  `text_proj/*` (the context tokens and the additive time embedding, one row with the learned null image
  embedding) and `decoder/output` (the UNet's [B, 6, H, W] on them, the pipeline's call with the text mask
  left-padded by 4 x True); `super_res/*` (x_t, a clamped 4 px low-res image, and the pipeline's bicubic
  upsampling of it) and `super_res_{first,last}/output` (each UNet on cat([x_t, upscaled]));
  `sched/{prior,decoder,super_res}/*`: each of the pipeline's UnCLIPScheduler configs' set_timesteps(n)
  and single step()s on fixed model outputs, samples and injected noise (`InjectedNoise` replaces
  diffusers' randn_tensor), at the first, second, middle, second-to-last and last positions;
  `guided/{prior,decoder}/*`: one classifier-free-guided step of the pipeline's prior / decoder loop;
- tests/fixtures/karlo_tiny/chain_prior/: a tiny prior sized for the tiny decoder (12-d CLIP, 10 tokens;
  float16 weights), and `chain/*`: the pipeline's three loops at 2/2/2 steps with every draw injected.
- tests/fixtures/karlo_tiny/index.json: versions, the inputs' description, the weights' sha256;
- tests/fixtures/karlo_keys.json: the FULL-SIZE karlo components' tensor names and shapes and their
  configs, from meta-device instantiation (no weights). Its "components" map holds one entry per
  pipeline component ("prior", "decoder", "text_proj", "super_res_first", "super_res_last"), each with
  the class, its config, the tensor count, the parameter count and the {name: shape} list in state-dict
  order. `--only prior` (or `--only decoder text_proj`, or `--only super_res_first super_res_last`, each
  pair made together; `--only schedulers` for sched/*, `--only guided` for guided/*, `--only chain` for
  chain_prior/ and chain/*) regenerates those components and keeps the others. guided and chain load the
  saved tiny components, so make those first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
TINY_DIR = os.path.join(ROOT, "karlo_tiny")
KEYS_PATH = os.path.join(ROOT, "karlo_keys.json")

# karlo's prior settings (diffusers' defaults) at tiny sizes: width 2 x 16 = 32, a 24-d CLIP (so [W, E]
# weights are not square), 12 caption tokens (so 16 positions, not karlo's 81)
TINY_PRIOR = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, embedding_dim=24, num_embeddings=12,
                  additional_embeddings=4, dropout=0.0, time_embed_act_fn="silu", norm_in_type=None,
                  embedding_proj_norm_type=None, encoder_hid_proj_type="linear", added_emb_type="prd",
                  time_embed_dim=None, embedding_proj_dim=None, clip_embed_dim=None)
# karlo's decoder (the diffusers conversion script's DECODER_CONFIG; the rest are UNet2DConditionModel's
# defaults: GroupNorm 32 / 1e-5, [cos, sin] timestep features with shift 0, SiLU)
DECODER_CONFIG = dict(sample_size=64, layers_per_block=3,
                      down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
                      up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
                      mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(320, 640, 960, 1280),
                      in_channels=3, out_channels=6, cross_attention_dim=1536, class_embed_type="identity",
                      attention_head_dim=64, resnet_time_scale_shift="scale_shift")
# the same block types at tiny sizes: attention at 8 and 4 px (not at the first level) and in the middle,
# 8-channel heads, a 20-wide context (not 4 x channels), 2 resnets per level
TINY_DECODER = dict(DECODER_CONFIG, sample_size=16, layers_per_block=2,
                    down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 2,
                    up_block_types=("SimpleCrossAttnUpBlock2D",) * 2 + ("ResnetUpsampleBlock2D",),
                    block_out_channels=(8, 16, 24), cross_attention_dim=20, attention_head_dim=8, norm_num_groups=2)
# text_proj sized to the tiny decoder: time embedding 4 x 8, a 12-d CLIP (text embedding and token states)
TINY_TEXT_PROJ = dict(clip_extra_context_tokens=4, clip_embeddings_dim=12, time_embed_dim=32, cross_attention_dim=20)
# karlo's super-resolution UNets (the conversion script's SUPER_RES_UNET_{FIRST_STEPS,LAST_STEP}_CONFIG; the
# rest are UNet2DModel's defaults: GroupNorm 32 / 1e-5, [cos, sin] timestep features with shift 0, SiLU,
# resnet_time_scale_shift "default" = the time embedding added before the second norm). The hub's
# super_res_last/config.json has no sample_size (the pipeline sizes both from super_res_first's).
SUPER_RES_CONFIG = dict(sample_size=256, layers_per_block=3, down_block_types=("ResnetDownsampleBlock2D",) * 4,
                        up_block_types=("ResnetUpsampleBlock2D",) * 4, block_out_channels=(320, 640, 960, 1280),
                        in_channels=6, out_channels=3, add_attention=False)
SUPER_RES_LAST_CONFIG = dict(SUPER_RES_CONFIG, sample_size=None)
# the same block types at tiny sizes: 3 levels of 8/8/16 channels (small: two of them are stored), 2 resnets
# per level, GroupNorm with 2
# groups (>= 4 channels per group), 16 px output from a 4 px low-res image (karlo's factor 4)
TINY_SUPER_RES = dict(SUPER_RES_CONFIG, sample_size=16, layers_per_block=2,
                      down_block_types=("ResnetDownsampleBlock2D",) * 3, up_block_types=("ResnetUpsampleBlock2D",) * 3,
                      block_out_channels=(8, 8, 16), norm_num_groups=2)
TINY_SUPER_RES_LAST = dict(TINY_SUPER_RES, sample_size=None)
SUPER_RES_LOW = 4  # the tiny low-res side
DECODER_TEXT_LENGTHS = [10, 4, 1, 7]  # valid caption tokens per row, of 10
DECODER_NULL_ROWS = [False, True, False, False]  # rows given the learned null image embedding
TIMESTEPS = [0, 1, 437, 999]
TEXT_LENGTHS = [12, 5, 1, 9]  # valid caption tokens per row (the rest is padding)


def _perturb(model, seed: int) -> None:
    """Moves every parameter away from its initial value: weights get N(0, 1/fan_in) noise added, vectors
    N(0, 0.1) (norm scales around 1), the learned embeddings N(0, 0.5); clip_std = 0.5 + U(0, 1)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name == "clip_std":
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name == "clip_mean":
                p.copy_(0.3 * noise)
            elif name in ("positional_embedding", "prd_embedding"):
                p.copy_(0.5 * noise)
            elif p.ndim >= 2:
                p.add_(noise / p.shape[1] ** 0.5)
            else:
                p.add_(0.1 * noise)
            assert bool((p != 0).all()), name


def _perturb_weights(model, seed: int) -> None:
    """Moves every parameter away from its initial value: weights (2-D and conv) get N(0, 1/fan_in) noise
    added, vectors N(0, 0.1) (norm scales around 1), the null image embedding N(0, 1)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name == "learned_classifier_free_guidance_embeddings":
                p.copy_(noise)
            elif p.ndim >= 2:
                p.add_(noise / (p[0].numel()) ** 0.5)
            else:
                p.add_(0.1 * noise)
            assert bool((p != 0).all()), name


def make_tiny_decoder(out_dir: str, seed: int = 10) -> dict:
    """Saves the tiny decoder and text_proj under out_dir/{decoder,text_proj} and returns {name: array} of
    their inputs and outputs (the pipeline's decoder call, one step)."""
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_DECODER).eval()
    text_proj = UnCLIPTextProjModel(**TINY_TEXT_PROJ).eval()
    _perturb_weights(unet, seed + 1)
    _perturb_weights(text_proj, seed + 2)
    with torch.no_grad():  # the decoder is stored as float16: compute with exactly the stored values
        for p in unet.parameters():
            p.copy_(p.half().float())
    unet.half().save_pretrained(os.path.join(out_dir, "decoder"), safe_serialization=True)
    unet.float()
    text_proj.save_pretrained(os.path.join(out_dir, "text_proj"), safe_serialization=True)

    rng = np.random.default_rng(seed + 3)
    b, e = len(TIMESTEPS), TINY_TEXT_PROJ["clip_embeddings_dim"]
    n, side = max(DECODER_TEXT_LENGTHS), TINY_DECODER["sample_size"]
    x_t = rng.standard_normal((b, 3, side, side), dtype=np.float32)
    image_emb = rng.standard_normal((b, e), dtype=np.float32)
    text_emb = (3.0 * rng.standard_normal((b, e))).astype(np.float32)
    states = rng.standard_normal((b, n, e), dtype=np.float32)
    mask = np.arange(n)[None, :] < np.asarray(DECODER_TEXT_LENGTHS)[:, None]
    null = np.asarray(DECODER_NULL_ROWS)
    t = np.asarray(TIMESTEPS, np.int64)
    T = torch.from_numpy
    with torch.no_grad():
        # the null rows as text_proj's classifier-free-guidance path makes them: the learned embedding
        cond = T(image_emb).clone()
        cond[T(null)] = text_proj.learned_classifier_free_guidance_embeddings
        context, additive = text_proj(image_embeddings=cond, prompt_embeds=T(text_emb),
                                      text_encoder_hidden_states=T(states), do_classifier_free_guidance=False)
        rows = np.flatnonzero(null)
        cfg_context, cfg_additive = text_proj(
            image_embeddings=T(image_emb[rows]), prompt_embeds=T(text_emb[np.r_[rows, rows]]),
            text_encoder_hidden_states=T(states[np.r_[rows, rows]]), do_classifier_free_guidance=True)
        assert torch.allclose(cfg_context[: len(rows)], context[rows]), "text_proj's own null rows differ"
        assert torch.allclose(cfg_additive[: len(rows)], additive[rows])
        decoder_mask = F.pad(T(mask), (TINY_TEXT_PROJ["clip_extra_context_tokens"], 0), value=True)
        out = unet(T(x_t), timestep=T(t), encoder_hidden_states=context, class_labels=additive,
                   attention_mask=decoder_mask).sample
    return {"decoder/timesteps": t.astype(np.int32), "decoder/x_t": x_t, "decoder/image_emb": image_emb,
            "decoder/text_emb": text_emb, "decoder/text_states": states, "decoder/text_mask": mask,
            "decoder/null_rows": null, "text_proj/context": context.numpy(), "text_proj/additive": additive.numpy(),
            "decoder/output": out.numpy()}


def make_tiny_super_res(out_dir: str, seed: int = 20) -> dict:
    """Saves the tiny super_res_first and super_res_last (two UNet2DModels, the same block types, perturbed
    differently) under out_dir/ and returns {name: array} of their inputs and outputs: the pipeline's
    super-res input, cat([x_t, bicubic-upsampled low-res image]), built as UnCLIPPipeline builds it."""
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DModel

    rng = np.random.default_rng(seed)
    b, side = len(TIMESTEPS), TINY_SUPER_RES["sample_size"]
    x_t = rng.standard_normal((b, 3, side, side), dtype=np.float32)
    # the decoder's output as the pipeline passes it on: clamped to [-1, 1] (some pixels saturated)
    low = np.clip(1.5 * rng.standard_normal((b, 3, SUPER_RES_LOW, SUPER_RES_LOW)), -1, 1).astype(np.float32)
    t = np.asarray(TIMESTEPS, np.int64)
    with torch.no_grad():  # UnCLIPPipeline.__call__'s upsampling (off MPS), then its model input
        upscaled = F.interpolate(torch.from_numpy(low), size=[side, side], mode="bicubic", align_corners=False,
                                 antialias=True)
        model_input = torch.cat([torch.from_numpy(x_t), upscaled], dim=1)
    arrays = {"super_res/timesteps": t.astype(np.int32), "super_res/x_t": x_t, "super_res/low_res": low,
              "super_res/upscaled": upscaled.numpy()}
    for k, (name, config) in enumerate((("super_res_first", TINY_SUPER_RES), ("super_res_last", TINY_SUPER_RES_LAST))):
        torch.manual_seed(seed + 10 * (k + 1))
        unet = UNet2DModel(**config).eval()
        _perturb_weights(unet, seed + 10 * (k + 1) + 1)
        with torch.no_grad():  # stored as float16: compute with exactly the stored values
            for p in unet.parameters():
                p.copy_(p.half().float())
        unet.half().save_pretrained(os.path.join(out_dir, name), safe_serialization=True)
        unet.float()
        with torch.no_grad():
            arrays[f"{name}/output"] = unet(model_input, timestep=torch.from_numpy(t)).sample.numpy()
    return arrays


def make_tiny_prior(out_dir: str, seed: int = 0) -> dict:
    """Saves the tiny prior under out_dir/prior and returns {name: array} of its inputs and outputs."""
    import torch
    from diffusers import PriorTransformer

    torch.manual_seed(seed)
    model = PriorTransformer(**TINY_PRIOR).eval()
    _perturb(model, seed + 1)
    model.save_pretrained(os.path.join(out_dir, "prior"), safe_serialization=True)

    rng = np.random.default_rng(seed + 2)
    b, e, n = len(TIMESTEPS), TINY_PRIOR["embedding_dim"], TINY_PRIOR["num_embeddings"]
    x_t = rng.standard_normal((b, e), dtype=np.float32)
    text_emb = (3.0 * rng.standard_normal((b, e))).astype(np.float32)  # karlo's text_embeds are not unit
    states = rng.standard_normal((b, n, e), dtype=np.float32)
    mask = np.arange(n)[None, :] < np.asarray(TEXT_LENGTHS)[:, None]
    t = np.asarray(TIMESTEPS, np.int64)
    with torch.no_grad():
        pred = model(torch.from_numpy(x_t), timestep=torch.from_numpy(t), proj_embedding=torch.from_numpy(text_emb),
                     encoder_hidden_states=torch.from_numpy(states), attention_mask=torch.from_numpy(mask)
                     ).predicted_image_embedding
        unnorm = model.post_process_latents(pred)
        # the pipeline's own call: one scalar timestep for the batch (the same as a repeated vector)
        scalar = model(torch.from_numpy(x_t), timestep=int(t[2]), proj_embedding=torch.from_numpy(text_emb),
                       encoder_hidden_states=torch.from_numpy(states), attention_mask=torch.from_numpy(mask)
                       ).predicted_image_embedding
    return {"prior/timesteps": t.astype(np.int32), "prior/x_t": x_t, "prior/text_emb": text_emb,
            "prior/text_states": states, "prior/text_mask": mask, "prior/predicted": pred.numpy(),
            "prior/unnormalised": unnorm.numpy(), "prior/predicted_t437": scalar.numpy()}


# The pipeline's three UnCLIPScheduler configs (karlo-v1-alpha's scheduler_config.json files; all
# squaredcos_cap_v2 over 1000 steps with clip_sample) and its default step counts.
SCHEDULERS = {"prior": dict(variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5.0),
              "decoder": dict(variance_type="learned_range", prediction_type="epsilon", clip_sample_range=1.0),
              "super_res": dict(variance_type="fixed_small_log", prediction_type="epsilon", clip_sample_range=1.0)}
SCHEDULER_STEPS = {"prior": 25, "decoder": 25, "super_res": 7}
SCHEDULER_SHAPES = {"prior": (2, 24), "decoder": (2, 3, 4, 4), "super_res": (2, 3, 4, 4)}
SET_TIMESTEPS = [2, 3, 7, 25]


class InjectedNoise:
    """Replaces diffusers' `randn_tensor` in the given modules by a queue of given arrays (each call takes
    the next one; its shape must be the one asked for), so the scheduler's and the pipeline's draws are
    fixed inputs of the fixture, not a torch generator's stream."""

    def __init__(self, modules, queue=()):
        self.modules, self.queue, self.saved = list(modules), list(queue), []

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        import torch

        a = self.queue.pop(0)
        assert tuple(a.shape) == tuple(shape), (a.shape, shape)
        return torch.from_numpy(np.ascontiguousarray(a)).to(dtype or torch.float32)

    def __enter__(self):
        self.saved = [m.randn_tensor for m in self.modules]
        for m in self.modules:
            m.randn_tensor = self
        return self

    def __exit__(self, *exc):
        for m, f in zip(self.modules, self.saved):
            m.randn_tensor = f
        assert not self.queue or exc[0] is not None, f"{len(self.queue)} injected noise arrays left unused"


def make_scheduler_steps(seed: int = 30) -> dict:
    """For each stage's UnCLIPScheduler config: set_timesteps(n) for n in SET_TIMESTEPS, and single step()s
    of its default-length chain at positions 0, 1, n // 2, n - 2 and n - 1 (the last: t = 0, prev_timestep
    None, no noise) as the pipeline calls them (prev_timestep = the next timestep), on fixed model outputs,
    samples and injected noise. Returns {name: array}."""
    import torch
    from diffusers import UnCLIPScheduler
    from diffusers.schedulers import scheduling_unclip

    rng = np.random.default_rng(seed)
    arrays = {}
    for stage, kwargs in SCHEDULERS.items():
        sched = UnCLIPScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                                **kwargs)
        for n in SET_TIMESTEPS:
            sched.set_timesteps(n)
            arrays[f"sched/{stage}/timesteps_{n}"] = sched.timesteps.numpy().astype(np.int32)
        n = SCHEDULER_STEPS[stage]
        sched.set_timesteps(n)
        ts = sched.timesteps.numpy()
        positions = np.asarray([0, 1, n // 2, n - 2, n - 1], np.int32)
        shape = SCHEDULER_SHAPES[stage]
        k = len(positions)
        sample = rng.standard_normal((k,) + shape).astype(np.float32)
        if stage == "prior":  # x0 predictions, some beyond the clip range 5
            out = (3.0 * rng.standard_normal((k,) + shape)).astype(np.float32)
        else:  # eps (and, for the decoder, the variance value v in [-1, 1] on 3 more channels)
            out = rng.standard_normal((k,) + shape).astype(np.float32)
            if stage == "decoder":
                v = rng.uniform(-1, 1, (k,) + shape).astype(np.float32)
                out = np.concatenate([out, v], axis=2)
        noise = rng.standard_normal((k,) + shape).astype(np.float32)
        prev, x0 = [], []
        for j, i in enumerate(positions):
            prev_t = None if i + 1 == n else int(ts[i + 1])
            queue = [noise[j]] if ts[i] > 0 else []
            with InjectedNoise([scheduling_unclip], queue), torch.no_grad():
                r = sched.step(torch.from_numpy(out[j]), int(ts[i]), torch.from_numpy(sample[j]), prev_timestep=prev_t)
            prev.append(r.prev_sample.numpy())
            x0.append(r.pred_original_sample.numpy())
        arrays.update({f"sched/{stage}/positions": positions, f"sched/{stage}/model_output": out,
                       f"sched/{stage}/sample": sample, f"sched/{stage}/noise": noise,
                       f"sched/{stage}/prev_sample": np.stack(prev), f"sched/{stage}/pred_original_sample":
                       np.stack(x0)})
    return arrays


GUIDED_POSITION = 12  # the recorded guided step: position 12 of the 25-step chain (t = 500 -> 458)
GUIDED_BATCH = 2


def _load_tiny(out_dir: str, name: str, cls):
    """A saved tiny component, in float32 (the stored float16 values exactly)."""
    return cls.from_pretrained(os.path.join(out_dir, name)).float().eval()


def make_guided_steps(out_dir: str, seed: int = 40) -> dict:
    """One classifier-free-guided denoising step of the saved tiny prior and of the saved tiny decoder (with
    text_proj), as UnCLIPPipeline.__call__ runs a step of its loops (each with its own UnCLIPScheduler, the
    default 25-step chain at GUIDED_POSITION, prev_timestep the next timestep): the doubled batch
    [unconditional, conditional], the unconditional half from the empty caption's encodings (given inputs
    here: one text embedding, token states and a 2-token mask, repeated per row), guidance 4.0 on the prior's
    x0 output and 8.0 on the decoder's eps with the variance from the conditional half, the scheduler's noise
    injected. Returns {name: array}."""
    import torch
    import torch.nn.functional as F
    from diffusers import PriorTransformer, UnCLIPScheduler, UNet2DConditionModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    from diffusers.schedulers import scheduling_unclip

    T = torch.from_numpy
    rng = np.random.default_rng(seed)
    b = GUIDED_BATCH
    arrays = {}
    with torch.no_grad():
        # prior
        prior = _load_tiny(out_dir, "prior", PriorTransformer)
        e, n = TINY_PRIOR["embedding_dim"], TINY_PRIOR["num_embeddings"]
        sched = UnCLIPScheduler(**SCHEDULERS["prior"])
        sched.set_timesteps(SCHEDULER_STEPS["prior"])
        t, t_prev = int(sched.timesteps[GUIDED_POSITION]), int(sched.timesteps[GUIDED_POSITION + 1])
        x = rng.standard_normal((b, e)).astype(np.float32)
        c_emb = (3.0 * rng.standard_normal((b, e))).astype(np.float32)
        c_states = rng.standard_normal((b, n, e)).astype(np.float32)
        c_mask = np.arange(n)[None, :] < np.asarray([n, 6])[:, None]
        u_emb = np.repeat((3.0 * rng.standard_normal((1, e))).astype(np.float32), b, 0)
        u_states = np.repeat(rng.standard_normal((1, n, e)).astype(np.float32), b, 0)
        u_mask = np.repeat(np.arange(n)[None, :] < 2, b, 0)
        noise = rng.standard_normal((b, e)).astype(np.float32)
        pred = prior(T(np.concatenate([x, x])), timestep=t, proj_embedding=T(np.concatenate([u_emb, c_emb])),
                     encoder_hidden_states=T(np.concatenate([u_states, c_states])),
                     attention_mask=T(np.concatenate([u_mask, c_mask]))).predicted_image_embedding
        p_u, p_c = pred.chunk(2)
        guided = p_u + 4.0 * (p_c - p_u)
        with InjectedNoise([scheduling_unclip], [noise]):
            prev = sched.step(guided, timestep=t, sample=T(x), prev_timestep=t_prev).prev_sample
        arrays.update({"guided/prior/timesteps": np.asarray([t, t_prev], np.int32), "guided/prior/x_t": x,
                       "guided/prior/text_emb": c_emb, "guided/prior/text_states": c_states,
                       "guided/prior/text_mask": c_mask, "guided/prior/uncond_text_emb": u_emb[:1],
                       "guided/prior/uncond_text_states": u_states[:1], "guided/prior/uncond_text_mask": u_mask[:1],
                       "guided/prior/noise": noise, "guided/prior/guided_x0": guided.numpy(),
                       "guided/prior/prev_sample": prev.numpy()})

        # decoder (text_proj's classifier-free-guidance path: the learned null image embedding for the
        # unconditional half)
        unet = _load_tiny(out_dir, "decoder", UNet2DConditionModel)
        text_proj = _load_tiny(out_dir, "text_proj", UnCLIPTextProjModel)
        e, n, side = TINY_TEXT_PROJ["clip_embeddings_dim"], max(DECODER_TEXT_LENGTHS), TINY_DECODER["sample_size"]
        sched = UnCLIPScheduler(**SCHEDULERS["decoder"])
        sched.set_timesteps(SCHEDULER_STEPS["decoder"])
        t, t_prev = int(sched.timesteps[GUIDED_POSITION]), int(sched.timesteps[GUIDED_POSITION + 1])
        x = rng.standard_normal((b, 3, side, side)).astype(np.float32)
        image_emb = rng.standard_normal((b, e)).astype(np.float32)
        c_emb = (3.0 * rng.standard_normal((b, e))).astype(np.float32)
        c_states = rng.standard_normal((b, n, e)).astype(np.float32)
        c_mask = np.arange(n)[None, :] < np.asarray([n, 4])[:, None]
        u_emb = np.repeat((3.0 * rng.standard_normal((1, e))).astype(np.float32), b, 0)
        u_states = np.repeat(rng.standard_normal((1, n, e)).astype(np.float32), b, 0)
        u_mask = np.repeat(np.arange(n)[None, :] < 2, b, 0)
        noise = rng.standard_normal((b, 3, side, side)).astype(np.float32)
        context, additive = text_proj(image_embeddings=T(image_emb), prompt_embeds=T(np.concatenate([u_emb, c_emb])),
                                      text_encoder_hidden_states=T(np.concatenate([u_states, c_states])),
                                      do_classifier_free_guidance=True)
        mask = F.pad(T(np.concatenate([u_mask, c_mask])), (TINY_TEXT_PROJ["clip_extra_context_tokens"], 0), value=True)
        out = unet(sample=T(np.concatenate([x, x])), timestep=t, encoder_hidden_states=context,
                   class_labels=additive, attention_mask=mask).sample
        o_u, o_c = out.chunk(2)
        eps_u, _ = o_u.split(3, dim=1)
        eps_c, var_c = o_c.split(3, dim=1)
        guided = torch.cat([eps_u + 8.0 * (eps_c - eps_u), var_c], dim=1)
        with InjectedNoise([scheduling_unclip], [noise]):
            prev = sched.step(guided, t, T(x), prev_timestep=t_prev).prev_sample
        arrays.update({"guided/decoder/timesteps": np.asarray([t, t_prev], np.int32), "guided/decoder/x_t": x,
                       "guided/decoder/image_emb": image_emb, "guided/decoder/text_emb": c_emb,
                       "guided/decoder/text_states": c_states, "guided/decoder/text_mask": c_mask,
                       "guided/decoder/uncond_text_emb": u_emb[:1], "guided/decoder/uncond_text_states": u_states[:1],
                       "guided/decoder/uncond_text_mask": u_mask[:1], "guided/decoder/noise": noise,
                       "guided/decoder/guided_output": guided.numpy(), "guided/decoder/prev_sample": prev.numpy()})
    return arrays


# the chain's prior: TINY_PRIOR sized to the tiny text_proj / decoder's 12-d CLIP and 10 caption tokens
TINY_CHAIN_PRIOR = dict(TINY_PRIOR, embedding_dim=TINY_TEXT_PROJ["clip_embeddings_dim"],
                        num_embeddings=max(DECODER_TEXT_LENGTHS))
CHAIN_STEPS = {"prior": 2, "decoder": 2, "super_res": 2}
CHAIN_BATCH = 2


def make_chain(out_dir: str, seed: int = 50) -> dict:
    """Saves a tiny prior sized for the tiny decoder (chain_prior/, float16 weights) and runs UnCLIPPipeline.
    __call__'s three loops after the text encoder, re-typed from its source (diffusers 0.42.1) with
    diffusers' own components and UnCLIPSchedulers, on given caption encodings (and the empty caption's, for
    the unconditional half) with every random draw injected (the three starting latents and each scheduler
    step's noise): prior (guidance 4) -> post_process_latents -> text_proj (classifier-free) -> decoder
    (guidance 8) -> clamp(-1, 1) -> bicubic antialias upsampling -> super_res_first on every step but the
    last, super_res_last on the last; CHAIN_STEPS steps each. Returns {name: array}."""
    import torch
    import torch.nn.functional as F
    from diffusers import PriorTransformer, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    from diffusers.schedulers import scheduling_unclip

    torch.manual_seed(seed)
    prior = PriorTransformer(**TINY_CHAIN_PRIOR).eval()
    _perturb(prior, seed + 1)
    with torch.no_grad():  # stored as float16: compute with exactly the stored values
        for p in prior.parameters():
            p.copy_(p.half().float())
    prior.half().save_pretrained(os.path.join(out_dir, "chain_prior"), safe_serialization=True)
    prior.float()
    text_proj = _load_tiny(out_dir, "text_proj", UnCLIPTextProjModel)
    decoder = _load_tiny(out_dir, "decoder", UNet2DConditionModel)
    sr_first = _load_tiny(out_dir, "super_res_first", UNet2DModel)
    sr_last = _load_tiny(out_dir, "super_res_last", UNet2DModel)

    T = torch.from_numpy
    rng = np.random.default_rng(seed + 2)
    b, e, n = CHAIN_BATCH, TINY_CHAIN_PRIOR["embedding_dim"], TINY_CHAIN_PRIOR["num_embeddings"]
    side, sr_side = TINY_DECODER["sample_size"], TINY_SUPER_RES["sample_size"]
    c_emb = (3.0 * rng.standard_normal((b, e))).astype(np.float32)
    c_states = rng.standard_normal((b, n, e)).astype(np.float32)
    c_mask = np.arange(n)[None, :] < np.asarray([n, 5])[:, None]
    u_emb = (3.0 * rng.standard_normal((1, e))).astype(np.float32)
    u_states = rng.standard_normal((1, n, e)).astype(np.float32)
    u_mask = np.arange(n)[None, :] < 2
    noise = {"prior": rng.standard_normal((CHAIN_STEPS["prior"], b, e)).astype(np.float32),
             "decoder": rng.standard_normal((CHAIN_STEPS["decoder"], b, 3, side, side)).astype(np.float32),
             "super_res": rng.standard_normal((CHAIN_STEPS["super_res"], b, 3, sr_side, sr_side)).astype(np.float32)}
    # _encode_prompt with classifier-free guidance: [uncond, cond]
    prompt_embeds = T(np.concatenate([np.repeat(u_emb, b, 0), c_emb]))
    text_enc_hid_states = T(np.concatenate([np.repeat(u_states, b, 0), c_states]))
    text_mask = T(np.concatenate([np.repeat(u_mask, b, 0), c_mask]))
    scheds = {k: UnCLIPScheduler(**SCHEDULERS[k]) for k in SCHEDULERS}
    # each loop's randn_tensor calls, in order: the starting latents (x 1, init_noise_sigma), then one per step
    # with t > 0 (noise row j is step j's; the last step draws none)
    queue = [noise[k][j] for k in ("prior", "decoder", "super_res") for j in range(CHAIN_STEPS[k])]
    out = {}
    with InjectedNoise([scheduling_unclip], queue[:0]) as inj, torch.no_grad():
        def draws(stage):
            inj.queue = [noise[stage][j] for j in range(1, CHAIN_STEPS[stage])]

        # prior loop
        sched = scheds["prior"]
        sched.set_timesteps(CHAIN_STEPS["prior"])
        ts = sched.timesteps
        latents = T(noise["prior"][0].copy()) * sched.init_noise_sigma
        draws("prior")
        for i, t in enumerate(ts):
            pred = prior(torch.cat([latents] * 2), timestep=t, proj_embedding=prompt_embeds,
                         encoder_hidden_states=text_enc_hid_states, attention_mask=text_mask).predicted_image_embedding
            p_u, p_c = pred.chunk(2)
            pred = p_u + 4.0 * (p_c - p_u)
            prev_t = None if i + 1 == ts.shape[0] else ts[i + 1]
            latents = sched.step(pred, timestep=t, sample=latents, prev_timestep=prev_t).prev_sample
        image_embeddings = prior.post_process_latents(latents)
        out["chain/prior/image_emb"] = image_embeddings.numpy()

        # decoder loop
        hid, additive = text_proj(image_embeddings=image_embeddings, prompt_embeds=prompt_embeds,
                                  text_encoder_hidden_states=text_enc_hid_states, do_classifier_free_guidance=True)
        decoder_mask = F.pad(text_mask, (TINY_TEXT_PROJ["clip_extra_context_tokens"], 0), value=True)
        sched = scheds["decoder"]
        sched.set_timesteps(CHAIN_STEPS["decoder"])
        ts = sched.timesteps
        latents = T(noise["decoder"][0].copy()) * sched.init_noise_sigma
        draws("decoder")
        for i, t in enumerate(ts):
            pred = decoder(sample=torch.cat([latents] * 2), timestep=t, encoder_hidden_states=hid,
                           class_labels=additive, attention_mask=decoder_mask).sample
            o_u, o_c = pred.chunk(2)
            eps_u, _ = o_u.split(3, dim=1)
            eps_c, var_c = o_c.split(3, dim=1)
            pred = torch.cat([eps_u + 8.0 * (eps_c - eps_u), var_c], dim=1)
            prev_t = None if i + 1 == ts.shape[0] else ts[i + 1]
            latents = sched.step(pred, t, latents, prev_timestep=prev_t).prev_sample
        image_small = latents.clamp(-1, 1)
        out["chain/decoder/image"] = image_small.numpy()

        # super-res loop
        sched = scheds["super_res"]
        sched.set_timesteps(CHAIN_STEPS["super_res"])
        ts = sched.timesteps
        latents = T(noise["super_res"][0].copy()) * sched.init_noise_sigma
        draws("super_res")
        upscaled = F.interpolate(image_small, size=[sr_side, sr_side], mode="bicubic", align_corners=False,
                                 antialias=True)
        for i, t in enumerate(ts):
            unet = sr_last if i == ts.shape[0] - 1 else sr_first
            pred = unet(sample=torch.cat([latents, upscaled], dim=1), timestep=t).sample
            prev_t = None if i + 1 == ts.shape[0] else ts[i + 1]
            latents = sched.step(pred, t, latents, prev_timestep=prev_t).prev_sample
        out["chain/super_res/sample"] = latents.numpy()
        out["chain/image"] = (latents * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    out.update({"chain/text_emb": c_emb, "chain/text_states": c_states, "chain/text_mask": c_mask,
                "chain/uncond_text_emb": u_emb, "chain/uncond_text_states": u_states, "chain/uncond_text_mask": u_mask,
                **{f"chain/{k}/noise": v for k, v in noise.items()}})
    return out


def full_size_components() -> dict:
    """The full-size karlo components on the meta device: {component: {class, config, num_tensors,
    num_params, tensors: {name: shape}}}."""
    import torch
    from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    with torch.device("meta"):
        models = {"prior": PriorTransformer(),  # its defaults are karlo's
                  "decoder": UNet2DConditionModel(**DECODER_CONFIG),
                  # as the conversion script builds it: time embedding 4 x 320, the decoder's context width
                  "text_proj": UnCLIPTextProjModel(time_embed_dim=4 * DECODER_CONFIG["block_out_channels"][0],
                                                   cross_attention_dim=DECODER_CONFIG["cross_attention_dim"]),
                  "super_res_first": UNet2DModel(**SUPER_RES_CONFIG),
                  "super_res_last": UNet2DModel(**SUPER_RES_LAST_CONFIG)}
    out = {}
    for name, model in models.items():
        sd = model.state_dict()
        config = json.loads(json.dumps({k: v for k, v in dict(model.config).items() if not k.startswith("_")}))
        out[name] = {"class": type(model).__name__, "config": config,
                     "num_tensors": len(sd), "num_params": int(sum(v.numel() for v in sd.values())),
                     "tensors": {k: list(v.shape) for k, v in sd.items()}}
    return out


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help="components to (re)write (default: all)")
    args = ap.parse_args()
    import diffusers
    import safetensors
    import torch

    versions = {"torch": torch.__version__, "diffusers": diffusers.__version__,
                "safetensors": safetensors.__version__, "numpy": np.__version__}
    only = set(args.only or ["prior", "decoder", "text_proj", "super_res_first", "super_res_last", "schedulers",
                             "guided", "chain"])

    keys = {"format": 1, "components": {}}
    if os.path.exists(KEYS_PATH):
        with open(KEYS_PATH) as f:
            keys = json.load(f)
    full = full_size_components()
    for name in sorted(only & set(full)):
        keys["components"][name] = full[name]
        print(f"full-size {name}: {full[name]['num_tensors']} tensors, {full[name]['num_params']:,} params")
    keys["source"] = ("diffusers' karlo (unCLIP) component classes with their karlo-v1-alpha configs, "
                      "instantiated on the meta device by scripts/make_karlo_fixtures.py (no weights)")
    keys["versions"] = versions
    with open(KEYS_PATH, "w") as f:
        json.dump(keys, f, indent=1)
        f.write("\n")

    os.makedirs(TINY_DIR, exist_ok=True)
    index_path = os.path.join(TINY_DIR, "index.json")
    index = {"components": {}}
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
    npz_path = os.path.join(TINY_DIR, "reference.npz")
    arrays = dict(np.load(npz_path)) if os.path.exists(npz_path) else {}
    if "prior" in only:
        arrays = {k: v for k, v in arrays.items() if not k.startswith("prior/")}
        arrays.update(make_tiny_prior(TINY_DIR))
        weights = os.path.join(TINY_DIR, "prior", "diffusion_pytorch_model.safetensors")
        index["components"]["prior"] = {
            "class": "PriorTransformer", "config": TINY_PRIOR, "weights_sha256": _sha256(weights),
            "timesteps": TIMESTEPS, "text_lengths": TEXT_LENGTHS,
            "outputs": {"predicted": "model(x_t, timestep=t, proj_embedding=text_emb, encoder_hidden_states="
                                     "text_states, attention_mask=text_mask).predicted_image_embedding",
                        "unnormalised": "post_process_latents(predicted) = predicted * clip_std + clip_mean",
                        "predicted_t437": "predicted with the scalar timestep 437 for every row"},
            "max_abs": {k: float(np.abs(arrays[f"prior/{k}"]).max())
                        for k in ("predicted", "unnormalised", "predicted_t437")}}
        print(f"tiny prior: outputs max |x| {index['components']['prior']['max_abs']}")
    if only & {"decoder", "text_proj"}:  # made together: the reference runs text_proj into the decoder
        arrays = {k: v for k, v in arrays.items() if not k.startswith(("decoder/", "text_proj/"))}
        arrays.update(make_tiny_decoder(TINY_DIR))
        shared = {"timesteps": TIMESTEPS, "text_lengths": DECODER_TEXT_LENGTHS, "null_rows": DECODER_NULL_ROWS}
        index["components"]["text_proj"] = {
            "class": "UnCLIPTextProjModel", "config": TINY_TEXT_PROJ,
            "weights_sha256": _sha256(os.path.join(TINY_DIR, "text_proj", "diffusion_pytorch_model.safetensors")),
            **shared,
            "outputs": {"context": "text_proj(image_embeddings=image_emb with null_rows replaced by "
                                   "learned_classifier_free_guidance_embeddings (as its do_classifier_free_guidance "
                                   "path does), prompt_embeds=text_emb, text_encoder_hidden_states=text_states) "
                                   "[0]: [B, 4 + L, cross_attention_dim]",
                        "additive": "the same call's [1]: [B, time_embed_dim] (the decoder's class_labels)"},
            "max_abs": {k: float(np.abs(arrays[f"text_proj/{k}"]).max()) for k in ("context", "additive")}}
        index["components"]["decoder"] = {
            "class": "UNet2DConditionModel", "config": TINY_DECODER, "weights_dtype": "float16",
            "weights_sha256": _sha256(os.path.join(TINY_DIR, "decoder", "diffusion_pytorch_model.safetensors")),
            **shared,
            "outputs": {"output": "decoder(x_t [B, 3, H, W], timestep=t, encoder_hidden_states=text_proj/context, "
                                  "class_labels=text_proj/additive, attention_mask=text_mask left-padded with 4 x "
                                  "True).sample: [B, 6, H, W] float32 (the model in float32 holding the stored "
                                  "float16 values)"},
            "max_abs": {"output": float(np.abs(arrays["decoder/output"]).max())}}
        print(f"tiny decoder: output max |x| {index['components']['decoder']['max_abs']}, text_proj "
              f"{index['components']['text_proj']['max_abs']}")
    if only & {"super_res_first", "super_res_last"}:  # made together: the same inputs
        arrays = {k: v for k, v in arrays.items() if not k.startswith("super_res")}
        arrays.update(make_tiny_super_res(TINY_DIR))
        for name, config in (("super_res_first", TINY_SUPER_RES), ("super_res_last", TINY_SUPER_RES_LAST)):
            index["components"][name] = {
                "class": "UNet2DModel", "config": config, "weights_dtype": "float16",
                "weights_sha256": _sha256(os.path.join(TINY_DIR, name, "diffusion_pytorch_model.safetensors")),
                "timesteps": TIMESTEPS, "low_res_side": SUPER_RES_LOW,
                "outputs": {"output": f"{name}(cat([x_t, upscaled], dim=1), timestep=t).sample: [B, 3, H, W] float32 "
                                      "(the model in float32 holding the stored float16 values), where upscaled = "
                                      "F.interpolate(low_res, size=[H, W], mode='bicubic', align_corners=False, "
                                      "antialias=True) as UnCLIPPipeline makes it (super_res/upscaled)"},
                "max_abs": {"output": float(np.abs(arrays[f"{name}/output"]).max())}}
            print(f"tiny {name}: output max |x| {index['components'][name]['max_abs']}")
    if "schedulers" in only:
        arrays = {k: v for k, v in arrays.items() if not k.startswith("sched/")}
        arrays.update(make_scheduler_steps())
        index["schedulers"] = {
            "class": "UnCLIPScheduler", "common": {"num_train_timesteps": 1000,
                                                   "beta_schedule": "squaredcos_cap_v2", "clip_sample": True},
            "configs": SCHEDULERS, "default_steps": SCHEDULER_STEPS, "set_timesteps": SET_TIMESTEPS,
            "arrays": {"timesteps_{n}": "scheduler.set_timesteps(n); scheduler.timesteps (int, decreasing)",
                       "positions": "indices into the default-length chain's timesteps of the recorded steps",
                       "model_output, sample, noise": "per position (diffusers' NCHW / [B, E]); noise is what "
                                                      "randn_tensor returned inside step() (unused at t = 0)",
                       "prev_sample, pred_original_sample": "step(model_output, t, sample, prev_timestep=the next "
                                                            "timestep, None at the last)"}}
        print("schedulers: " + ", ".join(f"{s}: {arrays[f'sched/{s}/timesteps_{SCHEDULER_STEPS[s]}'][:3]}..."
                                         for s in SCHEDULERS))
    if "guided" in only:
        arrays = {k: v for k, v in arrays.items() if not k.startswith("guided/")}
        arrays.update(make_guided_steps(TINY_DIR))
        index["guided"] = {
            "position": GUIDED_POSITION, "batch": GUIDED_BATCH, "guidance": {"prior": 4.0, "decoder": 8.0},
            "description": "one step of UnCLIPPipeline's prior loop (tiny prior) and decoder loop (tiny text_proj + "
                           "decoder) on the doubled batch [uncond, cond], the uncond half from uncond_text_* "
                           "(the empty caption's encodings, one row, repeated) and, for the decoder, text_proj's "
                           "learned null image embedding; guided_x0 = u + 4 (c - u) on the prior's x0, "
                           "guided_output = cat([eps_u + 8 (eps_c - eps_u), v_c]); prev_sample = "
                           "scheduler.step(guided, t, x_t, prev_timestep) with `noise` injected",
            "max_abs": {k: float(np.abs(arrays[f"guided/{k}"]).max())
                        for k in ("prior/guided_x0", "prior/prev_sample", "decoder/guided_output",
                                  "decoder/prev_sample")}}
        print(f"guided steps: max |x| {index['guided']['max_abs']}")
    if "chain" in only:
        arrays = {k: v for k, v in arrays.items() if not k.startswith("chain/")}
        arrays.update(make_chain(TINY_DIR))
        index["components"]["chain_prior"] = {
            "class": "PriorTransformer", "config": TINY_CHAIN_PRIOR, "weights_dtype": "float16",
            "weights_sha256": _sha256(os.path.join(TINY_DIR, "chain_prior", "diffusion_pytorch_model.safetensors"))}
        index["chain"] = {
            "steps": CHAIN_STEPS, "batch": CHAIN_BATCH, "guidance": {"prior": 4.0, "decoder": 8.0},
            "description": "UnCLIPPipeline.__call__'s loops after the text encoder (re-typed from diffusers' source, "
                           "its own components and schedulers): chain_prior -> post_process_latents (prior/"
                           "image_emb) -> text_proj + decoder, clamp(-1, 1) (decoder/image) -> bicubic antialias "
                           "-> super_res_first, super_res_last on the last step (super_res/sample; image = "
                           "clamp(sample / 2 + 0.5, 0, 1) NHWC); {stage}/noise[0] is the starting latents, "
                           "[j] step j's scheduler noise (the last step draws none); the unconditional half from "
                           "uncond_text_* (one row, repeated)",
            "max_abs": {k: float(np.abs(arrays[f"chain/{k}"]).max())
                        for k in ("prior/image_emb", "decoder/image", "super_res/sample")}}
        print(f"chain: max |x| {index['chain']['max_abs']}")
    index["versions"] = versions
    np.savez_compressed(npz_path, **arrays)
    with open(index_path, "w") as f:
        json.dump(index, f, indent=1)
        f.write("\n")
    print(f"wrote {TINY_DIR} and {KEYS_PATH}")


if __name__ == "__main__":
    main()
