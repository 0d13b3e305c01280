"""Side-by-side CPU speed of dalle2-jax and DALLE2-pytorch (issue 36) at matched parameter counts and shapes.

    bash benchmarks/peer/setup.sh                       # once: the peer environment (benchmarks/peer/.venv)
    python -m benchmarks.peer.compare                   # all workloads: benchmarks/results/peer_cpu.json and .md
    python -m benchmarks.peer.compare --smoke           # 2 rounds of 1 step, sampling at 4 steps: proves the harness
    python -m benchmarks.peer.compare --workloads decoder_train prior_train --rounds 7 --steps 3

Run from the repository root in dalle2-jax's environment. For each workload it starts two long-lived workers, one per
framework: dalle2-jax's in this interpreter (`--_jax_worker`), DALLE2-pytorch's in the peer environment
(benchmarks/peer/torch_side.py). Each builds its model, compiles / warms up, and then times `--steps` calls when told
to; the driver alternates them, ABAB... (dalle2-jax, then DALLE2-pytorch, each round; `--order abba` swaps the
first one every round), and records the load average before and after each measurement. In every round a worker
first runs `--warmup_steps` untimed train steps (1): the first step after sitting idle while the other framework ran
was up to 1.6x slower than the next (dalle2-jax's CLIP step, 2026-12-08: 17.7-18.1 s, then 11.3-11.6 s), which
back-to-back training never sees. A round's figure is the median of its timed step times; the result is the median
over rounds. Compile time and warm-up are never timed.

Fairness: float32 on both sides; both workers pinned to the same `--threads` CPUs (2; sched_setaffinity when the
machine has more), torch.set_num_threads(threads) with OMP_NUM_THREADS=threads and OMP_WAIT_POLICY=PASSIVE
(torch's default spinning OpenMP threads collapse on a loaded machine: 2-5x slower when another process holds a
core; `--omp_wait_policy ""` leaves torch's default).

Workloads (dalle2-jax's side: the repository's configs with the overrides below; DALLE2-pytorch's: torch_side.py):
- decoder_train: configs/decoder.py:tiny at 64 px, channels 64, mults 1,2,3,4, 2 res blocks, attention at 8 px
  (with the image tokens as context), conv down/upsampling (DALLE2-pytorch's Unet resamples with convs), no caption
  transformer, no dropout (the peer's Unet has none), 512-d image embedding from precomputed embeddings; batch 8.
  Peer: Unet(dim=64, dim_mults=(1,2,3,4), cond_on_image_embeds=True) in a Decoder(image_sizes=(64,)).
- prior_train: configs/prior.py:tiny at width 512, depth 6, 8 heads, MLP ratio 5 (the peer's SwiGLU MLP has
  12 d^2 params a layer), a 512-d CLIP with 256 text tokens (260 positions), from precomputed embeddings (no CLIP
  in the step); batch 64. Peer: DiffusionPriorNetwork(dim=512, depth=6) in a DiffusionPrior.
- clip_train: configs/clip.py:tiny with a 512 x 6 text tower over 256 tokens (vocabulary 49408) and a 512 x 6 ViT on
  64 px images with 16 px patches, MLP ratio 6 (x-clip's GEGLU MLP has 12 d^2 params a layer); batch 32. Peer:
  x-clip's CLIP at the same sizes, patch dropout off.
- decoder_sample: the decoder above, DDIM 50 steps, guidance 3 (both frameworks evaluate the conditional and the
  unconditional model each step), batch 4; seconds per image.
- prior_sample: the prior above, DDIM 64 steps, guidance 2, 2 candidates per caption, batch 8; seconds per embedding.
dalle2-jax's train step is the trainer's own (benchmarks/run.py TrainStep: trainer.jit_train_step, with the
optimizer, gradient clipping and EMA); the peer's is forward + backward + clip + DALLE2-pytorch's AdamW + an EMA.
GFLOP/step is XLA's cost analysis of the compiled step (the jaxpr's matmul/conv count is in the JSON beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.join(REPO, "benchmarks", "peer")
DEFAULT_OUT = os.path.join(REPO, "benchmarks", "results", "peer_cpu.json")
DEFAULT_PEER_PYTHON = os.path.join(HERE, ".venv", "bin", "python")
PROTO = "@@peer "  # protocol lines on a worker's stdout start with this; anything else is passed through
EMB = "precomputed"  # benchmarks.run.EMB: the from-embeddings step, no files read

_DECODER = {"data.embeddings_dir": EMB, "data.resolution": 64, "model.channels": 64, "model.channel_mult": (1, 2, 3, 4),
            "model.num_res_blocks": 2, "model.attention_resolutions": (8,), "model.resblock_updown": False,
            "model.caption_depth": 0, "model.clip_embed_dim": 512,
            "model.dropout": 0.0}  # the peer's Unet has no dropout (its ResnetBlock has none; the tiny config's is 0.1)
_PRIOR = {"data.embeddings_dir": EMB, "model.width": 512, "model.depth": 6, "model.heads": 8, "model.mlp_ratio": 5.0,
          "model.clip_embed_dim": 512, "model.clip_text_width": 512, "model.clip_context_length": 256}
_PRIOR_CLIP = {"model.embed_dim": 512, "model.text.width": 512, "model.text.heads": 8,
               "model.text.context_length": 256}
_CLIP = {"model.embed_dim": 512, "model.text.width": 512, "model.text.depth": 6, "model.text.heads": 8,
         "model.text.mlp_ratio": 6.0, "model.text.context_length": 256, "model.text.vocab_size": 49408,
         "model.vision.width": 512, "model.vision.depth": 6, "model.vision.heads": 8, "model.vision.mlp_ratio": 6.0,
         "model.vision.image_size": 64, "model.vision.stem": "patch", "model.vision.patch_size": 16,
         "model.vision.conv_channels": ()}

# name -> (kind, dalle2-jax suite entry as benchmarks/run.py reads it, label, unit, peer params from torch_side.py
# --check with dalle2-pytorch 1.15.6 / x-clip 0.14.4 / torch 2.13.0: the test checks the match without torch)
WORKLOADS: dict[str, dict[str, Any]] = {
    "decoder_train": dict(
        kind="train", label="decoder train step, UNet 64 ch, mults 1,2,3,4, 64 px, batch 8", unit="img/s",
        spec={"key": "decoder", "config": "configs/decoder.py:tiny", "batch": 8, "clip_config": "configs/clip.py:tiny",
              "clip_overrides": {"model.embed_dim": 512}, "overrides": _DECODER},
        peer_params=22_796_934),
    "prior_train": dict(
        kind="train", label="prior train step, width 512, depth 6, 260 tokens, batch 64", unit="/s",
        spec={"key": "prior", "config": "configs/prior.py:tiny", "batch": 64, "clip_config": "configs/clip.py:tiny",
              "clip_overrides": _PRIOR_CLIP, "overrides": _PRIOR},
        peer_params=23_330_832),
    "clip_train": dict(
        kind="train", label="CLIP train step, text 512x6 (256 tokens), ViT 64 px/16 512x6, batch 32", unit="/s",
        spec={"key": "clip", "config": "configs/clip.py:tiny", "batch": 32, "overrides": _CLIP},
        peer_params=77_517_825),
    "decoder_sample": dict(
        kind="sample", label="decoder sampling, DDIM 50, batch 4", unit="s/img", steps=50,
        spec={"key": "decoder", "config": "configs/decoder.py:tiny", "batch": 4, "clip_config": "configs/clip.py:tiny",
              "clip_overrides": {"model.embed_dim": 512},
              "overrides": {**_DECODER, "sampling.sampler": "ddim", "sampling.guidance_scale": 3.0}},
        peer_params=22_796_934),
    "prior_sample": dict(
        kind="sample", label="prior sampling, DDIM 64, batch 8", unit="s/emb", steps=64,
        spec={"key": "prior", "config": "configs/prior.py:tiny", "batch": 8, "clip_config": "configs/clip.py:tiny",
              "clip_overrides": _PRIOR_CLIP,
              "overrides": {**_PRIOR, "sampling.sampler": "ddim", "sampling.guidance_scale": 2.0,
                            "sampling.num_candidates": 2}},
        peer_params=23_330_832),
}
SMOKE = {"rounds": 2, "steps": 1, "sample_steps": 4, "warmup_steps": 0}


def jax_spec(name: str, sample_steps: int | None = None) -> dict:
    """The benchmarks/run.py suite entry of a workload's dalle2-jax side (sampling steps set for samplers)."""
    w = WORKLOADS[name]
    spec = json.loads(json.dumps(w["spec"]))
    if w["kind"] == "sample":
        spec["overrides"]["sampling.steps"] = int(sample_steps or w["steps"])
    return spec


