"""The DALLE2-pytorch half of benchmarks/peer/compare.py. Runs in the peer environment (benchmarks/peer/setup.sh),
never in dalle2-jax's: this file imports torch, and nothing in the dalle2-jax package or its tests imports it.

    python benchmarks/peer/torch_side.py --check                 # the environment imports and builds every model
    python benchmarks/peer/torch_side.py --workload decoder_train --threads 2 --serve

With --serve it builds the workload's model, runs one warm-up call, prints a JSON line with its parameter count and
what one call is (`units` examples, images or embeddings), then answers JSON commands on stdin, one per line:
{"cmd": "run", "n": N} -> {"times": [N wall times, seconds]}; {"cmd": "quit"}. compare.py sets
OMP_WAIT_POLICY=PASSIVE and OMP_NUM_THREADS before starting it (torch reads them when it loads).

The workloads mirror compare.py's dalle2-jax ones at matched sizes (compare.py's docstring has the table):
- decoder_train: `Unet(dim=64, dim_mults=(1,2,3,4), cond_on_image_embeds=True)` (its defaults otherwise: 2 resnet
  blocks per level, attention at the middle, image tokens cross-attended) in a `Decoder(image_sizes=(64,))`,
  conditioned on a 512-d image embedding; batch of 64 px images in [0, 1].
- prior_train: `DiffusionPriorNetwork(dim=512, depth=6, dim_head=64, heads=8, num_timesteps=1000)` in a
  `DiffusionPrior(image_embed_dim=512, condition_on_text_encodings=True)`, trained from precomputed text
  embeddings, 256 text encodings and image embeddings (260 tokens: 256 + text, time, image, query).
- clip_train: x-clip's `CLIP` with a 512 x 6 text transformer over 256 tokens (vocabulary 49408) and a 512 x 6
  ViT on 64 px images with 16 px patches, `visual_patch_dropout=0` (its default 0.5 drops half the patches in
  training, which dalle2-jax does not do), contrastive loss.
- decoder_sample: the decoder above, `Decoder.sample` with DDIM 50 steps (sample_timesteps=50), guidance scale 3.
- prior_sample: the prior above, `DiffusionPrior.sample` with DDIM 64 steps, 2 candidates per caption (the best
  by similarity kept, as dalle2-jax does), guidance scale 2; the CLIP text encoder replaced by precomputed
  embeddings (a stub with `embed_text`), so no CLIP runs.
Each train step is forward + backward + global-norm gradient clip (1.0) + DALLE2-pytorch's optimizer
(dalle2_pytorch.optimizer.get_optimizer: AdamW) + an EMA of the params every step, as dalle2-jax's step does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

PROTO = "@@peer "  # compare.py's protocol-line prefix
WORKLOADS = ("decoder_train", "prior_train", "clip_train", "decoder_sample", "prior_sample")


def _torchvision_shim() -> None:
    """The registry's torchvision wheels are CUDA builds: on the CPU torch, importing torchvision (DALLE2-pytorch
    imports it) fails with "operator torchvision::nms does not exist". Define the two op schemas it looks up
    first; the pure-Python parts then import (no workload here calls nms)."""
    import torch

    if getattr(_torchvision_shim, "done", False):
        return
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    _torchvision_shim.lib = lib  # keep the registration alive
    _torchvision_shim.done = True


def _count(module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def _decoder(sample_timesteps: int = 50):
    from dalle2_pytorch import Decoder, Unet

    unet = Unet(dim=64, image_embed_dim=512, channels=3, dim_mults=(1, 2, 3, 4), cond_on_image_embeds=True,
                cond_on_text_encodings=False)
    return Decoder(unet=unet, image_sizes=(64,), timesteps=1000, sample_timesteps=sample_timesteps,
                   learned_variance=True)


def _prior(sample_timesteps: int = 64):
    from dalle2_pytorch import DiffusionPrior, DiffusionPriorNetwork

    net = DiffusionPriorNetwork(dim=512, depth=6, dim_head=64, heads=8, num_timesteps=1000, max_text_len=256)
    return DiffusionPrior(net=net, image_embed_dim=512, timesteps=1000, sample_timesteps=sample_timesteps,
                          cond_drop_prob=0.1, condition_on_text_encodings=True)


def _clip():
    from x_clip import CLIP

    return CLIP(dim_text=512, dim_image=512, dim_latent=512, num_text_tokens=49408, text_enc_depth=6,
                text_seq_len=256, text_heads=8, visual_enc_depth=6, visual_heads=8, visual_image_size=64,
                visual_patch_size=16, visual_patch_dropout=0.0)


class _TextStub:
    """Stands in for the prior's CLIP: `embed_text` returns precomputed (text embedding, 256 token encodings)."""

    def __init__(self, dim: int = 512, length: int = 256):
        self.dim, self.length = dim, length

    def embed_text(self, text):
        import torch

        g = torch.Generator().manual_seed(0)
        b = text.shape[0]
        emb = torch.nn.functional.normalize(torch.randn(b, self.dim, generator=g), dim=-1)
        return emb, torch.randn(b, self.length, self.dim, generator=g)


