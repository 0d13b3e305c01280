"""AOT compilation for TPU slices: slice names, the analytic FLOP count, collective bytes, and (with libtpu
installed, `-m slow`) the real compile of a train step for a v5p slice."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import pytest

from dalle2_jax.tools.aot_compile import CHIPS, chip_grid, collective_bytes, hlo_traffic, parse_topology
from dalle2_jax.training.flops import count_flops


@pytest.mark.parametrize("name,libtpu,chips", [
    ("v5p-8", "v5p:2x2x1", 4), ("v5p-16", "v5p:2x2x2", 8), ("v5p-128", "v5p:4x4x4", 64),
    ("v5p-256", "v5p:4x4x8", 128), ("v5p-1024", "v5p:8x8x8", 512), ("v5e-256", "v5e:16x16", 256),
    ("v5litepod-32", "v5e:4x8", 32), ("v6e-64", "v6e:8x8", 64), ("v4-32", "v4:2x2x4", 16),
    ("v5p:4x4x6", "v5p:4x4x6", 96), ("v5e-1", "v5e:1x1", 1),
])
def test_slice_names_map_to_libtpu_topologies(name, libtpu, chips):
    chip, got, n = parse_topology(name)
    assert (got, n) == (libtpu, chips)
    assert chip is CHIPS[libtpu.split(":")[0]]


@pytest.mark.parametrize("bad", ["v5p-12", "v9-8", "tpu", "v5p-2"])
def test_bad_slice_names_say_what_is_accepted(bad):
    with pytest.raises(ValueError, match="v5p|power of two|at least|generation|cores"):
        parse_topology(bad)


def test_chip_grid_doubles_the_smallest_side():
    assert chip_grid(512, 3) == (8, 8, 8)
    assert chip_grid(1024, 3) == (8, 8, 16)
    assert chip_grid(2048, 3) == (8, 16, 16)  # Cloud's v5p-4096
    assert chip_grid(128, 2) == (8, 16)


@pytest.mark.slow  # 11-13 s of XLA:CPU compiles; the default suite keeps the parsers' unit tests
def test_flop_count_matches_the_formula_for_a_transformer_and_a_conv():
    """Forward = 2 x multiply-adds of every matmul (scans multiplied out); grad = 3x forward; full remat adds
    the recomputed forward; a convolution counts kernel x in-channels per output."""
    from flax import linen as nn

    from dalle2_jax.models.transformer import Transformer

    b, t, d, depth = 2, 8, 32, 2
    x = jnp.zeros((b, t, d))
    expected = depth * (2 * b * t * 12 * d * d + 2 * 2 * b * t * t * d)  # qkv+out+4x MLP, and QK^T, AV
    flops = {}
    for remat in ("none", "full"):
        m = Transformer(depth=depth, num_heads=4, remat=remat, scan_layers=True)
        p = m.init(jax.random.key(0), x)
        flops[remat] = (count_flops(lambda p: m.apply(p, x), p),
                        count_flops(jax.grad(lambda p: jnp.sum(m.apply(p, x))), p))
    assert flops["none"][0] == expected
    assert flops["none"][1] == 3 * expected
    assert 3 * expected < flops["full"][1] <= 4 * expected
    conv = nn.Conv(8, (3, 3))
    xi = jnp.zeros((2, 16, 16, 4))
    assert count_flops(lambda p: conv.apply(p, xi), conv.init(jax.random.key(0), xi)) == 2 * 2 * 16 * 16 * 8 * 9 * 4


def test_flop_count_refuses_loops_of_unknown_length():
    def loop(x):
        return jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] @ c[0], c[1] + 1), (x, 0))[0]

    with pytest.raises(ValueError, match="while loop"):
        count_flops(loop, jnp.zeros((4, 4)))


_HLO = """HloModule step

%body.1 (p: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {
  %p = (s32[], f32[8,128]) parameter(0)
  %ag = bf16[64,128]{1,0} all-gather(bf16[8,128]{1,0} %x), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}
  ROOT %t = (s32[], f32[8,128]) tuple(%i, %y)
}

