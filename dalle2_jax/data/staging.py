"""Preparing a TFDS builder into a remote data dir (gs://...).

TFDS writes array_record files through array_record's writer, which opens local files only (its reader
reads gs:// directly). So a builder whose data dir is a URI is prepared into a local temporary data dir
and the result copied up, `dataset_info.json` last: TFDS treats a version directory without it as not
prepared, so an interrupted upload is rebuilt rather than read half-written.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable

import tensorflow_datasets as tfds

from dalle2_jax import fileio


class QuietBuild:
    """Builder mixin: TFDS's "Downloading and preparing dataset Unknown size ..." and "... downloaded and
    prepared" lines say nothing true of a data set built from local files (nothing is downloaded); the
    callers print their own one-line summary instead."""

    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass


@contextlib.contextmanager
def _progress_bars(enable: bool):
    from tensorflow_datasets.core.utils import tqdm_utils

    saved = tqdm_utils._active
    tfds.display_progress_bar(enable and saved)
    try:
        yield
    finally:
        tfds.display_progress_bar(saved)


def download_and_prepare(builder: Any, data_dir: str | os.PathLike, make: Callable[[str], Any],
                         progress: bool = True) -> Any:
    """Prepares `builder` (made by `make(data_dir)`) as array_record; returns the prepared builder.

    A local data dir is prepared in place. For a URI, `make(local_dir)` is prepared in a temporary local
    dir, copied to `data_dir`, and `make(data_dir)` returned. progress=False hides TFDS's progress bars
    (the built-in data set builds in seconds)."""
    with _progress_bars(progress):
        return _download_and_prepare(builder, data_dir, make)


def _download_and_prepare(builder: Any, data_dir: str | os.PathLike, make: Callable[[str], Any]) -> Any:
    root = fileio.resolve(data_dir)
    options = dict(file_format='array_record',
                   download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP))
    if not fileio.is_remote(root):
        builder.download_and_prepare(download_dir=os.path.join(root, 'downloads'), **options)
        return builder
    version_dir = os.fspath(builder.data_dir)
    if not version_dir.startswith(root + '/'):
        raise ValueError(f'builder data dir {version_dir!r} is not under {root!r}')
    info = version_dir[len(root) + 1:] + '/dataset_info.json'
    with fileio.staged_output(root, last=(info,)) as local:
        make(local).download_and_prepare(download_dir=os.path.join(local, 'downloads'), **options)
    return make(root)
