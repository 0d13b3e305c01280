"""Compile a stage's train step for a TPU slice from a CPU machine and report memory, FLOPs and MFU.

    pip install libtpu==<your TPU VMs' version>
    python launch/aot_compile.py --config configs/decoder.py:paper --topology v5p-128 [--mesh 1,64,1]

See dalle2_jax/tools/aot_compile.py and SCALING.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from dalle2_jax.tools.aot_compile import run  # noqa: E402

if __name__ == "__main__":
    run()
