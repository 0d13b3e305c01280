"""benchmarks/run.py: the harness measures what it says (FLOPs cross-checked, MFU and rates derived from the
timings, the sampling-loop split) and writes BENCHMARKS.md's tables. Speeds are never asserted."""

from __future__ import annotations

import json
import os

import pytest

from benchmarks import run as B

EMB = {"data.embeddings_dir": B.EMB}


@pytest.fixture(scope="module")
def small_suite(shapes_data_dir, monkeypatch_module):
    """A suite of the smallest real configs at batch 2, the data pipeline on the tests' small build."""
    data = {"data.data_dir": shapes_data_dir, "data.num_train": 256, "data.num_test": 64, "data.num_workers": 0}
    suite = {
        "dtype": "float32", "matmul_n": 256,
        "train": [{"key": "prior", "config": "configs/prior.py:tiny", "batch": 2,
                   "clip_config": "configs/clip.py:tiny", "overrides": EMB}],
        "data": [{"key": "clip", "config": "configs/clip.py:tiny", "batch": 8, "overrides": data}],
        "sampling": [{"key": "clip_text", "config": "configs/clip.py:tiny", "batch": 2},
                     {"key": "prior", "config": "configs/prior.py:tiny", "batch": 2,
                      "clip_config": "configs/clip.py:tiny", "overrides": {**EMB, "sampling.steps": 2}}],
        "fastpaths": {"scan": [{"key": "prior", "config": "configs/prior.py:tiny", "batch": 2,
                                "flag": "model.scan_layers", "clip_config": "configs/clip.py:tiny",
                                "overrides": EMB}],
                      "attention": [(2, 8, 2, 16)]},
    }
    monkeypatch_module.setitem(B.SUITES, "test", suite)
    return suite


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def result(small_suite):
    return B.run_suite("test", B.SECTIONS, steps=2, data_batches=3, in_process=True, log=lambda m: None)


def test_train_figures_are_consistent(result):
    import jax

    peak = result["peak"]
    assert peak["flops_per_s"] == pytest.approx(2 * 256**3 / peak["seconds"])
    (t,) = result["train"]
    assert t["params"] > 100_000 and t["batch"] == 2 and t["steps_timed"] == 2
    # the jaxpr's matmul count and XLA's cost analysis of the compiled step agree (XLA adds elementwise work)
    assert 0.5 < t["model_flops"] / t["xla_cost_flops"] < 1.2
    assert t["examples_per_s"] == pytest.approx(2 / t["step_s"])
    assert t["mfu"] == pytest.approx(t["model_flops"] / t["step_s"] / peak["flops_per_s"])
    if jax.default_backend() == "cpu":  # the bfloat16 peak (bf16 operands, float32 accumulation), a second MFU
        assert peak["bf16_flops_per_s"] > 0
        assert t["mfu_bf16_peak"] == pytest.approx(t["model_flops"] / t["step_s"] / peak["bf16_flops_per_s"])
    assert t["step_s_min"] <= t["step_s"] <= t["step_s_max"]
    mem = t["xla_memory_bytes"]
    assert mem["arguments"] > 3 * 4 * t["params"]  # params, EMA and Adam's two moments, float32
    assert mem["aliased"] > 0  # the state is donated
    assert t["compile_s"] > 0 and t["process_peak_rss_bytes"] > mem["total"]


def test_data_and_sampling(result):
    (d,) = result["data"]
    assert d["examples_per_s"] > 0 and d["batches"] == 3 and d["num_workers"] == 0
    text, prior = result["sampling"]
    assert text["steps"] is None and "forward_s" not in text
    assert prior["steps"] == 2 and prior["sampler"] == "ddim"
    assert prior["seconds_per_image"] == pytest.approx(prior["seconds_per_call"] / 2)
    assert prior["per_step_s"] == pytest.approx(prior["seconds_per_call"] / 2)
    assert prior["loop_overhead_s"] == pytest.approx(prior["per_step_s"] - prior["forward_in_loop_s"])
    assert result["cascade_seconds_per_image"] == pytest.approx(text["seconds_per_image"]
                                                                + prior["seconds_per_image"])


def test_fastpaths(result):
    (scan,) = result["fastpaths"]["scan"]
    assert scan["unrolled"]["compile_s"] > 0 and scan["scan"]["compile_s"] > 0
    (att,) = result["fastpaths"]["attention"]
    assert set(att["seconds"]) >= {"einsum", "dot_product_attention(xla)"}


def test_attention_implementations_agree():
    """The einsum reference the benchmark times computes the same attention as jax.nn's and as the models'
    `layers.dot_product_attention` (XLA's implementation on CPU), causal and with a padding mask."""
    import jax
    import jax.numpy as jnp

    from dalle2_jax.models.layers import dot_product_attention

    q, k, v = (jax.random.normal(kk, (2, 8, 2, 16)) for kk in jax.random.split(jax.random.key(0), 3))
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / 4.0
    ref = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((8, 8), bool)), s, -1e30), -1), v)
    assert jnp.allclose(jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"), ref, atol=1e-5)
    assert jnp.allclose(dot_product_attention(q, k, v, is_causal=True), ref, atol=1e-5)
    keep = jnp.arange(8)[None, None, None, :] < jnp.array([5, 8])[:, None, None, None]  # [B, 1, 1, S]
    ref_mask = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(jnp.where(keep, s, -1e30), -1), v)
    assert jnp.allclose(dot_product_attention(q, k, v, mask=keep), ref_mask, atol=1e-5)


def test_markdown(result, tmp_path, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    (results / "benchmarks_test.json").write_text(json.dumps(result))
    monkeypatch.setattr(B, "RESULTS", str(results))
    text = B.write_markdown(str(tmp_path / "BENCHMARKS.md"))
    assert text == (tmp_path / "BENCHMARKS.md").read_text()
    (t,) = result["train"]
    row = next(ln for ln in text.splitlines() if ln.startswith("| prior | `configs/prior.py:tiny`"))
    assert f"{t['examples_per_s']:.1f}" in row and f"{t['mfu'] * 100:.1f}%" in row
    if "mfu_bf16_peak" in t:
        assert f"{t['mfu_bf16_peak'] * 100:.1f}% |" in row and "MFU (bf16 peak)" in text
        assert f"{result['peak']['bf16_flops_per_s'] / 1e9:.1f} GFLOP/s" in text
    assert f"{result['data'][0]['examples_per_s']:.0f}" in text
    assert f"{result['cascade_seconds_per_image']:.2f} s per image" in text
    assert result["machine"]["versions"]["jax"] in text


def test_cli_markdown_only(tmp_path, monkeypatch):
    """`--markdown_only` rewrites the page from the committed JSON without measuring anything."""
    monkeypatch.setattr(B, "REPO", str(tmp_path))
    monkeypatch.setattr(B, "RESULTS", os.path.join(os.path.dirname(B.__file__), "results"))
    B.main(["--markdown_only"])
    assert (tmp_path / "BENCHMARKS.md").read_text().startswith("# Benchmarks")
