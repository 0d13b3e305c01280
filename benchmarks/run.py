"""BENCHMARKS.md: each stage's train step (examples/s, FLOPs, MFU, compile time, memory), the data pipeline alone,
sampling per stage and for the cascade (with the sampling loop's own overhead), and the fast-path comparisons,
all measured on this machine in one run.

    python -m benchmarks.run                      # the suite for this platform (cpu or gpu), all sections
    python -m benchmarks.run --only train sampling --steps 20
    python -m benchmarks.run --markdown_only      # rewrite BENCHMARKS.md from benchmarks/results/*.json

Every measurement runs in its own subprocess (clean peak memory, no cross-talk of compiled programs) and goes
into benchmarks/results/benchmarks_<platform>.json; BENCHMARKS.md is written from all such files present, with
the machine, the versions and the command. Nothing here asserts a speed.

What is measured:
- **peak**: the best FLOP/s of a large square matmul in the suite's compute dtype (the MFU denominator).
- **train**: the real train step of each stage (trainer.jit_train_step: loss, optimizer, EMA, donated state)
  on random data at the stated config and batch: compile time, median step time, examples/s, model FLOPs per
  step from the jaxpr (training/flops.py, remat off) against XLA's compiled cost analysis, achieved FLOP/s,
  MFU = analytic FLOPs / step time / peak, XLA's memory analysis of the step and the peak memory in use.
- **data**: the stage's own input pipeline (grain over the TFDS build) alone, examples/s after warm-up, next to
  the train step's examples/s.
- **sampling**: each stage's jitted sampler at its default steps, seconds per image; the time of one denoiser
  call (guided where the sampler is); per-step time minus that call is the loop's own overhead. The cascade is
  CLIP text encoding + prior + decoder + upsampler per image.
- **fastpaths**: scan over transformer blocks against unrolled blocks (compile time, step time), and
  `jax.nn.dot_product_attention`'s implementations against a plain einsum-softmax attention (forward+backward).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from dalle2_jax.runtime_env import malloc_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
SECTIONS = ("peak", "train", "data", "sampling", "fastpaths")
EMB = "precomputed"  # an embeddings_dir value that selects the from-embeddings step (no files are read)

# The suites: per platform, what to run and at which sizes. cpu: the configs of launch/shapes_recipe.sh at their
# batch sizes. gpu: configs sized for one H100/H200 in bfloat16 (prior and decoder from precomputed embeddings).
SUITES: dict[str, dict[str, Any]] = {
    "cpu": {
        "dtype": "float32", "matmul_n": 2048,
        "train": [
            {"key": "clip", "config": "configs/clip.py:tiny", "batch": 128},
            {"key": "prior", "config": "configs/prior.py:tiny", "batch": 128, "clip_config": "configs/clip.py:tiny",
             "overrides": {"data.embeddings_dir": EMB}},
            {"key": "decoder", "config": "configs/decoder.py:shapes", "batch": 16,
             "clip_config": "configs/clip.py:tiny", "overrides": {"data.embeddings_dir": EMB}},
            {"key": "up256", "config": "configs/upsampler.py:tiny_64to256", "batch": 16},
        ],
        "data": [
            {"key": "clip", "config": "configs/clip.py:tiny", "batch": 128},
            {"key": "up256", "config": "configs/upsampler.py:tiny_64to256", "batch": 16},
        ],
        "sampling": [
            {"key": "clip_text", "config": "configs/clip.py:tiny", "batch": 16},
            {"key": "prior", "config": "configs/prior.py:tiny", "batch": 16, "clip_config": "configs/clip.py:tiny",
             "overrides": {"data.embeddings_dir": EMB}},
            {"key": "decoder", "config": "configs/decoder.py:shapes", "batch": 8,
             "clip_config": "configs/clip.py:tiny", "overrides": {"data.embeddings_dir": EMB}},
            {"key": "up256", "config": "configs/upsampler.py:tiny_64to256", "batch": 2},
        ],
        "fastpaths": {
            "scan": [
                {"key": "clip", "config": "configs/clip.py:tiny", "batch": 128, "flag": "model.scan_layers"},
                {"key": "prior", "config": "configs/prior.py:tiny", "batch": 128, "flag": "model.scan_layers",
                 "clip_config": "configs/clip.py:tiny", "overrides": {"data.embeddings_dir": EMB}},
            ],
            # (batch, length, heads, head_dim): the tiny CLIP's text and vision towers
            "attention": [(128, 20, 4, 32), (128, 65, 4, 32)],
        },
    },
    "gpu": {
        "dtype": "bfloat16", "matmul_n": 8192,
        "train": [
            {"key": "clip", "config": "configs/clip.py:base", "batch": 1024, "overrides": {"model.dtype": "bfloat16"}},
            {"key": "prior", "config": "configs/prior.py:base", "batch": 1024, "clip_config": "configs/clip.py:base",
             "overrides": {"data.embeddings_dir": EMB, "model.dtype": "bfloat16"}},
            {"key": "decoder", "config": "configs/decoder.py:base", "batch": 256,
             "clip_config": "configs/clip.py:base", "overrides": {"data.embeddings_dir": EMB}},
            {"key": "up256", "config": "configs/upsampler.py:tiny_64to256", "batch": 256,
             "overrides": {"model.dtype": "bfloat16", "model.channels": 192}},
        ],
        "data": [
            {"key": "clip", "config": "configs/clip.py:tiny", "batch": 1024},
            {"key": "up256", "config": "configs/upsampler.py:tiny_64to256", "batch": 256},
        ],
        "sampling": [
            {"key": "clip_text", "config": "configs/clip.py:base", "batch": 64},
            {"key": "prior", "config": "configs/prior.py:base", "batch": 64, "clip_config": "configs/clip.py:base",
             "overrides": {"data.embeddings_dir": EMB}},
            {"key": "decoder", "config": "configs/decoder.py:base", "batch": 64,
             "clip_config": "configs/clip.py:base", "overrides": {"data.embeddings_dir": EMB}},
            {"key": "up256", "config": "configs/upsampler.py:tiny_64to256", "batch": 16,
             "overrides": {"model.dtype": "bfloat16", "model.channels": 192}},
        ],
        "fastpaths": {
            "scan": [
                {"key": "clip", "config": "configs/clip.py:base", "batch": 1024, "flag": "model.scan_layers",
                 "overrides": {"model.dtype": "bfloat16"}},
                {"key": "prior", "config": "configs/prior.py:base", "batch": 1024, "flag": "model.scan_layers",
                 "clip_config": "configs/clip.py:base",
                 "overrides": {"data.embeddings_dir": EMB, "model.dtype": "bfloat16"}},
            ],
            "attention": [(256, 77, 8, 64), (256, 257, 12, 64), (64, 1024, 16, 64)],
        },
    },
}


# --- helpers shared by the workers ------------------------------------------------------------------------
def load_config(spec: str, overrides: dict | None = None):
    """`configs/x.py:arg` -> its ConfigDict, with dotted-key overrides applied."""
    path, _, arg = spec.partition(":")
    mod_spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], os.path.join(REPO, path))
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    cfg = mod.get_config(arg) if arg else mod.get_config()
    for key, value in (overrides or {}).items():
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        with cfg.unlocked():
            node[leaf] = value
    return cfg


def _time(fn, reps: int) -> list[float]:
    """Wall times of `reps` calls of fn (each waits for its result)."""
    import jax

    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t0)
    return out


def _device_peak_bytes() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return int(stats["peak_bytes_in_use"]) if "peak_bytes_in_use" in stats else None


def _rss_peak_bytes() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _random_like(abstract: dict, key) -> dict:
    """Random values for a batch of ShapeDtypeStructs: uint8 images, small int tokens, normal floats."""
    import jax
    import jax.numpy as jnp

    out = {}
    for i, (name, s) in enumerate(sorted(abstract.items())):
        k = jax.random.fold_in(key, i)
        if s.dtype == jnp.uint8:
            out[name] = jax.random.randint(k, s.shape, 0, 256, jnp.int32).astype(jnp.uint8)
        elif jnp.issubdtype(s.dtype, jnp.integer):
            out[name] = jax.random.randint(k, s.shape, 1, 32, s.dtype)
        elif s.dtype == jnp.bool_:
            out[name] = jnp.ones(s.shape, bool)
        else:
            out[name] = jax.random.normal(k, s.shape, s.dtype)
    return out


def _stage_from_spec(spec: dict, batch: int, overrides: dict | None = None):
    """(config, stage with its model built, abstract batch, boxed abstract frozen params) of a suite entry."""
    from dalle2_jax.stages import get_stage_class

    cfg = load_config(spec["config"], {**spec.get("overrides", {}), **(overrides or {})})
    clip_model = (load_config(spec["clip_config"], spec.get("clip_overrides")).model if spec.get("clip_config")
                  else None)
    stage = get_stage_class(cfg.stage)(cfg, workdir="")
    batch_abs, frozen_boxed = stage.abstract_train_inputs(batch, clip_model)
    return cfg, stage, batch_abs, frozen_boxed


# --- workers (each runs in its own process) ---------------------------------------------------------------
def bench_peak(suite: dict, reps: int = 10) -> dict:
    """Best FLOP/s of an n x n x n matmul in the suite's dtype."""
    import jax
    import jax.numpy as jnp

    n, dtype = int(suite["matmul_n"]), jnp.dtype(suite["dtype"])
    k1, k2 = jax.random.split(jax.random.key(0))
    a, b = (jax.random.normal(k, (n, n), jnp.float32).astype(dtype) for k in (k1, k2))
    mm = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(mm(a, b))
    best = min(_time(lambda: mm(a, b), reps))
    out = {"n": n, "dtype": str(dtype), "seconds": best, "flops_per_s": 2.0 * n**3 / best}
    if dtype == jnp.float32 and jax.default_backend() == "cpu":
        # The CPU's bfloat16 units (AVX512-BF16/AMX where present): bfloat16 operands, float32 accumulation and
        # result, the one bfloat16 dot form XLA:CPU runs fast (a bfloat16 result is upcast to float32 first).
        ah, bh = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
        mmh = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
        jax.block_until_ready(mmh(ah, bh))
        best_h = min(_time(lambda: mmh(ah, bh), reps))
        out["bf16_flops_per_s"] = 2.0 * n**3 / best_h
    return out


