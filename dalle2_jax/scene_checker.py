"""A pixel-level checker of generated `captioned_shapes` images against the scene their caption describes.

No network is involved: the checker knows the data set's palette and shapes (data/scenes.py) and measures
pixels. For an image [R, R, 3] uint8 and a scene dict (scenes.decode_scene's format):

1. **Pixels to palette.** Each pixel takes the nearest of the 3 background and 7 object colours (RGB
   distance), or "other" when none is within `MAX_COLOR_DISTANCE`. The background is the most common
   label on the image's border.
2. **Objects.** For each object of the scene, the pixels of its colour form 8-connected components (holes
   filled); components smaller than `MIN_AREA_FRACTION` of the canvas are noise. The object's component is
   the largest one of its colour. When both objects share a colour, the two largest components are assigned
   to them by the better total shape match (the only place the requested shapes inform the matching).
   - **color** is right when the object has a component.
   - **shape** is right when, of the 6 shapes, the requested one fits the component best: each shape's
     outline (triangle and star also rotated by -15..15 degrees in 5-degree steps, the data's range) is
     stretched to the component's bounding box, rasterised with anti-aliasing, and compared by IoU.
   - **size** is right when the bounding box's longer side is on the requested side of the midpoint
     between the small (0.22) and large (0.42) sizes.
3. **relation** (two-object scenes) is right when both objects have components whose centroids are ordered
   along the relation's axis as the caption says.

`check_image` returns the per-object verdicts; `attribute_accuracy` aggregates them over many images.
The checker scores the real test images of the data set near 100% (tests/test_scene_checker.py), so its
errors on generated images are the generator's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from dalle2_jax.data import scenes as S

PALETTE_NAMES: tuple[str, ...] = tuple(f"bg:{b}" for b in S.BACKGROUND_NAMES) + S.COLOR_NAMES
PALETTE = np.array([S.BACKGROUNDS[b] for b in S.BACKGROUND_NAMES] + [S.COLORS[c] for c in S.COLOR_NAMES],
                   np.float32)
OTHER = len(PALETTE_NAMES)  # label of pixels near no palette colour
MAX_COLOR_DISTANCE = 90.0  # RGB distance to the nearest palette colour; beyond it a pixel is "other"
MIN_AREA_FRACTION = 0.004  # of the canvas (16 px at 64x64; the smallest real object, a small star, is ~55)
ROTATIONS = {"triangle": tuple(range(-15, 16, 5)), "star": tuple(range(-15, 16, 5))}
SIZE_THRESHOLD = 0.5 * (S.SIZE_FRACTIONS["small"] + S.SIZE_FRACTIONS["large"])
_SUPERSAMPLE = 4


def palette_labels(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> int [H, W]: the index into PALETTE_NAMES of each pixel's nearest colour, or OTHER."""
    x = np.asarray(image, np.float32)[..., :3]
    d = np.sqrt(((x[:, :, None, :] - PALETTE[None, None]) ** 2).sum(-1))
    labels = d.argmin(-1)
    return np.where(d.min(-1) <= MAX_COLOR_DISTANCE, labels, OTHER)


def background_of(labels: np.ndarray) -> str | None:
    """The most common background label on the border, as a name (None if the border is mostly objects)."""
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    counts = np.bincount(border, minlength=OTHER + 1)
    best = int(counts[: len(S.BACKGROUND_NAMES)].argmax())
    return S.BACKGROUND_NAMES[best] if counts[best] > 0 else None


def _unit_outline(shape: str, rotation: float) -> np.ndarray:
    """The shape's outline [N, 2], rotated, then normalised to the unit box [0, 1]^2."""
    outline = S._shape_outline(shape, "large")
    if outline is None:
        ang = np.linspace(0.0, 2 * np.pi, 64, endpoint=False)
        outline = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    if rotation:
        c, s = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
        outline = outline @ np.array([[c, s], [-s, c]])
    lo, hi = outline.min(0), outline.max(0)
    return (outline - lo) / (hi - lo)


_OUTLINES = {(shape, rot): _unit_outline(shape, rot) for shape in S.SHAPES for rot in ROTATIONS.get(shape, (0,))}


def _template(outline: np.ndarray, h: int, w: int) -> np.ndarray:
    """The unit outline stretched over an h x w pixel box, rasterised anti-aliased -> bool [h, w] (coverage
    >= 0.5)."""
    ss = _SUPERSAMPLE
    img = Image.new("L", (w * ss, h * ss), 0)
    ImageDraw.Draw(img).polygon([tuple(p) for p in outline * np.array([w * ss, h * ss])], fill=255)
    cover = np.asarray(img, np.float32).reshape(h, ss, w, ss).mean(axis=(1, 3)) / 255.0
    return cover >= 0.5


def shape_scores(mask: np.ndarray) -> dict[str, float]:
    """bool [H, W] mask of one object (cropped anywhere) -> {shape: best IoU of its outline fitted to the
    mask's bounding box}."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    h, w = crop.shape
    scores: dict[str, float] = {}
    for (shape, _), outline in _OUTLINES.items():
        t = _template(outline, h, w)
        iou = float((t & crop).sum()) / max(1.0, float((t | crop).sum()))
        scores[shape] = max(scores.get(shape, 0.0), iou)
    return scores


def _components(labels: np.ndarray, color: str, min_area: int) -> list[np.ndarray]:
    """The masks (holes filled) of the 8-connected components of `color`'s pixels, largest first."""
    mask = labels == PALETTE_NAMES.index(color)
    comp, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if not n:
        return []
    areas = ndimage.sum_labels(mask, comp, index=np.arange(1, n + 1))
    order = [int(i) + 1 for i in np.argsort(-areas) if areas[i] >= min_area]
    return [ndimage.binary_fill_holes(comp == k) for k in order]


