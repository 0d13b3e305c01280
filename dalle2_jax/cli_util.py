"""Shared bits of the absl entry points: logging set-up and error -> exit code mapping."""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Callable

from absl import app, flags

from dalle2_jax.inference.errors import InputError
from dalle2_jax.training.config import ConfigError
from dalle2_jax.training.errors import NoIntactCheckpoint, TrainingStopped


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
    """Config errors and bad input (InputError, a checkpoint of another model) exit 2 with the message;
    missing files, a workdir with no intact checkpoint and a run stopped by its non-finite guard exit 1."""
    try:
        yield
    except (ConfigError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (FileNotFoundError, TrainingStopped, NoIntactCheckpoint) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def run_program(doc: str, define: Callable[[flags.FlagValues], None],
                main: Callable[[flags.FlagValues], None], argv: list[str] | None = None,
                required: tuple[str, ...] = (), positional: tuple[str, int, int] | None = None) -> None:
    """Runs an absl program whose flags live in their own FlagValues, so entry points can be called
    in-process one after another (tests, the `dalle2-jax` console script) without flag clashes.

    Bad usage (unknown or malformed flags, missing required ones, stray arguments) exits 2.
    positional: (names for the usage message, min count, max count or -1 for any): the program takes
    positional arguments (flags may come before or after them) and is called as main(fv, args).
    """
    fv = flags.FlagValues()
    define(fv)
    argv = list(sys.argv if argv is None else argv)

    def usage_exit(message: str) -> None:
        print(f"{argv[0]}: error: {message}\n(run with --help for the flags)", file=sys.stderr)
        sys.exit(2)

    def parser(args: list[str]) -> list[str]:
        if any(a in ("-h", "--help", "--helpfull") for a in args[1:]):
            print(doc.strip() + "\n\nflags:\n" + fv.get_help())
            sys.exit(0)
        saved, sys.argv = sys.argv, list(args)  # ml_collections reads config overrides from sys.argv
        try:
            rest = fv(args)
        except flags.Error as e:
            usage_exit(str(e))
        finally:
            sys.argv = saved
        if positional is None and len(rest) > 1:
            usage_exit(f"unexpected arguments: {rest[1:]}")
        if positional is not None:
            names, lo, hi = positional
            n = len(rest) - 1
            if n < lo or (hi >= 0 and n > hi):
                usage_exit(f"expected {names}, got {n} positional argument(s): {rest[1:]}")
        for name in required:
            if fv[name].value is None:
                usage_exit(f"--{name} is required")
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()  # grain reads absl flags
        return rest

    def body(rest: list[str]) -> None:
        setup_logging()
        if positional is None:
            main(fv)
        else:
            main(fv, list(rest[1:]))

    app.run(body, argv=argv, flags_parser=parser)
