"""dalle2-jax: DALL-E 2 (unCLIP) in JAX/Flax."""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# XLA:CPU (jax 0.10.2) hands convolutions to YNNPACK fusions by default, whose kernel-gradient convolutions run
# 3-5x slower than XLA's own (Eigen) ones: a UNet train step spends about half its time there. With the
# fusion type empty, XLA:CPU keeps convolutions (and dots) on its own kernels: the decoder's train step runs
# about 1.5x faster on CPU (docs/benchmarks.md, "CPU step time"). It must be set before jax creates its CPU
# backend, so it goes into XLA_FLAGS when dalle2_jax is imported; a value the user set is kept, and
# DALLE2_JAX_XLA_DEFAULTS=0 turns this off. XLA ignores CPU options on GPU and TPU.
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)


def _set_cpu_xla_flags() -> None:
    if _os.environ.get("DALLE2_JAX_XLA_DEFAULTS", "1") == "0":
        return
    flags = _os.environ.get("XLA_FLAGS", "")
    for flag in CPU_XLA_FLAGS:
        if flag.split("=")[0] not in flags:
            flags = f"{flags} {flag}".strip()
    _os.environ["XLA_FLAGS"] = flags


_set_cpu_xla_flags()


def _entry_point() -> str | None:
    """'dalle2-jax' or the module of `python -m dalle2_jax.<module>` when this process is a dalle2-jax command,
    None for a library import."""
    argv = list(getattr(_sys, "orig_argv", []))
    i = 1
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-m":
        i += 1
    if i + 1 < len(argv) and argv[i] == "-m":
        return argv[i + 1] if argv[i + 1].split(".")[0] == "dalle2_jax" else None
    return "dalle2-jax" if i < len(argv) and _os.path.basename(argv[i]) == "dalle2-jax" else None


# A dalle2-jax command re-executes itself once, before jax is imported, with glibc malloc tunables that XLA:CPU
# steps want (dalle2_jax/runtime_env.py: huge pages for XLA's per-step temporaries; the prior's CPU step 1.1x
# faster). DALLE2_JAX_MALLOC_DEFAULTS=0 turns this off.
_ENTRY = _entry_point()
if _ENTRY is not None:
    from dalle2_jax.runtime_env import maybe_reexec as _maybe_reexec

    _maybe_reexec()
    if _ENTRY == "dalle2_jax.runtime_env":
        del _sys.modules[_ENTRY]  # runpy executes it as __main__ next
