"""CLIP stage configs: `tiny` (learns shapes on 2 CPU cores in minutes), `base`, `paper` (ViT-H/16 at 256 px),
and the released architectures under open_clip's names (ViT-B-32, ViT-B-16, ViT-L-14, ViT-L-14-336, ViT-H-14,
each also `-quickgelu`), which `dalle2_jax.tools.import_clip` fills with pretrained weights.

Use: `python -m dalle2_jax.train --config configs/clip.py:tiny --workdir DIR [--config.total_steps=200]`.
"""

from __future__ import annotations

import ml_collections

from dalle2_jax.models.clip import CLIP_MEAN, CLIP_STD
from dalle2_jax.training.config import base_config


def _tower(width: int, depth: int, heads: int, mlp_ratio: float = 4.0, act: str = "gelu"):
    return ml_collections.ConfigDict(dict(width=width, depth=depth, heads=heads, mlp_ratio=mlp_ratio, act=act))


# open_clip's model_configs/<name>.json: embed dim, vision (image size, layers, width, head width, patch),
# text (width, heads, layers); context 77 and vocabulary 49408 everywhere, MLP ratio 4.
OPEN_CLIP_ARCHS = {
    "ViT-B-32": (512, (224, 12, 768, 64, 32), (512, 8, 12)),
    "ViT-B-16": (512, (224, 12, 768, 64, 16), (512, 8, 12)),
    "ViT-L-14": (768, (224, 24, 1024, 64, 14), (768, 12, 12)),
    "ViT-L-14-336": (768, (336, 24, 1024, 64, 14), (768, 12, 12)),
    "ViT-H-14": (1024, (224, 32, 1280, 80, 14), (1024, 16, 24)),
}
QUICKGELU_SUFFIX = "-quickgelu"


def arch_names() -> list[str]:
    """The released architectures this file defines (open_clip names)."""
    return [n + q for n in OPEN_CLIP_ARCHS for q in ("", QUICKGELU_SUFFIX)]