def _train_step(model, loss_fn, ema_decay: float = 0.999, grad_clip: float = 1.0):
    import torch

    from dalle2_pytorch.optimizer import get_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    opt = get_optimizer(params, lr=1e-4, wd=1e-2)
    ema = [p.detach().clone() for p in params]
    model.train()

    def step():
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - ema_decay)
        return float(loss.detach())

    return step


def build(workload: str, batch: int | None = None, steps: int | None = None):
    """(call, params, units per call, description) of a workload; `batch` / `steps` override the sizes (tests)."""
    import torch

    torch.manual_seed(0)
    if workload == "decoder_train":
        b = batch or 8
        model = _decoder()
        images, emb = torch.rand(b, 3, 64, 64), torch.nn.functional.normalize(torch.randn(b, 512), dim=-1)
        return _train_step(model, lambda: model(images, image_embed=emb)), _count(model.unets), b, "images"
    if workload == "prior_train":
        b = batch or 64
        model = _prior()
        t_emb = torch.nn.functional.normalize(torch.randn(b, 512), dim=-1)
        i_emb = torch.nn.functional.normalize(torch.randn(b, 512), dim=-1)
        t_enc = torch.randn(b, 256, 512)
        call = _train_step(model, lambda: model(text_embed=t_emb, image_embed=i_emb, text_encodings=t_enc))
        return call, _count(model), b, "examples"
    if workload == "clip_train":
        b = batch or 32
        model = _clip()
        text = torch.randint(1, 49408, (b, 256))
        images = torch.randn(b, 3, 64, 64)
        return _train_step(model, lambda: model(text, images, return_loss=True)), _count(model), b, "examples"
    if workload == "decoder_sample":
        b = batch or 4
        model = _decoder(sample_timesteps=steps or 50).eval()
        emb = torch.nn.functional.normalize(torch.randn(b, 512), dim=-1)

        def call():
            with torch.no_grad():
                return model.sample(image_embed=emb, cond_scale=3.0)
        return call, _count(model.unets), b, "images"
    if workload == "prior_sample":
        b = batch or 8
        model = _prior(sample_timesteps=steps or 64).eval()
        model.clip = _TextStub()
        text = torch.randint(1, 49408, (b, 256))

        def call():
            with torch.no_grad():
                return model.sample(text, num_samples_per_batch=2, cond_scale=2.0)
        return call, _count(model), b, "embeddings"
    raise ValueError(f"unknown workload {workload!r}; use one of {WORKLOADS}")


def serve(workload: str, threads: int, batch: int | None, steps: int | None) -> None:
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    call, params, units, unit = build(workload, batch, steps)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    call()  # warm-up: allocator, oneDNN primitive caches
    warmup_s = time.perf_counter() - t0
    out = sys.stdout
    out.write(PROTO + json.dumps({"ready": True, "params": params, "units": units, "unit": unit, "build_s": build_s,
                          "warmup_s": warmup_s, "threads": torch.get_num_threads(),
                          "process_peak_rss_bytes": _rss_peak_bytes(),
                          "versions": _versions(),
                          "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}}) + "\n")
    out.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        times = []
        for _ in range(int(cmd["n"])):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        out.write(PROTO + json.dumps({"times": times}) + "\n")
        out.flush()


def _rss_peak_bytes() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _versions() -> dict:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("torch", "dalle2-pytorch", "x-clip")}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=WORKLOADS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None, help="override the workload's batch (tests)")
    ap.add_argument("--sample_steps", type=int, default=None, help="override the sampling steps (tests)")
    ap.add_argument("--serve", action="store_true")
    ap.add_argument("--check", action="store_true", help="build every workload at batch 1 and print its params")
    args = ap.parse_args(argv)
    _torchvision_shim()
    if args.check:
        import torch

        print("torch", torch.__version__, "threads", torch.get_num_threads(), _versions())
        for w in WORKLOADS:
            _, params, _, _ = build(w, batch=1, steps=2)
            print(f"{w}: {params / 1e6:.2f}M params")
        return
    if not args.workload:
        ap.error("--workload is required (or --check)")
    serve(args.workload, args.threads, args.batch, args.sample_steps)


if __name__ == "__main__":
    main()
