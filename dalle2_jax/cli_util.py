"""Shared bits of the absl entry points: logging set-up and error -> exit code mapping."""

from __future__ import annotations

import contextlib
import logging
import sys

from dalle2_jax.training.config import ConfigError


class _DropNoise(logging.Filter):
    """Drops TFDS's notice for every custom-size build of the built-in data set."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Using custom data configuration")


def setup_logging() -> None:
    """Our own logger at INFO on stderr; noisy libraries at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("dalle2_jax").setLevel(logging.INFO)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
        absl_logging.get_absl_logger().addFilter(_DropNoise())
    except ImportError:  # pragma: no cover
        pass


@contextlib.contextmanager
def exit_on_errors():
    """Config errors exit 2 with the message; missing files exit 1 with the message."""
    try:
        yield
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
