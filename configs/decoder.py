"""Decoder configs (64x64 GLIDE-style UNet conditioned on the CLIP image embedding): `tiny` (2 CPU cores),
`base`, `paper` (DALL-E 2 appendix C: 3.5B with its caption transformer), and `clip512` / `clip768` /
`clip1024` for released CLIPs imported with tools.import_clip (the 64 px decoder on your data; the CLIP's
224 px input is made from each source image with CLIP's preprocessing), and `karlo`: Kakao Brain's
karlo-v1-alpha decoder as diffusers ships it (imported with tools.import_karlo).

Use: `python -m dalle2_jax.train --config configs/decoder.py:tiny --workdir DIR --config.clip_workdir=CLIP_DIR`.
"""

from __future__ import annotations

import ml_collections

from dalle2_jax.training.config import base_config


def unet_model_config() -> ml_collections.ConfigDict:
    """The UNet keys shared by the decoder and the upsamplers (models/unet.py)."""
    m = ml_collections.ConfigDict()
    m.channels = 16  # model channels at the first level
    m.num_res_blocks = 1
    m.channel_mult = (1, 2, 4)
    m.attention_resolutions = (16,)  # feature-map sizes (pixels, at data.resolution) with self-attention
    m.head_channels = 32
    m.dropout = 0.0
    m.scale_shift = True  # AdaGN timestep conditioning (False: added before the second norm)
    m.resblock_updown = True  # BigGAN-style residual up/down blocks (False: strided conv / nearest + conv)
    m.groups = 32  # GroupNorm groups (fewer when the channels are not divisible)
    m.dtype = "float32"
    m.patch_size = 1  # >1: fold p x p patches into channels at the input (space-to-depth; models/unet.py)
    m.full_res_channels = 0  # >0 (with patch_size > 1): a residual block of this width at full res each side
    m.remat = "none"  # none | full | dots_saveable | dots_with_no_batch_dims_saveable
    return m


