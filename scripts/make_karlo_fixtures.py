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
- tests/fixtures/karlo_tiny/pipeline/: a COMPLETE diffusers `UnCLIPPipeline` folder as save_pretrained writes it
  (model_index.json, prior/, text_proj/, decoder/, super_res_first/, super_res_last/, text_encoder/,
  tokenizer/, {prior,decoder,super_res}_scheduler/: kakaobrain/karlo-v1-alpha's layout) at tiny sizes: prior =
  chain_prior/'s weights, text_proj/decoder/super_res_* = the folders' weights (float16, text_proj float32 as
  stored), super_res_first's config sample_size 64 = 4 x the decoder's 16 (karlo's factor; the UNets are
  convolutional, the folder super_res_first/ says 16); text_encoder/ a tiny perturbed
  `CLIPTextModelWithProjection` with clip-vit-large-patch14's text settings (TINY_TEXT_ENCODER: CLIP's 49408
  vocabulary, width 12, 10 positions; float16 model.safetensors); tokenizer/ a `CLIPTokenizer`'s vocab.json +
  merges.txt built offline from dalle2_jax/assets/bpe_simple_vocab_16e6.txt.gz (pad <|endoftext|>,
  model_max_length 10; transformers 5's tokenizer.json is not kept); the schedulers are SCHEDULERS. diffusers
  0.42.1 writes text_proj in model_index.json as ["diffusers", "UnCLIPTextProjModel"], which its from_pretrained
  cannot resolve: the script exposes the class as diffusers.UnCLIPTextProjModel while loading (_alias_unclip).
  `pipe/*`: the tokenizer's ids / masks and the text encoder's text_embeds / last_hidden_state for PIPE_PROMPTS
  and "", and ONE `UnCLIPPipeline.from_pretrained('pipeline')` call (float32 holding the stored values; 2/2/2
  steps, guidance 4 / 8, given prior/decoder/super-res latents, every scheduler draw injected) -> pipe/image
  [2, 64, 64, 3], with its intermediates (prior/image_emb, decoder/image, super_res/upscaled) recorded by
  wrapping the pipeline's components;
- pipeline/image_encoder/ and pipeline/feature_extractor/ (as karlo-v1-alpha-image-variations has them): a tiny
  perturbed `CLIPVisionModelWithProjection` (TINY_IMAGE_ENCODER, float16) and a `CLIPImageProcessor`
  (TINY_FEATURE_EXTRACTOR: shortest edge 32, crop 32, OpenAI's mean / std, bicubic); `var/*`: two fixed uint8
  images (40 x 48), their pixel_values and image_embeds, the empty prompt's encodings, and one
  `UnCLIPImageVariationPipeline` call (the pipeline/ folder plus those two; 2/2 steps, guidance 8, given image
  embeddings and latents, draws injected) -> var/image [2, 64, 64, 3];
- tests/fixtures/karlo_tiny/index.json: versions, the inputs' description, the weights' sha256;
- tests/fixtures/karlo_keys.json: the FULL-SIZE karlo components' tensor names and shapes and their
  configs, from meta-device instantiation (no weights). Its "components" map holds one entry per
  pipeline component ("prior", "decoder", "text_proj", "super_res_first", "super_res_last"), each with
  the class, its config, the tensor count, the parameter count and the {name: shape} list in state-dict
  order. `--only prior` (or `--only decoder text_proj`, or `--only super_res_first super_res_last`, each
  pair made together; `--only schedulers` for sched/*, `--only guided` for guided/*, `--only chain` for
  chain_prior/ and chain/*, `--only pipeline` for pipeline/ (but its variation folders) and pipe/*, `--only
  variation` for pipeline/{image_encoder,feature_extractor}/ and var/*) regenerates those components and keeps the
  others. guided, chain, pipeline and variation load the saved tiny components (pipeline: chain_prior/ and the
  decoder / text_proj / super-res folders; variation: pipeline/), so make those first. pipeline and variation
  need transformers as well.
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


# ---- the complete UnCLIPPipeline folder (pipeline/) with a tiny CLIP text encoder, tokenizer and image encoder ----

# karlo's text encoder (openai/clip-vit-large-patch14's text config: quick_gelu, 1e-5, causal, the legacy
# eos_token_id 2 = pooling at argmax(input_ids), i.e. the first EOT) at tiny sizes; CLIP's real vocabulary
TINY_TEXT_ENCODER = dict(vocab_size=49408, hidden_size=12, intermediate_size=24, projection_dim=12,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=10,
                         hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0, initializer_range=0.02,
                         initializer_factor=1.0, pad_token_id=1, bos_token_id=0, eos_token_id=2)
# karlo-v1-alpha-image-variations' image encoder (clip-vit-large-patch14's vision config) at tiny sizes
TINY_IMAGE_ENCODER = dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, projection_dim=12, num_channels=3, hidden_act="quick_gelu",
                          layer_norm_eps=1e-5, attention_dropout=0.0, initializer_range=0.02, initializer_factor=1.0)
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TINY_FEATURE_EXTRACTOR = dict(do_resize=True, size={"shortest_edge": 32}, resample=3, do_center_crop=True,
                              crop_size={"height": 32, "width": 32}, do_rescale=True, rescale_factor=1 / 255,
                              do_normalize=True, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
                              do_convert_rgb=True)
TOKENIZER_MAX_LENGTH = 10  # = TINY_TEXT_ENCODER's max_position_embeddings = the chain prior's num_embeddings
CLIP_NUM_MERGES = 49152 - 256 - 2  # OpenAI's / HF's CLIP vocabulary: 49408 entries
# the prompts: one with a non-final '!' (CLIP id 0, the package's padding id) and one cut at 10 tokens
PIPE_PROMPTS = ["a red cube!~", "a small green ball on a wooden kitchen table"]
PIPE_STEPS = {"prior": 2, "decoder": 2, "super_res": 2}
PIPE_GUIDANCE = {"prior": 4.0, "decoder": 8.0}
# the pipeline's super-res side: karlo's factor 4 over the decoder's side (karlo: 64 -> 256). The UNets are
# convolutional; only super_res_first's config sample_size (which sizes the pipeline's super-res latents and
# the upsampled image) differs from the super_res_first/ folder's 16.
PIPE_SUPER_RES_SIDE = 4 * TINY_DECODER["sample_size"]
VAR_IMAGE_HW = (40, 48)


def _bytes_to_unicode() -> dict:
    """OpenAI's / HF's CLIP byte -> printable unicode symbol map (GPT-2's)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(
        range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_clip_tokenizer_files(out_dir: str) -> None:
    """Writes HF's CLIPTokenizer files offline from the package's copy of OpenAI's merges: vocab.json (the 256
    byte symbols, each with </w>, the first 48894 merges joined, <|startoftext|>, <|endoftext|>: 49408) and
    merges.txt (a '#version: 0.2' header, then those merges), tokenizer_config.json and special_tokens_map.json
    as karlo-v1-alpha's tokenizer/ has them (pad <|endoftext|>), model_max_length TOKENIZER_MAX_LENGTH."""
    import gzip

    os.makedirs(out_dir, exist_ok=True)
    bpe = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "dalle2_jax", "assets",
                       "bpe_simple_vocab_16e6.txt.gz")
    with open(bpe, "rb") as f:
        merges = gzip.decompress(f.read()).decode("utf-8").split("\n")[1: CLIP_NUM_MERGES + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [
        "<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == len(set(vocab)) == 49408
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
        f.write("\n")
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({**special, "add_prefix_space": False, "do_lower_case": True, "errors": "replace",
                   "model_max_length": TOKENIZER_MAX_LENGTH, "tokenizer_class": "CLIPTokenizer"}, f, indent=2)
        f.write("\n")


def _stored_fp16(model):
    """Rounds a float32 model's parameters to float16 in place (it then holds exactly the stored values)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(p.half().float())
            assert bool((p != 0).all()), name
    return model


def _pipe_text_inputs(tokenizer, prompts):
    t = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                  return_tensors="pt")
    return t.input_ids, t.attention_mask.bool()


def make_pipeline(out_dir: str, seed: int = 60) -> dict:
    """Writes out_dir/pipeline/, a complete UnCLIPPipeline folder (save_pretrained's layout, as
    kakaobrain/karlo-v1-alpha), from the saved tiny components (prior = chain_prior/, text_proj/, decoder/,
    super_res_first/ with sample_size PIPE_SUPER_RES_SIDE, super_res_last/: the same stored weights), a tiny
    perturbed CLIPTextModelWithProjection (float16), the CLIPTokenizer built offline and karlo's three
    UnCLIPScheduler configs. Returns the pipe/* arrays: the tokenizer's and text encoder's outputs on
    PIPE_PROMPTS and "", and one UnCLIPPipeline.__call__ run (from_pretrained, upcast to float32) with given
    latents and every scheduler draw injected, plus its intermediates."""
    import shutil

    import torch
    import torch.nn.functional as F
    from diffusers import (PriorTransformer, UnCLIPPipeline, UnCLIPScheduler, UNet2DConditionModel,
                           UNet2DModel)
    from diffusers.pipelines.deprecated.unclip import pipeline_unclip
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    from diffusers.schedulers import scheduling_unclip
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    pipe_dir = os.path.join(out_dir, "pipeline")
    for name in ("prior", "text_proj", "decoder", "super_res_first", "super_res_last", "text_encoder", "tokenizer",
                 "prior_scheduler", "decoder_scheduler", "super_res_scheduler"):  # not variation's two folders
        if os.path.exists(os.path.join(pipe_dir, name)):
            shutil.rmtree(os.path.join(pipe_dir, name))
    tok_src = os.path.join(out_dir, "_tokenizer_src")
    write_clip_tokenizer_files(tok_src)
    tokenizer = CLIPTokenizer.from_pretrained(tok_src)
    assert tokenizer.model_max_length == TOKENIZER_MAX_LENGTH and tokenizer.pad_token == "<|endoftext|>"

    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_TEXT_ENCODER)).eval()
    _perturb_weights(text_encoder, seed + 1)
    _stored_fp16(text_encoder)

    f16 = dict(torch_dtype=torch.float16)
    prior = PriorTransformer.from_pretrained(os.path.join(out_dir, "chain_prior"), **f16)
    decoder = UNet2DConditionModel.from_pretrained(os.path.join(out_dir, "decoder"), **f16)
    text_proj = UnCLIPTextProjModel.from_pretrained(os.path.join(out_dir, "text_proj"))  # stored float32
    sr_first = UNet2DModel.from_pretrained(os.path.join(out_dir, "super_res_first"), **f16)
    sr_first.register_to_config(sample_size=PIPE_SUPER_RES_SIDE)
    sr_last = UNet2DModel.from_pretrained(os.path.join(out_dir, "super_res_last"), **f16)
    scheds = {k: UnCLIPScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True, **v)
              for k, v in SCHEDULERS.items()}
    pipe = UnCLIPPipeline(prior=prior, decoder=decoder, text_encoder=text_encoder.half(), tokenizer=tokenizer,
                          text_proj=text_proj, super_res_first=sr_first, super_res_last=sr_last,
                          prior_scheduler=scheds["prior"], decoder_scheduler=scheds["decoder"],
                          super_res_scheduler=scheds["super_res"])
    pipe.save_pretrained(pipe_dir, safe_serialization=True)
    for name in ("prior", "text_proj", "decoder", "super_res_first", "super_res_last"):
        _drop_local_path(os.path.join(pipe_dir, name, "config.json"))
    # the tokenizer folder as the hub has it (vocab.json + merges.txt), not transformers 5's 3.6 MB tokenizer.json
    shutil.rmtree(os.path.join(pipe_dir, "tokenizer"))
    shutil.move(tok_src, os.path.join(pipe_dir, "tokenizer"))
    del pipe, prior, decoder, text_proj, sr_first, sr_last, text_encoder

    # the folder loads back as the pipeline (float32 holding the stored values); the same weights as the
    # component folders
    _alias_unclip()
    pipe = UnCLIPPipeline.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    for name in ("prior", "decoder", "text_proj", "super_res_first", "super_res_last", "text_encoder"):
        getattr(pipe, name).float().eval()
    for name, folder in (("prior", "chain_prior"), ("decoder", "decoder"), ("text_proj", "text_proj"),
                         ("super_res_first", "super_res_first"), ("super_res_last", "super_res_last")):
        ref = type(getattr(pipe, name)).from_pretrained(os.path.join(out_dir, folder)).state_dict()
        got = getattr(pipe, name).state_dict()
        assert ref.keys() == got.keys() and all(torch.equal(ref[k].float(), got[k]) for k in ref), name
    assert pipe.super_res_first.config.sample_size == PIPE_SUPER_RES_SIDE
    assert pipe.super_res_last.config.sample_size is None
    assert isinstance(pipe.tokenizer, CLIPTokenizer)

    ids, mask = _pipe_text_inputs(pipe.tokenizer, PIPE_PROMPTS)
    u_ids, u_mask = _pipe_text_inputs(pipe.tokenizer, [""])
    with torch.no_grad():
        enc, u_enc = pipe.text_encoder(ids), pipe.text_encoder(u_ids)
    arrays = {"pipe/prompts": np.asarray(PIPE_PROMPTS), "pipe/input_ids": ids.numpy().astype(np.int32),
              "pipe/attention_mask": mask.numpy(), "pipe/uncond_input_ids": u_ids.numpy().astype(np.int32),
              "pipe/uncond_attention_mask": u_mask.numpy(), "pipe/text_embeds": enc.text_embeds.numpy(),
              "pipe/last_hidden_state": enc.last_hidden_state.numpy(),
              "pipe/uncond_text_embeds": u_enc.text_embeds.numpy(),
              "pipe/uncond_last_hidden_state": u_enc.last_hidden_state.numpy()}
    for k in ("pipe/input_ids", "pipe/uncond_input_ids"):
        assert arrays[k].max() < 49408

    rng = np.random.default_rng(seed + 2)
    b, e = len(PIPE_PROMPTS), pipe.prior.config.embedding_dim
    side, sr_side = pipe.decoder.config.sample_size, PIPE_SUPER_RES_SIDE
    shapes = {"prior": (b, e), "decoder": (b, 3, side, side), "super_res": (b, 3, sr_side, sr_side)}
    latents = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
    # UnCLIPScheduler.step draws noise when t > 0: every step but the last
    noise = {k: rng.standard_normal((PIPE_STEPS[k] - 1,) + s, dtype=np.float32) for k, s in shapes.items()}
    rec = _record(pipe)
    queue = [n for k in ("prior", "decoder", "super_res") for n in noise[k]]
    T = torch.from_numpy
    with InjectedNoise([scheduling_unclip, pipeline_unclip], queue):
        image = pipe(PIPE_PROMPTS, num_images_per_prompt=1, prior_num_inference_steps=PIPE_STEPS["prior"],
                     decoder_num_inference_steps=PIPE_STEPS["decoder"],
                     super_res_num_inference_steps=PIPE_STEPS["super_res"],
                     prior_latents=T(latents["prior"].copy()), decoder_latents=T(latents["decoder"].copy()),
                     super_res_latents=T(latents["super_res"].copy()),
                     prior_guidance_scale=PIPE_GUIDANCE["prior"], decoder_guidance_scale=PIPE_GUIDANCE["decoder"],
                     output_type="np").images
    # the text encoder's calls inside the pipeline: the prompts, then the empty prompt (repeated per row)
    assert len(rec["text_encoder"]) == 2
    assert np.array_equal(rec["text_encoder"][0][0], arrays["pipe/input_ids"])
    assert np.array_equal(rec["text_encoder"][1][0], np.repeat(arrays["pipe/uncond_input_ids"], b, 0))
    decoder_image = rec["decoder"][-1].clamp(-1, 1)
    with torch.no_grad():
        upscaled = F.interpolate(decoder_image, size=[sr_side, sr_side], mode="bicubic", align_corners=False,
                                 antialias=True)
    assert torch.equal(upscaled, rec["super_res_input"][0][:, 3:])
    final = (rec["super_res"][-1] * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(final, image), np.abs(final - image).max()
    arrays.update({"pipe/prior_latents": latents["prior"], "pipe/decoder_latents": latents["decoder"],
                   "pipe/super_res_latents": latents["super_res"],
                   **{f"pipe/{k}/noise": v for k, v in noise.items()},
                   **{f"pipe/{k}/timesteps": np.asarray(rec["timesteps"][k], np.int32)
                      for k in ("prior", "decoder", "super_res")},
                   "pipe/prior/image_emb": rec["image_emb"][0].numpy(),
                   "pipe/decoder/image": decoder_image.numpy(), "pipe/super_res/upscaled": upscaled.numpy(),
                   "pipe/super_res/x0_first": rec["x0"]["super_res"][0].numpy(),
                   "pipe/image": image.astype(np.float32)})
    return arrays


def _drop_local_path(config_path: str) -> None:
    """Removes `_name_or_path` (the folder this script loaded the component from: a path on its machine) from a
    saved config.json; diffusers does not need it to load the folder."""
    with open(config_path) as f:
        config = json.load(f)
    if config.pop("_name_or_path", None) is not None:
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")


def _alias_unclip() -> None:
    """Lets diffusers 0.42.1 load its own saved UnCLIPPipeline folder: save_pretrained records text_proj in
    model_index.json as ["diffusers", "UnCLIPTextProjModel"], but the class is not exported at diffusers' top
    level (it lives in diffusers.pipelines.deprecated.unclip), so from_pretrained cannot resolve it (neither
    the hub's older name "unclip"). Exposes it there, for this process only."""
    import diffusers
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    if not hasattr(diffusers, "UnCLIPTextProjModel"):
        setattr(diffusers, "UnCLIPTextProjModel", UnCLIPTextProjModel)


def _record(pipe) -> dict:
    """Wraps the pipeline's components in place to record its intermediates: the text encoder's input ids,
    post_process_latents' output, each scheduler's prev_samples, x0 predictions (clipped, as the scheduler
    returns them) and timesteps, super_res_first's inputs."""

    rec = {"text_encoder": [], "image_emb": [], "prior": [], "decoder": [], "super_res": [], "super_res_input": [],
           "timesteps": {"prior": [], "decoder": [], "super_res": []}, "x0": {"prior": [], "decoder": [],
                                                                             "super_res": []}}

    def te_hook(module, args, kwargs, out):
        ids = args[0] if args else kwargs["input_ids"]
        rec["text_encoder"].append((ids.numpy().astype(np.int32), out))

    pipe.text_encoder.register_forward_hook(te_hook, with_kwargs=True)
    if hasattr(pipe, "prior"):
        post = pipe.prior.post_process_latents

        def post_process_latents(x):
            y = post(x)
            rec["image_emb"].append(y.clone())
            return y

        pipe.prior.post_process_latents = post_process_latents

    def sr_hook(module, args, kwargs):
        rec["super_res_input"].append((kwargs.get("sample", args[0] if args else None)).clone())

    pipe.super_res_first.register_forward_pre_hook(sr_hook, with_kwargs=True)
    pipe.super_res_last.register_forward_pre_hook(sr_hook, with_kwargs=True)
    for stage in ("prior", "decoder", "super_res"):
        sched = getattr(pipe, f"{stage}_scheduler", None)
        if sched is None:
            continue

        def step(*args, _stage=stage, _step=sched.step, **kwargs):
            out = _step(*args, **kwargs)
            t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            rec["timesteps"][_stage].append(int(t))
            rec[_stage].append(out.prev_sample.clone())
            rec["x0"][_stage].append(out.pred_original_sample.clone())
            return out

        sched.step = step
    return rec


def make_variation(out_dir: str, seed: int = 70) -> dict:
    """Adds pipeline/image_encoder/ (a tiny perturbed CLIPVisionModelWithProjection, float16) and
    pipeline/feature_extractor/ (a CLIPImageProcessor: shortest edge 32, center crop 32, OpenAI's mean/std,
    bicubic), as karlo-v1-alpha-image-variations has them, and returns the var/* arrays: a fixed uint8 image
    (and its mirror), the feature extractor's pixel_values, the image encoder's image_embeds, and one
    UnCLIPImageVariationPipeline run (the pipeline/ folder's components plus these two) with given image
    embeddings and latents, every scheduler draw injected."""
    import shutil

    import PIL.Image
    import torch
    from diffusers import UnCLIPImageVariationPipeline
    from diffusers.pipelines.deprecated.unclip import pipeline_unclip_image_variation
    from diffusers.schedulers import scheduling_unclip
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    pipe_dir = os.path.join(out_dir, "pipeline")
    for name in ("image_encoder", "feature_extractor"):
        if os.path.exists(os.path.join(pipe_dir, name)):
            shutil.rmtree(os.path.join(pipe_dir, name))
    torch.manual_seed(seed)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_IMAGE_ENCODER)).eval()
    _perturb_weights(image_encoder, seed + 1)
    _stored_fp16(image_encoder)
    image_encoder.half().save_pretrained(os.path.join(pipe_dir, "image_encoder"), safe_serialization=True)
    CLIPImageProcessor(**TINY_FEATURE_EXTRACTOR).save_pretrained(os.path.join(pipe_dir, "feature_extractor"))

    # a structured image: gradients, a bright rectangle, a dark disc, a noisy band (H 40, W 48: resized to 32 x 38,
    # then center-cropped); the batch is it and its left-right mirror
    h, w = VAR_IMAGE_HW
    rng = np.random.default_rng(seed + 2)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([255 * xx / (w - 1), 255 * yy / (h - 1), 128 + 100 * np.sin(xx / 3.0) * np.cos(yy / 5.0)], -1)
    img[8:20, 30:44] = [250, 240, 30]
    img[((yy - 28) ** 2 + (xx - 14) ** 2) < 49] = [20, 30, 90]
    img[34:38] += rng.normal(0, 40, (4, w, 3))
    img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    images = np.stack([img, img[:, ::-1]])

    image_encoder = CLIPVisionModelWithProjection.from_pretrained(
        os.path.join(pipe_dir, "image_encoder")).float().eval()
    feature_extractor = CLIPImageProcessor.from_pretrained(os.path.join(pipe_dir, "feature_extractor"))
    pils = [PIL.Image.fromarray(a) for a in images]
    pixel_values = feature_extractor(images=pils, return_tensors="pt").pixel_values
    with torch.no_grad():
        image_embeds = image_encoder(pixel_values).image_embeds

    _alias_unclip()
    pipe = UnCLIPImageVariationPipeline.from_pretrained(pipe_dir, image_encoder=image_encoder,
                                                        feature_extractor=feature_extractor)
    pipe.set_progress_bar_config(disable=True)
    for name in ("decoder", "text_proj", "super_res_first", "super_res_last", "text_encoder", "image_encoder"):
        getattr(pipe, name).float().eval()
    b, side, sr_side = len(images), pipe.decoder.config.sample_size, pipe.super_res_first.config.sample_size
    shapes = {"decoder": (b, 3, side, side), "super_res": (b, 3, sr_side, sr_side)}
    latents = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
    noise = {k: rng.standard_normal((PIPE_STEPS[k] - 1,) + s, dtype=np.float32) for k, s in shapes.items()}
    queue = [n for k in ("decoder", "super_res") for n in noise[k]]
    T = torch.from_numpy
    kwargs = dict(decoder_num_inference_steps=PIPE_STEPS["decoder"],
                  super_res_num_inference_steps=PIPE_STEPS["super_res"],
                  decoder_guidance_scale=PIPE_GUIDANCE["decoder"], output_type="np")
    rec = _record(pipe)
    with InjectedNoise([scheduling_unclip, pipeline_unclip_image_variation], queue):
        out = pipe(image_embeddings=image_embeds.clone(), decoder_latents=T(latents["decoder"].copy()),
                   super_res_latents=T(latents["super_res"].copy()), **kwargs).images
    # the same run from the PIL images (the feature extractor and image encoder inside the pipeline)
    with InjectedNoise([scheduling_unclip, pipeline_unclip_image_variation], list(queue)):
        out_pil = pipe(image=pils, decoder_latents=T(latents["decoder"].copy()),
                       super_res_latents=T(latents["super_res"].copy()), **kwargs).images
    assert np.array_equal(out, out_pil), np.abs(out - out_pil).max()
    # the variation pipeline's text inputs: the empty prompt for both halves (its tokenizer call: padding
    # max_length, no truncation), encoded twice (cond = uncond)
    te = rec["text_encoder"][:2]
    assert len(te) == 2 and np.array_equal(te[0][0], te[1][0])
    u_ids, u_mask = _pipe_text_inputs(pipe.tokenizer, [""] * b)
    assert np.array_equal(te[0][0], u_ids.numpy())
    decoder_image = rec["decoder"][PIPE_STEPS["decoder"] - 1].clamp(-1, 1)
    return {"var/images": images, "var/pixel_values": pixel_values.numpy(), "var/image_embeds": image_embeds.numpy(),
            "var/uncond_input_ids": u_ids.numpy()[:1].astype(np.int32), "var/uncond_attention_mask": u_mask.numpy()[:1],
            "var/uncond_text_embeds": te[0][1].text_embeds.numpy()[:1],
            "var/uncond_last_hidden_state": te[0][1].last_hidden_state.numpy()[:1],
            "var/decoder_latents": latents["decoder"], "var/super_res_latents": latents["super_res"],
            **{f"var/{k}/noise": v for k, v in noise.items()},
            **{f"var/{k}/timesteps": np.asarray(rec["timesteps"][k][: PIPE_STEPS[k]], np.int32)
               for k in ("decoder", "super_res")},
            "var/decoder/image": decoder_image.numpy(), "var/image": out.astype(np.float32),
            "var/super_res/x0_first": rec["x0"]["super_res"][0].numpy()}


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
                             "guided", "chain", "pipeline", "variation"])
    if only & {"pipeline", "variation"}:
        import transformers

        versions["transformers"] = transformers.__version__

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
    keys["versions"] = {k: v for k, v in versions.items() if k != "transformers"}  # no transformers component
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
    if "pipeline" in only:
        arrays = {k: v for k, v in arrays.items() if not k.startswith("pipe/")}
        arrays.update(make_pipeline(TINY_DIR))
        pipe_dir = os.path.join(TINY_DIR, "pipeline")
        index["pipeline"] = {
            "class": "UnCLIPPipeline", "folder": "pipeline",
            "components": {"prior": "chain_prior/'s weights (float16)", "text_proj": "text_proj/'s (float32)",
                           "decoder": "decoder/'s (float16)", "super_res_last": "super_res_last/'s (float16)",
                           "super_res_first": f"super_res_first/'s weights (float16), config sample_size "
                                              f"{PIPE_SUPER_RES_SIDE} (= 4 x the decoder's "
                                        f"{TINY_DECODER['sample_size']}; "
                                              f"the folder super_res_first/ says {TINY_SUPER_RES['sample_size']})",
                           "text_encoder": "CLIPTextModelWithProjection (float16), config text_encoder_config",
                           "tokenizer": "CLIPTokenizer: vocab.json + merges.txt built from dalle2_jax/assets/"
                                        "bpe_simple_vocab_16e6.txt.gz, pad <|endoftext|>, model_max_length "
                                        f"{TOKENIZER_MAX_LENGTH}",
                           "{prior,decoder,super_res}_scheduler": "UnCLIPScheduler, schedulers.configs"},
            "text_encoder_config": TINY_TEXT_ENCODER,
            "weights_sha256": {name: _sha256(os.path.join(pipe_dir, name, fname)) for name, fname in (
                ("text_encoder", "model.safetensors"), ("prior", "diffusion_pytorch_model.safetensors"),
                ("decoder", "diffusion_pytorch_model.safetensors"),
                ("text_proj", "diffusion_pytorch_model.safetensors"),
                ("super_res_first", "diffusion_pytorch_model.safetensors"),
                ("super_res_last", "diffusion_pytorch_model.safetensors"))},
            "steps": PIPE_STEPS, "guidance": PIPE_GUIDANCE, "super_res_side": PIPE_SUPER_RES_SIDE,
            "description": "pipe/prompts -> tokenizer(padding='max_length', max_length=10, truncation=True) "
                           "(pipe/input_ids, pipe/attention_mask; HF pads with 49407 = EOT, the mask is 1 from SOT "
                           "to the first EOT), the empty prompt likewise (pipe/uncond_*); text_encoder(input_ids) "
                           "(no attention mask: causal only) -> text_embeds, last_hidden_state; then "
                           "UnCLIPPipeline.from_pretrained('pipeline').__call__ (every model upcast to float32 "
                           "holding the stored values) with prompt=pipe/prompts, prior_latents, decoder_latents, "
                           "super_res_latents given, {stage}/noise[j] injected as step j's scheduler noise (the "
                           "last step, t = 0, draws none), output_type 'np' -> pipe/image [B, H, W, 3]; "
                           "intermediates: prior/image_emb (post_process_latents of the prior loop's result), "
                           "decoder/image (the decoder loop's result clamped to [-1, 1], float32: the super-res "
                           "low-res input), super_res/upscaled (its bicubic antialias upsampling to super_res_side), "
                           "{stage}/timesteps (the loop's timesteps), super_res/x0_first (the super-res loop's "
                           "first x0 prediction, at t = 999, clipped to [-1, 1] as UnCLIPScheduler.step returns "
                           "it: |x0| < 1 marks the values computed unclipped from 1/sqrt(alpha_bar_999) = 2e4 "
                           "times the model's output)",
            "notes": ["model_index.json is diffusers 0.42.1's save_pretrained output; its text_proj entry "
                      "[\"diffusers\", \"UnCLIPTextProjModel\"] does not load back in diffusers 0.42.1 (the class "
                      "is not exported at the top level; the hub's karlo-v1-alpha names the library \"unclip\"): "
                      "the reference exposed the class as diffusers.UnCLIPTextProjModel while loading",
                      "the variation references' empty-prompt encodings come from a batch of 2 rows (var/*) and "
                      "differ from pipe/uncond_* (1 row) by float rounding (< 1e-6)"],
            "max_abs": {k: float(np.abs(arrays[f"pipe/{k}"]).max())
                        for k in ("text_embeds", "last_hidden_state", "prior/image_emb", "decoder/image")}}
        print(f"pipeline: max |x| {index['pipeline']['max_abs']}, image mean {arrays['pipe/image'].mean():.4f}")
    if "variation" in only:
        arrays = {k: v for k, v in arrays.items() if not k.startswith("var/")}
        arrays.update(make_variation(TINY_DIR))
        pipe_dir = os.path.join(TINY_DIR, "pipeline")
        index["variation"] = {
            "class": "UnCLIPImageVariationPipeline",
            "folders": ["pipeline/image_encoder", "pipeline/feature_extractor"],
            "image_encoder_config": TINY_IMAGE_ENCODER, "feature_extractor_config": TINY_FEATURE_EXTRACTOR,
            "weights_sha256": {"image_encoder": _sha256(os.path.join(pipe_dir, "image_encoder",
                                                                     "model.safetensors"))},
            "steps": {k: PIPE_STEPS[k] for k in ("decoder", "super_res")},
            "guidance": {"decoder": PIPE_GUIDANCE["decoder"]},
            "description": "var/images (uint8 [B, 40, 48, 3]: a structured image and its left-right mirror) -> "
                           "feature_extractor (PIL bicubic resize of the shortest edge to 32, center crop 32, /255, "
                           "OpenAI mean/std) -> var/pixel_values [B, 3, 32, 32] -> image_encoder(...).image_embeds "
                           "(var/image_embeds, not normalised); UnCLIPImageVariationPipeline.from_pretrained("
                           "'pipeline', image_encoder=..., feature_extractor=...) (float32 holding the stored "
                           "values) called with image_embeddings=var/image_embeds (the same output as with the "
                           "PIL images), decoder_latents, super_res_latents given, {stage}/noise injected -> "
                           "var/image; the text inputs are the empty prompt's (var/uncond_*, one row) for BOTH "
                           "halves of the classifier-free batch; decoder/image is the clamped decoder result; "
                           "super_res/x0_first as pipe/super_res/x0_first",
            "max_abs": {k: float(np.abs(arrays[f"var/{k}"]).max()) for k in ("image_embeds", "decoder/image")}}
        print(f"variation: max |x| {index['variation']['max_abs']}, image mean {arrays['var/image'].mean():.4f}")
    index["versions"] = versions
    np.savez_compressed(npz_path, **arrays)
    with open(index_path, "w") as f:
        json.dump(index, f, indent=1)
        f.write("\n")
    print(f"wrote {TINY_DIR} and {KEYS_PATH}")


if __name__ == "__main__":
    main()
