"""Builds the karlo (diffusers unCLIP) import fixtures, tests/fixtures/karlo_tiny/ and karlo_keys.json.

Run once, in an environment with torch (CPU build) and diffusers (see ../shared/STACK_NOTES.md, "Reference
environments"), never in the package's:

    python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install torch==2.13.0
    /tmp/refenv/bin/pip install diffusers transformers safetensors accelerate
    /tmp/refenv/bin/python scripts/make_karlo_fixtures.py

It writes
- tests/fixtures/karlo_tiny/prior/ (config.json + diffusion_pytorch_model.safetensors): a diffusers
  `PriorTransformer` with karlo's settings at tiny sizes (TINY_PRIOR below), every parameter perturbed
  away from its initial value (no zeros, no unit norms, a non-trivial clip_mean / clip_std), saved with
  `save_pretrained`;
- tests/fixtures/karlo_tiny/reference.npz: fixed inputs (timesteps, noisy embeddings, text embeddings,
  text token states, a text padding mask with a different length per row) and diffusers' outputs on them:
  `prior/predicted` (the raw x0 prediction, in the standardised space) and `prior/unnormalised`
  (`post_process_latents` of it: predicted * clip_std + clip_mean, as the pipeline returns embeddings);
- tests/fixtures/karlo_tiny/index.json: versions, the inputs' description, the weights' sha256;
- tests/fixtures/karlo_keys.json: the FULL-SIZE karlo components' tensor names and shapes and their
  configs, from meta-device instantiation (no weights). Its "components" map holds one entry per
  pipeline component ("prior" here; the decoder, text_proj and super-res parts add theirs), each with
  the class, its config, the tensor count, the parameter count and the {name: shape} list in state-dict
  order. `--only prior` regenerates one component and keeps the others.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
TINY_DIR = os.path.join(ROOT, "karlo_tiny")
KEYS_PATH = os.path.join(ROOT, "karlo_keys.json")

# karlo's prior settings (diffusers' defaults) at tiny sizes: width 2 x 16 = 32, a 24-d CLIP (so [W, E]
# weights are not square), 12 caption tokens (so 16 positions, not karlo's 81)
TINY_PRIOR = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, embedding_dim=24, num_embeddings=12,
                  additional_embeddings=4, dropout=0.0, time_embed_act_fn="silu", norm_in_type=None,
                  embedding_proj_norm_type=None, encoder_hid_proj_type="linear", added_emb_type="prd",
                  time_embed_dim=None, embedding_proj_dim=None, clip_embed_dim=None)
TIMESTEPS = [0, 1, 437, 999]
TEXT_LENGTHS = [12, 5, 1, 9]  # valid caption tokens per row (the rest is padding)


def _perturb(model, seed: int) -> None:
    """Moves every parameter away from its initial value: weights get N(0, 1/fan_in) noise added, vectors
    N(0, 0.1) (norm scales around 1), the learned embeddings N(0, 0.5); clip_std = 0.5 + U(0, 1)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name == "clip_std":
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name == "clip_mean":
                p.copy_(0.3 * noise)
            elif name in ("positional_embedding", "prd_embedding"):
                p.copy_(0.5 * noise)
            elif p.ndim >= 2:
                p.add_(noise / p.shape[1] ** 0.5)
            else:
                p.add_(0.1 * noise)
            assert bool((p != 0).all()), name


def make_tiny_prior(out_dir: str, seed: int = 0) -> dict:
    """Saves the tiny prior under out_dir/prior and returns {name: array} of its inputs and outputs."""
    import torch
    from diffusers import PriorTransformer

    torch.manual_seed(seed)
    model = PriorTransformer(**TINY_PRIOR).eval()
    _perturb(model, seed + 1)
    model.save_pretrained(os.path.join(out_dir, "prior"), safe_serialization=True)

    rng = np.random.default_rng(seed + 2)
    b, e, n = len(TIMESTEPS), TINY_PRIOR["embedding_dim"], TINY_PRIOR["num_embeddings"]
    x_t = rng.standard_normal((b, e), dtype=np.float32)
    text_emb = (3.0 * rng.standard_normal((b, e))).astype(np.float32)  # karlo's text_embeds are not unit
    states = rng.standard_normal((b, n, e), dtype=np.float32)
    mask = np.arange(n)[None, :] < np.asarray(TEXT_LENGTHS)[:, None]
    t = np.asarray(TIMESTEPS, np.int64)
    with torch.no_grad():
        pred = model(torch.from_numpy(x_t), timestep=torch.from_numpy(t), proj_embedding=torch.from_numpy(text_emb),
                     encoder_hidden_states=torch.from_numpy(states), attention_mask=torch.from_numpy(mask)
                     ).predicted_image_embedding
        unnorm = model.post_process_latents(pred)
        # the pipeline's own call: one scalar timestep for the batch (the same as a repeated vector)
        scalar = model(torch.from_numpy(x_t), timestep=int(t[2]), proj_embedding=torch.from_numpy(text_emb),
                       encoder_hidden_states=torch.from_numpy(states), attention_mask=torch.from_numpy(mask)
                       ).predicted_image_embedding
    return {"prior/timesteps": t.astype(np.int32), "prior/x_t": x_t, "prior/text_emb": text_emb,
            "prior/text_states": states, "prior/text_mask": mask, "prior/predicted": pred.numpy(),
            "prior/unnormalised": unnorm.numpy(), "prior/predicted_t437": scalar.numpy()}


