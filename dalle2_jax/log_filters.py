"""Drops library log records that say nothing true about our runs; installed by the CLI's logging set-up and
by the data modules at import (so grain's worker processes, which build data sources, drop them too).

- TFDS's "Using custom data configuration ..." for every custom-size build of the built-in data set;
- TFDS's "Variant folder ... has no dataset_info.json", seen while a data set is being built (staging
  writes dataset_info.json last, so such a folder is rebuilt, never read);
- orbax's two warnings that a checkpoint manager opened read-only (evaluate, export, embed) is read-only.
Warnings that carry information are left alone.
"""

from __future__ import annotations

import logging

NOISE = ("Using custom data configuration", "Variant folder ", "CheckpointManagerOptions.read_only=True",
         "Given directory is read only")


class DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(NOISE)


def install() -> None:
    """Adds the filter to the absl logger (where TFDS and orbax log), once."""
    logger = logging.getLogger("absl")
    if not any(isinstance(f, DropNoise) for f in logger.filters):
        logger.addFilter(DropNoise())