class TrainStep:
    """One stage's real train step (trainer.jit_train_step: loss, optimizer, EMA, donated state), compiled for
    random data at a suite entry's config and batch, with its state made: `run(n)` times n steps. The setup's
    figures (params, compile time, FLOPs per step, XLA's cost and memory analysis) are in `info`. Used by
    bench_train and by benchmarks/peer/compare.py."""

    def __init__(self, spec: dict, overrides: dict | None = None):
        import flax.linen as nn
        import jax
        import jax.numpy as jnp
        import numpy as np

        from dalle2_jax.training.flops import count_flops
        from dalle2_jax.training.partitioning import LOGICAL_RULES, make_mesh, replicated
        from dalle2_jax.training.state import make_optimizer
        from dalle2_jax.training.trainer import abstract_train_state, jit_train_step, sharded_abstract

        batch_size = int(spec["batch"])
        devices = jax.devices()[:1]

        def build(remat: str | None):
            extra = dict(overrides or {})
            if remat is not None:
                extra["model.remat"] = remat
            cfg, stage, batch_abs, frozen_boxed = _stage_from_spec(spec, batch_size, extra)
            mesh = make_mesh(cfg, devices)
            tx = make_optimizer(cfg)
            key = jax.random.key(0)
            init_fn, state_sh, state_abs = abstract_train_state(stage, tx, cfg, mesh, key)
            frozen_sh, frozen_abs = (sharded_abstract(frozen_boxed, mesh) if frozen_boxed is not None
                                     else (None, None))
            step = jit_train_step(stage, tx, cfg, mesh, state_sh, {k: v.ndim for k, v in batch_abs.items()},
                                  frozen_sh)
            key_abs = jax.ShapeDtypeStruct((), key.dtype, sharding=replicated(mesh))
            return dict(cfg=cfg, stage=stage, mesh=mesh, init_fn=init_fn, state_sh=state_sh, step=step, key=key,
                        abstract=(state_abs, batch_abs, frozen_abs, key_abs), frozen_sh=frozen_sh)

        b = build(None)
        cfg, mesh = b["cfg"], b["mesh"]
        num_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(b["abstract"][0].params)))
        with jax.set_mesh(mesh):
            t0 = time.perf_counter()
            lowered = b["step"].lower(*b["abstract"])
            lower_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            compiled = lowered.compile()
            compile_s = time.perf_counter() - t0
            hw_flops = count_flops(b["step"], *b["abstract"])
        remat = str(cfg.model.get("remat", "none"))
        if remat != "none":
            b0 = build("none")
            with jax.set_mesh(b0["mesh"]):
                model_flops = count_flops(b0["step"], *b0["abstract"])
        else:
            model_flops = hw_flops
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        mem = compiled.memory_analysis()

        with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
            self.state = jax.jit(lambda k: nn.meta.unbox(b["init_fn"](k)), out_shardings=b["state_sh"])(b["key"])
        self.batch = jax.device_put(_random_like(b["abstract"][1], jax.random.key(1)), devices[0])
        self.frozen = None
        if b["abstract"][2] is not None:
            self.frozen = jax.device_put(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), b["abstract"][2]),
                                         b["frozen_sh"])
        self.key, self.mesh, self.compiled = jax.random.key(2), mesh, compiled
        total_b = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                   + mem.temp_size_in_bytes) if mem is not None else None
        self.info = {
            "key": spec["key"], "config": spec["config"],
            "overrides": {**spec.get("overrides", {}), **(overrides or {})},
            "stage": cfg.stage, "batch": batch_size, "params": num_params,
            "dtype": str(cfg.model.get("dtype", "float32")), "remat": remat, "lower_s": lower_s,
            "compile_s": compile_s, "model_flops": model_flops, "hardware_flops": hw_flops,
            "xla_cost_flops": float(cost.get("flops", 0.0)),
            "xla_bytes_accessed": float(cost.get("bytes accessed", 0.0)),
            "xla_memory_bytes": {"arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
                                 "aliased": mem.alias_size_in_bytes, "temporaries": mem.temp_size_in_bytes,
                                 "total": total_b} if mem is not None else None,
        }

    def run(self, steps: int) -> list[float]:
        """Wall times of `steps` train steps (each waits for its metrics)."""
        import jax

        times = []
        with jax.set_mesh(self.mesh):
            for _ in range(steps):
                t0 = time.perf_counter()
                self.state, metrics = self.compiled(self.state, self.batch, self.frozen, self.key)
                jax.block_until_ready(metrics)
                times.append(time.perf_counter() - t0)
        return times


