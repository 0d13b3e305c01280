"""Compile a stage's real train step for a TPU slice from any machine (no TPU needed), and say whether it fits.

`python launch/aot_compile.py --config configs/decoder.py:paper --topology v5p-128 [--mesh data,fsdp,tensor]`

libtpu's topology description (`jax.experimental.topologies`) gives the slice's devices; the step is the
trainer's own (`trainer.jit_train_step`: same loss, optimizer, EMA, shardings from the logical rules), lowered
with abstract arguments and compiled by XLA for that TPU. Printed per chip: memory (arguments, outputs,
temporaries, the total against the chip's HBM), FLOPs per step from the compiled cost analysis next to the
analytic count (training/flops.py), bytes moved by collectives, and a roofline step time and MFU estimate.
Exits 1 when the step does not fit in HBM. Needs `pip install libtpu` (the version your TPU VMs run).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass

from absl import flags
from ml_collections import config_flags

from dalle2_jax.cli_util import run_program


@dataclass(frozen=True)
class TpuChip:
    """Per-chip figures from Google Cloud's TPU documentation (bf16 peak, HBM, ICI per chip)."""

    generation: str
    libtpu_name: str  # the prefix of libtpu's topology names
    cores_per_chip: int  # slice names count TensorCores for v4/v5p and chips for v5e/v6e
    dims: int  # torus dimensions
    peak_flops: float  # bf16 FLOP/s
    hbm_bytes: float
    hbm_bandwidth: float  # bytes/s
    ici_bandwidth: float  # bytes/s, all links of one chip, one direction


GiB = 1024 ** 3
CHIPS = {
    "v4": TpuChip("v4", "v4", 2, 3, 275e12, 32 * GiB, 1228e9, 300e9),
    "v5p": TpuChip("v5p", "v5p", 2, 3, 459e12, 95 * GiB, 2765e9, 600e9),
    "v5e": TpuChip("v5e", "v5e", 1, 2, 197e12, 16 * GiB, 819e9, 200e9),
    "v6e": TpuChip("v6e", "v6e", 1, 2, 918e12, 32 * GiB, 1640e9, 448e9),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}


def chip_grid(num_chips: int, dims: int) -> tuple[int, ...]:
    """The slice shape Cloud TPU uses for `num_chips`: from 2x2(x1), double the smallest side, the last
    among equals (v5p-128 = 64 chips = 4x4x4, v5e-32 = 4x8, v6e-256 = 16x16)."""
    if num_chips < 4:
        if dims == 2 and num_chips == 1:
            return (1, 1)
        raise ValueError(f"{num_chips} chips: use a slice of at least 4 chips (or a libtpu name like v5e:1x1)")
    if num_chips & (num_chips - 1):
        raise ValueError(f"{num_chips} chips is not a power of two; pass libtpu's name, e.g. v5p:4x4x6")
    shape = [2, 2] + [1] * (dims - 2)
    while math.prod(shape) < num_chips:
        smallest = min(shape)
        i = max(j for j, s in enumerate(shape) if s == smallest)
        shape[i] *= 2
    return tuple(shape)


def parse_topology(name: str) -> tuple[TpuChip, str, int]:
    """'v5p-128' (Cloud slice name) or 'v5p:4x4x4' (libtpu name) -> (chip, libtpu topology name, chips)."""
    m = re.fullmatch(r"(v\w+?)-(\d+)", name)
    if m:
        gen = ALIASES.get(m.group(1), m.group(1))
        if gen not in CHIPS:
            raise ValueError(f"unknown TPU generation {m.group(1)!r}; known: {sorted(CHIPS)}")
        chip = CHIPS[gen]
        count = int(m.group(2))
        if count % chip.cores_per_chip:
            raise ValueError(f"{name}: {gen} slice names count {chip.cores_per_chip} cores per chip")
        chips = count // chip.cores_per_chip
        grid = chip_grid(chips, chip.dims)
        return chip, f"{chip.libtpu_name}:{'x'.join(map(str, grid))}", chips
    m = re.fullmatch(r"(v\w+?):(\d+(?:x\d+)+)", name)
    if m:
        gen = ALIASES.get(m.group(1), m.group(1))
        if gen not in CHIPS:
            raise ValueError(f"unknown TPU generation {m.group(1)!r}; known: {sorted(CHIPS)}")
        chips = 1
        for d in m.group(2).split("x"):
            chips *= int(d)
        return CHIPS[gen], f"{CHIPS[gen].libtpu_name}:{m.group(2)}", chips
    raise ValueError(f"topology {name!r}: use a slice name like v5p-128, v5e-256, v6e-64 or libtpu's v5p:4x4x4")


_COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]", text):
        if dtype in _DTYPE_BYTES:
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            total += n * _DTYPE_BYTES[dtype]
    return total


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*?)\)(.*)$")
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "conditional", "call",
               "after-all", "partition-id", "replica-id", "opt-barrier", "iota"}


def _parse_hlo(hlo_text: str) -> tuple[dict[str, list[tuple]], str | None]:
    """{computation: [(name, result type, op, operand names, attributes, raw operand text, is ROOT)]}, and the
    entry computation's name."""
    comps: dict[str, list[tuple]] = {}
    current, entry = None, None
    for line in hlo_text.splitlines():
        header = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if header and not line.startswith(" "):
            current = header.group(2)
            comps[current] = []
            if header.group(1):
                entry = current
        elif line.startswith("}"):
            current = None
        elif current is not None:
            m = _INSTR.match(line)
            if m:
                name, rtype, op, operands, attrs = m.groups()
                comps[current].append((name, rtype, op, re.findall(r"%([\w.\-]+)", operands), attrs, operands,
                                       line.lstrip().startswith("ROOT ")))
    return comps, entry


def hlo_traffic(hlo_text: str) -> dict:
    """Per-device traffic of one step from the compiled HLO: {'hbm_bytes': bytes read and written by the
    top-level instructions (a fusion reads its operands and writes its result in HBM; what happens inside it
    stays on chip), 'collectives': {kind: bytes produced}}, loop bodies times their trip counts.

    An in-place dynamic-update-slice (a scan stacking its outputs) counts the update, not the whole buffer,
    a fusion operand only sliced (one layer of stacked weights) counts the slice, and XLA's windowed-einsum
    loops (collective matmuls) count their HBM traffic once. An estimate: within a factor of about 2."""
    comps, entry = _parse_hlo(hlo_text)
    sizes = {c: {i[0]: _shape_bytes(i[1]) for i in instrs} for c, instrs in comps.items()}
    roots = {c: next((i for i in instrs if i[6]), instrs[-1]) for c, instrs in comps.items() if instrs}

    def fusion_bytes(callee: str, operand_bytes: list[int], result_bytes: int) -> float:
        instrs = comps.get(callee, [])
        param_index = {i[0]: int(i[5]) for i in instrs if i[2] == "parameter" and i[5].strip().isdigit()}
        uses: dict[str, list[tuple]] = {}
        for i in instrs:
            for o in i[3]:
                uses.setdefault(o, []).append(i)
        total = float(result_bytes)
        skip = set()
        root = roots.get(callee)
        if root is not None and root[2] == "dynamic-update-slice" and root[3] and root[3][0] in param_index:
            skip.add(param_index[root[3][0]])  # updated in place
            update = root[3][1] if len(root[3]) > 1 else None
            total = float(sizes[callee].get(update, 0))
        for pname, idx in param_index.items():
            if idx in skip or idx >= len(operand_bytes):
                continue
            users = uses.get(pname, [])
            if users and all(u[2] == "dynamic-slice" for u in users):
                total += sum(_shape_bytes(u[1]) for u in users)
            else:
                total += operand_bytes[idx]
        return total

    def trip_count(attrs: str) -> int:
        """XLA's known_trip_count, else N from a condition `counter < N` on a constant (jax's scans count
        from 0; TPU HLO text does not carry known_trip_count), else 1."""
        m = re.search(r'"known_trip_count":\{"n":"(\d+)"', attrs)
        if m:
            return int(m.group(1))
        cond = re.search(r"condition=%?([\w.\-]+)", attrs)
        instrs = comps.get(cond.group(1), []) if cond else []
        consts = {i[0]: int(i[5]) for i in instrs if i[2] == "constant" and re.fullmatch(r"-?\d+", i[5].strip())}
        root = next((i for i in instrs if i[6]), None)
        if root is not None and root[2] == "compare" and "direction=LT" in root[4]:
            bound = [consts[o] for o in root[3][1:] if o in consts]
            if bound and bound[0] > 0:
                return bound[0]
        return 1

    memo: dict[str, dict] = {}
    loops: list[dict] = []

    def walk(comp: str, depth: int = 0) -> dict:
        if comp in memo or depth > 50:
            return memo.get(comp, {"hbm_bytes": 0.0, "collectives": {}})
        hbm, coll = 0.0, {}
        table = sizes.get(comp, {})
        for name, rtype, op, operands, attrs, _, _ in comps.get(comp, []):
            base = op.replace("-start", "")
            if base in _COLLECTIVES and not op.endswith("-done"):
                coll[base] = coll.get(base, 0.0) + _shape_bytes(rtype)
            callees: list[tuple[str, int]] = []
            if op == "while":
                body = re.search(r"body=%?([\w.\-]+)", attrs)
                if body:
                    callees.append((body.group(1), trip_count(attrs)))
            elif op in ("call", "conditional") or op.endswith("-start"):
                callees += [(c, 1) for c in re.findall(r"(?:calls|to_apply|true_computation|false_computation)"
                                                       r"=%?([\w.\-]+)", attrs)]
                for group in re.findall(r"branch_computations=\{([^}]*)\}", attrs):
                    callees += [(c, 1) for c in re.findall(r"%?([\w.\-]+)", group)]
            for callee, trips in callees:
                sub = walk(callee, depth + 1)
                if op == "while":
                    loops.append({"body": callee, "trips": trips, "hbm_bytes_per_trip": sub["hbm_bytes"],
                                  "collective_bytes_per_trip": sum(sub["collectives"].values())})
                # XLA's collective matmuls (windowed einsum) loop over chunks of operands that the body names
                # whole: their HBM traffic is one pass, their collectives move one chunk per trip
                windowed = "windowed_dot_general" in callee
                hbm += (1 if windowed else trips) * sub["hbm_bytes"]
                for k, v in sub["collectives"].items():
                    coll[k] = coll.get(k, 0.0) + trips * v
            if op in _NO_TRAFFIC or op.endswith("-done"):
                continue
            result = _shape_bytes(rtype)
            operand_bytes = [table.get(o, 0) for o in operands]
            if op == "fusion":
                callee = re.search(r"calls=%?([\w.\-]+)", attrs)
                hbm += fusion_bytes(callee.group(1), operand_bytes, result) if callee else result + sum(operand_bytes)
            elif op == "dynamic-update-slice":
                hbm += 2.0 * (operand_bytes[1] if len(operand_bytes) > 1 else result)
            elif op == "dynamic-slice":
                hbm += 2.0 * result
            else:
                hbm += result + sum(operand_bytes)
        memo[comp] = {"hbm_bytes": hbm, "collectives": coll}
        return memo[comp]

    out = dict(walk(entry)) if entry else {"hbm_bytes": 0.0, "collectives": {}}
    out["loops"] = loops  # every while loop met: its body, trip count and per-trip traffic
    return out


