"""glibc malloc tunables for XLA:CPU (dalle2_jax/runtime_env.py) and the commands' re-execution with them."""

import json
import subprocess
import sys

import pytest

import dalle2_jax
from dalle2_jax import runtime_env

OURS = dict(runtime_env.TUNABLES)


def _tunables(s: str) -> dict:
    return dict(p.split("=", 1) for p in s.split(":") if p)


def test_merged_tunables_keep_the_users_values():
    merged = _tunables(runtime_env.merged_tunables("glibc.malloc.hugetlb=0:glibc.cpu.x86_shstk=off"))
    assert merged["glibc.malloc.hugetlb"] == "0" and merged["glibc.cpu.x86_shstk"] == "off"
    assert merged["glibc.malloc.mmap_max"] == "0" and int(merged["glibc.malloc.trim_threshold"]) >= 2**40
    assert _tunables(runtime_env.merged_tunables("")) == OURS


@pytest.mark.skipif(not runtime_env._glibc(), reason="glibc only")
def test_malloc_env_only_for_cpu_runs_and_can_be_turned_off():
    base = {"PATH": "/usr/bin", "JAX_PLATFORMS": "cpu"}
    assert _tunables(runtime_env.malloc_env(base)["GLIBC_TUNABLES"]) == OURS
    assert "GLIBC_TUNABLES" not in runtime_env.malloc_env({**base, "DALLE2_JAX_MALLOC_DEFAULTS": "0"})
    for platforms in ("tpu", "cuda", "cpu,cuda"):
        assert "GLIBC_TUNABLES" not in runtime_env.malloc_env({**base, "JAX_PLATFORMS": platforms})


@pytest.mark.parametrize("argv, entry", [
    (["python", "-m", "dalle2_jax.train", "--config", "c"], "dalle2_jax.train"),
    (["python", "-u", "-m", "dalle2_jax.cli", "train"], "dalle2_jax.cli"),
    (["python", "/venv/bin/dalle2-jax", "generate"], "dalle2-jax"),
    (["python", "-m", "pytest", "-q"], None),
    (["python", "-c", "import dalle2_jax"], None),
    (["python", "script.py"], None),
    (["python"], None),
])
def test_entry_point_detection(monkeypatch, argv, entry):
    monkeypatch.setattr(sys, "orig_argv", argv)
    assert dalle2_jax._entry_point() == entry


def _report(env_extra: dict) -> dict:
    env = {k: v for k, v in runtime_env.os.environ.items() if k not in ("GLIBC_TUNABLES",)}
    env.update(JAX_PLATFORMS="cpu", **env_extra)
    out = subprocess.run([sys.executable, "-m", "dalle2_jax.runtime_env"], env=env, capture_output=True,
                         text=True, check=True)
    assert "RuntimeWarning" not in out.stderr, out.stderr
    return json.loads(out.stdout)


@pytest.mark.skipif(not runtime_env._glibc(), reason="glibc only")
def test_a_command_reexecutes_with_the_tunables_and_reuses_freed_memory():
    on = _report({})
    assert _tunables(on["GLIBC_TUNABLES"]) == OURS
    assert on["page_faults_on_reuse_64MiB"] < 100  # the freed 64 MiB came back from the heap
    off = _report({"DALLE2_JAX_MALLOC_DEFAULTS": "0"})
    assert off["GLIBC_TUNABLES"] == ""
    try:
        thp_always = "[always]" in open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        thp_always = False
    # glibc's default: a fresh mmap, every page faulted (4 KiB pages unless the kernel backs every mapping with
    # huge pages)
    assert off["page_faults_on_reuse_64MiB"] > (16 if thp_always else 10000)
