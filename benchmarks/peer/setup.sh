#!/usr/bin/env bash
# Creates the peer environment for benchmarks/peer/compare.py: DALLE2-pytorch 1.15.6 on a CPU build of torch,
# in its own virtual environment (default benchmarks/peer/.venv, or the path given as $1). torch is never a
# dependency of the dalle2-jax package; this environment exists only for the comparison.
#
#   bash benchmarks/peer/setup.sh [VENV]
#
# torch is pinned to 2.13.0, which resolves to the CPU build on the project's machines (an unpinned torch pulls
# the CUDA build and its nvidia wheels, GBs); every later install runs under a constraints file holding that pin,
# so no dependency can swap it. Only pip's own registry access is used.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${1:-$HERE/.venv}"
PY="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"
DALLE2_PIN="dalle2-pytorch==1.15.6"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)

CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "$TORCH_PIN" > "$CONSTRAINTS"

"${PIP[@]}" install "$TORCH_PIN"
"${PIP[@]}" install -c "$CONSTRAINTS" "$DALLE2_PIN"

# Check: the torch build, and every workload of compare.py builds (its parameter counts are printed).
"$VENV/bin/python" -c 'import torch, sys; v = torch.__version__; print("torch", v)
if "+cpu" not in v: print("note: not a +cpu build of torch; compare.py runs it on CPU all the same", file=sys.stderr)'
"$VENV/bin/python" "$HERE/torch_side.py" --check
echo "peer environment ready: $VENV"
