"""Shared bits of the absl entry points: logging set-up and error -> exit code mapping.

Every user mistake (bad flag, missing required flag, unknown config file, variant or key, missing or
foreign path, bad input) exits 2 with one `error: ...` line on stderr and no traceback; `--debug` or
DALLE2_DEBUG=1 prints the traceback too. A run stopped by its non-finite guard or a workdir whose
checkpoints are all damaged exits 1, also with one line.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import logging
import os
import re
import sys
import traceback
from typing import Callable

from absl import app, flags

from dalle2_jax import log_filters

from dalle2_jax.inference.errors import InputError
from dalle2_jax.training.config import ConfigError
from dalle2_jax.training.errors import NoIntactCheckpoint, TrainingStopped


def setup_logging() -> None:
    """Our own logger at INFO on stderr; noisy libraries at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("dalle2_jax").setLevel(logging.INFO)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
        log_filters.install()
    except ImportError:  # pragma: no cover
        pass


DEBUG_ENV = "DALLE2_DEBUG"
_debug = False


def debug_on() -> bool:
    """Whether errors show their traceback (--debug, or DALLE2_DEBUG=1)."""
    return _debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def one_line(message: str) -> str:
    """A message on one line: a multi-line one (a wrapped traceback) becomes its first line joined with
    the last `SomeError: ...` line; the others are joined with spaces."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else str(message)
    errs = [m.group(2) for m in (re.match(r"^([\w.]*(?:Error|Exception)): (.*)$", line) for line in lines) if m]
    if "Traceback (most recent call last):" in lines or errs:
        head = lines[0].rstrip(":")
        return f"{head}: {errs[-1]}" if errs and errs[-1] not in head else head
    return " ".join(lines)


def fail(message: str, code: int = 2) -> None:
    """Prints `error: message` as one line on stderr (the traceback before it with --debug) and exits."""
    if debug_on() and sys.exc_info()[0] is not None:
        traceback.print_exc()
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(code)


@contextlib.contextmanager
def exit_on_errors():
    """Config errors, bad input (InputError, a checkpoint of another model) and missing or unusable
    paths (not a workdir, not a bundle, no such file) exit 2 with the message; a workdir with no intact
    checkpoint and a run stopped by its non-finite guard exit 1."""
    try:
        yield
    except (ConfigError, InputError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError) as e:
        fail(str(e), 2)
    except (TrainingStopped, NoIntactCheckpoint) as e:
        fail(str(e), 1)


def _config_flag_names(fv: flags.FlagValues) -> list[str]:
    from ml_collections.config_flags import config_flags as cf

    return [name for name in fv if isinstance(fv[name], cf._ConfigFlag)]


def _flag_value(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
        if a == f"--{name}" and i + 1 < len(args):
            return args[i + 1]
    return None


def _flat_keys(cfg, prefix: str = "") -> list[str]:
    import ml_collections

    keys = []
    for k, v in cfg.items():
        keys.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            keys += _flat_keys(v, prefix + k + ".")
    return keys


def check_config_args(fv: flags.FlagValues, args: list[str]) -> str | None:
    """The first mistake in a config flag and its overrides, as a one-line message naming the fix (None
    when they are fine): a config file that does not exist, an unknown variant (whatever the file's
    get_config raises), an override of a key the config does not have (with the nearest key)."""
    import ml_collections

    for name in _config_flag_names(fv):
        value = _flag_value(args, name)
        if value is None:
            continue
        path, _, variant = value.partition(":")
        if not os.path.isfile(path):
            folder = os.path.dirname(path) or "."
            there = sorted(f for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_")) \
                if os.path.isdir(folder) else []
            hint = f"; {folder} has {', '.join(there)}" if there else "; e.g. configs/clip.py:tiny"
            return f"--{name}={value}: no config file {path!r}{hint}"
        try:
            spec = importlib.util.spec_from_file_location(f"_dalle2_config_{name}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            cfg = module.get_config(variant) if variant else module.get_config()
        except Exception as e:  # the config file's own message (e.g. "unknown clip config 'x'; use ...")
            return f"--{name}={value}: {one_line(str(e)) or type(e).__name__}"
        keys = _flat_keys(cfg)
        for a in args:
            m = re.match(rf"^--(?:no)?{re.escape(name)}\.([^=]+)", a)
            if not m:
                continue
            key, node = m.group(1), cfg
            for part in key.split("."):
                if isinstance(node, ml_collections.ConfigDict) and part in node:
                    node = node[part]
                    continue
                close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
                hint = f"; did you mean --{name}.{close[0]}?" if close else \
                    f"; see {path}" + (f":{variant}" if variant else "") + " for its keys"
                return f"--{name}.{key}: {value} has no key {key!r}{hint}"
    return None


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
    if "debug" not in fv:
        flags.DEFINE_bool("debug", False, f"Show the Python traceback of an error (also {DEBUG_ENV}=1).",
                          flag_values=fv)
    for name in required:
        if "(required)" not in (fv[name].help or ""):
            fv[name].help = f"{fv[name].help or ''} (required)".strip()
    argv = list(sys.argv if argv is None else argv)

    def usage_exit(message: str) -> None:
        fail(f"{one_line(message)} (see {argv[0]} --help)", 2)

    def parser(args: list[str]) -> list[str]:
        global _debug
        if any(a in ("-h", "--help", "--helpfull") for a in args[1:]):
            print(doc.strip() + "\n\nflags:\n" + fv.get_help())
            sys.exit(0)
        _debug = any(a in ("--debug", "--debug=true", "--debug=True") for a in args[1:])
        mistake = check_config_args(fv, args[1:])
        if mistake:
            usage_exit(mistake)
        saved, sys.argv = sys.argv, list(args)  # ml_collections reads config overrides from sys.argv
        try:
            rest = fv(args)
        except flags.Error as e:
            usage_exit(str(e))
        except (AttributeError, KeyError, TypeError, ValueError) as e:  # a config override ml_collections refused
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
        with exit_on_errors():
            if positional is None:
                main(fv)
            else:
                main(fv, list(rest[1:]))

    app.run(body, argv=argv, flags_parser=parser)
