"""Shared fixtures: a small built-in data set and a tiny CLIP trained once per test session."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from absl import flags
from filelock import FileLock

os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="session", autouse=True)
def _absl_flags():
    """grain and absl-based code read absl flags; mark them parsed once."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _session_root(tmp_path_factory):
    """A folder of this test session that every pytest-xdist worker sees (the workers' base temp dirs share a
    parent); None without xdist."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return None
    root = tmp_path_factory.getbasetemp().parent / "shared"
    root.mkdir(exist_ok=True)
    return root


def built_once(tmp_path_factory, name: str, build):
    """(folder, build's result if a dict, else None): `build(folder)` run once per test session for all xdist
    workers. The first worker to ask builds under a file lock (filelock: pytest-xdist's recipe for session
    fixtures) while the others wait, then reuse the folder and the result (through JSON); without xdist, an
    ordinary session folder. Tests must not write into these folders: copy them first (`copy_workdir`)."""
    root = _session_root(tmp_path_factory)
    if root is None:
        folder = str(tmp_path_factory.mktemp(name))
        result = build(folder)
        return folder, result if isinstance(result, dict) else None
    folder, done = root / name, root / f"{name}.result.json"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a worker that failed half-way
            folder.mkdir()
            result = build(str(folder))
            done.write_text(json.dumps(result if isinstance(result, dict) else None, default=float))
        return str(folder), json.loads(done.read_text())


def copy_workdir(src: str, dst) -> str:
    """A private copy of a shared fixture's workdir, for a test that writes into it (evaluation reports)."""
    shutil.copytree(src, str(dst))
    return str(dst)


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
    """JAX's persistent compilation cache for this session, shared by the xdist workers: the CLI tests load a
    bundle again in-process, and its sampling loops then compile to the executables the pipeline tests (in
    either worker) already built."""
    import jax

    root = _session_root(tmp_path_factory)
    cache = root / "jax_cache" if root is not None else tmp_path_factory.mktemp("jax_cache")
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    yield
    jax.config.update("jax_compilation_cache_dir", None)


def _for_tests(c, data_dir: str, num_train: int, num_test: int, batch_size: int, overrides: dict):
    """The shrinking every test config shares: small data, no worker processes, a few steps, checkpoints
    every 2 steps, evaluation only at the end; then `overrides` (flattened keys)."""
    c.data.data_dir = data_dir
    c.data.num_train = num_train
    c.data.num_test = num_test
    c.data.num_workers = 0
    c.data.read_threads = 1
    c.batch_size = batch_size
    c.total_steps = 4
    c.log_every = 2
    c.eval_every = 0
    c.checkpoint_every = 2
    c.optimizer.warmup_steps = 1
    c.update_from_flattened_dict(overrides)
    return c


def small_config(data_dir: str, **overrides):
    """configs/clip.py:tiny shrunk for tests: small data, batch 16, no worker processes."""
    from configs.clip import get_config

    c = get_config("tiny")
    c.eval.batch_size = 64
    return _for_tests(c, data_dir, 256, 64, 16, overrides)


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory) -> str:
    """A data dir holding captioned_shapes/64 with 256 train and 64 test examples."""
    from dalle2_jax.data.captioned_shapes import prepare_captioned_shapes

    return built_once(tmp_path_factory, "tfds", lambda d: prepare_captioned_shapes(
        d, "64", num_train=256, num_test=64, num_workers=0))[0]


@pytest.fixture(scope="session")
def trained_clip(tmp_path_factory, shapes_data_dir) -> str:
    """A CLIP workdir trained for 4 steps through the trainer (checkpoints at steps 2 and 4)."""
    from dalle2_jax.training.trainer import train

    return built_once(tmp_path_factory, "clip_workdir", lambda w: train(small_config(shapes_data_dir), w))[0]


def small_prior_config(data_dir: str, clip_workdir: str, **overrides):
    """configs/prior.py:tiny shrunk for tests (width 64, 2 blocks, 2 sampling steps, small data)."""
    from configs.prior import get_config

    c = get_config("tiny")
    c.clip_workdir = clip_workdir
    c.model.width, c.model.depth, c.model.heads = 64, 2, 2
    c.sampling.steps = 2
    c.eval.batch_size = 32
    c.eval.max_examples = 32
    return _for_tests(c, data_dir, 256, 64, 16, overrides)


def small_decoder_config(data_dir: str, clip_workdir: str, **overrides):
    """configs/decoder.py:tiny shrunk for tests: an 8-channel 2-level UNet, 2 sampling steps, small data."""
    from configs.decoder import get_config

    c = get_config("tiny")
    c.clip_workdir = clip_workdir
    m = c.model
    m.channels, m.num_res_blocks, m.channel_mult, m.attention_resolutions, m.head_channels = 8, 1, (1, 2), (32,), 8
    m.caption_width, m.caption_depth, m.caption_heads = 32, 1, 2
    c.sampling.steps = 2
    c.eval.batch_size = 8
    c.eval.max_examples = 16
    c.eval.grid_size = 4
    return _for_tests(c, data_dir, 256, 64, 8, overrides)


@pytest.fixture(scope="session")
def trained_prior(tmp_path_factory, shapes_data_dir, trained_clip) -> tuple[str, dict]:
    """(workdir, train output) of a prior trained for 4 steps on the tiny CLIP, standardised embeddings."""
    from dalle2_jax.training.trainer import train

    cfg = small_prior_config(shapes_data_dir, trained_clip, **{"model.embedding_norm": "standardize",
                                                               "model.stats_examples": 64})
    return built_once(tmp_path_factory, "prior_workdir", lambda w: train(cfg, w))