def full_size_components() -> dict:
    """The full-size karlo components on the meta device: {component: {class, config, num_tensors,
    num_params, tensors: {name: shape}}}."""
    import torch
    from diffusers import PriorTransformer

    out = {}
    with torch.device("meta"):
        prior = PriorTransformer()  # its defaults are karlo's
    sd = prior.state_dict()
    out["prior"] = {"class": "PriorTransformer",
                    "config": {k: v for k, v in dict(prior.config).items() if not k.startswith("_")},
                    "num_tensors": len(sd), "num_params": int(sum(v.numel() for v in sd.values())),
                    "tensors": {k: list(v.shape) for k, v in sd.items()}}
    return out


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help="components to (re)write (default: all)")
    args = ap.parse_args()
    import diffusers
    import safetensors
    import torch

    versions = {"torch": torch.__version__, "diffusers": diffusers.__version__,
                "safetensors": safetensors.__version__, "numpy": np.__version__}
    only = set(args.only or ["prior"])

    keys = {"format": 1, "components": {}}
    if os.path.exists(KEYS_PATH):
        with open(KEYS_PATH) as f:
            keys = json.load(f)
    full = full_size_components()
    for name in sorted(only & set(full)):
        keys["components"][name] = full[name]
        print(f"full-size {name}: {full[name]['num_tensors']} tensors, {full[name]['num_params']:,} params")
    keys["source"] = ("diffusers' karlo (unCLIP) component classes with their karlo-v1-alpha configs, "
                      "instantiated on the meta device by scripts/make_karlo_fixtures.py (no weights)")
    keys["versions"] = versions
    with open(KEYS_PATH, "w") as f:
        json.dump(keys, f, indent=1)
        f.write("\n")

    os.makedirs(TINY_DIR, exist_ok=True)
    index_path = os.path.join(TINY_DIR, "index.json")
    index = {"components": {}}
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
    npz_path = os.path.join(TINY_DIR, "reference.npz")
    arrays = dict(np.load(npz_path)) if os.path.exists(npz_path) else {}
    if "prior" in only:
        arrays = {k: v for k, v in arrays.items() if not k.startswith("prior/")}
        arrays.update(make_tiny_prior(TINY_DIR))
        weights = os.path.join(TINY_DIR, "prior", "diffusion_pytorch_model.safetensors")
        index["components"]["prior"] = {
            "class": "PriorTransformer", "config": TINY_PRIOR, "weights_sha256": _sha256(weights),
            "timesteps": TIMESTEPS, "text_lengths": TEXT_LENGTHS,
            "outputs": {"predicted": "model(x_t, timestep=t, proj_embedding=text_emb, encoder_hidden_states="
                                     "text_states, attention_mask=text_mask).predicted_image_embedding",
                        "unnormalised": "post_process_latents(predicted) = predicted * clip_std + clip_mean",
                        "predicted_t437": "predicted with the scalar timestep 437 for every row"},
            "max_abs": {k: float(np.abs(arrays[f"prior/{k}"]).max())
                        for k in ("predicted", "unnormalised", "predicted_t437")}}
        print(f"tiny prior: outputs max |x| {index['components']['prior']['max_abs']}")
    index["versions"] = versions
    np.savez_compressed(npz_path, **arrays)
    with open(index_path, "w") as f:
        json.dump(index, f, indent=1)
        f.write("\n")
    print(f"wrote {TINY_DIR} and {KEYS_PATH}")


if __name__ == "__main__":
    main()
