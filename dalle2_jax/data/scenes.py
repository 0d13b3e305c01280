"""Procedural scenes for the `captioned_shapes` data set (numpy + PIL only).

A scene is a resolution-independent description: a background plus one or two objects, each with a
shape, color, size, centre (x, y in [0, 1], y pointing down) and rotation (degrees), the spatial
relation between two objects, and a caption template index. See `shared/SHAPES.md`.

Scene dict format (what `sample_scene` returns and `render_scene` / `scene_caption` accept)::

    {'background': 'black',
     'objects': [{'shape': 'star', 'color': 'red', 'size': 'small',
                  'center': (0.31, 0.5), 'rotation': -7.5}, ...],   # 1 or 2 objects
     'relation': 'left of',        # None for one object; objects[0] <relation> objects[1]
     'template': 5}                # int in [0, NUM_TEMPLATES)

All floats in a sampled scene are exactly representable in float32, so `encode_scene` /
`decode_scene` round-trip exactly.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    'white': (255, 255, 255),
    'black': (0, 0, 0),
    'gray': (128, 128, 128),
}
SHAPES: tuple[str, ...] = ('circle', 'square', 'triangle', 'diamond', 'star', 'cross')
COLORS: dict[str, tuple[int, int, int]] = {
    'red': (220, 30, 30),
    'green': (30, 170, 50),
    'blue': (30, 70, 220),
    'yellow': (240, 210, 20),
    'purple': (140, 50, 190),
    'orange': (245, 130, 20),
    'cyan': (20, 200, 210),
}
SIZES: tuple[str, ...] = ('small', 'large')
SIZE_FRACTIONS: dict[str, float] = {'small': 0.22, 'large': 0.42}
RELATIONS: tuple[str, ...] = ('left of', 'right of', 'above', 'below')
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (('purple', 'star'), ('orange', 'triangle'), ('cyan', 'square'))

BACKGROUND_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
RELATION_LABELS: tuple[str, ...] = ('none',) + RELATIONS  # label 0 = one object, no relation
MAX_OBJECTS = 2
NUM_TEMPLATES = 8  # bit 0: size word for object 0, bit 1: for object 1, bit 2: background phrase
MIN_SEPARATION = 0.3  # along the relation's axis, fraction of the canvas side
ROTATING_SHAPES: tuple[str, ...] = ('triangle', 'star')
MAX_ROTATION = 15.0  # degrees
SPLIT_IDS: dict[str, int] = {'train': 0, 'test': 1}

_MARGIN = 0.01  # object bbox stays this far inside the canvas
_GAP = 0.04  # extra gap so two objects' bounding boxes never overlap
_PERP_JITTER = 0.08  # jitter of each object across the relation's axis
_RELATION_PHRASES = {'left of': 'to the left of', 'right of': 'to the right of', 'above': 'above',
                     'below': 'below'}
_HELDOUT_SET = frozenset(HELDOUT_PAIRS)


def _f32(x: float) -> float:
    """Rounds a Python float to the nearest float32 value (returned as a Python float)."""
    return float(np.float32(x))


def _center_bounds(size: str) -> tuple[float, float]:
    half = SIZE_FRACTIONS[size] / 2
    return half + _MARGIN, 1.0 - half - _MARGIN


def is_heldout(color: str, shape: str) -> bool:
    """True if the (color, shape) pair is held out of the train split."""
    return (color, shape) in _HELDOUT_SET


def sample_scene(rng: np.random.Generator, *, allow_heldout: bool, force_heldout: bool = False) -> dict:
    """Samples a random scene dict (see module docstring).

    Args:
      rng: numpy random generator (the only source of randomness).
      allow_heldout: if False, no object is one of HELDOUT_PAIRS.
      force_heldout: if True, at least one object is a held-out (color, shape) pair.
    Returns:
      A scene dict with 1 object (probability 1/2) or 2 objects with a relation.
    """
    if force_heldout and not allow_heldout:
        raise ValueError('force_heldout=True needs allow_heldout=True')
    background = BACKGROUND_NAMES[int(rng.integers(len(BACKGROUNDS)))]
    num_objects = 1 if rng.random() < 0.5 else 2
    heldout_slot = int(rng.integers(num_objects)) if force_heldout else -1
    pairs: list[tuple[str, str]] = []
    for k in range(num_objects):
        while True:
            if k == heldout_slot:
                pair = HELDOUT_PAIRS[int(rng.integers(len(HELDOUT_PAIRS)))]
            else:
                pair = (COLOR_NAMES[int(rng.integers(len(COLORS)))], SHAPES[int(rng.integers(len(SHAPES)))])
                if not allow_heldout and pair in _HELDOUT_SET:
                    continue
            if pair not in pairs and COLORS[pair[0]] != BACKGROUNDS[background]:
                break
        pairs.append(pair)
    sizes = [SIZES[int(rng.integers(len(SIZES)))] for _ in range(num_objects)]

    relation = None
    if num_objects == 1:
        lo, hi = _center_bounds(sizes[0])
        centers = [(rng.uniform(lo, hi), rng.uniform(lo, hi))]
    else:
        relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
        axis = 0 if relation in ('left of', 'right of') else 1
        # objects[0] has the smaller coordinate along the axis for 'left of' / 'above'.
        first, second = (0, 1) if relation in ('left of', 'above') else (1, 0)
        lo_a, hi_a = _center_bounds(sizes[first])
        lo_b, hi_b = _center_bounds(sizes[second])
        min_sep = max(MIN_SEPARATION, (SIZE_FRACTIONS[sizes[0]] + SIZE_FRACTIONS[sizes[1]]) / 2 + _GAP)
        a = rng.uniform(lo_a, min(hi_a, hi_b - min_sep))
        b = rng.uniform(max(lo_b, a + min_sep), hi_b)
        along = {first: a, second: b}
        bounds = [_center_bounds(s) for s in sizes]
        base = rng.uniform(max(bounds[0][0], bounds[1][0]), min(bounds[0][1], bounds[1][1]))
        perp = [float(np.clip(base + rng.uniform(-_PERP_JITTER, _PERP_JITTER), *bounds[k])) for k in range(2)]
        centers = [(along[k], perp[k]) if axis == 0 else (perp[k], along[k]) for k in range(2)]

    objects = []
    for (color, shape), size, (cx, cy) in zip(pairs, sizes, centers):
        rotation = rng.uniform(-MAX_ROTATION, MAX_ROTATION) if shape in ROTATING_SHAPES else 0.0
        objects.append({'shape': shape, 'color': color, 'size': size,
                        'center': (_f32(cx), _f32(cy)), 'rotation': _f32(rotation)})
    return {'background': background, 'objects': objects, 'relation': relation,
            'template': int(rng.integers(NUM_TEMPLATES))}


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator for example `index` of `split`, derived from (seed, split, index) only."""
    return np.random.default_rng([int(seed), SPLIT_IDS[split], int(index)])