def jax_params(name: str) -> int:
    """dalle2-jax's trained parameter count of a workload (abstract: nothing is allocated or compiled)."""
    import flax.linen as nn
    import jax
    import numpy as np

    from benchmarks.run import _stage_from_spec

    spec = jax_spec(name)
    _, stage, _, _ = _stage_from_spec(spec, 1)
    shapes = jax.eval_shape(lambda k: nn.meta.unbox(stage.init_params(k)), jax.random.key(0))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))


# --- the dalle2-jax worker ----------------------------------------------------------------------------------
def _emit(obj: dict) -> None:
    sys.stdout.write(PROTO + json.dumps(obj) + "\n")
    sys.stdout.flush()


def jax_worker(name: str, sample_steps: int | None) -> None:
    import jax

    from benchmarks import run as R

    w = WORKLOADS[name]
    spec = jax_spec(name, sample_steps)
    t0 = time.perf_counter()
    if w["kind"] == "train":
        ts = R.TrainStep(spec)
        ts.run(2)  # warm-up (the first call also allocates)
        run_n = ts.run
        info = {k: ts.info[k] for k in ("params", "compile_s", "model_flops", "xla_cost_flops", "batch")}
        units = int(spec["batch"])
    else:
        su = R.sampling_setup(spec)
        call = su["call"]
        t1 = time.perf_counter()
        jax.block_until_ready(call())
        info = {"first_call_s": time.perf_counter() - t1, "batch": su["batch"],
                "params": int(sum(x.size for x in jax.tree.leaves(su["params"]))), "sample_steps": su["steps"]}
        run_n = lambda n: R._time(call, n)  # noqa: E731
        units = su["batch"]
    import importlib.metadata as md

    _emit({"ready": True, "units": units, "setup_s": time.perf_counter() - t0, **info,
           "process_peak_rss_bytes": R._rss_peak_bytes(),
           "versions": {p: md.version(p) for p in ("jax", "jaxlib", "flax")}})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        _emit({"times": run_n(int(cmd["n"]))})


