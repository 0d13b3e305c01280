"""benchmarks/peer/compare.py without torch: its flags, and the dalle2-jax side of each train workload matching the
recorded DALLE2-pytorch parameter count within 5% (abstract shapes only; nothing is compiled). The torch half
(benchmarks/peer/torch_side.py) runs only in the peer environment and is never imported here."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from benchmarks.peer import compare as C


def test_flags():
    a = C.parse_args([])
    assert a.workloads == list(C.WORKLOADS) and a.rounds == 5 and a.steps == 2 and a.threads == 2
    assert a.sample_calls == 1 and a.order == "abab" and a.omp_wait_policy == "PASSIVE"
    assert a.sample_steps is None and a.out == C.DEFAULT_OUT and a.warmup_steps == 1
    assert not a.peer_malloc_tunables
    s = C.parse_args(["--smoke", "--workloads", "prior_train", "--out", "/tmp/x.json"])
    assert (s.rounds, s.steps, s.sample_steps) == (C.SMOKE["rounds"], C.SMOKE["steps"], C.SMOKE["sample_steps"])
    assert s.workloads == ["prior_train"] and s.out == "/tmp/x.json" and s.warmup_steps == 0
    assert C.parse_args(["--smoke", "--warmup_steps", "2"]).warmup_steps == 2
    s = C.parse_args(["--smoke", "--rounds", "3", "--sample_steps", "7"])
    assert (s.rounds, s.steps, s.sample_steps) == (3, C.SMOKE["steps"], 7)
    with pytest.raises(SystemExit):
        C.parse_args(["--workloads", "nope"])
    with pytest.raises(SystemExit):
        C.parse_args(["--rounds", "0"])
    with pytest.raises(SystemExit):
        C.parse_args(["--warmup_steps", "-1"])


def test_worker_envs_malloc_tunables():
    """dalle2-jax's worker starts as its CLI would (glibc malloc tunables); the peer with glibc's defaults unless
    --peer_malloc_tunables."""
    from dalle2_jax import runtime_env

    a = C.parse_args([])
    expect = runtime_env.malloc_env({**os.environ, "GLIBC_TUNABLES": ""}).get("GLIBC_TUNABLES", "")
    old = os.environ.pop("GLIBC_TUNABLES", None)
    try:
        assert C._worker_env(a, "jax").get("GLIBC_TUNABLES", "") == expect
        assert C._worker_env(a, "torch").get("GLIBC_TUNABLES", "") == ""
        b = C.parse_args(["--peer_malloc_tunables"])
        assert C._worker_env(b, "torch").get("GLIBC_TUNABLES", "") == expect
    finally:
        if old is not None:
            os.environ["GLIBC_TUNABLES"] = old


def test_sample_steps_reach_the_jax_spec():
    assert C.jax_spec("decoder_sample")["overrides"]["sampling.steps"] == 50
    assert C.jax_spec("prior_sample", 4)["overrides"]["sampling.steps"] == 4
    assert C.jax_spec("prior_sample")["overrides"]["sampling.sampler"] == "ddim"
    assert "sampling.steps" not in C.jax_spec("prior_train")["overrides"]
    assert C.WORKLOADS["decoder_sample"]["spec"]["overrides"]["model.channels"] == 64  # the trained decoder's sizes


@pytest.mark.parametrize("name", [n for n, w in C.WORKLOADS.items() if w["kind"] == "train"])
def test_params_match_the_peer(name):
    jax_n = C.jax_params(name)
    peer_n = C.WORKLOADS[name]["peer_params"]
    assert abs(jax_n / peer_n - 1) < 0.05, (name, jax_n, peer_n)


def test_the_harness_does_not_import_torch():
    # in a fresh process: another test file of the suite may import torch where it is installed
    code = ("import sys; from benchmarks.peer import compare as C; C.parse_args([]); C.jax_spec('decoder_train'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=C.REPO, check=True)