def bench_train(spec: dict, steps: int, warmup: int = 2, overrides: dict | None = None) -> dict:
    """Compile and time one stage's real train step on random data (see the module docstring)."""
    ts = TrainStep(spec, overrides)
    ts.run(warmup)
    times = ts.run(steps)
    step_s = statistics.median(times)
    info = ts.info
    return {
        **{k: info[k] for k in ("key", "config", "overrides", "stage", "batch", "params", "dtype", "remat")},
        "steps_timed": steps, "lower_s": info["lower_s"], "compile_s": info["compile_s"],
        "step_s": step_s, "step_s_min": min(times), "step_s_max": max(times), "examples_per_s": info["batch"] / step_s,
        **{k: info[k] for k in ("model_flops", "hardware_flops", "xla_cost_flops", "xla_bytes_accessed")},
        "achieved_flops_per_s": info["model_flops"] / step_s, "xla_memory_bytes": info["xla_memory_bytes"],
        "device_peak_bytes": _device_peak_bytes(), "process_peak_rss_bytes": _rss_peak_bytes(),
    }


def bench_data(spec: dict, batches: int, warmup: int = 5) -> dict:
    """The stage's train input pipeline alone: examples/s over `batches` batches after `warmup` batches."""
    from dalle2_jax.stages import get_stage_class

    cfg = load_config(spec["config"], spec.get("overrides"))
    with tempfile.TemporaryDirectory() as workdir:
        stage = get_stage_class(cfg.stage)(cfg, workdir)
        t0 = time.perf_counter()
        stage.prepare()
        prepare_s = time.perf_counter() - t0
        it = iter(stage.train_iterator(int(spec["batch"]), 0, 1))
        t0 = time.perf_counter()
        for _ in range(warmup):
            next(it)
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        seconds = time.perf_counter() - t0
        del it
    return {"key": spec["key"], "config": spec["config"], "batch": int(spec["batch"]), "batches": batches,
            "num_workers": int(cfg.data.num_workers), "prepare_s": prepare_s, "warmup_s": first_s,
            "examples_per_s": batches * int(spec["batch"]) / seconds}


