"""TFDS builder `captioned_shapes`: procedural captioned scenes (see shared/SHAPES.md), no TensorFlow.

Records, as returned by `tfds.data_source('captioned_shapes/64', data_dir=...)[i]`::

    {'caption': bytes,
     'scene': {'background': int64, 'relation': int64, 'num_objects': int32, 'template': int32,
               'shape': int32 [2], 'color': int32 [2], 'size': int32 [2],   # -1 padding
               'center': float32 [2, 2], 'rotation': float32 [2]},
     'image_64': uint8 [64, 64, 3]}          # and/or image_256 / image_1024 per config

`scenes.decode_scene(record['scene'])` gives back the scene dict.
"""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from dalle2_jax import log_filters, procs
from dalle2_jax.data import scenes, staging

log_filters.install()  # also in grain's worker processes, which rebuild the data source

NAME = 'captioned_shapes'
_DEFAULT_SIZES: dict[str, tuple[tuple[int, ...], int, int]] = {
    # config name: (resolutions, num_train, num_test)
    '64': ((64,), 32000, 2000),
    '64_256': ((64, 256), 4000, 500),
    '256_1024': ((256, 1024), 1000, 200),
}
_MAX_CHUNK = 64  # examples per task sent to a worker process
_MIN_PER_WORKER = 16  # fewer examples than this per worker: generate in this process


@dataclasses.dataclass(eq=False)
class CaptionedShapesConfig(tfds.core.BuilderConfig):
    """Config: which resolutions to store, split sizes and the generation seed."""

    resolutions: tuple[int, ...] = (64,)
    num_train: int = 32000
    num_test: int = 2000
    seed: int = 0


def _config(name: str, resolutions: tuple[int, ...], num_train: int, num_test: int, seed: int) -> CaptionedShapesConfig:
    return CaptionedShapesConfig(
        name=name, resolutions=resolutions, num_train=num_train, num_test=num_test, seed=seed,
        description=f'images at {"/".join(map(str, resolutions))} px; {num_train} train / {num_test} test; seed {seed}')


