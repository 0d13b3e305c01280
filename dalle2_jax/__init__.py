"""dalle2-jax: DALL-E 2 (unCLIP) in JAX/Flax."""

import os as _os

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