def collective_bytes(hlo_text: str) -> dict[str, float]:
    """Bytes each device's collectives produce per step, by kind, from the compiled (per-device) HLO; a
    collective inside a while loop (a scan over layers) counts once per iteration (XLA's known_trip_count)."""
    return hlo_traffic(hlo_text)["collectives"]


def define_flags(fv: flags.FlagValues) -> None:
    config_flags.DEFINE_config_file("config", None, "Stage config, e.g. configs/decoder.py:paper.", flag_values=fv)
    config_flags.DEFINE_config_file("clip_config", "configs/clip.py:paper",
                                    "The frozen CLIP of the prior/decoder (its config.model is used).", flag_values=fv)
    flags.DEFINE_string("topology", None, "A TPU slice (v5p-128, v5e-256, v6e-64, v4-32) or libtpu name "
                        "(v5p:4x4x4).", flag_values=fv)
    flags.DEFINE_string("mesh", "", "data,fsdp,tensor sizes (one may be -1); default: config.mesh.", flag_values=fv)
    flags.DEFINE_integer("batch_size", 0, "Global batch (default: config.batch_size).", flag_values=fv)
    flags.DEFINE_string("json_out", "", "Also write the report as JSON here.", flag_values=fv)
    flags.DEFINE_string("hlo_out", "", "Also write the compiled per-device HLO text here (gzipped).", flag_values=fv)


