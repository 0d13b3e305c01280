"""Image preprocessing shared by training data, inference and the CLIP tools.

`resize_shortest_center_crop` is CLIP's preprocessing (open_clip / OpenAI: torchvision `Resize(S)` with
bicubic interpolation on a PIL image, then `CenterCrop(S)`), reproduced exactly on the uint8 image, so an
imported CLIP sees the pixels it saw in its reference implementation. The mean/std normalisation is
applied inside the model (models/clip.py), on [0, 1] images.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from dalle2_jax.inference.errors import InputError


def load_image(source: Any, what: str = "image") -> np.ndarray:
    """A path, PIL image or array -> uint8 [H, W, 3] (grayscale and alpha converted). InputError if unreadable."""
    from PIL import UnidentifiedImageError

    if isinstance(source, np.ndarray):
        a = source
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=-1)
        if a.ndim != 3 or a.shape[-1] not in (3, 4):
            raise InputError(f"the {what} array must be [H, W, 3], got shape {a.shape}")
        if a.dtype != np.uint8:
            raise InputError(f"the {what} array must be uint8, got {a.dtype}")
        return np.ascontiguousarray(a[..., :3])
    if isinstance(source, Image.Image):
        return np.asarray(source.convert("RGB"))
    try:
        from dalle2_jax import fileio

        if isinstance(source, str) and fileio.is_remote(source):
            import io

            source = io.BytesIO(fileio.read_bytes(source))
        with Image.open(source) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise InputError(f"{what} {source!r}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"{what} {source!r} is not a readable image ({type(e).__name__})") from None


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
