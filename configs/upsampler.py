"""Upsampler configs: `tiny_64to256`, `paper_64to256` (700M), `tiny_256to1024`, `paper_256to1024` (300M),
`karlo_64to256` (Kakao Brain's karlo-v1-alpha super-resolution UNets as diffusers ships them, imported with
tools.import_karlo: one config for both `super_res_first` and `super_res_last`, two sets of weights).

Convolution-only UNets (no attention, no caption) that take the corrupted low-res image upsampled and
concatenated to the noisy input; trained on random crops a quarter of the target side and sampled at
full size. Use: `python -m dalle2_jax.train --config configs/upsampler.py:tiny_64to256 --workdir DIR`.
"""

from __future__ import annotations

import ml_collections

from configs.decoder import unet_model_config
from dalle2_jax.training.config import base_config

VARIANTS = ("tiny_64to256", "paper_64to256", "tiny_256to1024", "paper_256to1024", "karlo_64to256")


def get_config(arg: str = "tiny_64to256") -> ml_collections.ConfigDict:
    """The upsampler config variant `arg` (one of VARIANTS)."""
    if arg not in VARIANTS:
        raise ValueError(f"unknown upsampler config {arg!r}; use one of {VARIANTS}")
    size, stage = arg.split("_", 1)
    c = base_config()
    c.stage = "upsampler"
    m = c.model = unet_model_config()
    m.attention_resolutions = ()  # the paper's upsamplers have no attention
    m.scale_shift = False
    m.low_res_upsample = "bicubic"  # how the low-res input is brought to the output size (jax.image.resize)
    # Training-time corruption of the low-res input: blur (Gaussian, blur_size x blur_size, blur_sigma),
    # bsr (BSR-style: mixed blur kernels, resize modes, Gaussian noise, JPEG; data/degradations.py) or none.
    m.degradation = "blur"
    m.blur_sigma = 0.6
    m.blur_size = 3
    m.bsr_strength = 1.0
    # Optional noise-level conditioning: the low-res input is also noised with the diffusion's forward
    # process at a level s ~ U[0, max_noise_level) (of num_steps) in training and at sampling.noise_level
    # when sampling; the UNet embeds s like a timestep. 0 = off.
    m.max_noise_level = 0
    # Predict x0 as the bicubic-upsampled low-res input plus the UNet's output (needs diffusion.model_output
    # x0): an untrained upsampler returns bicubic, and training learns the correction (sharper edges).
    m.predict_residual = False
    # Models karlo imports (tools.import_karlo): last_step_model, a second weight set for the final sampling
    # step (params {"main", "last_step"}); float_low_res, the pipeline hands this upsampler the previous
    # stage's float output (clamped to [-1, 1]) instead of its 8-bit image, as diffusers' UnCLIPPipeline does.
    m.last_step_model = False
    m.float_low_res = False

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.schedule = "cosine"
    c.diffusion.num_steps = 1000
    c.diffusion.model_output = "eps"
    c.diffusion.learned_variance = False
    c.diffusion.schedule_shift = 1.0  # > 1: log-SNR lowered by 2 log(shift) at every step (schedules.py)
    c.diffusion.min_snr_gamma = 0.0  # > 0: Min-SNR-gamma loss weighting (diffusion/gaussian.py); 0 = unweighted
    c.diffusion.min_snr_floor = 0.0  # with min_snr_gamma: the x0-space weight is max(floor, min(SNR, gamma))
    # Training timesteps: uniform, or logit_normal (t / num_steps = sigmoid(N(mean, std^2)), SD3's choice: more of
    # each batch at the middle noise levels, where the layout and outlines are decided)
    c.diffusion.timestep_sampling = "uniform"
    c.diffusion.logit_normal_mean = 0.0
    c.diffusion.logit_normal_std = 1.0

    c.sampling = ml_collections.ConfigDict()
    c.sampling.sampler = "ddim"
    c.sampling.steps = 27
    c.sampling.eta = 0.0
    c.sampling.clip_x0 = True
    c.sampling.noise_level = 0  # the low-res noise level at sampling (with model.max_noise_level > 0)

    d = c.data
    d.builder_config = "64_256"
    d.image_key = "image_256"  # the high-res target
    d.resolution = 256
    d.low_res_key = "image_64"  # the stored low-res render of the same scene ("" = downsample the target)
    d.low_res_resolution = 64
    d.crop_size = 64  # random training crops of the target (0 = full size); a quarter of the side

    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.0
    c.eval.batch_size = 8
    c.eval.max_examples = 32
    c.eval.grid_size = 4  # rows of (low-res, bicubic, sample, truth) in the PNG grid

    if stage == "256to1024":
        c.diffusion.schedule = "linear"
        c.sampling.steps = 15
        m.degradation = "bsr"
        d.builder_config = "256_1024"
        d.image_key, d.resolution = "image_1024", 1024
        d.low_res_key, d.low_res_resolution = "image_256", 256
        d.crop_size = 256
    if size == "tiny":
        # x0 = bicubic(low-res) + the UNet's correction (model.predict_residual): a CPU-sized UNet starts at
        # bicubic's quality and keeps it. With eps-prediction its x0 estimate at high noise was too poor (a
        # 1000-step run: noisy grey samples, PSNR 9.7 dB); v-prediction without the residual left grain
        # (the 2026-12-03 recipe: 400 steps, PSNR 23.6 dB against bicubic's 34.0); the residual x0 model
        # scored 34.02 against 34.02 at 400 steps (2026-12-04). The paper configs keep eps.
        c.diffusion.model_output = "x0"
        m.predict_residual = True
        c.batch_size = 16
        c.total_steps = 600
        c.log_every = 50
        c.eval_every = 0
        c.checkpoint_every = 200
        c.optimizer.learning_rate = 1e-3
        c.optimizer.warmup_steps = 50
        c.optimizer.ema_decay = 0.995
        c.sampling.steps = 10
        if stage == "256to1024":
            # 256x256 crops are 16x the pixels of the 64->256 crops: a smaller batch and eval set.
            c.batch_size = 4
            c.eval.batch_size = 2
            c.eval.max_examples = 4
            c.eval.grid_size = 2
    else:
        # DALL-E 2 appendix C. 64->256: 700M, 320 channels, 3 res blocks, mults 1,2,3,4, cosine, dropout
        # 0.1, batch 1024, 1M iterations, lr 1.2e-4, 27 DDIM steps. 256->1024: 300M, 192 channels, 2 res
        # blocks, mults 1,1,2,2,4,4, linear, dropout 0, batch 512, 1M iterations, lr 1e-4, 15 DDIM steps.
        # Adam beta2 0.999, eps 1e-8, EMA 0.9999.
        m.dtype = "bfloat16"
        m.remat = "full"
        c.total_steps = 1_000_000
        c.optimizer.warmup_steps = 10_000
        c.optimizer.ema_decay = 0.9999
        c.log_every = 100
        c.eval_every = 10_000
        c.checkpoint_every = 2000
        c.data.name = ""  # set to your prepared TFDS data set with both resolutions
        if stage == "64to256":
            m.channels, m.num_res_blocks, m.channel_mult = 320, 3, (1, 2, 3, 4)
            m.dropout = 0.1
            c.batch_size = 1024
            c.optimizer.learning_rate = 1.2e-4
        else:
            m.channels, m.num_res_blocks, m.channel_mult = 192, 2, (1, 1, 2, 2, 4, 4)
            c.batch_size = 512
            c.optimizer.learning_rate = 1e-4
    if size == "karlo":
        # karlo-v1-alpha's super-res (diffusers' UNet2DModel x 2; tools.import_karlo reads every size from the
        # checkpoint's config.json): the paper 64->256 UNet's architecture (320 channels, mults 1,2,3,4, 3 res
        # blocks, no attention anywhere, additive time embedding, residual up/down, GroupNorm 32 / 1e-5, 6
        # inputs = noisy image + bicubic-upsampled 64 px image, 3 outputs = eps), 691,579,523 params. Two
        # weight sets share this config: super_res_first for every step but the last, super_res_last
        # (GAN-finetuned) for the last one. UnCLIPPipeline: cosine (squaredcos_cap_v2) 1000 steps, eps, fixed
        # small variance, x0 clipped to [-1, 1], 7 steps by default, no guidance.
        m.dropout = 0.0  # imported for sampling, not trained here
        m.low_res_upsample = "bicubic"  # diffusers: F.interpolate bicubic, antialias (4.8e-7 from jax's bicubic)
        m.predict_residual = False
        c.diffusion.schedule = "cosine"
        c.diffusion.model_output = "eps"
        c.diffusion.learned_variance = False
        c.sampling.sampler = "ddpm"
        c.sampling.steps = 7  # diffusers' UnCLIPPipeline default
        c.sampling.clip_x0 = True
        c.diffusion.schedule_arithmetic = "unclip"  # diffusers' UnCLIPScheduler float32 constants
        m.last_step_model = True  # params {"main": super_res_first, "last_step": super_res_last}
        m.float_low_res = True  # the pipeline hands the decoder's float output (clamped) on, not its 8-bit image
    return c
