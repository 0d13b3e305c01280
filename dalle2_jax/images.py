"""Image preprocessing shared by training data, inference and the CLIP tools.

`resize_shortest_center_crop` is CLIP's preprocessing (open_clip / OpenAI: torchvision `Resize(S)` with
bicubic interpolation on a PIL image, then `CenterCrop(S)`), reproduced exactly on the uint8 image, so an
imported CLIP sees the pixels it saw in its reference implementation. The mean/std normalisation is
applied inside the model (models/clip.py), on [0, 1] images.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable

import numpy as np
from PIL import Image

from dalle2_jax.inference.errors import InputError


WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
_NAMED = {"white": WHITE, "black": BLACK, "gray": (128, 128, 128), "grey": (128, 128, 128)}


def parse_color(text: str) -> tuple[int, int, int]:
    """'white', 'black', 'gray', '#rrggbb' or 'r,g,b' (0..255) -> an RGB tuple; ValueError otherwise."""
    t = str(text).strip().lower()
    if t in _NAMED:
        return _NAMED[t]
    if re.fullmatch(r"#[0-9a-f]{6}", t):
        return tuple(int(t[i: i + 2], 16) for i in (1, 3, 5))
    parts = t.split(",")
    if len(parts) == 3 and all(p.strip().isdigit() and int(p) <= 255 for p in parts):
        return tuple(int(p) for p in parts)
    raise ValueError(f"{text!r} is not a colour; use white, black, gray, #rrggbb or r,g,b (0-255)")


def _flatten(rgba: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """uint8 [H, W, 4] -> [H, W, 3]: the colours composited over `background` by their alpha."""
    alpha = rgba[..., 3:].astype(np.float32) / 255.0
    bg = np.asarray(background, np.float32)
    out = rgba[..., :3].astype(np.float32) * alpha + bg * (1.0 - alpha)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def load_image(source: Any, what: str = "image", background: tuple[int, int, int] = WHITE,
               warn: Callable[[str], None] | None = None) -> np.ndarray:
    """A path, PIL image or array -> uint8 [H, W, 3]. Grayscale, palette and CMYK images are converted to
    RGB; an image with transparency (RGBA, LA, a palette with a transparent colour, a [H, W, 4] array) is
    composited over `background` (white by default), so colours hidden under alpha 0 do not show through;
    of a multi-frame file (GIF, APNG, TIFF pages) the first frame is used. Both are reported through
    `warn` (one line each) when given. InputError if the file is missing, empty or unreadable."""
    from PIL import UnidentifiedImageError

    def note(message: str) -> None:
        if warn is not None:
            warn(message)

    if isinstance(source, np.ndarray):
        a = source
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=-1)
        if a.ndim != 3 or a.shape[-1] not in (3, 4):
            raise InputError(f"the {what} array must be [H, W, 3], got shape {a.shape}")
        if a.dtype != np.uint8:
            raise InputError(f"the {what} array must be uint8, got {a.dtype}")
        if a.shape[-1] == 4:
            if (a[..., 3] < 255).any():
                note(f"the {what} array has transparency; composited over rgb{tuple(background)}")
            return _flatten(a, background)
        return np.ascontiguousarray(a)
    name = repr(source) if isinstance(source, str) else f"the {what}"
    try:
        from dalle2_jax import fileio

        if isinstance(source, Image.Image):
            return _pil_to_rgb(source, what, name, background, note)
        if isinstance(source, str) and fileio.is_remote(source):
            import io

            source = io.BytesIO(fileio.read_bytes(source))
        with Image.open(source) as im:
            return _pil_to_rgb(im, what, name, background, note)
    except FileNotFoundError:
        raise InputError(f"{what} {name}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{what} {name} is a directory, not an image file") from None
    except Image.DecompressionBombError as e:
        raise InputError(f"{what} {name} is too large to load ({e})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        empty = isinstance(source, str) and os.path.isfile(source) and os.path.getsize(source) == 0
        why = "an empty file" if empty else type(e).__name__
        raise InputError(f"{what} {name} is not a readable image ({why})") from None


def _pil_to_rgb(im: Image.Image, what: str, name: str, background: tuple[int, int, int],
                note: Callable[[str], None]) -> np.ndarray:
    frames = int(getattr(im, "n_frames", 1) or 1)
    if frames > 1:
        im.seek(0)
        note(f"{what} {name} has {frames} frames; using the first")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode in ("P", "L", "RGB", "I")
                                                                   and "transparency" in im.info)
    if not has_alpha:
        return np.asarray(im.convert("RGB"))
    rgba = np.asarray(im.convert("RGBA"))
    if (rgba[..., 3] < 255).any():
        note(f"{what} {name} has transparency; composited over rgb{tuple(background)}")
    return _flatten(rgba, background)


def save_png(path: str, image: np.ndarray) -> None:
    """Writes a uint8 [H, W, 3] image as a PNG at `path` (local or remote), creating the directory."""
    import io

    from dalle2_jax import fileio

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
    fileio.write_bytes(path, buf.getvalue())


def to_pil_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """A PIL image or a uint8 array [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] -> an RGB PIL image."""
    if isinstance(image, np.ndarray):
        arr = image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image
        image = Image.fromarray(np.asarray(arr, np.uint8))
    return image.convert("RGB")


def resize_shortest_center_crop(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """image -> uint8 [size, size, 3]: RGB, the shortest side resized to `size` (bicubic; PIL antialiases
    when shrinking), the longest to floor(size * long / short), then the center `size` x `size` crop with
    torchvision's offsets (round half to even of (side - size) / 2). An image already `size` on its
    shortest side is not resampled."""
    img = to_pil_rgb(image)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    if (new_w, new_h) != (size, size):
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


def resize_square(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 square images [N, R, R, 3] -> [N, size, size, 3] with the same bicubic resampling (a no-op when
    R == size): how generated images reach a CLIP whose input size differs from theirs."""
    if images.shape[1] == size:
        return images
    return np.stack([resize_shortest_center_crop(im, size) for im in images])
