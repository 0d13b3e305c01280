"""Analytic FLOP counts from a function's jaxpr: every matmul (dot_general) and convolution, with scan
bodies multiplied by their length and the recomputation of rematerialised blocks included.

`count_flops(fn, *args)` traces `fn` (nothing runs, arguments may be jax.ShapeDtypeStruct) and returns
2 x multiply-adds of all dot_general and conv_general_dilated equations. Of a train step traced with
remat "none" this is the model's FLOPs (forward + backward, the frozen models' forward); with the run's
remat policy it is the hardware FLOPs the compiled step executes. Elementwise work is not counted (it is a
few percent for these models), so MFU figures computed from it are conservative.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.extend import core as jcore


def _dot_flops(eqn) -> float:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    out = eqn.outvars[0].aval.shape
    contracted = float(np.prod([lhs[i] for i in lhs_contract], dtype=np.float64))
    return 2.0 * float(np.prod(out, dtype=np.float64)) * contracted


def _conv_flops(eqn) -> float:
    rhs = eqn.invars[1].aval.shape
    out = eqn.outvars[0].aval.shape
    out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    per_output = float(np.prod(rhs, dtype=np.float64)) / rhs[out_feature_dim]
    return 2.0 * float(np.prod(out, dtype=np.float64)) * per_output


def _sub_jaxprs(value: Any) -> list:
    if isinstance(value, jcore.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, jcore.Jaxpr):
        return [value]
    if isinstance(value, (tuple, list)):
        return [j for v in value for j in _sub_jaxprs(v)]
    return []


def jaxpr_flops(jaxpr: jcore.Jaxpr) -> tuple[float, int]:
    """(FLOPs, number of while loops whose body was counted once because the trip count is unknown)."""
    total, unknown_loops = 0.0, 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "cond":
            counts = [jaxpr_flops(b.jaxpr) for b in eqn.params["branches"]]
            total += max(c[0] for c in counts)
            unknown_loops += max(c[1] for c in counts)
        else:
            mult = float(eqn.params["length"]) if name == "scan" else 1.0
            if name == "while":
                unknown_loops += 1
            for key, value in eqn.params.items():
                if name == "while" and key == "cond_jaxpr":
                    continue
                for sub in _sub_jaxprs(value):
                    f, u = jaxpr_flops(sub)
                    total += mult * f
                    unknown_loops += u
    return total, unknown_loops


def count_flops(fn: Callable, *args: Any) -> float:
    """FLOPs of one call of `fn(*args)` (matmuls and convolutions; see the module docstring).
    Raises ValueError if `fn` has a while loop (a trip count the jaxpr does not state)."""
    flops, unknown = jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)
    if unknown:
        raise ValueError(f"{unknown} while loop(s) with unknown trip counts; count a function without them")
    return flops