@pytest.fixture(scope="session")
def trained_decoder(tmp_path_factory, shapes_data_dir, trained_clip) -> tuple[str, dict]:
    """(workdir, train output) of the small decoder trained for 4 steps on the tiny CLIP."""
    from dalle2_jax.training.trainer import train

    return built_once(tmp_path_factory, "decoder_workdir",
                      lambda w: train(small_decoder_config(shapes_data_dir, trained_clip), w))


@pytest.fixture(scope="session")
def trained_upsampler(tmp_path_factory, shapes_256_data_dir) -> tuple[str, dict]:
    """(workdir, train output) of the small 64->256 upsampler trained for 4 steps on crops, with noise-level
    conditioning (max level 100, sampling at level 10)."""
    from dalle2_jax.training.trainer import train

    cfg = small_upsampler_config(shapes_256_data_dir, **{"model.max_noise_level": 100, "sampling.noise_level": 10})
    return built_once(tmp_path_factory, "upsampler_workdir", lambda w: train(cfg, w))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, trained_clip, trained_prior, trained_decoder, trained_upsampler) -> str:
    """A bundle exported from the session's tiny CLIP, prior, decoder and 64->256 upsampler."""
    from dalle2_jax.inference.bundle import export_bundle

    def build(folder):
        export_bundle(os.path.join(folder, "tiny"), trained_clip, trained_decoder[0], prior=trained_prior[0],
                      upsamplers=(trained_upsampler[0],))

    return os.path.join(built_once(tmp_path_factory, "bundles", build)[0], "tiny")


@pytest.fixture(scope="session")
def shapes_256_data_dir(tmp_path_factory) -> str:
    """A data dir holding captioned_shapes/64_256 with 32 train and 4 test examples."""
    from dalle2_jax.data.captioned_shapes import prepare_captioned_shapes

    return built_once(tmp_path_factory, "tfds256", lambda d: prepare_captioned_shapes(
        d, "64_256", num_train=32, num_test=4, num_workers=0))[0]


def small_upsampler_config(data_dir: str, **overrides):
    """configs/upsampler.py:tiny_64to256 shrunk for tests: an 8-channel 2-level UNet on 64x64 crops."""
    from configs.upsampler import get_config

    c = get_config("tiny_64to256")
    c.model.channels, c.model.num_res_blocks, c.model.channel_mult = 8, 1, (1, 2)
    c.sampling.steps = 2
    c.eval.batch_size = 2
    c.eval.max_examples = 2
    c.eval.grid_size = 2
    return _for_tests(c, data_dir, 32, 4, 4, overrides)


_EIGHT_DEVICE_SCRIPT = """
import json, sys
import jax, numpy as np
from absl import flags
flags.FLAGS.mark_as_parsed()
sys.path.insert(0, {tests!r})
import conftest
from dalle2_jax.training.partitioning import global_batch
from dalle2_jax.training.trainer import Run

assert jax.device_count() == 8
out = {{}}
for name, mesh, devices in [("one", dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]),
                            ("eight", {mesh!r}, jax.devices())]:
    cfg = getattr(conftest, {factory!r})(*{args!r})
    cfg.mesh.update(mesh)
    run = Run(cfg, {workdir!r}, devices=devices)
    it = iter(run.stage.train_iterator(cfg.batch_size, 0, 1))
    state = run.init_state()
    step = run.compile_step(run.stage.load_frozen())
    losses = []
    for _ in range({steps}):
        state, metrics = step(state, global_batch(next(it), run.mesh))
        losses.append(float(metrics["loss"]))
    leaves = [np.asarray(x).ravel() for x in jax.tree.leaves(jax.device_get(state.params))]
    shard_counts = sorted({{len(x.sharding.device_set) for x in jax.tree.leaves(state.params)}})
    out[name] = dict(losses=losses, params=np.concatenate(leaves).tolist(), shard_counts=shard_counts)
print(json.dumps(out))
"""


def steps_on_one_and_eight_devices(factory: str, args: tuple, mesh: dict, workdir: str, steps: int = 1) -> dict:
    """Runs `steps` train steps of conftest.<factory>(*args) on 1 device and on 8 fake CPU devices laid out
    as `mesh`, in a subprocess (the device count is fixed at JAX start-up). Returns {'one': ..., 'eight': ...}
    with the losses, the flattened params after the steps and the distinct shard counts of the params."""
    import json
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    script = _EIGHT_DEVICE_SCRIPT.format(tests=tests, factory=factory, args=tuple(args), mesh=mesh,
                                         workdir=workdir, steps=steps)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fixed_batch_losses(cfg, workdir: str) -> tuple[list[float], dict]:
    """Trains `cfg` for cfg.total_steps steps on ONE batch (the first of its pipeline) through the trainer's
    compiled step; returns the per-step losses and the last step's metrics (for overfitting tests)."""
    from dalle2_jax.training.partitioning import global_batch
    from dalle2_jax.training.trainer import Run

    run = Run(cfg, workdir)
    batch = global_batch(next(iter(run.stage.train_iterator(cfg.batch_size, 0, 1))), run.mesh)
    step = run.compile_step(run.stage.load_frozen())
    state = run.init_state()
    losses = []
    for _ in range(int(cfg.total_steps)):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, metrics


@pytest.fixture(scope="session")
def gcs_bucket() -> str:
    """gs://bkt on a local GCS emulator (tests/fake_gcs.py), one per session: tensorstore reads its
    endpoint once per process."""
    from fake_gcs import fake_gcs

    with fake_gcs("bkt"):
        yield "gs://bkt"
