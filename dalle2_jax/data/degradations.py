"""Image degradations for the upsampler stages (numpy + scipy + PIL only).

Used per example inside grain worker processes (to corrupt the low-resolution conditioning image while
training the upsamplers) and by evaluation (degradation-free downsampling and the bicubic baseline).

Unless said otherwise images are uint8 numpy arrays of shape [H, W, 3].

* The 64->256 upsampler corrupts its low-res input with `gaussian_blur` (kernel 3, sigma 0.6), as in the
  DALL-E 2 paper.
* The 256->1024 upsampler uses `bsr_degrade`, a BSR-style (BSRGAN, Zhang et al. 2021) random mix of blur,
  resize, noise and JPEG compression that keeps the image size.
* `downsample` / `upsample_bicubic` make the low-res input from a true high-res image at evaluation and the
  bicubic baseline to compare against.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image
from scipy import signal

# ----------------------------------------------------------------------------------------------------------
# bsr_degrade ranges and probabilities. Ranges are [lo, hi] (uniform) unless said otherwise; "* strength"
# means the drawn value is scaled by the `strength` argument (1.0 = the ranges as written).
# ----------------------------------------------------------------------------------------------------------

#: Probability of each operation being applied (each independently), in an order drawn per call.
BSR_BLUR_PROB: float = 0.9
BSR_RESIZE_PROB: float = 0.7
BSR_NOISE_PROB: float = 0.7
BSR_JPEG_PROB: float = 0.9

#: (a) Blur: odd kernel size drawn uniformly from {7, 9, ..., 21}, clamped to the largest odd size that is not
#: bigger than the image's shorter side (so an 8x8 image gets kernel 7, a 4x4 image kernel 3).
BSR_BLUR_KERNEL_SIZES: tuple[int, int] = (7, 21)
#: Gaussian standard deviation(s) in pixels, * strength (clamped below by BSR_MIN_BLUR_SIGMA).
BSR_BLUR_SIGMA_RANGE: tuple[float, float] = (0.1, 3.0)
#: Probability that the blur kernel is an anisotropic (rotated) Gaussian rather than an isotropic one.
BSR_ANISO_PROB: float = 0.5
#: Smallest blur sigma actually used (a Gaussian with sigma -> 0 is a delta; avoids division by zero).
BSR_MIN_BLUR_SIGMA: float = 1e-3

#: (b) Resize: down by a scale in [lo, hi) (the distance from 1 is * strength), then back up to the original
#: size. The down and up interpolation modes are each drawn uniformly from BSR_RESIZE_MODES.
BSR_RESIZE_SCALE_RANGE: tuple[float, float] = (0.5, 1.0)
BSR_RESIZE_MODES: tuple[str, ...] = ("nearest", "bilinear", "bicubic", "area")

#: (c) Additive Gaussian noise: sigma in [lo, hi] on the 0..255 scale, * strength.
BSR_NOISE_SIGMA_RANGE: tuple[float, float] = (1.0, 25.0)
#: Probability that the noise is per-channel (colour) noise rather than one grayscale field shared by channels.
BSR_COLOR_NOISE_PROB: float = 0.5

#: (d) JPEG compression quality in [lo, hi] (integer). With strength s the used quality is
#: round(100 - s * (100 - q)), clamped to [BSR_MIN_JPEG_QUALITY, hi], so strength 1 gives the range as written.
BSR_JPEG_QUALITY_RANGE: tuple[int, int] = (30, 95)
BSR_MIN_JPEG_QUALITY: int = 5

#: blur uses a direct sum of shifted copies for kernels with at most this many taps, an FFT above.
_DIRECT_CONV_MAX_TAPS = 49

_PIL_MODES = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
}


# ----------------------------------------------------------------------------------------------------------
# Kernels and blur
# ----------------------------------------------------------------------------------------------------------


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    if size < 1:
        raise ValueError(f"kernel size must be >= 1, got {size}")
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    yy, xx = np.meshgrid(r, r, indexing="ij")
    return xx, yy


def gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    """Isotropic Gaussian kernel centred in a [size, size] grid.

    Returns a float32 array of shape [size, size] that sums to 1.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    xx, yy = _grid(size)
    k = np.exp(-(xx**2 + yy**2) / (2.0 * sigma**2))
    return (k / k.sum()).astype(np.float32)