def aot_report(config, topology: str, clip_model_cfg=None, mesh: str = "", batch_size: int = 0,
               hlo_out: str = "") -> dict:
    """Compiles the train step of `config` for `topology` and returns the report (see the module docstring);
    with `hlo_out`, the compiled per-device HLO text is written there, gzipped."""
    import jax
    import numpy as np
    from jax.experimental import topologies

    from dalle2_jax.stages import get_stage_class
    from dalle2_jax.training.config import mesh_shape
    from dalle2_jax.training.flops import count_flops
    from dalle2_jax.training.partitioning import make_mesh, replicated
    from dalle2_jax.training.state import make_optimizer
    from dalle2_jax.training.trainer import abstract_train_state, jit_train_step, sharded_abstract

    chip, libtpu_name, chips = parse_topology(topology)
    devices = topologies.get_topology_desc(platform="tpu", topology_name=libtpu_name).devices
    config = config.copy_and_resolve_references() if hasattr(config, "copy_and_resolve_references") else config
    if mesh:
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = (int(x) for x in mesh.split(","))
    if batch_size:
        config.batch_size = batch_size
    shape = mesh_shape(config, len(devices))
    global_batch = int(config.batch_size)
    accum = int(config.optimizer.get("grad_accum_steps", 1))
    if global_batch % (shape[0] * shape[1] * accum):
        raise ValueError(f"global batch {global_batch} does not split over data*fsdp = {shape[0] * shape[1]} devices "
                         f"x {accum} microbatches")
    mesh_obj = make_mesh(config, list(devices))
    devices_per_chip = len(devices) // chips

    def build(remat: str | None):
        cfg = config.copy_and_resolve_references()
        if remat is not None:
            with cfg.unlocked():
                cfg.model.remat = remat
        stage = get_stage_class(cfg.stage)(cfg, workdir="")
        batch, frozen_boxed = stage.abstract_train_inputs(global_batch, clip_model_cfg)
        tx = make_optimizer(cfg)
        key0 = jax.random.key(0)  # concrete, on the host's CPU: outside the TPU mesh context
        _, state_sh, state = abstract_train_state(stage, tx, cfg, mesh_obj, key0)
        frozen_sh, frozen = sharded_abstract(frozen_boxed, mesh_obj) if frozen_boxed is not None else (None, None)
        key = jax.ShapeDtypeStruct((), key0.dtype, sharding=replicated(mesh_obj))
        step = jit_train_step(stage, tx, cfg, mesh_obj, state_sh, {k: v.ndim for k, v in batch.items()}, frozen_sh)
        return stage, step, (state, batch, frozen, key)

    stage, step, args = build(None)
    num_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(args[0].params)))
    t0 = time.time()
    with jax.set_mesh(mesh_obj):
        compiled = step.lower(*args).compile()
    compile_s = time.time() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    t0 = time.time()
    _, step_none, args_none = build("none")
    with jax.set_mesh(mesh_obj):
        hw_flops = count_flops(step, *args)  # the run's remat policy: what the chips execute
        model_flops = count_flops(step_none, *args_none)  # forward + backward, no recomputation
    flops_s = time.time() - t0
    hlo = compiled.as_text()
    traffic = hlo_traffic(hlo)
    comm = traffic["collectives"]
    if hlo_out:
        import gzip

        with gzip.open(hlo_out, "wt") as f:
            f.write(hlo)

    per_device_hbm = chip.hbm_bytes / devices_per_chip
    arg_b, out_b = mem.argument_size_in_bytes, mem.output_size_in_bytes
    alias_b, temp_b = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    total_b = arg_b + out_b - alias_b + temp_b + mem.generated_code_size_in_bytes
    hw_per_device = hw_flops / len(devices)
    xla_flops = float(cost.get("flops", 0.0))
    xla_bytes = float(cost.get("bytes accessed", 0.0))
    rl = roofline(chip, devices_per_chip, chips, hw_per_device, traffic["hbm_bytes"], sum(comm.values()), model_flops)
    return {
        "config": config.stage, "topology": topology, "libtpu_topology": libtpu_name, "chips": chips,
        "devices": len(devices), "mesh": dict(zip(("data", "fsdp", "tensor"), shape)), "global_batch": global_batch,
        "grad_accum_steps": accum, "params": num_params, "remat": str(config.model.get("remat", "none")),
        "dtype": str(config.model.get("dtype", "float32")),
        "moments_dtype": str(config.optimizer.get("moments_dtype", "float32")),
        "compile_s": round(compile_s, 1), "flop_count_s": round(flops_s, 1),
        "memory_per_device_gib": {"arguments": arg_b / GiB, "outputs": out_b / GiB, "aliased": alias_b / GiB,
                                  "temporaries": temp_b / GiB, "total": total_b / GiB,
                                  "hbm": per_device_hbm / GiB},
        "fits": bool(total_b <= per_device_hbm),
        "flops_per_step": {"model_analytic": model_flops, "hardware_analytic": hw_flops,
                           "xla_cost_analysis_per_device": xla_flops,
                           "hardware_analytic_per_device": hw_flops / len(devices)},
        "collective_bytes_per_device": comm,
        "hbm_bytes_per_device": traffic["hbm_bytes"], "xla_bytes_accessed_per_device": xla_bytes,
        "roofline": rl,
    }


