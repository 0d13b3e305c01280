"""Noise schedules, the `Diffusion` constants, and timestep respacing.

Every constant is computed in float64 numpy and stored as a read-only float32 numpy array, so a jitted function
that closes over a `Diffusion` embeds a few small constants and nothing else. Index a constant with a traced
timestep through `gaussian.extract`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

SCHEDULES = ("cosine", "linear")
MODEL_OUTPUTS = ("eps", "x0", "v")
RESPACE_KINDS = ("uniform", "ddim")


def cosine_alpha_bar(s: np.ndarray | float, offset: float = 0.008) -> np.ndarray:
    """Unnormalised cosine f(s) = cos^2(((s + offset) / (1 + offset)) * pi / 2) of Nichol & Dhariwal, s in [0, 1]."""
    return np.cos((np.asarray(s, np.float64) + offset) / (1 + offset) * math.pi / 2) ** 2


def shift_betas(betas: np.ndarray, shift: float) -> np.ndarray:
    """The schedule with its log-SNR moved down by 2 log(shift) at every step (Hoogeboom et al. 2023, "simple
    diffusion": logSNR'(t) = logSNR(t) - 2 log s), as betas float64. shift > 1 gives every step more noise,
    for images whose content is decided only at high noise (large flat areas: a shape of many pixels stays
    visible through noise that hides single pixels); 1 returns the betas unchanged."""
    if shift <= 0:
        raise ValueError(f"schedule shift must be positive, got {shift!r}")
    if shift == 1.0:
        return betas
    abar = np.cumprod(1.0 - np.asarray(betas, np.float64))
    log_snr = np.log(abar) - np.log1p(-abar) - 2.0 * math.log(shift)
    abar = 1.0 / (1.0 + np.exp(-log_snr))
    prev = np.concatenate([[1.0], abar[:-1]])
    return np.minimum(1.0 - abar / prev, 0.999)


def betas_for(name: str, num_steps: int, shift: float = 1.0) -> np.ndarray:
    """Betas [num_steps] float64 for schedule `name`, log-SNR shifted by `shift_betas` when shift != 1.

    - ``cosine``: beta_t = min(1 - f((t+1)/T) / f(t/T), 0.999) with f from `cosine_alpha_bar` (s = 0.008).
    - ``linear``: DDPM's linspace(1e-4, 0.02) scaled by 1000 / num_steps (so any T gives the same curve), capped
      at 0.999 too (the cap only acts below 21 steps, where the scaled end would exceed 1).
    """
    return shift_betas(_betas_for(name, num_steps), float(shift))


def _betas_for(name: str, num_steps: int) -> np.ndarray:
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"diffusion num_steps must be a positive integer, got {num_steps!r}")
    if name == "cosine":
        t = np.arange(num_steps + 1, dtype=np.float64) / num_steps
        f = cosine_alpha_bar(t)
        return np.minimum(1.0 - f[1:] / f[:-1], 0.999)
    if name == "linear":
        scale = 1000.0 / num_steps
        return np.minimum(np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64), 0.999)
    raise ValueError(f"unknown diffusion schedule {name!r}; choose one of {SCHEDULES}")


def _frozen32(a: np.ndarray) -> np.ndarray:
    out = np.asarray(a, np.float32).copy()
    out.flags.writeable = False
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class Diffusion:
    """A Gaussian diffusion over N steps (possibly a respaced subset of an original T-step chain).

    All arrays are read-only numpy [N] float32 unless noted. `timesteps[i]` is the ORIGINAL timestep the model is
    called with at index i (the identity for an unspaced chain). Hashing is by identity, so a `Diffusion` can be
    a static argument of `jax.jit`.
    """

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    alphas_cumprod_next: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    log_betas_clipped: np.ndarray  # log of the "large" fixed variance: [posterior_variance[1], betas[1:]]
    alphas_cumprod_f64: np.ndarray  # float64 copy, kept so respacing stays exact
    timesteps: np.ndarray  # [N] int32, original timestep of each index
    original_num_steps: int
    model_output: str = "eps"
    learned_variance: bool = False
    schedule: str = "custom"

    @property
    def num_steps(self) -> int:
        """N, the number of steps of this (possibly respaced) chain."""
        return int(self.betas.shape[0])

    def __repr__(self) -> str:
        return (f"Diffusion(schedule={self.schedule!r}, num_steps={self.num_steps}, "
                f"original_num_steps={self.original_num_steps}, model_output={self.model_output!r}, "
                f"learned_variance={self.learned_variance})")


def diffusion_from_betas(betas: np.ndarray, *, model_output: str = "eps", learned_variance: bool = False,
                         timesteps: np.ndarray | None = None, original_num_steps: int | None = None,
                         schedule: str = "custom") -> Diffusion:
    """Build every constant of a `Diffusion` from betas [N] (computed in float64, stored as float32)."""
    if model_output not in MODEL_OUTPUTS:
        raise ValueError(f"diffusion model_output must be one of {MODEL_OUTPUTS}, got {model_output!r}")
    betas = np.asarray(betas, np.float64)
    if betas.ndim != 1 or betas.size == 0:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    if not (np.all(betas > 0) and np.all(betas <= 1)):
        raise ValueError("betas must lie in (0, 1]")
    n = betas.shape[0]
    if timesteps is None:
        timesteps = np.arange(n)
    timesteps = np.asarray(timesteps, np.int64)
    if timesteps.shape != (n,):
        raise ValueError(f"timesteps must have shape ({n},), got {timesteps.shape}")
    alphas = 1.0 - betas
    acp = np.cumprod(alphas)
    acp_prev = np.append(1.0, acp[:-1])
    acp_next = np.append(acp[1:], 0.0)
    post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
    # posterior_variance[0] is 0: clip the log at the value of step 1 (or beta_0 for a one-step chain).
    first = post_var[1] if n > 1 else betas[0]
    post_log_var = np.log(np.append(first, post_var[1:]))
    log_betas_clipped = np.log(np.append(first, betas[1:]))
    ts = timesteps.astype(np.int32)
    ts.flags.writeable = False
    acp64 = acp.copy()
    acp64.flags.writeable = False
    return Diffusion(
        betas=_frozen32(betas),
        alphas_cumprod=_frozen32(acp),
        alphas_cumprod_prev=_frozen32(acp_prev),
        alphas_cumprod_next=_frozen32(acp_next),
        sqrt_alphas_cumprod=_frozen32(np.sqrt(acp)),
        sqrt_one_minus_alphas_cumprod=_frozen32(np.sqrt(1.0 - acp)),
        sqrt_recip_alphas_cumprod=_frozen32(np.sqrt(1.0 / acp)),
        sqrt_recipm1_alphas_cumprod=_frozen32(np.sqrt(1.0 / acp - 1.0)),
        posterior_variance=_frozen32(post_var),
        posterior_log_variance_clipped=_frozen32(post_log_var),
        posterior_mean_coef1=_frozen32(betas * np.sqrt(acp_prev) / (1.0 - acp)),
        posterior_mean_coef2=_frozen32((1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp)),
        log_betas_clipped=_frozen32(log_betas_clipped),
        alphas_cumprod_f64=acp64,
        timesteps=ts,
        original_num_steps=int(original_num_steps if original_num_steps is not None else n),
        model_output=model_output,
        learned_variance=bool(learned_variance),
        schedule=schedule,
    )


def make_diffusion(schedule: str, num_steps: int, model_output: str = "eps",
                   learned_variance: bool = False, shift: float = 1.0) -> Diffusion:
    """A `Diffusion` over `num_steps` steps of the named schedule (``cosine`` or ``linear``), its log-SNR
    shifted down by 2 log(shift) (`shift_betas`; 1 = the schedule as published).

    model_output: what the model predicts, ``eps``, ``x0`` or ``v``. learned_variance: the model output carries a
    second half on the last axis, the Improved-DDPM variance interpolation value v in [-1, 1].
    """
    return diffusion_from_betas(betas_for(schedule, num_steps, shift), model_output=model_output,
                                learned_variance=learned_variance,
                                schedule=schedule if shift == 1.0 else f"{schedule}@shift{shift:g}")


def karlo_timesteps(n: int, num_steps: int = 1000) -> np.ndarray:
    """round(arange(n) * (T - 1) / (n - 1)) as int [n], increasing (karlo/diffusers' unCLIP inference steps)."""
    if n < 1 or n > num_steps:
        raise ValueError(f"sampling steps must be in [1, {num_steps}], got {n}")
    if n == 1:
        return np.array([num_steps - 1], np.int64)
    return np.round(np.arange(n) * (num_steps - 1) / (n - 1)).astype(np.int64)


def unclip_diffusion(steps: int, *, model_output: str = "eps", learned_variance: bool = False,
                     num_train_steps: int = 1000) -> Diffusion:
    """karlo's sampling chain with diffusers' UnCLIPScheduler arithmetic: the cosine schedule over
    `num_train_steps`, respaced to `karlo_timesteps(steps)`, every constant computed as the scheduler computes
    it, in float32 (betas from float64 rounded to float32, alphas = 1 - betas and their cumulative product in
    float32; per kept step beta = 1 - abar_t / abar_prev, or the stored beta_t where the previous kept step is
    t - 1, the posterior coefficients and variance from those float32 values; x0 = x_t / sqrt(abar) -
    sqrt(1 - abar) / sqrt(abar) eps).

    Mathematically this is `respace(make_diffusion("cosine", num_train_steps, ...), steps)`; numerically the
    float32 rounding of diffusers' constants moves a step by up to ~1e-4 at t = 999 (1 - 0.999 in float32) and
    ~1e-3 relative at t = 0 (1 - abar_0 loses 3 digits), which this reproduces to ~1e-6 (tests/
    test_karlo_sampling.py). posterior_log_variance_clipped holds log(max(variance, 1e-20)), unclipped at
    index 0 as diffusers' learned range has it (no sampler adds noise there).
    """
    f32 = np.float32
    base = diffusion_from_betas(betas_for("cosine", num_train_steps), model_output=model_output,
                                learned_variance=learned_variance, schedule="cosine")
    keep = karlo_timesteps(int(steps), num_train_steps)
    betas_all = np.asarray(betas_for("cosine", num_train_steps), f32)
    alphas_all = f32(1.0) - betas_all
    acp_all = np.cumprod(alphas_all, dtype=f32)
    cols = {k: [] for k in ("beta", "abar", "abar_prev", "c1", "c2", "var", "rx", "rxm1")}
    for j, t in enumerate(keep):
        prev = int(keep[j - 1]) if j else -1
        a_t = acp_all[t]
        a_prev = acp_all[prev] if prev >= 0 else f32(1.0)
        b_t, b_prev = f32(1.0) - a_t, f32(1.0) - a_prev
        if prev == t - 1:
            beta, alpha = betas_all[t], alphas_all[t]
        else:
            beta = f32(1.0) - a_t / a_prev
            alpha = f32(1.0) - beta
        cols["beta"].append(beta)
        cols["abar"].append(a_t)
        cols["abar_prev"].append(a_prev)
        cols["c1"].append(a_prev ** f32(0.5) * beta / b_t)
        cols["c2"].append(alpha ** f32(0.5) * b_prev / b_t)
        cols["var"].append(b_prev / b_t * beta)
        cols["rx"].append(f32(1.0) / a_t ** f32(0.5))
        cols["rxm1"].append(b_t ** f32(0.5) / a_t ** f32(0.5))
    c = {k: np.asarray(v, f32) for k, v in cols.items()}
    log_var = np.log(np.maximum(c["var"], f32(1e-20)))
    new = respace(base, keep)[0]
    acp_next = np.append(c["abar"][1:], f32(0.0))
    return dataclasses.replace(
        new, betas=_frozen32(c["beta"]), alphas_cumprod=_frozen32(c["abar"]),
        alphas_cumprod_prev=_frozen32(c["abar_prev"]), alphas_cumprod_next=_frozen32(acp_next),
        sqrt_alphas_cumprod=_frozen32(c["abar"] ** f32(0.5)),
        sqrt_one_minus_alphas_cumprod=_frozen32((f32(1.0) - c["abar"]) ** f32(0.5)),
        sqrt_recip_alphas_cumprod=_frozen32(c["rx"]), sqrt_recipm1_alphas_cumprod=_frozen32(c["rxm1"]),
        posterior_variance=_frozen32(c["var"]), posterior_log_variance_clipped=_frozen32(log_var),
        posterior_mean_coef1=_frozen32(c["c1"]), posterior_mean_coef2=_frozen32(c["c2"]),
        schedule="cosine (diffusers UnCLIPScheduler float32)")


def _ddim_timesteps(n: int, num_steps: int) -> np.ndarray:
    for stride in range(1, num_steps):
        if len(range(0, num_steps, stride)) == n:
            return np.arange(0, num_steps, stride)
    if n == num_steps:
        return np.arange(num_steps)
    raise ValueError(f"cannot take exactly {n} evenly strided steps out of {num_steps} ('ddim' respacing); "
                     "use kind='uniform' or another step count")


def respace(diff: Diffusion, use_steps: int | Sequence[int], kind: str = "uniform") -> tuple[Diffusion, np.ndarray]:
    """Keep a subset of the timesteps of `diff` (Improved DDPM's `space_timesteps`).

    use_steps: a step count (spread by `kind`: ``uniform`` = `karlo_timesteps`, both ends kept; ``ddim`` = every
    k-th step from 0) or an explicit sequence of indices into `diff`. Betas are recomputed from alphas_cumprod at
    the kept steps (in float64), so the respaced alphas_cumprod equal the original ones there.
    Returns (respaced diffusion, timesteps [N'] int32: the ORIGINAL timestep of each new index).
    """
    n_old = diff.num_steps
    if isinstance(use_steps, (int, np.integer)):
        if kind == "uniform":
            keep = karlo_timesteps(int(use_steps), n_old)
        elif kind == "ddim":
            if not 1 <= use_steps <= n_old:
                raise ValueError(f"sampling steps must be in [1, {n_old}], got {use_steps}")
            keep = _ddim_timesteps(int(use_steps), n_old)
        else:
            raise ValueError(f"unknown respacing kind {kind!r}; choose one of {RESPACE_KINDS}")
    else:
        keep = np.unique(np.asarray(list(use_steps), np.int64))
        if keep.size == 0 or keep[0] < 0 or keep[-1] >= n_old:
            raise ValueError(f"respaced timesteps must be a non-empty subset of [0, {n_old}), got {list(use_steps)}")
    acp = diff.alphas_cumprod_f64[keep]
    betas = 1.0 - acp / np.append(1.0, acp[:-1])
    new = diffusion_from_betas(betas, model_output=diff.model_output, learned_variance=diff.learned_variance,
                               timesteps=diff.timesteps[keep], original_num_steps=diff.original_num_steps,
                               schedule=diff.schedule)
    return new, new.timesteps
