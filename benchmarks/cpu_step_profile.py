"""Where a CPU train step's time goes outside its dots: page faults per step, and a few op timings (issue 36).

    python -m benchmarks.cpu_step_profile steps --workload clip_train --steps 3            # as dalle2-jax runs
    python -m benchmarks.cpu_step_profile steps --workload clip_train --malloc glibc        # glibc's defaults
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python -m benchmarks.cpu_step_profile steps --malloc glibc
    python -m benchmarks.cpu_step_profile ops                                              # dots, GELU

`steps` builds a workload of benchmarks/peer/compare.py (its dalle2-jax side: the real train step of
benchmarks/run.py's TrainStep) and prints, per step after one warm-up step, the wall time, the minor page faults
and the user/system CPU seconds (getrusage), then the median step and the peak RSS; `--idle S` sleeps S seconds
before each timed step (the first step after a pause). `--malloc dalle2-jax` (default)
runs it with the glibc malloc tunables every dalle2-jax command starts with (dalle2_jax/runtime_env.py), `glibc`
with glibc's defaults (values already in GLIBC_TUNABLES are kept in both). The process re-executes itself once to
put them in place: glibc reads them only at start-up.

`ops` times, alternated over 7 rounds (median): the attention's batched dots against the MLP's dense dots of the
CLIP text tower (batch 32, 256 tokens, width 512, 8 heads) in GFLOP/s, and the exact GELU as jax writes it (erfc)
against PyTorch's erf form, the tanh approximation and ReLU (forward and backward of a [8192, 3072] activation).
Run it with XLA_FLAGS to compare XLA:CPU's dot paths (docs/benchmarks.md, "CPU step time").
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import sys
import time

from dalle2_jax.runtime_env import malloc_env

_MARK = "DALLE2_JAX_PROFILE_MALLOC"


def _reexec(mode: str) -> None:
    if os.environ.get(_MARK) == mode:
        return
    env = dict(os.environ)
    env[_MARK] = mode
    if mode == "dalle2-jax":
        env = malloc_env({**env, "DALLE2_JAX_MALLOC_DEFAULTS": "1"})
    else:
        env["DALLE2_JAX_MALLOC_DEFAULTS"] = "0"
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.cpu_step_profile"] + sys.argv[1:], env)


def steps(args) -> dict:
    _reexec(args.malloc)
    from benchmarks.peer.compare import WORKLOADS
    from benchmarks.run import TrainStep

    spec = copy.deepcopy(WORKLOADS[args.workload]["spec"])
    ts = TrainStep(spec)
    ts.run(1)
    rows = []
    for _ in range(args.steps):
        time.sleep(args.idle)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        wall = ts.run(1)[0]
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        rows.append({"step_s": wall, "minor_faults": r1.ru_minflt - r0.ru_minflt,
                     "user_s": r1.ru_utime - r0.ru_utime, "system_s": r1.ru_stime - r0.ru_stime})
        print(json.dumps(rows[-1]), flush=True)
    return {"workload": args.workload, "malloc": args.malloc, "idle_s": args.idle,
            "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", ""),
            "median_step_s": statistics.median(r["step_s"] for r in rows),
            "median_minor_faults": statistics.median(r["minor_faults"] for r in rows),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            "temporaries_gb": ts.info["xla_memory_bytes"]["temporaries"] / 1e9}


def ops(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    rng = np.random.default_rng(0)

    def a(*shape, scale=1.0):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * scale)

    b, t, n, h, d, m = 32, 256, 8, 64, 512, 3072
    q, k, p = a(b, n, t, h), a(b, n, t, h), a(b, n, t, t)
    x, w1, dy1, w2, dy2 = a(b * t, d), a(d, m), a(b * t, m), a(m, d), a(b * t, d)
    hact, ct = a(b * t, m, scale=3.0), a(b * t, m)
    attn_flop = 2 * b * n * t * t * h
    dense_flop = 2 * b * t * d * m
    half = np.float32(np.sqrt(0.5))
    gelus = {"gelu_erfc_jax": lambda v: jax.nn.gelu(v, approximate=False),
             "gelu_erf_torch_form": lambda v: 0.5 * v * (1 + lax.erf(v * half)),
             "gelu_tanh": lambda v: jax.nn.gelu(v, approximate=True), "relu": jax.nn.relu}
    cases = {
        "attn q@k^T": (lambda q, k: jnp.einsum("bnth,bnsh->bnts", q, k), (q, k), attn_flop),
        "attn p@v": (lambda p, v: jnp.einsum("bnts,bnsh->bnth", p, v), (p, k), attn_flop),
        "attn p^T@do": (lambda p, g: jnp.einsum("bnts,bnth->bnsh", p, g), (p, q), attn_flop),
        "dense x@w1": (lambda x, w: x @ w, (x, w1), dense_flop),
        "dense dy@w1^T": (lambda g, w: g @ w.T, (dy1, w1), dense_flop),
        "dense x^T@dy": (lambda x, g: x.T @ g, (x, dy1), dense_flop),
        "dense h@w2": (lambda v, w: v @ w, (dy1, w2), dense_flop),
        "dense dy@w2^T": (lambda g, w: g @ w.T, (dy2, w2), dense_flop),
    }
    for name, f in gelus.items():
        cases[f"{name} fwd+bwd"] = (lambda v, f=f: jax.vjp(f, v)[1](ct)[0], (hact,), None)
    fns = {name: jax.jit(f) for name, (f, _, _) in cases.items()}
    for name, f in fns.items():
        jax.block_until_ready(f(*cases[name][1]))
    times = {name: [] for name in cases}
    for _ in range(7):
        for name, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*cases[name][1]))
            times[name].append(time.perf_counter() - t0)
    out = {"XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
    for name, (_, _, flop) in cases.items():
        sec = statistics.median(times[name])
        out[name] = {"ms": round(sec * 1e3, 1)} | ({"gflop_s": round(flop / sec / 1e9, 1)} if flop else {})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("steps", help="page faults and CPU time per train step")
    s.add_argument("--workload", default="clip_train", choices=("decoder_train", "prior_train", "clip_train"))
    s.add_argument("--steps", type=int, default=3)
    s.add_argument("--malloc", choices=("dalle2-jax", "glibc"), default="dalle2-jax")
    s.add_argument("--idle", type=float, default=0.0, help="seconds to sleep before each timed step")
    sub.add_parser("ops", help="op timings: attention vs dense dots, GELU forms")
    args = ap.parse_args(argv)
    print(json.dumps(steps(args) if args.cmd == "steps" else ops(args)), flush=True)


if __name__ == "__main__":
    main()
