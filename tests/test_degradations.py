"""Tests for dalle2_jax.data.degradations and dalle2_jax.image_metrics (numpy only, fast)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dalle2_jax.data import degradations as D
from dalle2_jax.image_metrics import psnr, ssim


def _textured(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A deterministic uint8 [h, w, 3] image with edges, gradients and fine texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx // 4 + yy // 4) % 2) * 200],
                    axis=-1).astype(np.float64)
    base += rng.normal(0, 20, size=(h, w, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ kernels


@pytest.mark.parametrize("size,sigma", [(3, 0.6), (7, 1.5), (21, 3.0), (1, 1.0)])
def test_gaussian_kernel_normalized_symmetric(size, sigma):
    k = D.gaussian_kernel(size, sigma)
    assert k.shape == (size, size) and k.dtype == np.float32
    assert abs(float(k.sum()) - 1.0) < 1e-5
    np.testing.assert_allclose(k, k.T, atol=1e-7)
    np.testing.assert_allclose(k, k[::-1, :], atol=1e-7)
    np.testing.assert_allclose(k, k[:, ::-1], atol=1e-7)
    assert k[size // 2, size // 2] == k.max()


def test_anisotropic_kernel():
    k = D.anisotropic_gaussian_kernel(15, 3.0, 1.0, 0.0)
    assert k.shape == (15, 15) and k.dtype == np.float32
    assert abs(float(k.sum()) - 1.0) < 1e-5
    # theta = 0: wider along x (columns) than along y (rows).
    assert k[7, 10] > k[10, 7]
    # Rotating by 90 degrees swaps the axes.
    k90 = D.anisotropic_gaussian_kernel(15, 3.0, 1.0, math.pi / 2)
    np.testing.assert_allclose(k90, k.T, atol=1e-6)
    # Equal sigmas -> isotropic kernel, whatever theta.
    np.testing.assert_allclose(D.anisotropic_gaussian_kernel(9, 1.3, 1.3, 0.7), D.gaussian_kernel(9, 1.3), atol=1e-6)


def test_gaussian_blur_constant_unchanged():
    img = np.full((16, 20, 3), 137, np.uint8)
    img[..., 1] = 3
    out = D.gaussian_blur(img)
    assert out.dtype == np.uint8 and out.shape == img.shape
    np.testing.assert_array_equal(out, img)
    # Also with a kernel much larger than the image.
    np.testing.assert_array_equal(D.blur(img, D.gaussian_kernel(21, 3.0)), img)


def test_blur_spreads_point_and_keeps_mass():
    img = np.zeros((21, 21, 3), np.float32)
    img[10, 10, :] = 1.0
    out = D.blur(img, D.gaussian_kernel(5, 1.0))
    assert out.dtype == np.float32 and out.shape == img.shape
    assert out[10, 10, 0] < 1.0
    for dy, dx in [(0, 1), (1, 0), (0, -1), (-1, 0), (1, 1)]:
        assert out[10 + dy, 10 + dx, 0] > 0.0
    np.testing.assert_allclose(out.sum(axis=(0, 1)), 1.0, atol=1e-5)
    # uint8 path: rounded, clipped and same dtype.
    u = np.zeros((21, 21, 3), np.uint8)
    u[10, 10] = 255
    ou = D.gaussian_blur(u, sigma=0.6, size=3)
    assert ou.dtype == np.uint8
    assert 0 < ou[10, 11, 0] < ou[10, 10, 0] < 255


# ------------------------------------------------------------------------------------------------ resizing


def test_resize_modes_shapes():
    img = _textured(32, 48)
    for mode in ("nearest", "bilinear", "bicubic", "area"):
        out = D.resize(img, (16, 20), mode)
        assert out.shape == (16, 20, 3) and out.dtype == np.uint8
    with pytest.raises(ValueError):
        D.resize(img, (16, 16), "lanczos7")


def test_downsample_and_upsample():
    img = _textured(64, 32)
    lo = D.downsample(img, 4)
    assert lo.shape == (16, 8, 3) and lo.dtype == np.uint8
    const = np.full((64, 64, 3), (10, 200, 77), np.uint8)
    np.testing.assert_array_equal(D.downsample(const, 4), np.full((16, 16, 3), (10, 200, 77), np.uint8))
    with pytest.raises(ValueError, match="divisible"):
        D.downsample(_textured(30, 32), 4)
    with pytest.raises(ValueError, match="divisible"):
        D.downsample(_textured(32, 30), 4)
    up = D.upsample_bicubic(lo, 4)
    assert up.shape == (64, 32, 3) and up.dtype == np.uint8


# ------------------------------------------------------------------------------------------------ bsr_degrade


def test_bsr_degrade_deterministic():
    img = _textured(64, 64)
    a = D.bsr_degrade(img, np.random.default_rng(123))
    b = D.bsr_degrade(img, np.random.default_rng(123))
    assert a.tobytes() == b.tobytes()
    outs = [D.bsr_degrade(img, np.random.default_rng(s)).tobytes() for s in range(4)]
    assert len(set(outs)) > 1


def test_bsr_degrade_input_not_modified_and_strength_zero():
    img = _textured(32, 32)
    before = img.copy()
    out = D.bsr_degrade(img, np.random.default_rng(0), strength=0.0)
    np.testing.assert_array_equal(out, img)
    D.bsr_degrade(img, np.random.default_rng(1))
    np.testing.assert_array_equal(img, before)
    with pytest.raises(ValueError):
        D.bsr_degrade(img, np.random.default_rng(0), strength=-1.0)


@pytest.mark.parametrize("size", [8, 13, 256])
def test_bsr_degrade_shapes_and_changes(size):
    img = _textured(size, size)
    n = 3 if size == 256 else 8
    changed = 0
    for seed in range(n):
        out = D.bsr_degrade(img, np.random.default_rng(seed))
        assert out.dtype == np.uint8 and out.shape == img.shape
        assert out.min() >= 0 and out.max() <= 255
        if np.abs(out.astype(np.int32) - img.astype(np.int32)).mean() > 0:
            changed += 1
    assert changed >= n - 1


def test_bsr_degrade_tiny_images():
    for h, w in [(1, 1), (2, 5), (4, 4), (8, 3)]:
        img = _textured(h, w)
        for seed in range(4):
            out = D.bsr_degrade(img, np.random.default_rng(seed))
            assert out.shape == (h, w, 3) and out.dtype == np.uint8


def test_bsr_degrade_strength_monotone_on_average():
    img = _textured(48, 48)

    def err(strength):
        return np.mean([np.abs(D.bsr_degrade(img, np.random.default_rng(s), strength=strength).astype(float) - img)
                        .mean() for s in range(6)])

    assert err(0.2) < err(1.0)


# ------------------------------------------------------------------------------------------------ metrics


def test_psnr():
    x = _textured(32, 32)
    assert psnr(x, x) == np.inf
    x2 = np.clip(x, 0, 250)  # so that +5 never clips
    y = x2 + np.uint8(5)
    assert abs(float(psnr(x2, y)) - 20 * math.log10(255 / 5)) < 1e-6
    assert abs(float(psnr(x2.astype(np.float32) / 255, y.astype(np.float32) / 255, data_range=1.0))
               - 20 * math.log10(255 / 5)) < 1e-4
    with pytest.raises(ValueError, match=r"\(32, 32, 3\)"):
        psnr(x, x[:16])


def test_ssim_identity_and_noise():
    x = _textured(48, 48)
    assert abs(float(ssim(x, x)) - 1.0) < 1e-12
    rng = np.random.default_rng(0)
    prev = 1.0
    for sigma in (5, 15, 40):
        noisy = np.clip(x + rng.normal(0, sigma, x.shape), 0, 255).astype(np.uint8)
        s = float(ssim(x, noisy))
        assert s < prev
        prev = s
    assert prev < 0.9


def test_ssim_unrelated_near_zero():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert abs(float(ssim(a, b))) < 0.1


def test_metrics_batch_shapes():
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (4, 24, 20, 3), dtype=np.uint8)
    b = a.copy()
    b[1] = np.clip(b[1].astype(int) + 9, 0, 255)
    b[2] = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    p, s = psnr(a, b), ssim(a, b)
    assert p.shape == (4,) and s.shape == (4,)
    assert p.dtype == np.float64 and s.dtype == np.float64
    assert np.isinf(p[0]) and np.isinf(p[3]) and np.isfinite(p[1:3]).all()
    np.testing.assert_allclose(s[[0, 3]], 1.0)
    for i in range(4):  # batched == per image
        np.testing.assert_allclose(s[i], ssim(a[i], b[i]), rtol=1e-12)
        np.testing.assert_allclose(p[i], psnr(a[i], b[i]), rtol=1e-12)
    # Extra leading dims.
    assert ssim(a.reshape(2, 2, 24, 20, 3), b.reshape(2, 2, 24, 20, 3)).shape == (2, 2)
    with pytest.raises(ValueError, match="same shape"):
        ssim(a, b[:, :20])
    with pytest.raises(ValueError):
        ssim(a[:, :8, :8], b[:, :8, :8])


def test_ssim_matches_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(3)
    x = _textured(40, 36)
    y = np.clip(x + rng.normal(0, 12, x.shape), 0, 255).astype(np.uint8)
    ref = metrics.structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                        data_range=255, channel_axis=-1)
    assert abs(float(ssim(x, y)) - ref) < 1e-9