def sampling_setup(spec: dict, overrides: dict | None = None) -> dict:
    """One stage's jitted sampler at a suite entry's config and batch, with random params and inputs: `call()`
    samples the batch once; `den`, `x`, `cond` describe one denoiser call (None for the CLIP text encoder).
    Used by bench_sampling and by benchmarks/peer/compare.py."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    b = int(spec["batch"])
    cfg, stage, _, _ = _stage_from_spec(spec, 1, overrides)
    cond: tuple = ()
    key = jax.random.key(0)
    params = nn.meta.unbox(jax.jit(stage.init_params)(key))
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    steps = None
    if spec["key"] == "clip_text":
        t = cfg.model.text
        tokens = jax.random.randint(k1, (b, int(t.context_length)), 1, 32, jnp.int32)
        run = jax.jit(lambda p, tok: stage.model.apply(p, tok, method="encode_text_full"))
        call = lambda: run(params, tokens)  # noqa: E731
        den = x = None
    elif cfg.stage == "prior":
        s = cfg.sampling
        steps, kc = int(s.steps), int(s.num_candidates)
        txt = jax.random.normal(k1, (b, stage.clip_embed_dim))
        txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
        states = jax.random.normal(k2, (b, stage.context_length, stage.text_width))
        valid = jnp.ones((b, stage.context_length), bool)
        sampler = stage.make_sampler()
        call = lambda: sampler(params, txt, states, valid, key)  # noqa: E731
        den = lambda p, x, t, tx, st, va: stage._denoiser(p, tx, st, va, float(s.guidance_scale))(x, t)  # noqa: E731
        rep = lambda a: jnp.repeat(a, kc, axis=0)  # noqa: E731
        x = jax.random.normal(k3, (b * kc, stage.clip_embed_dim))
        cond = (rep(txt), rep(states), rep(valid))
    elif cfg.stage == "decoder":
        steps, r = int(cfg.sampling.steps), int(cfg.data.resolution)
        emb = jax.random.normal(k1, (b, stage.embed_dim))
        tokens = jax.random.randint(k2, (b, stage.clip_context), 1, 32, jnp.int32)
        sampler = stage.make_sampler()
        call = lambda: sampler(params, emb, tokens, key)  # noqa: E731
        scale = float(cfg.sampling.guidance_scale)
        den = lambda p, x, t, e, tok: stage.guided_denoiser(p, e, tok, scale)(x, t)  # noqa: E731
        x = jax.random.normal(k3, (b, r, r, 3))
        cond = (emb, tokens)
    elif cfg.stage == "upsampler":
        steps, r = int(cfg.sampling.steps), int(cfg.data.resolution)
        low = jax.random.randint(k1, (b, r // stage.factor, r // stage.factor, 3), 0, 256, jnp.int32).astype(jnp.uint8)
        sampler = stage.make_sampler()
        call = lambda: sampler(params, low, key)  # noqa: E731
        den = lambda p, x, t, lo, k: stage._denoiser(p, lo, k)[0](x, t)  # noqa: E731
        x = jax.random.normal(k3, (b, r, r, 3))
        cond = (low, key)
    else:
        raise ValueError(f"no sampling benchmark for {spec['key']}")
    return dict(cfg=cfg, stage=stage, params=params, call=call, steps=steps, den=den, x=x, cond=cond,
                batch=b)


def bench_sampling(spec: dict, reps: int = 3) -> dict:
    """Seconds per image of one stage's sampler at its default steps, and the time of one denoiser call."""
    import jax
    import jax.numpy as jnp

    su = sampling_setup(spec)
    cfg, params, call, steps, den, x, cond, b = (su[k] for k in ("cfg", "params", "call", "steps", "den", "x", "cond",
                                                                  "batch"))
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    first_s = time.perf_counter() - t0
    total = statistics.median(_time(call, reps))
    out = {"key": spec["key"], "config": spec["config"], "batch": b, "steps": steps,
           "sampler": None if steps is None else str(cfg.sampling.sampler), "first_call_s": first_s,
           "seconds_per_call": total, "seconds_per_image": total / b}
    if den is not None:
        # One denoiser call alone (with its dispatch), and `steps` calls chained in a scan like the sampler's
        # (each input depends on the previous output, so XLA cannot hoist the call out of the loop): the
        # sampler's time minus the chained calls' is the loop's own overhead.
        tt = jnp.full((x.shape[0],), 500, jnp.int32)
        single = jax.jit(den)

        def chained(p, x0, *c):
            def body(xc, _):
                out = den(p, xc, tt, *c)
                return xc + 1e-3 * out[..., : xc.shape[-1]].astype(xc.dtype), None
            return jax.lax.scan(body, x0, None, length=steps)[0]

        chained = jax.jit(chained)
        jax.block_until_ready(single(params, x, tt, *cond))
        jax.block_until_ready(chained(params, x, *cond))
        fwd = statistics.median(_time(lambda: single(params, x, tt, *cond), max(5, reps)))
        in_loop = statistics.median(_time(lambda: chained(params, x, *cond), reps)) / steps
        per_step = total / steps
        out.update(forward_s=fwd, forward_in_loop_s=in_loop, per_step_s=per_step,
                   loop_overhead_s=per_step - in_loop, loop_overhead_fraction=(per_step - in_loop) / per_step)
    return out


