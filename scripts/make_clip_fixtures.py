"""Builds the CLIP reference fixtures (tests/fixtures/clip_reference/) from open_clip and transformers.

Run once, in its own environment (open_clip needs the default CUDA build of torch, even on CPU; see
../shared/IMPORT_NOTES.md):

    python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install torch open_clip_torch transformers safetensors
    /tmp/refenv/bin/python scripts/make_clip_fixtures.py [--out tests/fixtures/clip_reference]

For every case in tests/clip_reference.py it builds the model (open_clip's architecture at its full or a
reduced depth, or a small Hugging Face CLIPModel), loads weights drawn from the case's seed, and stores its
state-dict layout (names and shapes), a digest of the weights, and its outputs on fixed inputs: raw and
unit image/text embeddings and the logits. It also stores open_clip's token ids for a few hundred strings
and open_clip's preprocessing of images of awkward sizes. Nothing else (no weights) is written.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import clip_reference as R  # noqa: E402


def _open_clip_model(case: R.Case):
    import open_clip

    quick = case.arch.endswith("-quickgelu")
    cfg = copy.deepcopy(open_clip.get_model_config(case.arch))
    cfg.pop("quick_gelu", None)
    if case.text_depth:
        cfg["text_cfg"]["layers"] = case.text_depth
    if case.vision_depth:
        cfg["vision_cfg"]["layers"] = case.vision_depth
    return open_clip.CLIP(**cfg, quick_gelu=quick).eval(), cfg["vision_cfg"]["image_size"]


def reference_outputs(case: R.Case) -> dict:
    """Builds the case's torch model with the drawn weights and returns its layout, digest and outputs."""
    import open_clip
    import torch

    torch.manual_seed(0)
    if case.layout == "open_clip":
        model, size = _open_clip_model(case)
    else:
        from transformers import CLIPConfig, CLIPModel

        model = CLIPModel(CLIPConfig(**R.hf_model_config())).eval()
        size = R.hf_model_config()["vision_config"]["image_size"]
    sd = model.state_dict()
    spec = {k: list(v.shape) for k, v in sd.items()}
    weights = R.draw_state_dict(spec, case.seed)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)

    images = R.draw_images(case.seed, size)
    pixels = torch.from_numpy(((images - R.CLIP_MEAN) / R.CLIP_STD).transpose(0, 3, 1, 2).copy())
    ids = open_clip.get_tokenizer("ViT-B-32")(R.CAPTIONS)
    with torch.no_grad():
        if case.layout == "open_clip":
            img = model.encode_image(pixels)
            txt = model.encode_text(ids)
            scale = model.logit_scale.exp()
        else:
            img = model.get_image_features(pixel_values=pixels)
            txt = model.get_text_features(input_ids=ids)
            img = getattr(img, "pooler_output", img)
            txt = getattr(txt, "pooler_output", txt)
            scale = model.logit_scale.exp()
            hf = model(input_ids=ids, pixel_values=pixels)
        img_u = img / img.norm(dim=-1, keepdim=True)
        txt_u = txt / txt.norm(dim=-1, keepdim=True)
        logits = scale * img_u @ txt_u.T
        if case.layout == "hf":  # the model's own normalised outputs agree with the ones computed here
            assert torch.allclose(hf.logits_per_image, logits, atol=1e-5)
            assert torch.allclose(hf.image_embeds, img_u, atol=1e-6)
            assert torch.allclose(hf.text_embeds, txt_u, atol=1e-6)
    return {"spec": spec, "digest": R.weights_digest(weights), "image_size": size,
            "tokens": ids.numpy().astype(np.int32), "image_embeds": img.numpy(), "text_embeds": txt.numpy(),
            "image_embeds_unit": img_u.numpy(), "text_embeds_unit": txt_u.numpy(),
            "logits_per_image": logits.numpy()}


def reference_tokens(strings: list[str]) -> np.ndarray:
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32")(strings).numpy().astype(np.int32)


def reference_preprocess(images: list[np.ndarray], size: int = 224) -> tuple[np.ndarray, float]:
    """open_clip's eval transform of each image, mapped back to uint8 (exact: the transform resamples a
    uint8 PIL image), and the largest round-trip error (float)."""
    import open_clip
    from PIL import Image

    transform = open_clip.image_transform(size, is_train=False)
    out, worst = [], 0.0
    for img in images:
        x = transform(Image.fromarray(img)).numpy().transpose(1, 2, 0)
        u = x * R.CLIP_STD + R.CLIP_MEAN
        q = np.round(u * 255.0)
        worst = max(worst, float(np.abs(u * 255.0 - q).max()))
        out.append(q.astype(np.uint8))
    return np.stack(out), worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=R.FIXTURE_DIR)
    ap.add_argument("--cases", nargs="*", default=None, help="case names (default: all)")
    args = ap.parse_args()
    import open_clip
    import torch
    import transformers

    os.makedirs(args.out, exist_ok=True)
    cases = [R.CASES_BY_NAME[n] for n in args.cases] if args.cases else R.CASES
    index = {"versions": {"open_clip": open_clip.__version__, "torch": torch.__version__,
                          "transformers": transformers.__version__, "numpy": np.__version__},
             "cases": {}}
    arrays = {}
    for case in cases:
        ref = reference_outputs(case)
        index["cases"][case.name] = {"spec": ref["spec"], "digest": ref["digest"], "image_size": ref["image_size"],
                                     "num_tensors": len(ref["spec"]),
                                     "num_params": int(sum(int(np.prod(s)) for s in ref["spec"].values()))}
        for k in ("tokens", "image_embeds", "text_embeds", "image_embeds_unit", "text_embeds_unit",
                  "logits_per_image"):
            arrays[f"{case.name}/{k}"] = ref[k]
        print(f"{case.name}: {len(ref['spec'])} tensors, logits {np.round(ref['logits_per_image'], 3).tolist()}")
    strings = R.token_strings()
    arrays["tokens/ids"] = reference_tokens(strings)
    index["token_strings"] = strings
    pre, worst = reference_preprocess(R.preprocess_inputs())
    assert worst < 1e-3, worst
    arrays["preprocess/224"] = pre
    index["preprocess_roundtrip_error"] = worst
    np.savez_compressed(os.path.join(args.out, "outputs.npz"), **arrays)
    with open(os.path.join(args.out, "index.json"), "w") as f:
        json.dump(index, f, indent=1, ensure_ascii=False)
    print(f"wrote {args.out}: {len(cases)} cases, {len(strings)} token strings, {len(pre)} preprocessed images")


if __name__ == "__main__":
    main()
