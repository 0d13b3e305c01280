"""Bad configs and commands through the real `train` CLI: one message naming the key and the fix, exit 2,
before anything is built or compiled. One process with 8 fake devices runs every case (in-process calls)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = r"""
import contextlib, io, json, os, sys, time
from dalle2_jax import train
import jax
assert jax.device_count() == 8
results = {}
for name, argv in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    t0 = time.time()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            train.run(["train"] + argv)
            code = 0
        except SystemExit as e:
            code = e.code
    results[name] = {"code": code, "stderr": err.getvalue(), "stdout": out.getvalue(), "s": time.time() - t0}
print(json.dumps(results))
"""


def test_each_bad_command_names_the_key_and_the_fix(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    w = str(tmp_path / "w")
    clip = ["--config", "configs/clip.py:tiny", "--workdir", w]
    cases = {  # name: (argv, the key the message must name, words of the fix)
        "unknown_stage": (clip + ["--config.stage=nope"], "stage", "known stages: ['clip', 'decoder'"),
        "patch_size": (clip + ["--config.model.vision.stem=patch", "--config.model.vision.patch_size=7"],
                       "model.vision.patch_size", "choose a divisor of 64"),
        "mesh": (clip + ["--config.mesh.data=3"], "mesh", "needs 3 devices but 8 are available"),
        "batch": (clip + ["--config.batch_size=12", "--config.mesh.data=8"], "batch_size",
                  "use a multiple of 8"),
        "prior_without_clip": (["--config", "configs/prior.py:tiny", "--workdir", w], "clip_workdir",
                               "point it at a trained or imported CLIP workdir"),
        "decoder_missing_clip": (["--config", "configs/decoder.py:tiny", "--workdir", w,
                                  f"--config.clip_workdir={tmp_path / 'no_such_clip'}"], "clip_workdir",
                                 "train one with configs/clip.py first"),
        "workdir": (["--config", "configs/clip.py:tiny", "--workdir", str(blocker / "run")], "workdir",
                    "choose a writable directory"),
    }
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps({k: v[0] for k, v in cases.items()})],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (_, key, fix) in cases.items():
        r = results[name]
        errors = [line for line in r["stderr"].splitlines() if line.startswith("error:")]
        assert r["code"] == 2, (name, r)
        assert len(errors) == 1 and errors[0].startswith(f"error: config.{key}: "), (name, r["stderr"])
        assert fix in errors[0], (name, errors[0])
        assert "Traceback" not in r["stderr"], (name, r["stderr"])
        assert " params, mesh " not in r["stdout"], name  # stopped before the model was built
    assert not os.path.exists(os.path.join(w, "checkpoints"))  # nothing trained, nothing written over