def _open_clip_arch(c: ml_collections.ConfigDict, name: str) -> None:
    """Sets c.model (and the data resolution) to open_clip's architecture `name`: exact-erf GELU, or
    QuickGELU (x * sigmoid(1.702 x), OpenAI's weights and the *-quickgelu names), LayerNorm eps 1e-5,
    bias-free patch conv, class token, CLIP's own BPE tokenizer (77 tokens)."""
    quick = name.endswith(QUICKGELU_SUFFIX)
    embed, (size, v_layers, v_width, head_width, patch), (t_width, t_heads, t_layers) = \
        OPEN_CLIP_ARCHS[name[: -len(QUICKGELU_SUFFIX)] if quick else name]
    act = "quick_gelu" if quick else "gelu"
    m = c.model
    m.arch = name
    m.embed_dim = embed
    m.text = _tower(t_width, t_layers, t_heads, act=act)
    m.text.update(dict(context_length=77, vocab_size=49408, tokenizer="clip_bpe"))
    m.vision = _tower(v_width, v_layers, v_width // head_width, act=act)
    m.vision.update(dict(image_size=size, stem="patch", patch_size=patch, conv_channels=(),
                         mean=CLIP_MEAN, std=CLIP_STD))
    m.dtype = "float32"
    m.scan_layers = False
    c.data.resolution = size
    # Fine-tuning from an import (init_from): open_clip's recipe values
    c.batch_size = 1024
    c.optimizer.learning_rate = 1e-5
    c.optimizer.warmup_steps = 500
    c.optimizer.weight_decay = 0.1
    c.total_steps = 10_000
    c.log_every = 100
    c.eval_every = 2000
    c.checkpoint_every = 1000


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    """The CLIP config variant `arg` (tiny | base | paper | an open_clip name from arch_names())."""
    c = base_config()
    c.stage = "clip"
    m = c.model = ml_collections.ConfigDict()
    m.embed_dim = 128
    m.dtype = "float32"  # compute dtype; params stay float32
    m.ln_eps = 1e-5
    m.remat = "none"
    m.scan_layers = False
    m.init_logit_scale = 2.6592600369644165  # log(1 / 0.07)
    m.max_logit_scale = 4.605170185988092  # log(100)
    m.identical_captions_positive = True  # identical captions in a batch count as matches
    # False: the text tower alone (karlo ships only CLIP's text encoder; tools.import_karlo without an image
    # encoder). model.vision keeps the sizes the image tower would have; nothing that needs images runs.
    m.image_tower = True
    m.text = _tower(128, 2, 4)
    m.text.context_length = 20  # the longest built-in caption is 16 words
    m.text.vocab_size = 512
    m.text.tokenizer = "bpe"  # bpe: trained on the captions | clip_bpe: CLIP's own (49408 tokens)
    m.arch = ""  # an open_clip architecture name for the released variants
    m.vision = _tower(128, 2, 4)
    m.vision.image_size = 64
    m.vision.stem = "conv"
    m.vision.patch_size = 8
    m.vision.conv_channels = (16, 32, 64, 128)
    m.vision.mean = CLIP_MEAN
    m.vision.std = CLIP_STD

    c.batch_size = 128
    c.optimizer.learning_rate = 2e-3
    c.optimizer.b2 = 0.98
    c.optimizer.eps = 1e-6
    c.optimizer.weight_decay = 0.05
    c.optimizer.warmup_steps = 100
    c.optimizer.final_lr_fraction = 0.05
    c.optimizer.ema_decay = 0.999

    if arg == "tiny":
        # A conv stem learns shape far faster than 8x8 patches at this size (see STACK_NOTES.md); the
        # narrower stem (16..128 instead of 32..128) is 1.5x faster per step on 2 CPU cores and learns
        # as fast per step. docs/clip.md for the figures.
        c.total_steps = 2500
        c.log_every = 50
        c.eval_every = 500
        c.checkpoint_every = 500
    elif arg == "base":
        c.model.embed_dim = 512
        c.model.text = _tower(512, 8, 8)
        c.model.text.context_length = 32
        c.model.text.vocab_size = 4096
        c.model.text.tokenizer = "bpe"
        c.model.vision = _tower(512, 8, 8)
        c.model.vision.update(dict(image_size=64, stem="patch", patch_size=4, conv_channels=(),
                                   mean=CLIP_MEAN, std=CLIP_STD))
        c.batch_size = 1024
        c.total_steps = 50_000
        c.optimizer.learning_rate = 5e-4
        c.optimizer.warmup_steps = 2000
        c.optimizer.weight_decay = 0.2
        c.log_every = 100
        c.eval_every = 5000
        c.checkpoint_every = 2000
        c.model.dtype = "bfloat16"
    elif arg == "paper":
        # DALL-E 2's CLIP: ViT-H/16 image encoder at 256 px (width 1280, 32 blocks) and a 24-block,
        # width-1024 causal text transformer, 1024-d joint embedding.
        c.model.embed_dim = 1024
        c.model.text = _tower(1024, 24, 16)
        c.model.text.context_length = 77
        c.model.text.vocab_size = 49408
        c.model.text.tokenizer = "clip_bpe"
        c.model.vision = _tower(1280, 32, 16)
        c.model.vision.update(dict(image_size=256, stem="patch", patch_size=16, conv_channels=(),
                                   mean=CLIP_MEAN, std=CLIP_STD))
        c.model.dtype = "bfloat16"
        c.model.remat = "full"
        c.model.scan_layers = True
        c.data.resolution = 256
        c.data.image_key = "image"
        c.data.name = ""  # set to your prepared image-text TFDS data set
        c.batch_size = 32768
        c.total_steps = 400_000
        c.optimizer.learning_rate = 5e-4
        c.optimizer.warmup_steps = 2000
        c.optimizer.weight_decay = 0.2
        c.log_every = 100
        c.eval_every = 10_000
        c.checkpoint_every = 1000
    elif arg in arch_names():
        _open_clip_arch(c, arg)
    else:
        raise ValueError(f"unknown clip config {arg!r}; use tiny, base, paper or one of {arch_names()}")
    return c
