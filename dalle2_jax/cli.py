"""The `dalle2-jax` console script: `dalle2-jax <command> [flags]`, one subcommand per entry point.

`dalle2-jax train ...` is `python -m dalle2_jax.train ...`.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("dalle2_jax.train", "train a stage from a config"),
    "evaluate": ("dalle2_jax.evaluate", "evaluate a workdir's newest checkpoint"),
    "params": ("dalle2_jax.tools.params", "count a config's parameters (no memory)"),
    "embed": ("dalle2_jax.tools.embed", "precompute a frozen CLIP's embeddings of a data set"),
    "build-folder": ("dalle2_jax.tools.build_folder", "build a TFDS data set from a folder of captioned images"),
}


def usage() -> str:
    lines = ["usage: dalle2-jax <command> [flags]   (dalle2-jax <command> --help for its flags)", "", "commands:"]
    lines += [f"  {name:<14}{desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv if argv is None else argv
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    name = argv[1]
    if name not in COMMANDS:
        print(f"dalle2-jax: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(COMMANDS[name][0])
    module.run([f"dalle2-jax {name}"] + argv[2:])


if __name__ == "__main__":
    main()