# variant -> (CLIP embed dim, (UNet channels, caption width, depth, heads)) for configs/clip.py's released CLIPs;
# clip768 has karlo's UNet width (320 channels, mults 1,2,3,4, 3 blocks, attention at 32/16/8, 64-d heads)
RELEASED_CLIP_DECODERS = {
    "clip512": (512, (192, 512, 8, 8)),  # ViT-B-32, ViT-B-16
    "clip768": (768, (320, 768, 12, 12)),  # ViT-L-14
    "clip1024": (1024, (512, 1024, 16, 16)),  # ViT-H-14
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    """The decoder config variant `arg` (tiny | shapes | base | paper | clip512 | clip768 | clip1024 | karlo)."""
    c = base_config()
    c.stage = "decoder"
    c.clip_workdir = ""  # required: a CLIP workdir (trained or imported)
    m = c.model = unet_model_config()
    m.dropout = 0.1
    m.image_tokens = 4  # extra context tokens projected from the CLIP image embedding
    m.normalize_embedding = True  # unit-normalise the CLIP image embedding before conditioning
    # Multiply the (unit-norm) embedding by sqrt(embed dim) before its projections, so its components are
    # O(1) like the timestep embedding's and the caption's: unscaled, a unit vector through a lecun-normal
    # Dense gives outputs ~1/sqrt(E) of theirs, and the decoder learns to follow the embedding slowly.
    m.scale_embedding = False
    m.image_drop_prob = 0.1  # for classifier-free guidance (a learned null embedding replaces it)
    m.caption_drop_prob = 0.5  # an all-padding caption replaces it
    # The caption transformer (GLIDE): depth 0 = no caption conditioning. Tokens come from the CLIP's
    # tokenizer, padded to caption_context_length (0 = the CLIP's context length).
    m.caption_width = 64
    m.caption_depth = 1
    m.caption_heads = 2
    m.caption_context_length = 0
    m.caption_scan_layers = False  # scan over the caption blocks: one compiled block (faster compiles)
    # karlo's text conditioning (no caption transformer): the CLIP text embedding added to the timestep
    # embedding, and the CLIP's text token states (projected to model.context_width and layer-normed)
    # appended to the context after the image tokens, masked at the caption's padding.
    m.clip_text_conditioning = False
    m.context_width = 0  # the context tokens' width; 0 = caption_width (or 4 x channels without a caption)
    # The CLIP's sizes, used only to count params without a CLIP workdir (tools.params); training reads
    # them from config.clip_workdir. These match configs/clip.py:tiny.
    m.clip_embed_dim = 128
    m.clip_vocab_size = 512
    m.clip_context_length = 20
    m.clip_text_width = 128

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.schedule = "cosine"
    c.diffusion.num_steps = 1000
    c.diffusion.model_output = "eps"
    c.diffusion.learned_variance = True  # Improved-DDPM hybrid loss; the sampler uses the learned variance
    # > 1: every step's log-SNR lowered by 2 log(shift) (simple diffusion's shifted schedule; schedules.py)
    c.diffusion.schedule_shift = 1.0
    c.diffusion.min_snr_gamma = 0.0  # > 0: Min-SNR-gamma loss weighting (diffusion/gaussian.py); 0 = unweighted
    # with min_snr_gamma: the x0-space weight's lower bound, max(floor, min(SNR, gamma)); 0 = plain Min-SNR
    c.diffusion.min_snr_floor = 0.0
    # Training timesteps: uniform, or logit_normal (t / num_steps = sigmoid(N(mean, std^2)), SD3's choice: more of
    # each batch at the middle noise levels, where the layout and outlines are decided)
    c.diffusion.timestep_sampling = "uniform"
    c.diffusion.logit_normal_mean = 0.0
    c.diffusion.logit_normal_std = 1.0

    c.sampling = ml_collections.ConfigDict()
    c.sampling.sampler = "ddpm"  # ddpm (learned variance, as the paper) | ddim
    c.sampling.steps = 25
    c.sampling.guidance_scale = 3.0  # on both conditions (image embedding and caption) together
    c.sampling.eta = 0.0  # ddim only
    c.sampling.clip_x0 = True  # clip predicted x0 to [-1, 1]

    c.batch_size = 16
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 100
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.0
    c.optimizer.ema_decay = 0.995
    c.eval.batch_size = 128
    c.eval.max_examples = 256
    c.eval.grid_size = 16  # samples in the PNG / TensorBoard grid
    # Timesteps t: also noise each test image to t and sample it back (SDEdit), scored by the scene checker
    # (renoise_t<t>_*): where along the chain the shapes are lost. E.g. (100, 300, 500, 800). At the same t,
    # the conditioning probe: one-step x0 error with each condition dropped or shuffled (x0_mse_t<t>_*).
    c.eval.renoise_steps = ()
    c.data.embeddings_dir = ""  # take image embeddings from `python -m dalle2_jax.tools.embed` output

    if arg == "tiny":
        c.total_steps = 1000
        c.log_every = 50
        c.eval_every = 0  # at the end only: sampling is the slow part on CPU
        c.checkpoint_every = 250
        c.eval.max_examples = 128
    elif arg == "shapes":
        # The decoder of launch/shapes_recipe.sh (2 CPU cores, about an hour). 4x4 patches folded into
        # channels, so the UNet runs at 16 and 8 px (96 and 192 channels, 2 blocks, attention at both), with
        # a 16-channel residual block at full resolution on each side (model.full_res_channels) for the edges
        # inside a patch: 112 GFLOP per step at batch 16. v-prediction with Min-SNR-5 weighting and the
        # embedding scaled to the timestep signal's size: at 1000 steps this scored checker color 0.733 /
        # shape 0.128 where x0-prediction without Min-SNR scored 0.599 / 0.128 (the probes are in
        # docs/notes/2026-12-decoder-probes.md).
        m.patch_size, m.channels, m.channel_mult, m.num_res_blocks = 4, 96, (1, 2), 2
        m.full_res_channels = 16
        m.attention_resolutions = (16, 8)
        m.dropout = 0.0
        m.scale_embedding = True
        m.caption_width, m.caption_depth, m.caption_heads = 128, 1, 4
        c.diffusion.model_output = "v"
        c.diffusion.learned_variance = False
        c.diffusion.min_snr_gamma = 5.0
        # SD3's logit-normal timesteps: at 1000 steps checker color 0.882 / shape 0.118 against uniform
        # timesteps' 0.733 / 0.128 (docs/notes/2026-12-decoder-probes.md, "More probes (2026-12-04)")
        c.diffusion.timestep_sampling = "logit_normal"
        c.sampling.sampler = "ddim"
        c.sampling.steps = 25
        c.optimizer.ema_decay = 0.999
        c.total_steps = 3000
        c.log_every = 50
        c.eval_every = 0
        c.checkpoint_every = 250
        c.eval.max_examples = 256
    elif arg == "base":
        m.channels, m.num_res_blocks, m.channel_mult = 192, 3, (1, 2, 3, 4)
        m.attention_resolutions, m.head_channels = (32, 16, 8), 64
        m.caption_width, m.caption_depth, m.caption_heads = 512, 8, 8
        m.dtype = "bfloat16"
        c.batch_size = 256
        c.total_steps = 200_000
        c.optimizer.learning_rate = 1.2e-4
        c.optimizer.warmup_steps = 2000
        c.optimizer.ema_decay = 0.9999
        c.sampling.steps = 100
        c.log_every = 100
        c.eval_every = 10_000
        c.checkpoint_every = 2000
    elif arg == "paper":
        # DALL-E 2 appendix C (the 64x64 decoder, 3.5B): 512 channels, 3 res blocks, mults 1,2,3,4, 64
        # channels per head, attention at 32/16/8; caption transformer context 256, width 2048, 24 layers,
        # 32 heads; dropout 0.1; learned sigma; cosine schedule, 1000 steps, 250 sampling steps;
        # Adam lr 1.2e-4, beta2 0.999, eps 1e-8, EMA 0.9999, batch 2048, 800K iterations.
        m.channels, m.num_res_blocks, m.channel_mult = 512, 3, (1, 2, 3, 4)
        m.attention_resolutions, m.head_channels = (32, 16, 8), 64
        m.caption_width, m.caption_depth, m.caption_heads, m.caption_context_length = 2048, 24, 32, 256
        m.caption_scan_layers = True
        m.dtype = "bfloat16"
        m.remat = "full"
        m.clip_embed_dim, m.clip_vocab_size, m.clip_context_length = 1024, 49408, 77  # configs/clip.py:paper
        c.batch_size = 2048
        c.total_steps = 800_000
        c.optimizer.learning_rate = 1.2e-4
        c.optimizer.warmup_steps = 10_000
        c.optimizer.ema_decay = 0.9999
        c.sampling.steps = 250
        c.log_every = 100
        c.eval_every = 10_000
        c.checkpoint_every = 2000
        c.data.name = ""  # set to your prepared image-text TFDS data set
        c.data.image_key = "image"
    elif arg in RELEASED_CLIP_DECODERS:
        embed, (m.channels, m.caption_width, m.caption_depth, m.caption_heads) = RELEASED_CLIP_DECODERS[arg]
        m.num_res_blocks, m.channel_mult = 3, (1, 2, 3, 4)
        m.attention_resolutions, m.head_channels = (32, 16, 8), 64
        m.clip_embed_dim, m.clip_vocab_size, m.clip_context_length = embed, 49408, 77
        m.dtype = "bfloat16"
        m.remat = "full"
        c.batch_size = 1024
        c.total_steps = 500_000
        c.optimizer.learning_rate = 1.2e-4
        c.optimizer.warmup_steps = 10_000
        c.optimizer.ema_decay = 0.9999
        c.sampling.steps = 100
        c.sampling.guidance_scale = 8.0  # karlo's default
        c.log_every = 100
        c.eval_every = 10_000
        c.checkpoint_every = 2000
        c.data.name = ""  # your prepared image-text TFDS data set (tools.build_folder)
        c.data.image_key = "image"
    elif arg == "karlo":
        # karlo-v1-alpha's decoder (diffusers' UNet2DConditionModel + UnCLIPTextProjModel; tools.import_karlo
        # reads every size from the checkpoint's config.json): 320 channels, mults 1,2,3,4, 3 res blocks,
        # attention at 32/16/8 (none at 64) with 64-channel heads, scale-shift norm, residual up/down, GroupNorm
        # 32 / 1e-5, time embedding 4 x 320 = 1280, learned-range variance (6 outputs); conditioned on ViT-L/14's
        # raw (not unit-normalised) 768-d image embedding (time embedding + 4 context tokens, a learned null
        # for guidance), its 768-d text embedding (time embedding) and its 77 text token states (context, after
        # the image tokens, masked at padding), all context tokens 1536 wide; no caption transformer.
        m.channels, m.num_res_blocks, m.channel_mult = 320, 3, (1, 2, 3, 4)
        m.attention_resolutions, m.head_channels = (32, 16, 8), 64
        m.groups, m.scale_shift, m.resblock_updown = 32, True, True
        m.image_tokens, m.normalize_embedding = 4, False
        # caption_drop_prob: for guidance in fine-tuning, half of the captions are replaced by the empty caption's
        # CLIP encodings (the unconditional half sampling uses), as the paper drops them 50% of the time
        m.caption_depth, m.caption_drop_prob = 0, 0.5
        m.clip_text_conditioning, m.context_width = True, 1536
        m.clip_embed_dim, m.clip_vocab_size, m.clip_context_length, m.clip_text_width = 768, 49408, 77, 768
        m.dtype = "bfloat16"
        m.remat = "full"
        c.diffusion.schedule = "cosine"
        c.diffusion.num_steps = 1000
        c.diffusion.model_output = "eps"
        c.diffusion.learned_variance = True
        c.sampling.sampler = "ddpm"
        c.sampling.steps = 25  # diffusers' UnCLIPPipeline default
        c.diffusion.schedule_arithmetic = "unclip"  # diffusers' UnCLIPScheduler float32 constants
        c.sampling.clip_x0 = True  # x0 clipped to [-1, 1]
        c.sampling.guidance_scale = 8.0  # karlo's default (on the image embedding; the text half is the empty caption)
        c.batch_size = 1024
        c.data.name = ""
        c.data.image_key = "image"
    else:
        raise ValueError(f"unknown decoder config {arg!r}; use tiny, shapes, base, paper, karlo or one of "
                         f"{sorted(RELEASED_CLIP_DECODERS)}")
    return c