def bench_scan(spec: dict, steps: int) -> dict:
    """The train step with the blocks unrolled and scanned: compile time and step time of each."""
    out = {"key": spec["key"], "config": spec["config"], "batch": int(spec["batch"])}
    for value in (False, True):
        r = bench_train(spec, steps, overrides={spec["flag"]: value})
        out["scan" if value else "unrolled"] = {k: r[k] for k in ("compile_s", "lower_s", "step_s", "examples_per_s")}
    return out


def bench_attention(shape: tuple, dtype: str, reps: int = 10) -> dict:
    """Forward+backward of causal self-attention [B, L, H, D]: jax.nn.dot_product_attention per implementation
    available here, against an einsum-softmax reference."""
    import jax
    import jax.numpy as jnp

    b, n, h, d = shape
    dt = jnp.dtype(dtype)
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, (b, n, h, d), jnp.float32).astype(dt) for kk in keys)

    def einsum_attn(q, k, v):
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(d)
        s = jnp.where(jnp.tril(jnp.ones((n, n), bool)), s, -1e30)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1).astype(q.dtype), v)

    impls = {"einsum": einsum_attn,
             "dot_product_attention(xla)": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                                       implementation="xla")}
    if jax.devices()[0].platform == "gpu":
        impls["dot_product_attention(cudnn)"] = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn")
    out = {"shape": list(shape), "dtype": str(dt), "seconds": {}}
    for name, fn in impls.items():
        g = jax.jit(jax.grad(lambda q, k, v, f=fn: jnp.sum(f(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))
        try:
            jax.block_until_ready(g(q, k, v))
        except Exception as e:  # an implementation this device/shape does not support
            out["seconds"][name] = f"unsupported: {type(e).__name__}"
            continue
        out["seconds"][name] = min(_time(lambda: g(q, k, v), reps))
    return out


def worker(task: dict) -> dict:
    suite = SUITES[task["suite"]]
    kind = task["kind"]
    if kind == "peak":
        return bench_peak(suite)
    if kind == "train":
        return bench_train(task["spec"], task["steps"])
    if kind == "data":
        return bench_data(task["spec"], task["batches"])
    if kind == "sampling":
        return bench_sampling(task["spec"])
    if kind == "scan":
        return bench_scan(task["spec"], task["steps"])
    if kind == "attention":
        return bench_attention(tuple(task["shape"]), suite["dtype"])
    raise ValueError(kind)


def run_task(task: dict, in_process: bool = False) -> dict:
    """Runs a worker task in a fresh Python process (or here, with in_process) and returns its result."""
    if in_process:
        return worker(task)
    with tempfile.NamedTemporaryFile("r", suffix=".json") as f:
        cmd = [sys.executable, "-m", "benchmarks.run", "--_task", json.dumps(task), "--_out", f.name]
        # the worker runs as a dalle2-jax command would (glibc malloc tunables: dalle2_jax/runtime_env.py)
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=malloc_env())
        if proc.returncode:
            raise RuntimeError(f"{task['kind']} {task.get('spec', {}).get('key', '')}: exit {proc.returncode}\n"
                               f"{proc.stderr[-3000:]}")
        return json.load(open(f.name))


# --- the run and the report -------------------------------------------------------------------------------
def machine() -> dict:
    import importlib.metadata as md

    import jax

    d = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": d.platform, "device_kind": d.device_kind, "device_count": jax.device_count(),
            "cpu": cpu, "cpu_cores_visible": os.cpu_count(), "python": platform.python_version(),
            "versions": {p: md.version(p) for p in ("jax", "jaxlib", "flax", "optax", "grain")}}


