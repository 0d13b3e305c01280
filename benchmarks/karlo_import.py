"""Time, peak memory and disk of importing a full-size karlo (unCLIP, diffusers layout, 3.4B params) folder.

`python benchmarks/karlo_import.py --tmp DIR [--file_dtype float32|float16] [--image_encoder] [--runs ...]`

It synthesises a karlo-v1-alpha-sized diffusers folder under DIR/karlo: prior/, decoder/, text_proj/,
super_res_first/, super_res_last/ (config.json from tests/fixtures/karlo_keys.json, the full-size configs of
diffusers' classes, and diffusion_pytorch_model.safetensors with those tensor names and shapes), text_encoder/
(openai/clip-vit-large-patch14's text tower, a transformers CLIPTextModelWithProjection: model.safetensors),
tokenizer/ and the scheduler folders (copied from tests/fixtures/karlo_tiny/pipeline: CLIP's real vocabulary),
and with --image_encoder a ViT-L/14 image_encoder/. Every file is written one tensor at a time (random values:
0.02 N, norm scales 1 + 0.02 N, a positive clip_std), float32 as the hub's karlo-v1-alpha files (or
--file_dtype float16), never holding a component in memory.

Then it runs `python -m dalle2_jax.tools.import_karlo --weights DIR/karlo --out BUNDLE` in a fresh process per
run: `bundle` (float32), `bf16` (--dtype bfloat16) and `workdirs` (float32 bundle plus --workdirs), recording the
wall time, the child's peak resident memory (VmHWM, printed by the child at exit) and, from /proc/PID/status
sampled every 0.1 s, the peak resident memory of each stage (clip, prior, decoder, upsampler: from the log line
that starts it to the next), the bytes written (bundle, workdirs) and the params count from the CLI's JSON
line. Results go to benchmarks/results/karlo_import_cpu.json. The synthetic folder is deleted at the end
(--keep to keep it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from clip_import import tool_child  # benchmarks/, this script's folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "tests", "fixtures", "karlo_tiny", "pipeline")
KEYS = os.path.join(REPO, "tests", "fixtures", "karlo_keys.json")
DIFFUSERS = ("prior", "decoder", "text_proj", "super_res_first", "super_res_last")
COPIED = ("tokenizer", "prior_scheduler", "decoder_scheduler", "super_res_scheduler", "feature_extractor")
STAGES = ("clip", "prior", "decoder", "upsampler")

# openai/clip-vit-large-patch14's towers, as karlo-v1-alpha's text_encoder/ and -image-variations' image_encoder/
CLIP_L_TEXT = {"architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model",
               "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
               "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 768, "hidden_act": "quick_gelu",
               "layer_norm_eps": 1e-5, "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 2,
               "pad_token_id": 1, "initializer_factor": 1.0, "initializer_range": 0.02}
CLIP_L_VISION = {"architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
                 "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
                 "patch_size": 14, "image_size": 224, "num_channels": 3, "projection_dim": 768,
                 "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "attention_dropout": 0.0,
                 "initializer_factor": 1.0, "initializer_range": 0.02}

ST_DTYPES = {"float32": ("F32", np.float32), "float16": ("F16", np.float16)}

CHILD = tool_child("import_karlo")  # prints its own peak RSS last


# --- the synthetic folder --------------------------------------------------------------------------------
def _draw(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    x = rng.standard_normal(shape, dtype=np.float32)
    last = name.split(".")
    if name == "clip_std":
        return np.abs(x) * np.float32(0.5) + np.float32(0.5)  # positive: the prior divides by it
    if len(shape) == 1 and last[-1] == "weight":  # 1-D weights are norm scales
        return x * np.float32(0.02) + np.float32(1.0)
    return x * np.float32(0.02)


def write_safetensors_streaming(spec: dict[str, tuple[int, ...]], path: str, seed: int = 0,
                                dtype: str = "float32") -> int:
    """Writes random tensors of `spec` (name -> shape) as a .safetensors file of `dtype`, one tensor at a time
    (at most one tensor in memory); returns the file size in bytes."""
    code, np_dtype = ST_DTYPES[dtype]
    item = np.dtype(np_dtype).itemsize
    header, offset = {}, 0
    for name in sorted(spec):
        n = int(np.prod(spec[name])) * item
        header[name] = {"dtype": code, "shape": [int(s) for s in spec[name]], "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name in sorted(spec):
            x = _draw(rng, name, tuple(int(s) for s in spec[name])).astype(np_dtype, copy=False)
            f.write(np.ascontiguousarray(x).tobytes())
            del x
    return os.path.getsize(path)


def clip_tower_spec(text_cfg: dict, vision_cfg: dict | None, tower: str) -> dict[str, tuple[int, ...]]:
    from dalle2_jax.tools import import_clip

    config = import_clip.hf_towers_config(text_cfg, vision_cfg)
    return import_clip.expected_tensors_for(config.model, "hf", (tower,))


def synthesise(root: str, file_dtype: str, image_encoder: bool) -> dict:
    """Writes the full-size karlo folder under `root`; returns {component: {num_tensors, num_params, bytes}}."""
    with open(KEYS) as f:
        keys = json.load(f)["components"]
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    shutil.copy(os.path.join(TINY, "model_index.json"), root)
    for c in COPIED:
        shutil.copytree(os.path.join(TINY, c), os.path.join(root, c))
    out = {}
    jobs = [(c, {"_class_name": keys[c]["class"], "_diffusers_version": "0.42.1", **keys[c]["config"]},
             {k: tuple(v) for k, v in keys[c]["tensors"].items()}, "diffusion_pytorch_model.safetensors")
            for c in DIFFUSERS]
    jobs.append(("text_encoder", dict(CLIP_L_TEXT, dtype=file_dtype),
                 clip_tower_spec(CLIP_L_TEXT, None, "text"), "model.safetensors"))
    if image_encoder:
        jobs.append(("image_encoder", dict(CLIP_L_VISION, dtype=file_dtype),
                     clip_tower_spec(CLIP_L_TEXT, CLIP_L_VISION, "vision"), "model.safetensors"))
    for seed, (c, cfg, spec, fname) in enumerate(jobs):
        t0 = time.time()
        d = os.path.join(root, c)
        os.makedirs(d)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        size = write_safetensors_streaming(spec, os.path.join(d, fname), seed, file_dtype)
        out[c] = {"num_tensors": len(spec), "num_params": int(sum(int(np.prod(s)) for s in spec.values())),
                  "bytes": size}
        print(f"wrote {c}: {out[c]['num_params'] / 1e6:.1f}M params, {size / 2**30:.2f} GiB "
              f"({time.time() - t0:.0f} s)", flush=True)
    return out


# --- one import in a fresh process -----------------------------------------------------------------------
def _rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def _trace(samples: list[tuple[float, int]], every: float) -> list[list[float]]:
    """[t, the peak RSS in GiB over (t - every, t]] for the sampled run."""
    out: dict[int, int] = {}
    for t, r in samples:
        k = int(t // every) + 1
        out[k] = max(out.get(k, 0), r)
    return [[k * every, round(r / 2**20, 2)] for k, r in sorted(out.items())]


def _du(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            total += os.path.getsize(os.path.join(dirpath, name))
    return total


def measure(name: str, weights: str, tmp: str, extra: list[str], max_rss_gib: float = 21.0) -> dict:
    out, wds = os.path.join(tmp, f"bundle_{name}"), os.path.join(tmp, f"workdirs_{name}")
    args = ["--weights", weights, "--out", out, "--overwrite"] + [a.replace("WORKDIRS", wds) for a in extra]
    cmd = [sys.executable, "-c", CHILD, "import_karlo"] + args
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    lines: list[tuple[float, str]] = []
    err: list[str] = []

    def read_out():
        for line in proc.stdout:
            lines.append((time.time() - t0, line.rstrip("\n")))

    def read_err():
        for line in proc.stderr:
            err.append(line)

    threads = [threading.Thread(target=read_out, daemon=True), threading.Thread(target=read_err, daemon=True)]
    for t in threads:
        t.start()
    samples: list[tuple[float, int]] = []
    while proc.poll() is None:
        r = _rss_kib(proc.pid)
        if r is not None:
            samples.append((time.time() - t0, r))
            if r > max_rss_gib * 2**20:  # stop it before the machine's OOM killer picks a process
                proc.kill()
                lines.append((time.time() - t0, f"killed by the benchmark at {r / 2**20:.1f} GiB"))
        time.sleep(0.1)
    for t in threads:
        t.join()
    seconds = time.time() - t0
    if proc.returncode:
        peak = max((r for _, r in samples), default=0) * 1024
        return {"run": name, "args": args, "failed": f"exit {proc.returncode}", "seconds": round(seconds, 1),
                "stage_starts_s": {s: round(t, 1) for t, ln in lines for s in STAGES
                                   if ln.startswith(f"{s}: importing")},
                "peak_rss_sampled_bytes": peak, "stderr_tail": "".join(err)[-3000:],
                "stdout_tail": [ln for _, ln in lines[-20:]]}
    rss = int(lines[-1][1].split()[-1]) * 1024
    report = json.loads(next(ln for _, ln in reversed(lines) if ln.startswith("{")))
    starts = {s: next((t for t, ln in lines if ln.startswith(f"{s}: importing")), None) for s in STAGES}
    bounds = [starts[s] for s in STAGES] + [seconds]
    per_stage = {}
    for i, s in enumerate(STAGES):
        if bounds[i] is None:
            continue
        sel = [r for t, r in samples if bounds[i] <= t < (bounds[i + 1] or seconds)]
        per_stage[s] = {"start_s": round(bounds[i], 1), "peak_rss_bytes": max(sel, default=0) * 1024}
    per_stage["startup"] = {"start_s": 0.0, "peak_rss_bytes": max((r for t, r in samples if t < (starts["clip"] or 0)),
                                                                  default=0) * 1024}
    row = {"run": name, "args": args, "num_params": report["num_params"], "dtype": report["dtype"],
           "seconds": round(seconds, 1), "peak_rss_bytes": rss, "bundle_bytes": _du(out),
           "workdirs_bytes": _du(wds) if os.path.isdir(wds) else 0, "stages": per_stage,
           "log": [[round(t, 1), ln] for t, ln in lines if not ln.startswith(("{", "peak_rss_kib"))],
           "rss_gib_every_5s": _trace(samples, 5.0)}
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(wds, ignore_errors=True)
    return row


RUNS = {"bundle": [], "bf16": ["--dtype", "bfloat16"], "workdirs": ["--workdirs", "WORKDIRS"]}


def _machine() -> dict:
    model = "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    with open("/proc/meminfo") as f:
        mem = int(next(ln.split()[1] for ln in f if ln.startswith("MemTotal"))) * 1024
    return {"cpu": model, "cores": os.cpu_count(), "ram_bytes": mem}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tmp", default=None, help="scratch directory (needs ~14 GB for the float32 folder, plus "
                    "~14 GB per bundle and ~14 GB more for the workdirs)")
    ap.add_argument("--file_dtype", choices=sorted(ST_DTYPES), default="float32")
    ap.add_argument("--image_encoder", action="store_true", help="also a ViT-L/14 image_encoder/")
    ap.add_argument("--runs", nargs="*", choices=sorted(RUNS), default=list(RUNS))
    ap.add_argument("--reuse", action="store_true", help="reuse DIR/karlo if it is there")
    ap.add_argument("--max_rss_gib", type=float, default=21.0, help="kill an import whose resident memory "
                    "passes this (recorded as failed)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic folder")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "karlo_import_cpu.json"))
    args = ap.parse_args()
    sys.path.insert(0, REPO)
    tmp = args.tmp or tempfile.mkdtemp(prefix="karlo_import_bench_")
    os.makedirs(tmp, exist_ok=True)
    weights = os.path.join(tmp, "karlo")
    t0 = time.time()
    if args.reuse and os.path.isdir(weights):
        files = {c: {"bytes": _du(os.path.join(weights, c))} for c in sorted(os.listdir(weights))
                 if os.path.isdir(os.path.join(weights, c))}
    else:
        files = synthesise(weights, args.file_dtype, args.image_encoder)
    synth_s = round(time.time() - t0, 1)
    results = []
    try:
        for name in args.runs:
            r = measure(name, weights, tmp, RUNS[name], args.max_rss_gib)
            print(json.dumps(r), flush=True)
            results.append(r)
    finally:
        if not args.keep:
            shutil.rmtree(weights, ignore_errors=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    doc = {"date": datetime.date.today().isoformat(), "machine": _machine(),
           "command": "python benchmarks/karlo_import.py " + " ".join(sys.argv[1:]),
           "file_dtype": args.file_dtype, "image_encoder": args.image_encoder, "files": files,
           "synthesis_seconds": synth_s, "import": results}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=2)
    gib = lambda b: f"{b / 2**30:.1f}"  # noqa: E731
    print(f"\n{'run':10} {'params':>7} {'time s':>7} {'peak RSS GiB':>12} {'bundle GiB':>10} {'workdirs GiB':>12}  "
          f"per-stage peak GiB ({', '.join(STAGES)})")
    for r in results:
        if "failed" in r:
            print(f"{r['run']:10} FAILED ({r['failed']}) after {r['seconds']} s, sampled peak "
                  f"{gib(r['peak_rss_sampled_bytes'])} GiB")
            continue
        stages = " / ".join(gib(r["stages"].get(s, {}).get("peak_rss_bytes", 0)) for s in STAGES)
        print(f"{r['run']:10} {r['num_params'] / 1e9:6.2f}B {r['seconds']:7.1f} {gib(r['peak_rss_bytes']):>12} "
              f"{gib(r['bundle_bytes']):>10} {gib(r['workdirs_bytes']):>12}  {stages}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