def scene_for_example(seed: int, split: str, index: int) -> dict:
    """The scene of example `index` of the captioned_shapes `split` ('train' or 'test') for `seed`.

    train: no held-out pairs. test: held-out pairs allowed; every 4th example (index % 4 == 0) is
    forced to contain one.
    """
    rng = scene_rng(seed, split, index)
    if split == 'train':
        return sample_scene(rng, allow_heldout=False)
    return sample_scene(rng, allow_heldout=True, force_heldout=index % 4 == 0)


# ----------------------------------------------------------------------------------------------
# Rendering


def _shape_outline(shape: str, size: str) -> np.ndarray | None:
    """Polygon vertices [N, 2] (x, y) in canvas units, centred at 0, unrotated; None for circle."""
    s = SIZE_FRACTIONS[size]
    h = s / 2
    if shape == 'square':
        return np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
    if shape == 'diamond':
        w = 0.36 * s
        return np.array([[0, -h], [w, 0], [0, h], [-w, 0]])
    if shape == 'triangle':  # equilateral, inscribed in the circle of radius s/2, pointing up
        ang = np.deg2rad([-90.0, 30.0, 150.0])
        return np.stack([h * np.cos(ang), h * np.sin(ang)], axis=1)
    if shape == 'star':  # 5 points, outer radius s/2
        ang = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        rad = np.where(np.arange(10) % 2 == 0, h, 0.42 * h)
        return np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)
    if shape == 'cross':  # plus sign, arms of width 0.34 s
        t = 0.17 * s
        return np.array([[-t, -h], [t, -h], [t, -t], [h, -t], [h, t], [t, t], [t, h], [-t, h], [-t, t],
                         [-h, t], [-h, -t], [-t, -t]])
    if shape == 'circle':
        return None
    raise ValueError(f'unknown shape {shape!r}')