def _object_verdict(obj: Mapping[str, Any], mask: np.ndarray | None, scores: dict[str, float] | None,
                    resolution: int) -> dict[str, Any]:
    if mask is None:
        return {"color": False, "shape": False, "size": False, "found_shape": None, "centroid": None}
    ys, xs = np.nonzero(mask)
    side = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) / resolution
    found = max(scores, key=scores.get)
    return {"color": True, "shape": found == obj["shape"],
            "size": (side >= SIZE_THRESHOLD) == (obj["size"] == "large"),
            "found_shape": found, "shape_iou": scores[found],
            "centroid": (float(xs.mean() + 0.5) / resolution, float(ys.mean() + 0.5) / resolution)}


def check_image(image: np.ndarray, scene: Mapping[str, Any]) -> dict[str, Any]:
    """Checks one image against one scene (scenes' dict format). Returns {"background": bool, "objects":
    [per object: color, shape, size (bools), found_shape, shape_iou, centroid (x, y in [0, 1])],
    "relation": bool or None (one object)}."""
    image = np.asarray(image)
    res = image.shape[0]
    labels = palette_labels(image)
    min_area = max(4, int(round(MIN_AREA_FRACTION * res * res)))
    objects = scene["objects"]
    comps = {c: _components(labels, c, min_area) for c in {o["color"] for o in objects}}
    assigned: list[tuple[np.ndarray | None, dict | None]] = []
    if len(objects) == 2 and objects[0]["color"] == objects[1]["color"]:
        cands = comps[objects[0]["color"]][:2]
        sc = [shape_scores(m) for m in cands]
        if len(cands) == 2 and sc[1][objects[0]["shape"]] + sc[0][objects[1]["shape"]] > \
                sc[0][objects[0]["shape"]] + sc[1][objects[1]["shape"]]:
            cands, sc = cands[::-1], sc[::-1]
        assigned = [(cands[k], sc[k]) if k < len(cands) else (None, None) for k in range(2)]
    else:
        for o in objects:
            c = comps[o["color"]]
            assigned.append((c[0], shape_scores(c[0])) if c else (None, None))
    verdicts = [_object_verdict(o, m, s, res) for o, (m, s) in zip(objects, assigned)]
    relation = None
    if len(objects) == 2:
        a, b = verdicts[0]["centroid"], verdicts[1]["centroid"]
        rel = scene["relation"]
        if a is None or b is None:
            relation = False
        else:
            axis = 0 if rel in ("left of", "right of") else 1
            first_smaller = rel in ("left of", "above")
            relation = bool((a[axis] < b[axis]) == first_smaller)
    return {"background": background_of(labels) == scene["background"], "objects": verdicts,
            "relation": relation}


def attribute_accuracy(images: Sequence[np.ndarray] | np.ndarray, scenes: Sequence[Mapping[str, Any]],
                       heldout_only: bool = False) -> dict[str, float]:
    """Checks every (image, scene) pair and returns the accuracies: color_acc, shape_acc, size_acc (over
    objects), relation_acc (over two-object scenes), background_acc and all_correct (over images: every
    attribute right), heldout_color_acc / heldout_shape_acc (the objects that are held-out pairs),
    shape_acc_small / shape_acc_large (the objects asked for at each size), and the counts."""
    per_obj = {"color": [], "shape": [], "size": []}
    held = {"color": [], "shape": []}
    by_size = {size: [] for size in S.SIZE_FRACTIONS}  # shape verdicts of the objects of each requested size
    rel, bg, allc = [], [], []
    for img, scene in zip(images, scenes):
        v = check_image(img, scene)
        ok = v["background"]
        for o, ov in zip(scene["objects"], v["objects"]):
            for k in per_obj:
                per_obj[k].append(ov[k])
                ok = ok and ov[k]
            if o["size"] in by_size:
                by_size[o["size"]].append(ov["shape"])
            if S.is_heldout(o["color"], o["shape"]):
                held["color"].append(ov["color"])
                held["shape"].append(ov["shape"])
        if v["relation"] is not None:
            rel.append(v["relation"])
            ok = ok and v["relation"]
        bg.append(v["background"])
        allc.append(ok)
    mean = lambda x: float(np.mean(x)) if x else float("nan")  # noqa: E731
    return {"color_acc": mean(per_obj["color"]), "shape_acc": mean(per_obj["shape"]),
            "size_acc": mean(per_obj["size"]), "relation_acc": mean(rel), "background_acc": mean(bg),
            "all_correct": mean(allc), "heldout_color_acc": mean(held["color"]),
            "heldout_shape_acc": mean(held["shape"]),
            **{f"shape_acc_{size}": mean(v) for size, v in by_size.items()},
            "num_images": len(bg), "num_objects": len(per_obj["color"]),
            "num_two_object": len(rel), "num_heldout_objects": len(held["color"])}
