"""The CLIP reference cases, shared (numpy only) by the tests and scripts/make_clip_fixtures.py.

The fixture script fills open_clip / Hugging Face models with weights drawn here from a seed, runs them on
inputs drawn here, and commits only their outputs (tests/fixtures/clip_reference/). The tests draw the same
weights from the same seed, write them as safetensors, import them and compare, without torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np

FIXTURE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "clip_reference")
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
CAPTIONS = ["a photo of a cat", "A  Red SQUARE above a blue circle!!", "two dogs &amp; a frisbee, 2024"]
NUM_IMAGES = 2


@dataclasses.dataclass(frozen=True)
class Case:
    """One reference model: an open_clip architecture (full or reduced depth) or a small HF CLIPModel."""

    name: str
    layout: str  # open_clip | hf
    arch: str  # the configs/clip.py (and open_clip) name
    text_depth: int = 0  # 0 = the architecture's
    vision_depth: int = 0
    seed: int = 0
    overrides: tuple = ()  # extra (dotted config key, value) pairs, for the small HF model
    default: bool = True  # in the default test suite (else `slow`)


ARCHS = ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14"]
HF_OVERRIDES = (("model.embed_dim", 32), ("model.text.width", 64), ("model.text.depth", 2),
                ("model.text.heads", 4), ("model.vision.width", 64), ("model.vision.depth", 2),
                ("model.vision.heads", 4), ("model.vision.image_size", 32), ("model.vision.patch_size", 8),
                ("data.resolution", 32))
DEFAULT_REDUCED = {"ViT-B-16-quickgelu"}  # the rest (and ViT-B-32 at full depth) run under -m slow

CASES = [Case("ViT-B-32-full", "open_clip", "ViT-B-32", seed=1, default=False)]
for _i, _arch in enumerate(ARCHS):
    for _q in ("", "-quickgelu"):
        CASES.append(Case(f"{_arch}{_q}-reduced", "open_clip", _arch + _q, text_depth=2, vision_depth=2,
                          seed=10 + 2 * _i + bool(_q), default=_arch + _q in DEFAULT_REDUCED))
CASES.append(Case("hf-small", "hf", "ViT-B-32-quickgelu", seed=100, overrides=HF_OVERRIDES))
CASES_BY_NAME = {c.name: c for c in CASES}


def hf_model_config() -> dict:
    """The transformers CLIPConfig kwargs of the small HF case (matches HF_OVERRIDES)."""
    return dict(projection_dim=32,
                text_config=dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                                 layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=0),
                vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                   image_size=32, patch_size=8, hidden_act="quick_gelu", layer_norm_eps=1e-5))


def _std(name: str, shape: tuple[int, ...]) -> float:
    if len(shape) >= 2:
        # open_clip applies these two as x @ W (fan-in first); everything else is torch's [out, in, ...]
        fan_in = shape[0] if name in ("text_projection", "visual.proj") else int(np.prod(shape[1:]))
        return float(fan_in) ** -0.5
    return 0.1


def iter_drawn(spec: dict[str, tuple[int, ...] | list[int]], seed: int):
    """Yields (name, float32 array) for every tensor of `spec` (name -> shape), drawn in sorted-name order
    from np.random.default_rng(seed): LayerNorm scales 1 + 0.1 N, other vectors 0.1 N, matrices and conv
    kernels N / sqrt(fan_in), logit_scale log(1 / 0.07)."""
    rng = np.random.default_rng(seed)
    for name in sorted(spec):
        shape = tuple(int(s) for s in spec[name])
        x = rng.standard_normal(shape, dtype=np.float32)
        if name == "logit_scale":
            x = np.asarray(np.log(1 / 0.07), np.float32).reshape(shape)
        elif len(shape) == 1 and name.endswith(".weight"):  # LayerNorm scale (1-D weights are only norms)
            x = 1.0 + 0.1 * x
        else:
            x *= np.float32(_std(name, shape))
        yield name, x.astype(np.float32, copy=False)


def draw_state_dict(spec: dict[str, tuple[int, ...] | list[int]], seed: int) -> dict[str, np.ndarray]:
    """All of iter_drawn(spec, seed) as a dict."""
    return dict(iter_drawn(spec, seed))


def write_safetensors_streaming(spec: dict[str, tuple[int, ...]], seed: int, path: str) -> int:
    """Writes iter_drawn(spec, seed) as a float32 .safetensors file one tensor at a time (a ViT-H-sized file
    without holding it in memory); returns the file size in bytes."""
    import json
    import struct

    header, offset = {}, 0
    for name in sorted(spec):
        n = int(np.prod(spec[name])) * 4
        header[name] = {"dtype": "F32", "shape": [int(s) for s in spec[name]], "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for _, x in iter_drawn(spec, seed):
            f.write(np.ascontiguousarray(x).tobytes())
    return os.path.getsize(path)


def weights_digest(weights: dict[str, np.ndarray]) -> str:
    """sha256 over the names and bytes: the fixture records it, so a numpy whose generator draws other
    numbers fails with a clear message instead of a numeric mismatch."""
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(np.ascontiguousarray(weights[name]).tobytes())
    return h.hexdigest()


def draw_images(seed: int, size: int) -> np.ndarray:
    """[NUM_IMAGES, size, size, 3] float32 in [0, 1]: smooth gradients plus noise (the model's input, before
    the mean/std normalisation)."""
    rng = np.random.default_rng(seed + 12345)
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    out = []
    for i in range(NUM_IMAGES):
        base = np.stack([xx, yy, (xx + yy) / 2][i % 3:] + [xx, yy, (xx + yy) / 2][: i % 3], -1)
        out.append(np.clip(0.6 * base + 0.4 * rng.random((size, size, 3)), 0, 1))
    return np.stack(out).astype(np.float32)


def preprocess_inputs() -> list[np.ndarray]:
    """uint8 RGB images of awkward sizes (landscape, portrait, odd sides, smaller than 224, already 224)
    for the preprocessing comparison."""
    rng = np.random.default_rng(7)
    sizes = [(200, 300), (131, 97), (224, 224), (224, 500), (64, 64), (800, 225), (225, 225), (333, 1000)]
    out = []
    for h, w in sizes:
        yy, xx = np.meshgrid(np.linspace(0, 255, h), np.linspace(0, 255, w), indexing="ij")
        img = np.stack([xx, yy, 255 - xx], -1) * 0.7 + rng.integers(0, 77, (h, w, 3))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


_PIECES = ["a photo of a", "cat", "Dog", "ÉCOLE", "naïve café", "東京タワー", "🙂🐈", "&amp;", "&lt;b&gt;", "&#39;",
           "it's", "they're", "I'LL", "won't", "2024", "3.14159", "!!!", "?!", "...", "--", "(hello)", "[x]",
           "e-mail", "https://example.com/a?b=c", "  spaced   out  ", "\ttab\nnewline", "Ã©", "âœ“", "Straße",
           "ﬁne", "½", "x²", "ＡＢＣ", "<end_of_text>", "<start_of_text>", "mmmmmmmmmmmm", "supercalifragilistic",
           "$100", "#tag", "@user", "C++", "don’t", "“quoted”", "Ελληνικά", "русский", "العربية", "😀😀😀"]


def token_strings(n: int = 300) -> list[str]:
    """`n` varied strings: fixed ones first (empty, unicode, punctuation, HTML entities, over-long), then
    random joins of _PIECES."""
    fixed = ["", " ", "a", "A photo of a cat", "hello world!", "hello!", "CAT!!", "&amp;&amp;", "&amp;lt;",
             " ".join(["word"] * 100), "x" * 500, " ".join(_PIECES), "a, b; c: d. e? f!"]
    rng = np.random.default_rng(3)
    out = list(fixed)
    while len(out) < n:
        k = int(rng.integers(1, 12))
        out.append(" ".join(_PIECES[int(j)] for j in rng.integers(0, len(_PIECES), k)))
    return out[:n]
