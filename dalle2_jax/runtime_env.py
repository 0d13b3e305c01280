"""glibc malloc settings for XLA:CPU, which must be in the environment when the process starts.

XLA:CPU allocates a step's temporaries (GBs for a transformer train step) and its outputs anew at every execution.
glibc's malloc serves blocks that large with a fresh `mmap` and unmaps them on free, so each step touches every
page of its working set anew: the CLIP train step of benchmarks/peer took 1.1 million page faults a step, the
prior's 2 million (4-12 s of system time a step on the 2-core box). `glibc.malloc.hugetlb=1` backs those mappings
with transparent huge pages (2 MiB a fault instead of 4 KiB); `mmap_max=0` and a `trim_threshold` that is never
reached keep freed blocks in the heap for reuse where a block comes from the main heap (the worker threads' arenas
map blocks above 64 MiB whatever mmap_max says). Measured alternated (docs/benchmarks.md, "CPU step time"): prior
step 19.8 -> 17.9 s, CLIP within the noise, decoder 3.4 -> 3.2 s; the cost is the first step after a pause (huge
pages faulted in after 30 s idle: CLIP 19-20 s against 11-13 s). Capping the arenas at one as well removed every
fault but made the decoder's step 1.5x slower (its threads contend for the one heap's lock), so it is not done.

glibc reads these tunables once, at start-up, so a dalle2-jax command re-executes itself with them (`maybe_reexec`,
called from dalle2_jax/__init__.py before jax is imported when the process is `dalle2-jax ...` or `python -m
dalle2_jax.<module>`), and benchmarks start their workers with them (`malloc_env`). Values the user set in
GLIBC_TUNABLES are kept; DALLE2_JAX_MALLOC_DEFAULTS=0 turns this off. Only on Linux with glibc, and only when JAX
will run on the CPU (JAX_PLATFORMS unset or naming cpu alone, no TPU or GPU plugin installed): accelerator hosts
keep glibc's defaults.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from typing import Mapping

TUNABLES = (("glibc.malloc.mmap_max", "0"), ("glibc.malloc.trim_threshold", str(2**62)),
            ("glibc.malloc.hugetlb", "1"))
_ACCELERATOR_MODULES = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin")
_REEXEC_MARK = "DALLE2_JAX_MALLOC_REEXEC"


def _glibc() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL(None).gnu_get_libc_version)
    except (OSError, AttributeError):
        return False


def _cpu_only(environ: Mapping[str, str]) -> bool:
    platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms == "cpu"
    for name in _ACCELERATOR_MODULES:
        try:
            if importlib.util.find_spec(name) is not None:
                return False
        except (ImportError, ValueError):
            continue
    return True


def merged_tunables(current: str) -> str:
    """GLIBC_TUNABLES with our keys added where `current` does not set them (its own values win)."""
    parts = [p for p in current.split(":") if p]
    have = {p.split("=", 1)[0] for p in parts}
    parts += [f"{k}={v}" for k, v in TUNABLES if k not in have]
    return ":".join(parts)


def malloc_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a dalle2-jax process should start with: `environ` (default os.environ) with
    GLIBC_TUNABLES merged, or unchanged where the settings do not apply."""
    env = dict(os.environ if environ is None else environ)
    if env.get("DALLE2_JAX_MALLOC_DEFAULTS", "1") == "0" or not _glibc() or not _cpu_only(env):
        return env
    env["GLIBC_TUNABLES"] = merged_tunables(env.get("GLIBC_TUNABLES", ""))
    return env


def maybe_reexec() -> None:
    """Re-executes this process (same interpreter and arguments) with `malloc_env`, once, when that changes
    the environment; returns otherwise."""
    env = malloc_env()
    if env.get("GLIBC_TUNABLES", "") == os.environ.get("GLIBC_TUNABLES", "") or os.environ.get(_REEXEC_MARK):
        return
    env[_REEXEC_MARK] = "1"
    argv = list(getattr(sys, "orig_argv", []) or [sys.executable] + sys.argv)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable] + argv[1:], env)
    except OSError:
        return  # could not re-execute: run on with glibc's defaults


def page_faults_on_reuse(nbytes: int = 64 << 20) -> int:
    """Minor page faults when a block of `nbytes` is malloc'ed, written, freed, and malloc'ed and written again:
    about nbytes / 4096 under glibc's defaults (a fresh mmap each time), about 0 under `malloc_env`'s tunables."""
    import resource

    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    ptr = libc.malloc(nbytes)
    ctypes.memset(ptr, 1, nbytes)
    libc.free(ptr)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ptr = libc.malloc(nbytes)
    ctypes.memset(ptr, 2, nbytes)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    libc.free(ptr)
    return faults


if __name__ == "__main__":  # `python -m dalle2_jax.runtime_env`: what this process runs with
    import json

    print(json.dumps({"GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", ""), "glibc": _glibc(),
                      "cpu_only": _cpu_only(os.environ),
                      "page_faults_on_reuse_64MiB": page_faults_on_reuse() if _glibc() else None}))