# --- the driver ---------------------------------------------------------------------------------------------
class Worker:
    """A worker process speaking the JSON-lines protocol (torch_side.py's or jax_worker's)."""

    def __init__(self, name: str, cmd: list[str], env: dict, cpus: set[int] | None, log):
        self.name, self.log = name, log
        preexec = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        # stderr to a file, not a pipe: a worker's progress output must never fill a pipe while the other is timed
        self.stderr = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, bufsize=1, preexec_fn=preexec)

    def _failed(self) -> RuntimeError:
        self.proc.wait()
        self.stderr.seek(0)
        tail = self.stderr.read()[-4000:]
        return RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{tail}")

    def read(self, timeout: float = 3600.0) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 1.0)
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    raise self._failed()
                if line.startswith(PROTO):
                    return json.loads(line[len(PROTO):])
            elif self.proc.poll() is not None:
                raise self._failed()
        raise TimeoutError(f"{self.name}: no answer in {timeout:.0f} s")

    def send(self, obj: dict) -> None:
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send({"cmd": "quit"})
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _cpu_ids() -> dict:
    """cpu family / model / stepping and the microcode from /proc/cpuinfo (the model name can be generic on VMs)."""
    out: dict[str, str] = {}
    try:
        for line in open("/proc/cpuinfo"):
            k, _, v = line.partition(":")
            k = k.strip()
            if k in ("cpu family", "model", "stepping", "microcode", "cache size") and k not in out:
                out[k] = v.strip()
            if not line.strip():
                break
    except OSError:
        pass
    return out


