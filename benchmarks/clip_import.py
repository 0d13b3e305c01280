"""Accuracy against the reference, and time and peak memory of importing full-size CLIP files.

`python benchmarks/clip_import.py [--archs ViT-B-32 ViT-L-14 ViT-H-14] [--tmp DIR] [--out FILE]`

Accuracy: every case of tests/clip_reference.py (open_clip architectures at full or reduced depth, a small
Hugging Face CLIPModel) is imported from its seeded weights and compared with the committed open_clip /
transformers outputs (tests/fixtures/clip_reference/): the largest absolute difference of the unit image and
text embeddings and of the logits.

For each architecture it writes an open_clip-layout .safetensors file of the full size (one tensor at a
time, tests/clip_reference.write_safetensors_streaming), then runs `python -m dalle2_jax.tools.import_clip`
in a fresh process and records the wall time and that process's peak resident memory (VmHWM: it counts
the memory-mapped file pages it touched and the interpreter with jax). Results go to
benchmarks/results/clip_import_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))



def tool_child(module: str) -> str:
    """`python -c` code running dalle2_jax.tools.<module>.run(argv) that prints the process's own peak RSS last,
    as `peak_rss_kib N` (VmHWM, not ru_maxrss: the latter keeps the forking parent's high-water mark)."""
    return f"""
import sys
from dalle2_jax.tools.{module} import run
try:
    run(sys.argv[1:])
except SystemExit as e:
    if e.code:
        raise
with open("/proc/self/status") as f:
    print("peak_rss_kib", next(line.split()[1] for line in f if line.startswith("VmHWM")))
"""


CHILD = tool_child("import_clip")


def measure(arch: str, tmp: str, seed: int = 0) -> dict:
    """Writes a full-size `arch` file, imports it in a fresh process; returns sizes, time and peak RSS."""
    import clip_reference as R
    from configs import clip as clip_configs
    from dalle2_jax.tools.import_clip import expected_tensors

    spec = expected_tensors(clip_configs.get_config(arch).model, "open_clip")
    path = os.path.join(tmp, f"{arch}.safetensors")
    out = os.path.join(tmp, f"{arch}_workdir")
    size = R.write_safetensors_streaming(spec, seed, path)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", CHILD, "import_clip", "--arch", arch, "--weights", path,
                           "--out", out, "--overwrite"], capture_output=True, text=True, cwd=REPO)
    seconds = time.time() - t0
    if proc.returncode:
        raise RuntimeError(f"import of {arch} failed:\n{proc.stderr[-3000:]}")
    rss = int(proc.stdout.strip().splitlines()[-1].split()[-1]) * 1024
    report = json.loads(proc.stdout.strip().splitlines()[-2])
    os.remove(path)
    shutil.rmtree(out)
    return {"arch": arch, "file_bytes": size, "num_params": report["num_params"], "seconds": round(seconds, 1),
            "peak_rss_bytes": rss, "peak_rss_over_file": round(rss / size, 2)}


def accuracy(tmp: str) -> list[dict]:
    """Per reference case: max |ours - reference| of unit image/text embeddings and logits (fp32, CPU)."""
    import numpy as np
    from safetensors.numpy import save_file

    import clip_reference as R
    import test_clip_import as T
    from dalle2_jax.text import ClipBpeTokenizer
    from dalle2_jax.tools.import_clip import import_clip

    with open(os.path.join(R.FIXTURE_DIR, "index.json")) as f:
        index = json.load(f)
    arrays = dict(np.load(os.path.join(R.FIXTURE_DIR, "outputs.npz")))
    tokens = ClipBpeTokenizer().encode_batch(R.CAPTIONS)
    out = []
    for case in R.CASES:
        entry = index["cases"][case.name]
        path, wd = os.path.join(tmp, "w.safetensors"), os.path.join(tmp, case.name)
        save_file(R.draw_state_dict(entry["spec"], case.seed), path)
        import_clip(path, T.case_config(case), wd)
        img, txt, scale = T.run_clip(wd, R.draw_images(case.seed, entry["image_size"]), tokens)
        iu, tu = T.unit(img), T.unit(txt)
        row = {"case": case.name, "layout": case.layout, "arch": case.arch, "num_params": entry["num_params"],
               "image_embeds_unit": float(np.abs(iu - arrays[f"{case.name}/image_embeds_unit"]).max()),
               "text_embeds_unit": float(np.abs(tu - arrays[f"{case.name}/text_embeds_unit"]).max()),
               "logits": float(np.abs(scale * iu @ tu.T - arrays[f"{case.name}/logits_per_image"]).max())}
        print(json.dumps(row), flush=True)
        out.append(row)
        shutil.rmtree(wd)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="*", default=["ViT-B-32", "ViT-L-14", "ViT-H-14"])
    ap.add_argument("--tmp", default=None, help="scratch directory (needs ~2x the largest file)")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "clip_import_cpu.json"))
    args = ap.parse_args()
    tmp = args.tmp or tempfile.mkdtemp(prefix="clip_import_bench_")
    os.makedirs(tmp, exist_ok=True)
    acc = accuracy(tmp)
    results = []
    for arch in args.archs:
        r = measure(arch, tmp)
        print(json.dumps(r), flush=True)
        results.append(r)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "accuracy": acc,
                   "import": results}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
