"""Shared fixtures: a small built-in data set and a tiny CLIP trained once per test session."""

from __future__ import annotations

import os

import pytest
from absl import flags

os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="session", autouse=True)
def _absl_flags():
    """grain and absl-based code read absl flags; mark them parsed once."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def small_config(data_dir: str, **overrides):
    """configs/clip.py:tiny shrunk for tests: small data, batch 16, no worker processes."""
    from configs.clip import get_config

    c = get_config("tiny")
    c.data.data_dir = data_dir
    c.data.num_train = 256
    c.data.num_test = 64
    c.data.num_workers = 0
    c.data.read_threads = 1
    c.batch_size = 16
    c.total_steps = 4
    c.log_every = 2
    c.eval_every = 0
    c.checkpoint_every = 2
    c.optimizer.warmup_steps = 1
    c.eval.batch_size = 64
    c.update_from_flattened_dict(overrides)
    return c


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory) -> str:
    """A data dir holding captioned_shapes/64 with 256 train and 64 test examples."""
    from dalle2_jax.data.captioned_shapes import prepare_captioned_shapes

    d = str(tmp_path_factory.mktemp("tfds"))
    prepare_captioned_shapes(d, "64", num_train=256, num_test=64, num_workers=0)
    return d


@pytest.fixture(scope="session")
def trained_clip(tmp_path_factory, shapes_data_dir) -> str:
    """A CLIP workdir trained for 4 steps through the trainer (checkpoints at steps 2 and 4)."""
    from dalle2_jax.training.trainer import train

    workdir = str(tmp_path_factory.mktemp("clip_workdir"))
    train(small_config(shapes_data_dir), workdir)
    return workdir


def small_prior_config(data_dir: str, clip_workdir: str, **overrides):
    """configs/prior.py:tiny shrunk for tests (width 64, 2 blocks, 2 sampling steps, small data)."""
    from configs.prior import get_config

    c = get_config("tiny")
    c.clip_workdir = clip_workdir
    c.data.data_dir = data_dir
    c.data.num_train = 256
    c.data.num_test = 64
    c.data.num_workers = 0
    c.data.read_threads = 1
    c.model.width, c.model.depth, c.model.heads = 64, 2, 2
    c.batch_size = 16
    c.total_steps = 4
    c.log_every = 2
    c.eval_every = 0
    c.checkpoint_every = 2
    c.optimizer.warmup_steps = 1
    c.sampling.steps = 2
    c.eval.batch_size = 32
    c.eval.max_examples = 32
    c.update_from_flattened_dict(overrides)
    return c


def small_decoder_config(data_dir: str, clip_workdir: str, **overrides):
    """configs/decoder.py:tiny shrunk for tests: an 8-channel 2-level UNet, 2 sampling steps, small data."""
    from configs.decoder import get_config

    c = get_config("tiny")
    c.clip_workdir = clip_workdir
    c.data.data_dir = data_dir
    c.data.num_train = 256
    c.data.num_test = 64
    c.data.num_workers = 0
    c.data.read_threads = 1
    m = c.model
    m.channels, m.num_res_blocks, m.channel_mult, m.attention_resolutions, m.head_channels = 8, 1, (1, 2), (32,), 8
    m.caption_width, m.caption_depth, m.caption_heads = 32, 1, 2
    c.batch_size = 8
    c.total_steps = 4
    c.log_every = 2
    c.eval_every = 0
    c.checkpoint_every = 2
    c.optimizer.warmup_steps = 1
    c.sampling.steps = 2
    c.eval.batch_size = 8
    c.eval.max_examples = 16
    c.eval.grid_size = 4
    c.update_from_flattened_dict(overrides)
    return c


@pytest.fixture(scope="session")
def shapes_256_data_dir(tmp_path_factory) -> str:
    """A data dir holding captioned_shapes/64_256 with 32 train and 4 test examples."""
    from dalle2_jax.data.captioned_shapes import prepare_captioned_shapes

    d = str(tmp_path_factory.mktemp("tfds256"))
    prepare_captioned_shapes(d, "64_256", num_train=32, num_test=4, num_workers=0)
    return d


def small_upsampler_config(data_dir: str, **overrides):
    """configs/upsampler.py:tiny_64to256 shrunk for tests: an 8-channel 2-level UNet on 64x64 crops."""
    from configs.upsampler import get_config

    c = get_config("tiny_64to256")
    c.data.data_dir = data_dir
    c.data.num_train = 32
    c.data.num_test = 4
    c.data.num_workers = 0
    c.data.read_threads = 1
    c.model.channels, c.model.num_res_blocks, c.model.channel_mult = 8, 1, (1, 2)
    c.batch_size = 4
    c.total_steps = 4
    c.log_every = 2
    c.checkpoint_every = 2
    c.optimizer.warmup_steps = 1
    c.sampling.steps = 2
    c.eval.batch_size = 2
    c.eval.max_examples = 2
    c.eval.grid_size = 2
    c.update_from_flattened_dict(overrides)
    return c