def _cpu_flags() -> list[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2", "fma")))
    except OSError:
        pass
    return []


def _worker_env(args, framework: str) -> dict:
    """A worker's environment. dalle2-jax's gets the glibc malloc tunables its CLI runs with
    (dalle2_jax/runtime_env.py); DALLE2-pytorch's runs with glibc's defaults, as its users run it, unless
    --peer_malloc_tunables gives it the same."""
    from dalle2_jax.runtime_env import malloc_env

    env = dict(os.environ)
    if framework == "jax" or args.peer_malloc_tunables:
        env = malloc_env(env)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if framework == "torch":
        env["TQDM_DISABLE"] = "1"  # DALLE2-pytorch's sampling loops draw tqdm bars
        env["OMP_NUM_THREADS"] = str(args.threads)
        if args.omp_wait_policy:
            env["OMP_WAIT_POLICY"] = args.omp_wait_policy
        else:
            env.pop("OMP_WAIT_POLICY", None)
    return env


def run_workload(name: str, args, cpus: set[int] | None, log) -> dict:
    w = WORKLOADS[name]
    sample_steps = args.sample_steps if w["kind"] == "sample" else None
    jax_cmd = [sys.executable, "-m", "benchmarks.peer.compare", "--_jax_worker", name]
    torch_cmd = [args.peer_python, os.path.join(HERE, "torch_side.py"), "--workload", name, "--threads",
                 str(args.threads), "--serve"]
    if sample_steps:
        jax_cmd += ["--sample_steps", str(sample_steps)]
        torch_cmd += ["--sample_steps", str(sample_steps)]
    workers = {"dalle2-jax": Worker("dalle2-jax", jax_cmd, _worker_env(args, "jax"), cpus, log),
               "DALLE2-pytorch": Worker("DALLE2-pytorch", torch_cmd, _worker_env(args, "torch"), cpus, log)}
    try:
        ready = {k: v.read() for k, v in workers.items()}  # both build / compile at once; nothing is timed yet
        log(f"  {name}: ready (dalle2-jax {ready['dalle2-jax']['params'] / 1e6:.2f}M params, "
            f"DALLE2-pytorch {ready['DALLE2-pytorch']['params'] / 1e6:.2f}M)")
        measurements = []
        order = list(workers)
        n_calls = args.steps if w["kind"] == "train" else args.sample_calls
        n_warm = args.warmup_steps if w["kind"] == "train" else 0
        for r in range(args.rounds):
            for fw in (order[::-1] if args.order == "abba" and r % 2 else order):
                load0 = os.getloadavg()
                t0 = time.time()
                workers[fw].send({"cmd": "run", "n": n_warm + n_calls})
                warm, times = (lambda t: (t[:n_warm], t[n_warm:]))(workers[fw].read()["times"])
                load1 = os.getloadavg()
                measurements.append({"round": r, "framework": fw, "times": times, "median_s": statistics.median(times),
                                     "warmup_times": warm, "started": t0, "loadavg_before": list(load0),
                                     "loadavg_after": list(load1)})
                log(f"    round {r} {fw}: {statistics.median(times):.3f} s/call "
                    f"(load {load0[0]:.2f} -> {load1[0]:.2f})")
    finally:
        for v in workers.values():
            v.close()
    out: dict[str, Any] = {"workload": name, "kind": w["kind"], "label": w["label"], "unit": w["unit"],
                           "calls_per_round": n_calls, "warmup_calls_per_round": n_warm, "rounds": args.rounds,
                           "measurements": measurements}
    if w["kind"] == "sample":
        out["sample_steps"] = int(sample_steps or w["steps"])
    for fw, info in ready.items():
        per_round = [m["median_s"] for m in measurements if m["framework"] == fw]
        call_s = statistics.median(per_round)
        units = int(info["units"])
        res = {"params": int(info["params"]), "units_per_call": units, "seconds_per_call": call_s,
               "seconds_per_call_rounds": per_round, "setup": info}
        if w["kind"] == "train":
            res["throughput"] = units / call_s  # examples (images) per second
        else:
            res["seconds_per_unit"] = call_s / units
        if fw == "dalle2-jax" and w["kind"] == "train":
            res["xla_gflop_per_step"] = info["xla_cost_flops"] / 1e9
            res["jaxpr_gflop_per_step"] = info["model_flops"] / 1e9
            res["xla_gflop_per_s"] = info["xla_cost_flops"] / call_s / 1e9
        out[fw] = res
    j, t = out["dalle2-jax"], out["DALLE2-pytorch"]
    # ratio = dalle2-jax throughput / DALLE2-pytorch throughput (> 1: dalle2-jax is faster)
    out["ratio"] = (j["throughput"] / t["throughput"] if w["kind"] == "train"
                    else t["seconds_per_unit"] / j["seconds_per_unit"])
    loads = [x for m in measurements for x in (m["loadavg_before"][0], m["loadavg_after"][0])]
    out["loadavg_1min"] = {"min": min(loads), "max": max(loads), "median": statistics.median(loads)}
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"Measured {result['date']} on {m['cpu']} ({m['cpu_cores_visible']} cores visible, "
             f"{result['threads']} threads per framework), float32; "
             + ", ".join(f"{k} {v}" for k, v in result["versions"].items())
             + f"; OMP_WAIT_POLICY={result['omp_wait_policy'] or '(torch default)'}"
             + "".join(f"; {fw} GLIBC_TUNABLES={v or '(glibc defaults)'}"
                       for fw, v in result.get("glibc_tunables", {}).items()) + ". "
             f"Command: `{result['command']}`." + (" **Smoke run: not a measurement.**" if result["smoke"] else ""),
             "",
             "| workload | params (dalle2-jax / DALLE2-pytorch) | dalle2-jax | DALLE2-pytorch | ratio jax/torch | "
             "dalle2-jax GFLOP/step (XLA) | dalle2-jax GFLOP/s | load avg (1 min) |", "|---" * 8 + "|"]
    for w in result["workloads"]:
        j, t = w["dalle2-jax"], w["DALLE2-pytorch"]
        label = w["label"]
        if w["kind"] == "sample" and w["sample_steps"] != WORKLOADS[w["workload"]]["steps"]:
            label = label.replace(f"DDIM {WORKLOADS[w['workload']]['steps']}", f"DDIM {w['sample_steps']}")
        if w["kind"] == "train":
            cells = [f"{j['throughput']:.3g} {w['unit']}", f"{t['throughput']:.3g} {w['unit']}"]
            flops = [f"{j['xla_gflop_per_step']:.1f}", f"{j['xla_gflop_per_s']:.1f}"]
        else:
            cells = [f"{j['seconds_per_unit']:.3g} {w['unit']}", f"{t['seconds_per_unit']:.3g} {w['unit']}"]
            flops = ["-", "-"]
        la = w["loadavg_1min"]
        lines.append(f"| {label} | {j['params'] / 1e6:.1f}M / {t['params'] / 1e6:.1f}M | {cells[0]} | {cells[1]} | "
                     f"{w['ratio']:.2f} | {flops[0]} | {flops[1]} | {la['min']:.1f}-{la['max']:.1f} |")
    for f in result.get("failed", []):
        lines.append(f"| {WORKLOADS[f['workload']]['label']} | failed: {f['error'].splitlines()[0][:100]} |")
    lines += ["", "Ratio = dalle2-jax throughput / DALLE2-pytorch throughput (for sampling: DALLE2-pytorch's seconds "
              "per image or embedding / dalle2-jax's); > 1 means dalle2-jax is faster. Each figure is the median over "
              f"{result['rounds']} alternating rounds of the median of {result['steps']} train steps"
              + (f" (after {result['warmup_steps']} untimed)" if result.get("warmup_steps") else "") + " or "
              f"{result.get('sample_calls', 1)} sampling run(s); load average is the "
              "1-minute figure before and after each measurement (the machine has "
              f"{m['cpu_cores_visible']} cores).", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (each framework once a round)")
    ap.add_argument("--steps", type=int, default=2, help="timed train steps per framework per round")
    ap.add_argument("--warmup_steps", type=int, default=1,
                    help="untimed train steps before the timed ones in every round (recorded as warmup_times): a "
                         "worker that sat idle while the other ran pays for it in its first step, which back-to-back "
                         "training steps never do")
    ap.add_argument("--sample_calls", type=int, default=1, help="timed sampling runs per framework per round (each "
                    "is a whole DDIM run of the batch)")
    ap.add_argument("--sample_steps", type=int, default=None, help="override the samplers' step counts (smoke)")
    ap.add_argument("--smoke", action="store_true",
                    help=f"tiny counts to prove the harness: {SMOKE['rounds']} rounds of {SMOKE['steps']} call, "
                    f"no warm-up, sampling at {SMOKE['sample_steps']} steps (unless given)")
    ap.add_argument("--order", choices=("abab", "abba"), default="abab",
                    help="abab: dalle2-jax then DALLE2-pytorch every round; abba: the first one swapped every round")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per framework")
    ap.add_argument("--omp_wait_policy", default="PASSIVE", help="torch's OMP_WAIT_POLICY ('' = torch's default)")
    ap.add_argument("--peer_malloc_tunables", action="store_true",
                    help="start DALLE2-pytorch with dalle2-jax's glibc malloc tunables too (a side check)")
    ap.add_argument("--peer_python", default=DEFAULT_PEER_PYTHON, help="python of the peer env (setup.sh)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="JSON path; the markdown table goes beside it (.md)")
    ap.add_argument("--_jax_worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke:
        argv = argv if argv is not None else sys.argv[1:]
        if "--rounds" not in argv:
            args.rounds = SMOKE["rounds"]
        if "--steps" not in argv:
            args.steps = SMOKE["steps"]
        if args.sample_steps is None:
            args.sample_steps = SMOKE["sample_steps"]
        if "--warmup_steps" not in argv:
            args.warmup_steps = SMOKE["warmup_steps"]
    if args.warmup_steps < 0:
        ap.error("--warmup_steps must be >= 0")
    if min(args.rounds, args.steps, args.sample_calls, args.threads) < 1:
        ap.error("--rounds, --steps, --sample_calls and --threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args._jax_worker:
        jax_worker(args._jax_worker, args.sample_steps)
        return
    if not os.path.exists(args.peer_python):
        sys.exit(f"no peer environment at {args.peer_python}: run `bash benchmarks/peer/setup.sh` first "
                 "(or pass --peer_python)")
    cpus = None
    if hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) > args.threads:
        cpus = set(sorted(os.sched_getaffinity(0))[: args.threads])
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    log(f"peer comparison: {' '.join(args.workloads)}; {args.rounds} rounds x {args.steps} calls, "
        f"{args.threads} threads{' (pinned to CPUs ' + str(sorted(cpus)) + ')' if cpus else ''}"
        + (" [smoke]" if args.smoke else ""))
    import importlib.metadata as md

    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "smoke": bool(args.smoke),
        "command": "python -m benchmarks.peer.compare " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpu": _cpu_model(), "cpu_ids": _cpu_ids(), "cpu_flags": _cpu_flags(),
                    "cpu_cores_visible": os.cpu_count(), "pinned_cpus": sorted(cpus) if cpus else None},
        "threads": args.threads, "order": args.order, "omp_wait_policy": args.omp_wait_policy,
        "warmup_steps": args.warmup_steps,
        "glibc_tunables": {"dalle2-jax": _worker_env(args, "jax").get("GLIBC_TUNABLES", ""),
                           "DALLE2-pytorch": _worker_env(args, "torch").get("GLIBC_TUNABLES", "")},
        "rounds": args.rounds, "steps": args.steps, "sample_calls": args.sample_calls,
        "dtype": "float32", "workloads": [],
        "versions": {p: md.version(p) for p in ("jax", "jaxlib", "flax")},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    md_path = os.path.splitext(args.out)[0] + ".md"
    for name in args.workloads:
        t0 = time.time()
        try:
            r = run_workload(name, args, cpus, log)
        except (RuntimeError, TimeoutError) as e:  # e.g. a worker killed for memory on a shared machine
            log(f"  {name}: FAILED: {e}")
            result.setdefault("failed", []).append({"workload": name, "error": str(e)[-2000:]})
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
            continue
        result["workloads"].append(r)
        for k, v in r["DALLE2-pytorch"]["setup"].get("versions", {}).items():
            result["versions"][k] = v
        log(f"  {name}: ratio {r['ratio']:.2f} ({time.time() - t0:.0f} s)")
        with open(args.out, "w") as f:  # after each workload: a failure later keeps what was measured
            json.dump(result, f, indent=2)
        with open(md_path, "w") as f:
            f.write(markdown(result))
    print(markdown(result))
    log(f"wrote {args.out} and {md_path}")
    if result.get("failed"):
        sys.exit(f"failed: {', '.join(f['workload'] for f in result['failed'])}")


if __name__ == "__main__":
    main()
