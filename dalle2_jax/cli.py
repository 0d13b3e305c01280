"""The `dalle2-jax` console script: `dalle2-jax <command> [flags]`, one subcommand per entry point.

`dalle2-jax train ...` is `python -m dalle2_jax.train ...`; the image methods (generate, variations,
interpolate, edit, inpaint) are `python -m dalle2_jax.generate <method> ...`.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("dalle2_jax.train", "train a stage from a config"),
    "evaluate": ("dalle2_jax.evaluate", "evaluate a workdir's newest checkpoint"),
    "params": ("dalle2_jax.tools.params", "count a config's parameters (no memory)"),
    "embed": ("dalle2_jax.tools.embed", "precompute a frozen CLIP's embeddings of a data set"),
    "import-clip": ("dalle2_jax.tools.import_clip", "import released CLIP weights (OpenCLIP/OpenAI/HF) as a workdir"),
    "import-karlo": ("dalle2_jax.tools.import_karlo", "import karlo's released unCLIP (diffusers folder) as a bundle"),
    "clip-score": ("dalle2_jax.tools.clip_score", "cosines between images and texts under a CLIP workdir"),
    "build-folder": ("dalle2_jax.tools.build_folder", "build a TFDS data set from a folder of captioned images"),
    "export": ("dalle2_jax.export", "turn trained workdirs into one inference bundle"),
    "generate": ("dalle2_jax.generate:run_generate", "text -> images with a bundle"),
    "variations": ("dalle2_jax.generate:run_variations", "variations of an image (DDIM from its inversion)"),
    "interpolate": ("dalle2_jax.generate:run_interpolate", "interpolate between two images' CLIP embeddings"),
    "edit": ("dalle2_jax.generate:run_edit", "text diff: move an image from one caption toward another"),
    "inpaint": ("dalle2_jax.generate:run_inpaint", "regenerate a masked region from a prompt"),
    "shapes-report": ("dalle2_jax.tools.shapes_report", "quality report of a cascade trained on captioned_shapes"),
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
    module_name, _, func = COMMANDS[name][0].partition(":")
    getattr(importlib.import_module(module_name), func or "run")([f"dalle2-jax {name}"] + argv[2:])


if __name__ == "__main__":
    main()