_OUTLINES = {(shape, size): _shape_outline(shape, size) for shape in SHAPES for size in SIZES}


def _supersample(resolution: int) -> int:
    """Supersampling factor: 4 up to 512 px, 2 at 1024 px, 1 above 2048."""
    return max(1, min(4, 2048 // resolution))


def object_polygon(obj: Mapping[str, Any], canvas: float) -> np.ndarray:
    """Vertices [N, 2] (x, y) of `obj` in pixel units of a canvas `canvas` pixels wide.

    Continuous coordinate u in [0, 1] maps to u * canvas (pixel i covers [i, i + 1)).
    Circles become regular polygons with about one vertex per pixel of radius (at least 32).
    """
    outline = _OUTLINES[(obj['shape'], obj['size'])]
    if outline is None:
        r = SIZE_FRACTIONS[obj['size']] / 2
        n = int(min(512, max(32, r * canvas)))
        ang = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
        outline = np.stack([r * np.cos(ang), r * np.sin(ang)], axis=1)
    rot = float(obj.get('rotation', 0.0))
    if rot:
        c, s = math.cos(math.radians(rot)), math.sin(math.radians(rot))
        outline = outline @ np.array([[c, s], [-s, c]])
    cx, cy = obj['center']
    return (outline + np.array([cx, cy])) * canvas


def _render_pil(scene: Mapping[str, Any], resolution: int) -> Image.Image:
    ss = _supersample(resolution)
    canvas = resolution * ss
    img = Image.new('RGB', (canvas, canvas), BACKGROUNDS[scene['background']])
    draw = ImageDraw.Draw(img)
    for obj in scene['objects']:
        # PIL samples pixel (i, j) at integer coordinates; our pixel centres are at i + 0.5.
        poly = object_polygon(obj, canvas) - 0.5
        draw.polygon([tuple(p) for p in poly.tolist()], fill=COLORS[obj['color']])
    return img.reduce(ss) if ss > 1 else img


def render_scene(scene: Mapping[str, Any], resolution: int) -> np.ndarray:
    """Renders a scene anti-aliased to a uint8 array [resolution, resolution, 3].

    Draws at 4x (2x at 1024 px) with PIL polygons and box-filters down, so geometry is
    resolution-independent: a 256 px render box-downsampled to 64 px is close to the 64 px render.
    """
    return np.asarray(_render_pil(scene, resolution))


def render_scene_png(scene: Mapping[str, Any], resolution: int, compress_level: int = 1) -> bytes:
    """`render_scene` encoded as PNG bytes (lossless; decodes to exactly `render_scene`'s array)."""
    buf = io.BytesIO()
    _render_pil(scene, resolution).save(buf, format='PNG', compress_level=compress_level)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# Captions


def _article(word: str) -> str:
    return 'an' if word[0] in 'aeiou' else 'a'


def _object_phrase(obj: Mapping[str, Any], with_size: bool) -> str:
    words = ([obj['size']] if with_size else []) + [obj['color'], obj['shape']]
    return ' '.join([_article(words[0])] + words)


def scene_caption(scene: Mapping[str, Any]) -> str:
    """The caption of a scene, a deterministic function of it (template chosen by scene['template']).

    Template bits: 1 = size word for object 0, 2 = size word for object 1, 4 = background phrase.
    E.g. 'a large red circle', 'a small blue star on a black background',
    'a green square to the left of a yellow triangle'. Changing one object's color or shape changes
    only that word (and its article).
    """
    template = int(scene['template'])
    objects = scene['objects']
    text = _object_phrase(objects[0], bool(template & 1))
    if len(objects) == 2:
        text += f" {_RELATION_PHRASES[scene['relation']]} {_object_phrase(objects[1], bool(template & 2))}"
    if template & 4:
        text += f" on a {scene['background']} background"
    return text


# ----------------------------------------------------------------------------------------------
# Structured (TFDS feature) format


def encode_scene(scene: Mapping[str, Any]) -> dict[str, Any]:
    """Scene dict -> the `scene` feature dict of `captioned_shapes`.

    Keys: background (int, index into BACKGROUND_NAMES), relation (int, index into RELATION_LABELS),
    num_objects (int), shape/color/size (int32 [2], index into SHAPES/COLOR_NAMES/SIZES, -1 padding),
    center (float32 [2, 2], rows (x, y), zero padding), rotation (float32 [2], degrees), template (int).
    """
    objects = scene['objects']
    if not 1 <= len(objects) <= MAX_OBJECTS:
        raise ValueError(f'a scene has 1 or 2 objects, got {len(objects)}')
    shape = np.full([MAX_OBJECTS], -1, np.int32)
    color = np.full([MAX_OBJECTS], -1, np.int32)
    size = np.full([MAX_OBJECTS], -1, np.int32)
    center = np.zeros([MAX_OBJECTS, 2], np.float32)
    rotation = np.zeros([MAX_OBJECTS], np.float32)
    for k, obj in enumerate(objects):
        shape[k] = SHAPES.index(obj['shape'])
        color[k] = COLOR_NAMES.index(obj['color'])
        size[k] = SIZES.index(obj['size'])
        center[k] = obj['center']
        rotation[k] = obj.get('rotation', 0.0)
    relation = scene.get('relation')
    return {
        'background': BACKGROUND_NAMES.index(scene['background']),
        'relation': RELATION_LABELS.index(relation if relation is not None else 'none'),
        'num_objects': len(objects),
        'shape': shape,
        'color': color,
        'size': size,
        'center': center,
        'rotation': rotation,
        'template': int(scene.get('template', 0)),
    }


def _label(value: Any, names: Sequence[str]) -> str:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        if value not in names:
            raise ValueError(f'{value!r} not in {names}')
        return value
    return names[int(value)]


def decode_scene(record_scene: Mapping[str, Any]) -> dict:
    """The `scene` feature of a record (as returned by `tfds.data_source`) -> scene dict.

    Inverse of `encode_scene`: class labels may be ints (numpy or Python) or names.
    """
    n = int(record_scene['num_objects'])
    shape = np.asarray(record_scene['shape'])
    color = np.asarray(record_scene['color'])
    size = np.asarray(record_scene['size'])
    center = np.asarray(record_scene['center'], np.float32)
    rotation = np.asarray(record_scene['rotation'], np.float32)
    objects = [{'shape': SHAPES[int(shape[k])], 'color': COLOR_NAMES[int(color[k])], 'size': SIZES[int(size[k])],
                'center': (float(center[k, 0]), float(center[k, 1])), 'rotation': float(rotation[k])}
               for k in range(n)]
    relation = _label(record_scene['relation'], RELATION_LABELS)
    return {'background': _label(record_scene['background'], BACKGROUND_NAMES), 'objects': objects,
            'relation': None if relation == 'none' else relation, 'template': int(record_scene['template'])}


def make_example(seed: int, split: str, index: int, resolutions: Sequence[int]) -> tuple[int, dict[str, Any]]:
    """Generates example `index` of `split`: (index, {'caption', 'scene', 'image_<R>': PNG bytes}).

    A top-level, picklable function of (seed, split, index) only, so examples can be generated in
    any order or in worker processes.
    """
    scene = scene_for_example(seed, split, index)
    example: dict[str, Any] = {'caption': scene_caption(scene), 'scene': encode_scene(scene)}
    for r in resolutions:
        example[f'image_{r}'] = render_scene_png(scene, r)
    return index, example
