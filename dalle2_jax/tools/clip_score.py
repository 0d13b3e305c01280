"""CLIP score: cosine similarities between images and texts under a CLIP workdir (trained or imported).

`python -m dalle2_jax.tools.clip_score --workdir W --image A.png [--image B.png] --text "..." [--text "..."]
[--json]`

Images get the CLIP's preprocessing (shortest side to its input size, bicubic, center crop); texts its
tokenizer. Prints the matrix of cosines (rows: images, columns: texts); a generated image's CLIP score
is its cosine with its prompt (often reported x 100). With --json the last line is one JSON object with
`image_embeds` and `text_embeds` (unit-normalised, as lists), `cosine` [images][texts], `images`,
`texts`, `logit_scale` and the CLIP's `step`.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

import numpy as np
from absl import flags

from dalle2_jax.cli_util import exit_on_errors, run_program
from dalle2_jax.inference.errors import InputError


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "A CLIP workdir (trained, or written by tools.import_clip).", flag_values=fv)
    flags.DEFINE_multi_string("image", [], "An image file (repeat for more).", flag_values=fv)
    flags.DEFINE_multi_string("text", [], "A text (repeat for more).", flag_values=fv)
    flags.DEFINE_bool("json", False, "Also print one JSON object (embeddings, cosines) as the last line.",
                      flag_values=fv)
    flags.DEFINE_integer("batch_size", 16, "Images or texts per CLIP forward pass.", flag_values=fv)


def clip_score(workdir: str, images: Sequence, texts: Sequence[str], batch_size: int = 16) -> dict:
    """Unit image embeddings [N, E], unit text embeddings [M, E] and their cosines [N, M] under the CLIP of
    `workdir`. `images` are paths, PIL images or uint8 arrays."""
    import jax
    import jax.numpy as jnp

    from dalle2_jax.images import load_image, resize_shortest_center_crop
    from dalle2_jax.models.clip import build_clip
    from dalle2_jax.text import load_tokenizer
    from dalle2_jax.training.checkpoint import load_params

    if not images and not texts:
        raise InputError("give at least one --image or --text")
    cfg, params, info = load_params(workdir)
    if cfg.get("stage") != "clip":
        raise InputError(f"{workdir!r} is a {cfg.get('stage')!r} workdir, not a CLIP one")
    tok = load_tokenizer(os.path.join(workdir, "tokenizer"))
    model = build_clip(cfg.model, tok.eot_id)
    size = int(cfg.model.vision.image_size)
    embed_image = jax.jit(lambda p, x: model.apply(p, x.astype(jnp.float32) / 255.0, method=model.encode_image))
    embed_text = jax.jit(lambda p, t: model.apply(p, t, method=model.encode_text))

    def batched(fn, arr: np.ndarray, dim: int) -> np.ndarray:
        out = []
        for start in range(0, len(arr), batch_size):
            chunk = arr[start: start + batch_size]
            n = len(chunk)
            if n < batch_size and len(arr) > batch_size:  # one compiled shape for long lists
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, 0)])
            out.append(np.asarray(fn(params, chunk))[:n])
        return np.concatenate(out) if out else np.zeros((0, dim), np.float32)

    dim = int(cfg.model.embed_dim)
    pixels = np.stack([resize_shortest_center_crop(load_image(im, f"image {i}"), size)
                       for i, im in enumerate(images)]) if images else np.zeros((0, size, size, 3), np.uint8)
    img = batched(embed_image, pixels, dim)
    txt = batched(embed_text, tok.encode_batch(list(texts)), dim) if texts else np.zeros((0, dim), np.float32)
    truncated = [t for t in texts if tok.is_truncated(t)]
    scale = float(model.apply(params, method=model.temperature_scale))
    return {"image_embeds": img, "text_embeds": txt, "cosine": img @ txt.T, "logit_scale": scale,
            "step": info["step"], "truncated_texts": truncated}


def format_table(cosine: np.ndarray, images: Sequence[str], texts: Sequence[str]) -> str:
    """The cosine matrix as aligned text: one row per image, one column per text."""
    heads = [t if len(t) <= 28 else t[:25] + "..." for t in texts]
    names = [os.path.basename(str(i)) for i in images]
    w = max([5] + [len(n) for n in names])
    cols = [max(7, len(h)) for h in heads]
    lines = [" " * w + "  " + "  ".join(h.rjust(c) for h, c in zip(heads, cols))]
    for n, row in zip(names, cosine):
        lines.append(n.ljust(w) + "  " + "  ".join(f"{v:.4f}".rjust(c) for v, c in zip(row, cols)))
    return "\n".join(lines)


def main(fv: flags.FlagValues) -> None:
    with exit_on_errors():
        out = clip_score(fv.workdir, fv.image, fv.text, fv.batch_size)
    for t in out["truncated_texts"]:
        print(f"warning: text longer than the CLIP's context, truncated: {t[:60]!r}", file=sys.stderr)
    if fv.image and fv.text:
        print(format_table(out["cosine"], fv.image, fv.text))
    if fv.json:
        print(json.dumps({"images": list(fv.image), "texts": list(fv.text),
                          "image_embeds": out["image_embeds"].tolist(), "text_embeds": out["text_embeds"].tolist(),
                          "cosine": out["cosine"].tolist(), "logit_scale": out["logit_scale"], "step": out["step"]}))


def run(argv: list[str] | None = None) -> None:
    run_program(__doc__, define_flags, main, argv, required=("workdir",))


if __name__ == "__main__":
    run()