def run_suite(suite_name: str, sections: tuple[str, ...], steps: int, data_batches: int, in_process: bool = False,
              log=print, save=None) -> dict:
    """Runs the suite's `sections`; `save(result)` (if given) is called after each section, so a failure
    later keeps what was measured."""
    suite = SUITES[suite_name]
    result: dict[str, Any] = {"suite": suite_name, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "machine": machine(), "command": "python -m benchmarks.run " + " ".join(sys.argv[1:]),
                              "dtype": suite["dtype"]}

    def go(task: dict) -> dict:
        t0 = time.time()
        r = run_task(dict(task, suite=suite_name), in_process)
        log(f"  {task['kind']} {task.get('spec', {}).get('key', task.get('shape', ''))}: {time.time() - t0:.0f} s")
        return r

    if "peak" in sections or "train" in sections:
        result["peak"] = go({"kind": "peak"})
    if "train" in sections:
        result["train"] = [go({"kind": "train", "spec": s, "steps": steps}) for s in suite["train"]]
        for r in result["train"]:
            r["mfu"] = r["achieved_flops_per_s"] / result["peak"]["flops_per_s"]
            if result["peak"].get("bf16_flops_per_s"):
                r["mfu_bf16_peak"] = r["achieved_flops_per_s"] / result["peak"]["bf16_flops_per_s"]
        save and save(result)
    if "data" in sections:
        result["data"] = [go({"kind": "data", "spec": s, "batches": data_batches}) for s in suite["data"]]
        save and save(result)
    if "sampling" in sections:
        result["sampling"] = [go({"kind": "sampling", "spec": s}) for s in suite["sampling"]]
        result["cascade_seconds_per_image"] = sum(r["seconds_per_image"] for r in result["sampling"])
        save and save(result)
    if "fastpaths" in sections:
        fp = suite["fastpaths"]
        result["fastpaths"] = {
            "scan": [go({"kind": "scan", "spec": s, "steps": steps}) for s in fp["scan"]],
            "attention": [go({"kind": "attention", "shape": list(sh)}) for sh in fp["attention"]]}
    return result


def _fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}" if isinstance(x, (int, float)) else str(x)


def _gib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**30:.2f}"