def roofline(chip: TpuChip, devices_per_chip: int, chips: int, hw_flops_per_device: float, hbm_bytes: float,
             collective_bytes_per_device: float, model_flops: float) -> dict:
    """Step-time bounds of one device: compute (executed FLOPs at the bf16 peak), HBM (hlo_traffic's estimate
    at the HBM bandwidth) and ICI (the collectives' bytes at the chip's ICI bandwidth), assuming they overlap
    perfectly. `mfu_upper` = model FLOPs / (chips x peak x max(compute, ICI)); `mfu` also counts the HBM
    estimate, which over-counts scanned layers (up to about 2x on CPU checks), so the truth lies between."""
    t_compute = hw_flops_per_device / (chip.peak_flops / devices_per_chip)
    t_hbm = hbm_bytes / (chip.hbm_bandwidth / devices_per_chip)
    t_ici = collective_bytes_per_device / (chip.ici_bandwidth / devices_per_chip)
    t_step = max(t_compute, t_hbm, t_ici)
    t_upper = max(t_compute, t_ici)
    peak_total = chips * chip.peak_flops
    return {"compute_s": t_compute, "hbm_s": t_hbm, "ici_s": t_ici, "step_s": t_step,
            "mfu": model_flops / (peak_total * t_step) if t_step > 0 else 0.0,
            "mfu_upper": model_flops / (peak_total * t_upper) if t_upper > 0 else 0.0,
            "peak_flops_per_chip": chip.peak_flops, "hbm_bytes_per_s_per_chip": chip.hbm_bandwidth,
            "ici_bytes_per_s_per_chip": chip.ici_bandwidth}


def format_report(r: dict) -> str:
    m, f, rl = r["memory_per_device_gib"], r["flops_per_step"], r["roofline"]
    lines = [
        f"{r['config']} on {r['topology']} ({r['libtpu_topology']}, {r['chips']} chips, {r['devices']} devices), "
        f"mesh {r['mesh']}, global batch {r['global_batch']} (x{r['grad_accum_steps']} microbatches), "
        f"{r['params'] / 1e9:.3f}B params, remat {r['remat']}, compute {r['dtype']}, moments {r['moments_dtype']}; "
        f"compiled in {r['compile_s']} s",
        f"memory per device: arguments {m['arguments']:.2f} GiB, outputs {m['outputs']:.2f} (aliased "
        f"{m['aliased']:.2f}), temporaries {m['temporaries']:.2f}, total {m['total']:.2f} of {m['hbm']:.1f} GiB HBM"
        f" -> {'fits' if r['fits'] else 'DOES NOT FIT'}",
        f"FLOPs per step: model (analytic) {f['model_analytic']:.3e}, executed with remat {f['hardware_analytic']:.3e}"
        f" ({f['hardware_analytic_per_device']:.3e} per device; XLA cost analysis "
        f"{f['xla_cost_analysis_per_device']:.3e} per device: loop bodies (layer scans, windowed einsums) "
        "counted once)",
        "collectives per device per step: " + ", ".join(f"{k} {v / GiB:.2f} GiB"
                                                        for k, v in sorted(r["collective_bytes_per_device"].items())),
        f"roofline: compute {rl['compute_s'] * 1e3:.1f} ms, HBM {rl['hbm_s'] * 1e3:.1f} ms "
        f"({r['hbm_bytes_per_device'] / GiB:.1f} GiB; XLA's bytes accessed "
        f"{r['xla_bytes_accessed_per_device'] / GiB:.1f} GiB), ICI {rl['ici_s'] * 1e3:.1f} ms -> step "
        f"{rl['step_s'] * 1e3:.1f} ms, MFU {rl['mfu'] * 100:.1f}% with the HBM estimate, at most "
        f"{rl['mfu_upper'] * 100:.1f}% (compute and ICI alone; all three overlapping perfectly)",
    ]
    return "\n".join(lines)


def main(fv: flags.FlagValues) -> None:
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")  # silences libtpu's host probing on a CPU machine
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no TPU is opened: compiles may run side by side
    try:
        import libtpu  # noqa: F401
    except ImportError:
        print("launch/aot_compile.py needs libtpu: pip install libtpu (the version your TPU VMs run)", file=sys.stderr)
        sys.exit(2)
    clip_model = fv.clip_config.model if fv.config.stage in ("prior", "decoder") else None
    report = aot_report(fv.config, fv.topology, clip_model, fv.mesh, fv.batch_size, fv.hlo_out)
    print(format_report(report))
    print(json.dumps(report))
    if fv.json_out:
        with open(fv.json_out, "w") as f:
            json.dump(report, f, indent=2)
    if not report["fits"]:
        sys.exit(1)


def run(argv: list[str] | None = None) -> None:
    run_program(__doc__, define_flags, main, argv, required=("config", "topology"))


if __name__ == "__main__":
    run()
