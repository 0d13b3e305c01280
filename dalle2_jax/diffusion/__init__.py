"""Gaussian diffusion math in plain jnp: schedules, q_sample, losses, samplers, respacing, guidance.

Knows nothing of images or text: arrays are [B, ...] of any trailing shape, and models are plain callables
`model_fn(x_t, t_original) -> output` (output with 2x channels on the last axis when the variance is learned).
"""

from dalle2_jax.diffusion.clipping import clip_range, dynamic_threshold, process_x0
from dalle2_jax.diffusion.gaussian import (
    FIXED_VARIANCES,
    LOSS_TYPES,
    MAX_LOG_STD_DIFF,
    discretized_gaussian_log_likelihood,
    extract,
    fixed_log_variance,
    gaussian_log_likelihood,
    learned_range_log_variance,
    mean_flat,
    min_snr_weight,
    sample_timesteps,
    model_output_to_x0_eps,
    normal_kl,
    p_mean_variance,
    predict_eps_from_v,
    predict_eps_from_x0,
    predict_x0_from_eps,
    predict_x0_from_v,
    q_posterior,
    q_sample,
    split_output,
    training_losses,
    v_from_x0_eps,
    vb_terms_bpd,
)
from dalle2_jax.diffusion.guidance import cfg_denoiser, cfg_denoiser_batched, combine_guidance
from dalle2_jax.diffusion.samplers import (
    analytic_variances,
    ddim_invert,
    ddpm_step,
    estimate_analytic_gamma,
    repaint_schedule,
    sample_analytic,
    sample_ddim,
    sample_ddpm,
    sample_repaint,
)
from dalle2_jax.diffusion.schedules import (
    MODEL_OUTPUTS,
    RESPACE_KINDS,
    SCHEDULES,
    Diffusion,
    betas_for,
    cosine_alpha_bar,
    diffusion_from_betas,
    karlo_timesteps,
    make_diffusion,
    respace,
    unclip_diffusion,
)

__all__ = [
    "FIXED_VARIANCES", "LOSS_TYPES", "MAX_LOG_STD_DIFF", "MODEL_OUTPUTS", "RESPACE_KINDS", "SCHEDULES",
    "Diffusion", "betas_for", "cosine_alpha_bar", "diffusion_from_betas", "make_diffusion", "karlo_timesteps",
    "respace", "unclip_diffusion",
    "extract", "mean_flat", "q_sample", "predict_x0_from_eps", "predict_eps_from_x0", "predict_x0_from_v",
    "predict_eps_from_v", "v_from_x0_eps", "model_output_to_x0_eps", "split_output", "q_posterior",
    "learned_range_log_variance", "fixed_log_variance", "p_mean_variance", "normal_kl", "gaussian_log_likelihood",
    "discretized_gaussian_log_likelihood", "vb_terms_bpd", "training_losses", "min_snr_weight", "sample_timesteps",
    "clip_range", "dynamic_threshold", "process_x0",
    "ddpm_step", "sample_ddpm", "sample_ddim", "ddim_invert", "repaint_schedule", "sample_repaint",
    "estimate_analytic_gamma", "analytic_variances", "sample_analytic",
    "combine_guidance", "cfg_denoiser", "cfg_denoiser_batched",
]
