"""Per-image PSNR and SSIM (numpy + scipy only), used to evaluate the upsamplers.

Images are arrays [..., H, W, C] (uint8 or float) on a scale given by `data_range` (255 for uint8).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: SSIM constants (Wang et al. 2004) and Gaussian window: sigma 1.5 truncated at 3.5 sigma (radius 5, i.e. an
#: 11x11 window), matching scikit-image's ``structural_similarity(gaussian_weights=True, sigma=1.5,
#: use_sample_covariance=False)``.
SSIM_K1: float = 0.01
SSIM_K2: float = 0.03
SSIM_SIGMA: float = 1.5
SSIM_TRUNCATE: float = 3.5
SSIM_WIN_SIZE: int = 2 * int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5) + 1  # 11


def _check(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"images must have the same shape, got {a.shape} and {b.shape}")
    if a.ndim < 3:
        raise ValueError(f"images must be [..., H, W, C], got shape {a.shape}")
    return a.astype(np.float64), b.astype(np.float64)


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """Peak signal-to-noise ratio in dB per image.

    a, b: [..., H, W, C], uint8 or float, same shape. Returns float64 of shape ``a.shape[:-3]`` (a 0-d array
    for a single image): ``10 * log10(data_range**2 / MSE)``, and +inf where the images are identical.
    """
    a, b = _check(a, b)
    mse = np.mean((a - b) ** 2, axis=(-3, -2, -1))
    with np.errstate(divide="ignore"):
        return np.asarray(10.0 * np.log10(data_range**2 / mse), dtype=np.float64)


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """Structural similarity (Wang et al. 2004) per image.

    a, b: [..., H, W, C], uint8 or float, same shape, with H, W >= 11. Local statistics use a Gaussian window
    (sigma 1.5, radius 5, reflect boundary) and population (not sample) covariances; the SSIM map is computed
    per channel, its border of width 5 is cropped, and the rest is averaged over pixels and channels, as
    scikit-image's ``structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=data_range, channel_axis=-1)``. Returns float64 of shape ``a.shape[:-3]``.
    """
    a, b = _check(a, b)
    h, w = a.shape[-3:-1]
    if h < SSIM_WIN_SIZE or w < SSIM_WIN_SIZE:
        raise ValueError(f"ssim needs images of at least {SSIM_WIN_SIZE}x{SSIM_WIN_SIZE}, got shape {a.shape}")
    sigma = (0.0,) * (a.ndim - 3) + (SSIM_SIGMA, SSIM_SIGMA, 0.0)

    def filt(x: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(x, sigma=sigma, mode="reflect", truncate=SSIM_TRUNCATE)

    ux, uy = filt(a), filt(b)
    uxx, uyy, uxy = filt(a * a), filt(b * b), filt(a * b)
    vx = uxx - ux * ux
    vy = uyy - uy * uy
    vxy = uxy - ux * uy
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    pad = (SSIM_WIN_SIZE - 1) // 2
    s = s[..., pad : h - pad, pad : w - pad, :]
    return np.asarray(s.mean(axis=(-3, -2, -1), dtype=np.float64), dtype=np.float64)
