"""Diffusion prior configs: `tiny` (2 CPU cores), `base`, `paper` (width 2048, 24 blocks, ~1.2B params), and
`clip512` / `clip768` / `clip1024` for released CLIPs imported with tools.import_clip (ViT-B-*, ViT-L-14,
ViT-H-14: embeddings 512, 768, 1024 wide; images at the CLIP's 224 px; your data set), and `karlo`: Kakao
Brain's karlo-v1-alpha prior as diffusers ships it (imported with tools.import_karlo).

Use: `python -m dalle2_jax.train --config configs/prior.py:tiny --workdir DIR --config.clip_workdir=CLIP_DIR`.
"""

from __future__ import annotations

import ml_collections

from dalle2_jax.training.config import base_config


# variant -> (CLIP embed dim, CLIP text width, (prior width, depth, heads)) for configs/clip.py's released CLIPs
RELEASED_CLIP_PRIORS = {
    "clip512": (512, 512, (1024, 12, 16)),  # ViT-B-32, ViT-B-16
    "clip768": (768, 768, (2048, 20, 32)),  # ViT-L-14 (karlo: width 2048, 20 layers, 32 heads)
    "clip1024": (1024, 1024, (2048, 24, 32)),  # ViT-H-14 (the paper's prior)
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    """The prior config variant `arg` (tiny | base | paper | clip512 | clip768 | clip1024 | karlo)."""
    c = base_config()
    c.stage = "prior"
    c.clip_workdir = ""  # required: a CLIP workdir (trained or imported)
    m = c.model = ml_collections.ConfigDict()
    m.width = 128
    m.depth = 4
    m.heads = 4
    m.mlp_ratio = 4.0
    m.act = "gelu"
    m.dtype = "float32"
    m.ln_eps = 1e-5
    m.remat = "none"
    m.scan_layers = False
    m.text_token_norm = True  # LayerNorm on the caption token encodings before their projection (karlo: none)
    m.null_text_embedding = True  # a learned null text embedding for dropped conditioning (karlo: none)
    # How CLIP embeddings are scaled for diffusion: "scale" multiplies the unit-norm embeddings by
    # embedding_scale (the paper's 17.2 for 1024-d CLIP; sqrt(embed_dim) keeps per-dimension variance
    # near 1); "standardize" uses per-dimension mean/std measured on the training data (stats/).
    m.embedding_norm = "scale"
    m.embedding_scale = 0.0  # 0 = sqrt(embed_dim) of the frozen CLIP
    m.stats_examples = 4096  # training records for the "standardize" statistics
    m.cond_drop_prob = 0.1  # caption tokens + text embedding dropped together, for guidance
    # The CLIP's sizes, used only to count params without a CLIP workdir (tools.params); training reads
    # them from config.clip_workdir. These match configs/clip.py:tiny.
    m.clip_embed_dim = 128
    m.clip_text_width = 128
    m.clip_context_length = 20

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.schedule = "cosine"
    c.diffusion.num_steps = 1000
    c.diffusion.model_output = "x0"  # the paper's prior predicts the clean embedding
    c.diffusion.learned_variance = False
    c.diffusion.min_snr_gamma = 0.0  # > 0: Min-SNR-gamma loss weighting (diffusion/gaussian.py); 0 = unweighted
    c.diffusion.min_snr_floor = 0.0  # with min_snr_gamma: the x0-space weight is max(floor, min(SNR, gamma))

    c.sampling = ml_collections.ConfigDict()
    c.sampling.sampler = "ddim"  # ddim | ddpm | analytic
    c.sampling.steps = 64
    c.sampling.guidance_scale = 2.0
    c.sampling.eta = 0.0
    c.sampling.num_candidates = 2  # keep the candidate with the higher dot product with the text embedding

    c.batch_size = 128
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 100
    c.optimizer.b2 = 0.96
    c.optimizer.eps = 1e-6
    c.optimizer.weight_decay = 6e-2
    c.optimizer.ema_decay = 0.999
    c.eval.max_examples = 1000
    c.data.embeddings_dir = ""  # train from `python -m dalle2_jax.tools.embed` output instead of images

    if arg == "tiny":
        c.total_steps = 3000
        c.log_every = 50
        c.eval_every = 1000
        c.checkpoint_every = 1000
        c.sampling.steps = 16
    elif arg == "base":
        m.width, m.depth, m.heads = 768, 12, 12
        m.dtype = "bfloat16"
        c.batch_size = 1024
        c.total_steps = 200_000
        c.optimizer.learning_rate = 3e-4
        c.optimizer.warmup_steps = 2000
        c.optimizer.ema_decay = 0.9999
        c.log_every = 100
        c.eval_every = 10_000
        c.checkpoint_every = 2000
    elif arg == "paper":
        # DALL-E 2 appendix C: decoder-only transformer, width 2048, 24 blocks, AdamW lr 1.1e-4,
        # beta2 0.96, eps 1e-6, weight decay 6e-2, EMA 0.9999, 1000 diffusion steps (cosine), 64 sampling
        # steps; the paper's batch is 4096.
        m.width, m.depth, m.heads = 2048, 24, 32
        m.dtype = "bfloat16"
        m.remat = "full"
        m.scan_layers = True
        m.embedding_scale = 17.2
        m.clip_embed_dim, m.clip_text_width, m.clip_context_length = 1024, 1024, 77  # configs/clip.py:paper
        c.batch_size = 4096
        c.total_steps = 600_000
        c.optimizer.learning_rate = 1.1e-4
        c.optimizer.warmup_steps = 10_000
        c.optimizer.ema_decay = 0.9999
        c.sampling.steps = 64
        c.log_every = 100
        c.eval_every = 10_000
        c.checkpoint_every = 2000
        c.data.name = ""  # set to your prepared image-text TFDS data set
        c.data.image_key = "image"
        c.data.resolution = 256
    elif arg in RELEASED_CLIP_PRIORS or arg == "karlo":
        # On an imported CLIP: the transformer sized for the embedding (clip768 is karlo's ViT-L/14 prior,
        # clip1024 the paper's), standardised embeddings (karlo's clip_mean / clip_std), text context 77.
        embed, text_width, (m.width, m.depth, m.heads) = RELEASED_CLIP_PRIORS["clip768" if arg == "karlo" else arg]
        m.clip_embed_dim, m.clip_text_width, m.clip_context_length = embed, text_width, 77
        m.embedding_norm = "standardize"
        m.dtype = "bfloat16"
        m.remat = "dots_with_no_batch_dims_saveable"
        m.scan_layers = True
        c.batch_size = 4096
        c.total_steps = 400_000
        c.optimizer.learning_rate = 1.1e-4
        c.optimizer.warmup_steps = 5000
        c.optimizer.ema_decay = 0.9999
        c.sampling.steps = 64
        c.sampling.guidance_scale = 4.0  # karlo's default
        c.log_every = 100
        c.eval_every = 10_000
        c.checkpoint_every = 2000
        c.data.name = ""  # your prepared image-text TFDS data set (tools.build_folder)
        c.data.image_key = "image"
        c.data.resolution = 224  # the CLIP's input size (336 for ViT-L-14-336)
        if arg == "karlo":
            # karlo-v1-alpha's prior (diffusers PriorTransformer defaults; tools.import_karlo reads every size
            # from the checkpoint's config.json): width 2048 = 32 heads x 64, 20 pre-LN blocks with exact GELU,
            # ViT-L/14's 768-d embeddings and 77 text tokens (81 positions), the caption token encodings
            # projected without a LayerNorm, no learned null embedding (its unconditional input is the empty
            # caption), x0 prediction on the cosine schedule with the fixed small (posterior, log-clipped)
            # variance, embeddings standardised with karlo's clip_mean / clip_std (stats/, from the import).
            m.text_token_norm = False
            m.null_text_embedding = False
            # fine-tuning (--config.init_from=<import>/prior): 10% of the captions are replaced by the empty
            # caption's CLIP encodings, the unconditional input guidance uses; the standardisation statistics
            # come with the params (stats/ copied from init_from, not measured on the new data)
            m.cond_drop_prob = 0.1
            c.diffusion.schedule = "cosine"
            c.diffusion.num_steps = 1000
            c.diffusion.model_output = "x0"
            c.diffusion.learned_variance = False
            c.sampling.sampler = "ddpm"  # the fixed small variance; diffusers' UnCLIPScheduler, 25 steps
            c.sampling.steps = 25
            c.sampling.num_candidates = 1
            # sampling as UnCLIPPipeline does: its scheduler's float32 constants, x0 clipped at 5, the
            # unconditional half from the empty caption's encodings (passed by the caller), the CLIP text
            # embedding raw (not unit-norm, not scaled) and the sampled image embedding un-standardised only
            c.diffusion.schedule_arithmetic = "unclip"
            c.sampling.clip_x0 = 5.0
            m.embedding_scale = 1.0
            m.normalize_embedding = False
    else:
        raise ValueError(f"unknown prior config {arg!r}; use tiny, base, paper, karlo or one of "
                         f"{sorted(RELEASED_CLIP_PRIORS)}")
    return c