class CaptionedShapes(staging.QuietBuild, tfds.core.GeneratorBasedBuilder):
    """Procedural captioned shapes: a background plus 1-2 colored shapes, with a caption and the scene."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES: ClassVar[dict[str, str]] = {'1.0.0': 'Initial release.'}
    BUILDER_CONFIGS: ClassVar[list[CaptionedShapesConfig]] = [
        _config(name, res, n, t, 0) for name, (res, n, t) in _DEFAULT_SIZES.items()]
    DEFAULT_CONFIG_NAME = '64'

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """This file (TFDS's own lookup needs the undeclared `importlib_resources` package)."""
        return epath.Path(__file__)

    def __init__(self, *, num_workers: int | None = None, **kwargs: Any):
        """`num_workers`: render processes (None: the usable CPUs, at most 8; 0: render in this process)."""
        self._num_workers = _default_workers() if num_workers is None else num_workers
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        features: dict[str, Any] = {
            'caption': tfds.features.Text(),
            'scene': tfds.features.FeaturesDict({
                'background': tfds.features.ClassLabel(names=list(scenes.BACKGROUND_NAMES)),
                'relation': tfds.features.ClassLabel(names=list(scenes.RELATION_LABELS)),
                'num_objects': tfds.features.Scalar(dtype=np.int32),
                'shape': tfds.features.Tensor(shape=(scenes.MAX_OBJECTS,), dtype=np.int32),
                'color': tfds.features.Tensor(shape=(scenes.MAX_OBJECTS,), dtype=np.int32),
                'size': tfds.features.Tensor(shape=(scenes.MAX_OBJECTS,), dtype=np.int32),
                'center': tfds.features.Tensor(shape=(scenes.MAX_OBJECTS, 2), dtype=np.float32),
                'rotation': tfds.features.Tensor(shape=(scenes.MAX_OBJECTS,), dtype=np.float32),
                'template': tfds.features.Scalar(dtype=np.int32),
            }),
        }
        for r in cfg.resolutions:
            features[f'image_{r}'] = tfds.features.Image(shape=(r, r, 3), encoding_format='png')
        return tfds.core.DatasetInfo(
            builder=self,
            description=('Procedural scenes: a white/black/gray background with one or two colored shapes '
                         '(circle, square, triangle, diamond, star, cross; small or large; left of / right of / '
                         'above / below) and a templated caption. Held out of train: purple star, orange '
                         'triangle, cyan square.'),
            features=tfds.features.FeaturesDict(features),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        cfg = self.builder_config
        return {'train': self._generate_examples('train', cfg.num_train),
                'test': self._generate_examples('test', cfg.num_test)}

    def _generate_examples(self, split: str, num_examples: int) -> Iterator[tuple[int, dict[str, Any]]]:
        cfg = self.builder_config
        make = functools.partial(scenes.make_example, cfg.seed, split, resolutions=tuple(cfg.resolutions))
        workers = min(self._num_workers, num_examples // _MIN_PER_WORKER)
        if workers <= 1:
            yield from map(make, range(num_examples))
            return
        chunk = max(1, min(_MAX_CHUNK, num_examples // (4 * workers)))
        with _pool_context().Pool(workers, initializer=procs.die_with_parent) as pool:
            yield from pool.imap(make, range(num_examples), chunksize=chunk)


def _default_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return min(cpus, 8)


def _pool_context() -> multiprocessing.context.BaseContext:
    """'fork' (fast start) unless a multithreaded runtime (JAX/TF) is loaded; then 'spawn'."""
    if sys.platform == 'linux' and not ({'jax', 'jaxlib', 'tensorflow', 'torch'} & set(sys.modules)):
        return multiprocessing.get_context('fork')
    return multiprocessing.get_context('spawn')


def config_name_for(config_name: str = '64', num_train: int | None = None, num_test: int | None = None,
                    seed: int | None = None) -> str:
    """Config name for non-default sizes/seed, e.g. ('64', 2000, 500) -> '64_n2000_t500'."""
    if config_name not in _DEFAULT_SIZES:
        raise ValueError(f'unknown captioned_shapes config {config_name!r}; one of {list(_DEFAULT_SIZES)}')
    _, n, t = _DEFAULT_SIZES[config_name]
    name = config_name
    if num_train is not None and num_train != n:
        name += f'_n{num_train}'
    if num_test is not None and num_test != t:
        name += f'_t{num_test}'
    if seed:
        name += f'_s{seed}'
    return name


def make_builder(data_dir: str | os.PathLike, config_name: str = '64', num_train: int | None = None,
                 num_test: int | None = None, *, seed: int = 0, num_workers: int | None = None) -> CaptionedShapes:
    """A `captioned_shapes` builder (not yet prepared) for a base config with optional custom sizes/seed.

    Non-default sizes or seed get their own config name (see `config_name_for`), so builds never collide.
    """
    name = config_name_for(config_name, num_train, num_test, seed)
    res, n, t = _DEFAULT_SIZES[config_name]
    num_train = n if num_train is None else num_train
    num_test = t if num_test is None else num_test
    if num_train < 1 or num_test < 1:
        raise ValueError(f'need num_train >= 1 and num_test >= 1, got {num_train}, {num_test}')
    config: str | CaptionedShapesConfig = (
        name if name == config_name else _config(name, res, num_train, num_test, seed))
    return CaptionedShapes(data_dir=os.fspath(data_dir), config=config, num_workers=num_workers)


def prepare_captioned_shapes(data_dir: str | os.PathLike, config_name: str = '64', num_train: int | None = None,
                             num_test: int | None = None, *, seed: int = 0,
                             num_workers: int | None = None) -> CaptionedShapes:
    """Builds `captioned_shapes/<config>` under `data_dir` unless present; prints one timing line.

    Returns the prepared builder: read it with `builder.as_data_source('train')` or
    `tfds.data_source(f'captioned_shapes/{builder.builder_config.name}', data_dir=data_dir, split=...)`.
    """
    def make(d):
        return make_builder(d, config_name, num_train, num_test, seed=seed, num_workers=num_workers)

    builder = make(data_dir)
    cfg = builder.builder_config
    start = time.perf_counter()
    already = builder.is_prepared()
    if not already:  # a gs:// data dir is built locally and copied up (staging)
        builder = staging.download_and_prepare(builder, data_dir, make, progress=False)
    what = 'found' if already else 'built'
    print(f'{NAME}/{cfg.name}: {what} {cfg.num_train} train + {cfg.num_test} test examples '
          f'in {time.perf_counter() - start:.1f}s at {builder.data_dir}', flush=True)
    return builder