%cond.1 (p: (s32[], f32[8,128])) -> pred[] {
  %b = s32[] constant(24)
  %a = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%a, %b), direction=LT
}

%cond.2 (p: (s32[], f32[8,128])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %s = f32[] add(%a, %b)
}

ENTRY %main (x: f32[8,128]) -> f32[8,128] {
  %w = (s32[], f32[8,128]) while(%init), condition=%cond.1, body=%body.1
  %w2 = (s32[], f32[8,128]) while(%init), condition=%cond.2, body=%body.1, backend_config={"known_trip_count":{"n":"3"}}
  %ar = f32[1000]{0} all-reduce(f32[1000]{0} %g), channel_id=2, replica_groups=[1,8]<=[8], to_apply=%add
  %rs-start = ((f32[80]{0}), f32[10]{0}) reduce-scatter-start(f32[80]{0} %h), dimensions={0}
  %rs-done = f32[10]{0} reduce-scatter-done(%rs-start)
  ROOT %r = f32[8,128] get-tuple-element(%w), index=1
}
"""


def test_collective_bytes_multiply_loop_bodies_by_their_trip_count():
    """Trip counts from XLA's known_trip_count, or (TPU HLO has none) from the loop condition `i < 24`."""
    got = collective_bytes(_HLO)
    assert got["all-gather"] == (24 + 3) * 64 * 128 * 2
    assert got["all-reduce"] == 1000 * 4
    assert got["reduce-scatter"] == (80 + 10) * 4  # the async start's result tuple, counted once


@pytest.mark.slow  # 11-13 s of XLA:CPU compiles; the default suite keeps the parsers' unit tests
def test_hlo_traffic_equals_xla_on_a_loop_free_step_and_counts_scanned_layers():
    """The HBM estimate of a compiled grad step: exactly XLA's bytes accessed without loops; with the layers
    scanned (XLA counts the body once) it stays near the unrolled figure instead of dropping by the depth."""
    from dalle2_jax.models.transformer import Transformer

    x = jnp.zeros((2, 8, 32))
    got = {}
    for scan in (False, True):
        m = Transformer(depth=3, num_heads=2, scan_layers=scan)
        p = m.init(jax.random.key(0), x)
        compiled = jax.jit(jax.grad(lambda p: jnp.sum(m.apply(p, x) ** 2))).lower(p).compile()
        got[scan] = (hlo_traffic(compiled.as_text())["hbm_bytes"], compiled.cost_analysis()["bytes accessed"])
    assert abs(got[False][0] - got[False][1]) < 1e-3 * got[False][1]  # a few scalars apart
    assert 0.9 * got[False][0] < got[True][0] < 2.5 * got[False][0]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs `pip install libtpu`")
def test_aot_compile_of_a_small_prior_for_a_v5p_slice():
    """The real train step (a frozen ViT-B-32 CLIP in the step, FSDP over 4 chips) compiles for v5p-8 from
    this CPU machine; memory within the chip, analytic FLOPs near XLA's count, FSDP all-gathers present."""
    import os

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    from configs.clip import get_config as clip_config
    from configs.prior import get_config
    from dalle2_jax.tools.aot_compile import aot_report

    clip = clip_config("ViT-B-32").model
    cfg = get_config("clip512")
    cfg.model.width, cfg.model.depth, cfg.model.heads = 256, 2, 4
    cfg.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    r = aot_report(cfg, "v5p-8", clip, batch_size=64)
    assert r["devices"] == 4 and r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and r["fits"]
    assert 0 < r["memory_per_device_gib"]["total"] < 95
    f = r["flops_per_step"]
    assert f["hardware_analytic"] >= f["model_analytic"] > 0
    assert f["xla_cost_analysis_per_device"] > 0 and r["hbm_bytes_per_device"] > 0
    assert r["collective_bytes_per_device"].get("all-gather", 0) > 0  # FSDP gathers the params
    assert 0 < r["roofline"]["mfu"] <= 1