def markdown_section(r: dict) -> str:
    m = r["machine"]
    lines = [f"## {m['platform'].upper()}: {m['device_kind']} x{m['device_count']} ({m['cpu']}, "
             f"{m['cpu_cores_visible']} cores visible), {r['dtype']}",
             "", f"Measured {r['date']}; " + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
             + f", Python {m['python']}. Command: `{r['command'].strip()}`.", ""]
    if "peak" in r:
        p = r["peak"]
        lines += [f"Peak: a {p['n']}x{p['n']} {p['dtype']} matmul at **{p['flops_per_s'] / 1e9:.1f} GFLOP/s** "
                  "(the MFU denominator)"
                  + (f"; with bfloat16 operands and float32 accumulation the same matmul runs at "
                     f"**{p['bf16_flops_per_s'] / 1e9:.1f} GFLOP/s** (the bfloat16 peak under this run's XLA flags, "
                     "the second MFU column; docs/benchmarks.md has what the CPU flag costs it)"
                     if p.get("bf16_flops_per_s") else "") + ".", ""]
    data = {d["key"]: d for d in r.get("data", [])}
    if "train" in r:
        bf16 = any("mfu_bf16_peak" in t for t in r["train"])
        lines += ["### Train step", "",
                  "| stage | config | batch | params | compile s | step ms | examples/s | data pipeline examples/s | "
                  "model GFLOP/step (jaxpr) | XLA cost GFLOP | achieved GFLOP/s | MFU | "
                  + ("MFU (bf16 peak) | " if bf16 else "") + "XLA memory GiB (args+temp) | "
                  "peak memory GiB |", "|---" * (15 if bf16 else 14) + "|"]
        for t in r["train"]:
            d = data.get(t["key"])
            mem = t["xla_memory_bytes"] or {}
            peak = t["device_peak_bytes"] if t["device_peak_bytes"] is not None else t["process_peak_rss_bytes"]
            over = "".join(f", {k}={v}" for k, v in t["overrides"].items())
            data_rate = "-" if d is None else f"{d['examples_per_s']:.0f}"
            lines.append(
                f"| {t['key']} | `{t['config']}`{over} | {t['batch']} | {t['params'] / 1e6:.2f}M | "
                f"{t['compile_s']:.1f} | {t['step_s'] * 1e3:.1f} | {t['examples_per_s']:.1f} | "
                f"{data_rate} | {t['model_flops'] / 1e9:.2f} | "
                f"{t['xla_cost_flops'] / 1e9:.2f} | {t['achieved_flops_per_s'] / 1e9:.1f} | {t['mfu'] * 100:.1f}% | "
                + (f"{t['mfu_bf16_peak'] * 100:.1f}% | " if "mfu_bf16_peak" in t else ("- | " if bf16 else ""))
                + f"{_gib(mem.get('total'))} | {_gib(peak)} |")
        lines += ["", "Peak memory is the device's `peak_bytes_in_use` on accelerators and the process's peak "
                  "resident set on CPU (it includes the Python runtime and the compiler).", ""]
    if "data" in r:
        lines += ["### Data pipeline alone", "", "| stage pipeline | config | batch | grain workers | "
                  "examples/s | warm-up s (first batches) |", "|---" * 6 + "|"]
        for d in r["data"]:
            lines.append(f"| {d['key']} | `{d['config']}` | {d['batch']} | {d['num_workers']} | "
                         f"{d['examples_per_s']:.0f} | {d['warmup_s']:.1f} |")
        lines.append("")
    if "sampling" in r:
        lines += ["### Sampling", "", "| stage | config | batch | sampler, steps | s/image | first call s | "
                  "ms/step | ms/denoiser call alone / in a scan | loop overhead |", "|---" * 9 + "|"]
        for s in r["sampling"]:
            sampler = "-" if s["steps"] is None else f"{s['sampler']}, {s['steps']}"
            step_ms = "-" if "per_step_s" not in s else f"{s['per_step_s'] * 1e3:.2f}"
            fwd_ms = ("-" if "forward_s" not in s
                      else f"{s['forward_s'] * 1e3:.2f} / {s['forward_in_loop_s'] * 1e3:.2f}")
            over = "-" if "loop_overhead_fraction" not in s else f"{s['loop_overhead_fraction'] * 100:.0f}%"
            lines.append(f"| {s['key']} | `{s['config']}` | {s['batch']} | {sampler} | {s['seconds_per_image']:.3g} "
                         f"| {s['first_call_s']:.1f} | {step_ms} | {fwd_ms} | {over} |")
        lines += ["", f"Cascade (CLIP text + prior + decoder + 64->256 upsampler): "
                  f"**{r['cascade_seconds_per_image']:.2f} s per image** at these batch sizes. The denoiser call "
                  "(guided: both halves in one call) is timed alone, with its dispatch, and as `steps` calls "
                  "chained in a scan; the loop overhead is (per-step time - the chained call) / per-step time: "
                  "the sampler's own arithmetic (x0, eps, clipping, the update).", ""]
    if "fastpaths" in r:
        lines += ["### Fast paths", "", "Scan over transformer blocks (`model.scan_layers`):", "",
                  "| stage | config | batch | compile s unrolled / scanned | step ms unrolled / scanned |",
                  "|---" * 5 + "|"]
        for s in r["fastpaths"]["scan"]:
            u, c = s["unrolled"], s["scan"]
            lines.append(f"| {s['key']} | `{s['config']}` | {s['batch']} | {u['compile_s']:.1f} / "
                         f"{c['compile_s']:.1f} | {u['step_s'] * 1e3:.1f} / {c['step_s'] * 1e3:.1f} |")
        impls = sorted({k for a in r["fastpaths"]["attention"] for k in a["seconds"]})
        lines += ["", "Causal self-attention, forward + backward, ms (the models call `jax.nn.dot_product_attention` "
                  "through `models/layers.dot_product_attention`: cuDNN's on GPU where it applies, XLA's elsewhere):",
                  "", "| B, L, H, D | " + " | ".join(impls) + " |", "|---" * (len(impls) + 1) + "|"]
        for a in r["fastpaths"]["attention"]:
            secs = a["seconds"]
            cells = [f"{secs[k] * 1e3:.2f}" if isinstance(secs.get(k), float) else secs.get(k, "-") for k in impls]
            lines.append(f"| {', '.join(map(str, a['shape']))} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


HEADER = """# Benchmarks

Written by `python -m benchmarks.run` (see its docstring for what each figure means) from the JSON in
`benchmarks/results/benchmarks_<platform>.json`; rerun it on your machine to regenerate this page. Each
measurement runs in a fresh process on random data at the stated config; speed is reported here, never asserted
in the tests. FLOPs per step are the jaxpr's matmuls and convolutions (forward + backward, the frozen models'
forward; `dalle2_jax/training/flops.py`); XLA's cost analysis is given beside it as the cross-check. MFU = those
FLOPs / step time / the peak matmul rate measured in the same run.
"""


def write_markdown(path: str | None = None) -> str:
    path = path or os.path.join(REPO, "BENCHMARKS.md")
    sections = []
    for name in sorted(os.listdir(RESULTS)):
        if name.startswith("benchmarks_") and name.endswith(".json"):
            sections.append(markdown_section(json.load(open(os.path.join(RESULTS, name)))))
    peer = os.path.join(RESULTS, "peer_cpu.md")  # benchmarks/peer/compare.py's side-by-side table
    if os.path.exists(peer):
        sections.append("## Side by side with DALLE2-pytorch (CPU)\n\n" + open(peer).read())
    extra = os.path.join(REPO, "benchmarks", "NOTES.md")
    text = HEADER + "\n" + "\n".join(sections) + (("\n" + open(extra).read()) if os.path.exists(extra) else "")
    with open(path, "w") as f:
        f.write(text)
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default=None, help="cpu | gpu (default: this machine's platform)")
    ap.add_argument("--only", nargs="*", default=list(SECTIONS), choices=SECTIONS)
    ap.add_argument("--steps", type=int, default=10, help="timed train steps per stage (after 2 warm-up steps)")
    ap.add_argument("--data_batches", type=int, default=50, help="timed batches of each data pipeline")
    ap.add_argument("--out", default="", help="JSON path (default benchmarks/results/benchmarks_<suite>.json)")
    ap.add_argument("--markdown_only", action="store_true", help="only rewrite BENCHMARKS.md from the JSON files")
    ap.add_argument("--_task", default="", help=argparse.SUPPRESS)
    ap.add_argument("--_out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._task:
        from absl import flags

        flags.FLAGS.mark_as_parsed()  # grain reads absl flags (the data workers)
        result = worker(json.loads(args._task))
        with open(args._out, "w") as f:
            json.dump(result, f)
        return
    if args.markdown_only:
        write_markdown()
        print(f"wrote {os.path.join(REPO, 'BENCHMARKS.md')}")
        return
    import jax

    suite = args.suite or ("gpu" if jax.devices()[0].platform == "gpu" else "cpu")
    print(f"benchmarks: suite {suite}, sections {' '.join(args.only)}", flush=True)
    out = args.out or os.path.join(RESULTS, f"benchmarks_{suite}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    # a partial rerun (--only) keeps the other sections of an earlier run
    old = json.load(open(out)) if os.path.exists(out) and set(args.only) != set(SECTIONS) else {}

    def save(result: dict) -> None:
        with open(out, "w") as f:
            json.dump({**old, **result}, f, indent=2)

    save(run_suite(suite, tuple(args.only), args.steps, args.data_batches, log=lambda m: print(m, flush=True),
                   save=save))
    write_markdown()
    print(f"wrote {out} and {os.path.join(REPO, 'BENCHMARKS.md')}")


if __name__ == "__main__":
    main()
