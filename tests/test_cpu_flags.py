"""The XLA:CPU flags dalle2_jax sets on import (dalle2_jax/__init__.py: convolutions on XLA's own kernels instead
of YNNPACK fusions, about 1.5x faster UNet train steps on CPU) change nothing beyond float rounding."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAG = "--xla_cpu_experimental_ynn_fusion_type"
# the tiny decoder's first four train steps (tests/step_losses.py), measured 2026-12-07 with jax 0.10.2 on CPU
PINNED = [1.0495371, 1.0198655, 1.0013201, 0.9545392]


def _run(code_or_script: list[str], **env) -> str:
    e = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "DALLE2_JAX_XLA_DEFAULTS")}
    e.update(env, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, *code_or_script], cwd=REPO, env=e, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def test_import_sets_the_flag_unless_the_user_did():
    show = ["-c", "import os, dalle2_jax; print(os.environ.get('XLA_FLAGS', ''))"]
    assert _run(show) == f"{FLAG}="
    assert _run(show, XLA_FLAGS="--xla_force_host_platform_device_count=2") == \
        f"--xla_force_host_platform_device_count=2 {FLAG}="
    mine = f"{FLAG}=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
    assert _run(show, XLA_FLAGS=mine) == mine
    assert _run(show, DALLE2_JAX_XLA_DEFAULTS="0") == ""


@pytest.mark.slow  # two processes compile a UNet train step (~100 s); every default test runs with the flags
def test_train_steps_match_with_and_without_the_flags():
    """Four real train steps of a tiny decoder: the same losses (within 1e-5 relative) with the flags and without
    them, and the pinned curve within 1e-3."""
    with_flags = json.loads(_run(["tests/step_losses.py", "4"]))
    without = json.loads(_run(["tests/step_losses.py", "4"], DALLE2_JAX_XLA_DEFAULTS="0"))
    assert with_flags["xla_flags"] == f"{FLAG}=" and without["xla_flags"] == ""
    assert with_flags["losses"] == pytest.approx(without["losses"], rel=1e-5)
    assert with_flags["losses"] == pytest.approx(PINNED, rel=1e-3)
