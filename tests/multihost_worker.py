"""One process of a multi-process CPU training run, for tests/test_multihost.py.

    python tests/multihost_worker.py --data_dir D --workdir W --out OUT.json --total_steps 4 [6 ...]
        [--num_cpu_devices 2] [--coordinator 127.0.0.1:PORT --num_processes 2 --process_id I]

Trains tests/conftest.py's small CLIP config (mesh data=-1) through the real trainer once per value of
--total_steps, in order (a later value resumes the same workdir in this process), and writes
{'process_index', 'process_count', 'local_devices', 'devices', 'results': [train() output, ...]} to OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data_dir", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--total_steps", type=int, nargs="+", required=True)
    p.add_argument("--num_cpu_devices", type=int, default=2)
    p.add_argument("--coordinator", default=None)
    p.add_argument("--num_processes", type=int, default=None)
    p.add_argument("--process_id", type=int, default=None)
    args = p.parse_args()

    import jax
    from absl import flags

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.num_cpu_devices)  # before the backend starts
    flags.FLAGS.mark_as_parsed()  # grain reads absl flags

    from dalle2_jax.distributed import maybe_initialize

    maybe_initialize(args.coordinator, args.num_processes, args.process_id,
                     distributed=None if args.coordinator else False)

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from conftest import small_config
    from dalle2_jax.training.trainer import train

    results = []
    for total in args.total_steps:
        cfg = small_config(args.data_dir, total_steps=total, **{"mesh.data": -1, "mesh.fsdp": 1, "mesh.tensor": 1})
        results.append(train(cfg, args.workdir))
    with open(args.out, "w") as f:
        json.dump({"process_index": jax.process_index(), "process_count": jax.process_count(),
                   "local_devices": jax.local_device_count(), "devices": jax.device_count(),
                   "results": results}, f)


if __name__ == "__main__":
    main()