def anisotropic_gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """Anisotropic Gaussian kernel with a rotated covariance, as in BSRGAN.

    The covariance is ``R diag(sigma_x**2, sigma_y**2) R^T`` with ``R`` the rotation by `theta` radians
    (x along columns, y along rows). Returns a float32 array of shape [size, size] that sums to 1.
    """
    if sigma_x <= 0 or sigma_y <= 0:
        raise ValueError(f"sigmas must be > 0, got sigma_x={sigma_x}, sigma_y={sigma_y}")
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    cov = rot @ np.diag([sigma_x**2, sigma_y**2]) @ rot.T
    inv = np.linalg.inv(cov)
    xx, yy = _grid(size)
    q = inv[0, 0] * xx**2 + (inv[0, 1] + inv[1, 0]) * xx * yy + inv[1, 1] * yy**2
    k = np.exp(-0.5 * q)
    return (k / k.sum()).astype(np.float32)


def blur(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """2-D convolution of each channel of `img` with `kernel`, with reflect padding (edge pixel not repeated).

    img: [H, W, C] or [H, W], uint8 or float. kernel: [kh, kw] float. Returns an array of the same shape and
    dtype as `img` (uint8 input is rounded and clipped to [0, 255]; float input stays float).
    """
    img = np.asarray(img)
    kernel = np.asarray(kernel, dtype=np.float64)
    if kernel.ndim != 2:
        raise ValueError(f"kernel must be 2-D, got shape {kernel.shape}")
    if img.ndim not in (2, 3):
        raise ValueError(f"img must be [H, W] or [H, W, C], got shape {img.shape}")
    kh, kw = kernel.shape
    ph, pw = kh // 2, kw // 2
    # float64 only where the input is float64; float32 is ample for uint8 (<= 255, rounded) and float32 input.
    work = np.float64 if img.dtype == np.float64 else np.float32
    x = img.astype(work)
    pad = [(ph, kh - 1 - ph), (pw, kw - 1 - pw)] + [(0, 0)] * (img.ndim - 2)
    # numpy 'reflect' mirrors without repeating the edge and handles pads wider than the image.
    mode = "reflect" if min(img.shape[:2]) > 1 else "edge"
    x = np.pad(x, pad, mode=mode)
    h, w = img.shape[:2]
    if kh * kw <= _DIRECT_CONV_MAX_TAPS:
        # Small kernels: a direct sum of shifted copies is faster than an FFT.
        flipped = kernel[::-1, ::-1].astype(work)
        out = np.zeros(img.shape, work)
        tmp = np.empty(img.shape, work)
        for i in range(kh):
            for j in range(kw):
                if flipped[i, j] != 0.0:
                    np.multiply(x[i : i + h, j : j + w], flipped[i, j], out=tmp)
                    out += tmp
    else:
        k = kernel if img.ndim == 2 else kernel[:, :, None]
        out = signal.fftconvolve(x, k, mode="valid", axes=(0, 1))
    if img.dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out.astype(img.dtype)


def gaussian_blur(img: np.ndarray, sigma: float = 0.6, size: int = 3) -> np.ndarray:
    """`blur` with `gaussian_kernel(size, sigma)`; same shape and dtype as `img` ([H, W, 3] uint8 usually).

    The defaults are the 64->256 upsampler's low-res corruption (kernel 3, sigma 0.6; DALL-E 2 paper).
    """
    return blur(img, gaussian_kernel(size, sigma))


# ----------------------------------------------------------------------------------------------------------
# Resizing
# ----------------------------------------------------------------------------------------------------------


def resize(img: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """Resize a uint8 [H, W, 3] (or [H, W]) image to `size` = (H', W') with PIL, antialiased.

    mode: "nearest", "bilinear", "bicubic" or "area" (PIL BOX). Returns uint8 [H', W', 3] (or [H', W']).
    """
    if mode not in _PIL_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; expected one of {sorted(_PIL_MODES)}")
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise ValueError(f"target size must be positive, got {size}")
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f"resize expects a uint8 image, got dtype {img.dtype}")
    if img.shape[:2] == (h, w):
        return img.copy()
    out = Image.fromarray(img).resize((w, h), resample=_PIL_MODES[mode], reducing_gap=None)
    return np.asarray(out, dtype=np.uint8)


def downsample(img: np.ndarray, factor: int) -> np.ndarray:
    """Degradation-free antialiased bicubic downsampling: uint8 [H, W, 3] -> uint8 [H/factor, W/factor, 3].

    Used to make an upsampler's low-res input from a true high-res image at evaluation. Raises ValueError if
    H or W is not divisible by `factor`.
    """
    if factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor}")
    h, w = img.shape[:2]
    if h % factor or w % factor:
        raise ValueError(f"image size {h}x{w} (HxW) is not divisible by the downsampling factor {factor}")
    return resize(img, (h // factor, w // factor), "bicubic")


def upsample_bicubic(img: np.ndarray, factor: int) -> np.ndarray:
    """Bicubic upsampling (the evaluation baseline): uint8 [H, W, 3] -> uint8 [H*factor, W*factor, 3]."""
    if factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor}")
    h, w = img.shape[:2]
    return resize(img, (h * factor, w * factor), "bicubic")


# ----------------------------------------------------------------------------------------------------------
# BSR-style degradation
# ----------------------------------------------------------------------------------------------------------


def _bsr_blur(img: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    lo, hi = BSR_BLUR_KERNEL_SIZES
    kmax = min(hi, min(img.shape[:2]))
    if kmax % 2 == 0:
        kmax -= 1
    kmin = min(lo, kmax)
    size = 2 * int(rng.integers(kmin // 2, kmax // 2 + 1)) + 1
    s_lo, s_hi = BSR_BLUR_SIGMA_RANGE

    def draw_sigma() -> float:
        return max(float(rng.uniform(s_lo, s_hi)) * strength, BSR_MIN_BLUR_SIGMA)

    if rng.random() < BSR_ANISO_PROB:
        sx, sy = draw_sigma(), draw_sigma()
        theta = float(rng.uniform(0.0, math.pi))
        kernel = anisotropic_gaussian_kernel(size, sx, sy, theta)
    else:
        kernel = gaussian_kernel(size, draw_sigma())
    return blur(img, kernel)


def _bsr_resize(img: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    h, w = img.shape[:2]
    scale = float(rng.uniform(*BSR_RESIZE_SCALE_RANGE))
    scale = max(1.0 - strength * (1.0 - scale), 0.0)
    down_mode = BSR_RESIZE_MODES[int(rng.integers(len(BSR_RESIZE_MODES)))]
    up_mode = BSR_RESIZE_MODES[int(rng.integers(len(BSR_RESIZE_MODES)))]
    small = (max(1, round(h * scale)), max(1, round(w * scale)))
    return resize(resize(img, small, down_mode), (h, w), up_mode)


def _bsr_noise(img: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    sigma = float(rng.uniform(*BSR_NOISE_SIGMA_RANGE)) * strength
    if rng.random() < BSR_COLOR_NOISE_PROB:
        noise = rng.standard_normal(img.shape)
    else:
        noise = rng.standard_normal(img.shape[:2])[..., None]
    out = img.astype(np.float64) + sigma * noise
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _bsr_jpeg(img: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    q_lo, q_hi = BSR_JPEG_QUALITY_RANGE
    q = int(rng.integers(q_lo, q_hi + 1))
    q = int(np.clip(round(100 - strength * (100 - q)), BSR_MIN_JPEG_QUALITY, q_hi))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=q)
    buf.seek(0)
    with Image.open(buf) as decoded:
        out = np.asarray(decoded.convert("RGB"), dtype=np.uint8)
    return out


_BSR_OPS = (
    (_bsr_blur, BSR_BLUR_PROB),
    (_bsr_resize, BSR_RESIZE_PROB),
    (_bsr_noise, BSR_NOISE_PROB),
    (_bsr_jpeg, BSR_JPEG_PROB),
)


def bsr_degrade(img: np.ndarray, rng: np.random.Generator, *, strength: float = 1.0) -> np.ndarray:
    """BSR-style random degradation (BSRGAN; DALL-E 2's 256->1024 upsampler) that keeps the image size.

    img: uint8 [H, W, 3]. Returns uint8 [H, W, 3]. In an order drawn from `rng`, each of these is applied
    with its own probability (see the BSR_* constants at the top of this module): (a) isotropic or
    anisotropic Gaussian blur, (b) resize down by a random scale and mode and back up with a random mode,
    (c) additive Gaussian colour or grayscale noise, (d) JPEG compression. `strength` scales the blur sigmas,
    the resize scale's distance from 1, the noise sigma and the JPEG quality loss; `strength=0` returns the
    input unchanged (a copy). The output depends only on `img`, `strength` and the state of `rng`.
    """
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"bsr_degrade expects a uint8 [H, W, 3] image, got {img.dtype} {img.shape}")
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    if strength == 0:
        return img.copy()
    out = img
    for i in rng.permutation(len(_BSR_OPS)):
        op, prob = _BSR_OPS[int(i)]
        if rng.random() < prob:
            out = op(out, rng, strength)
    return out if out is not img else img.copy()
