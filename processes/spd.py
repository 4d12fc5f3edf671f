"""Shortest Path Diffusion (Das, Fotiadis et al., ICML 2023, arXiv 2306.00501) and its DDPM control: forward
processes that are variance-preserving per Fourier frequency.

Per frequency k and channel, with F the orthonormal 2-D DFT (unshifted layout) and eps white in pixel space,

    u_t(k) = sqrt(abar_t(k)) (F x_0)(k) + sqrt(1 - abar_t(k)) (F eps)(k),        x_t = Re F^-1 u_t,

on integer times t = 0 .. T-1. The network predicts eps (training: unweighted MSE against the white pixel noise).

SPD (`SPDProcess`, registry name 'spd'). The data is modelled as a zero-mean Gaussian with a stationary spectrum
Sigma0(k) = c1 / |c2 + |k||^m (|k| in integer DFT units, the same for every channel; CIFAR-10: 1.59, 0.0086, 2.0).
The Fisher-Rao geodesic from N(0, Sigma0) to N(0, I) interpolates each frequency's variance geometrically,
Sigma0(k)^tau with tau from 1 (data) to 0 (noise); asking abar Sigma0 + 1 - abar = Sigma0^tau gives

    abar(k, tau) = (1 - Sigma0(k)^tau) / (1 - Sigma0(k))        (limit tau where Sigma0(k) = 1),

on the reference's grid t' = linspace(1, T-1, T), tau = (T - t') / T (mtkresearch/shortest-path-diffusion,
nonunif_diffusion/script_util.py). The signal filter sqrt(abar) is high-pass at intermediate times (low frequencies
lose their signal first) and the noise filter low-pass early and white at the end.

DDPM control (`DDPMProcess`, 'ddpm'): the same objects with one abar for every frequency, guided-diffusion's linear
beta schedule scaled by 1000 / T (beta from 1e-4 to 0.02 at T = 1000), abar = cumprod(1 - beta), T = 4000.

Numerics. abar is evaluated in float64 from the closed form (expm1 ratio, exact at Sigma0 = 1); the reference's
formulas (betas as consecutive ratios clamped at 0.999, then cumprod) give back the same abar to 1e-12 in float64
wherever the clamp does not bind, which for T >= 2 needs ln Sigma0 > 6.9 T (never; the largest beta is at the last
step, about 0.5). The reference evaluates them in torch's default float32, though (then takes the cumulative
product of its betas in float64): against its own table (32x32, T = 4000) 1 - abar differs by up to 1.2 % (t = 0, at
|k| = 18.4; over 1e-3 up to t = 550), abar by up to 5.2e-6, and x_t on equal inputs by about 5e-5 (audits of
2026-12-02 and, with these corrected numbers, 2026-12-03). These float64 values are the closed form's; bit
parity with networks trained by the reference would need its float32 table. The network sees t * 1000 / T
(guided-diffusion's rescale_timesteps), not tau. FFTs run in the data's dtype in training (float32, as the
reference; half precision in float32) and in float64 when sampling.

Fitting Sigma0 to a data set (`mean_power_spectrum`, `fit_power_law`): the radially averaged E|F x|^2 of the images
as the network sees them ([-1, 1]), fitted in log-log over the non-DC frequencies (losses/spd.py runs it when a run
asks for `fit`). The published constants' scale convention is unknown (docs: README, SPD).
"""

import math

import numpy as np
import torch

from samplers.fourier import FourierSampling, to_fourier, to_pixels

CIFAR10_SIGMA0 = dict(c1=1.59, c2=0.0086, m=2.0)  # configs/cifar10_fourier.yml of the reference
CIFAR10_RESOLUTION = 32  # the image size those constants were fitted at


def radial_frequency(height: int, width: int, device=None) -> torch.Tensor:
    """|k| = sqrt(kx^2 + ky^2) in integer DFT units, unshifted layout (fftfreq * size), float64 [H, W]."""
    ky = torch.fft.fftfreq(height, d=1.0 / height, dtype=torch.float64, device=device)
    kx = torch.fft.fftfreq(width, d=1.0 / width, dtype=torch.float64, device=device)
    return (ky[:, None] ** 2 + kx[None, :] ** 2).sqrt()


def power_law_spectrum(c1: float, c2: float, m: float, height: int, width: int, device=None) -> torch.Tensor:
    """Sigma0(k) = c1 / |c2 + |k||^m, float64 [H, W]."""
    return c1 / (c2 + radial_frequency(height, width, device)).abs() ** m


def shortest_path_alpha_bar(log_sigma0: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """abar = (1 - Sigma0^tau) / (1 - Sigma0) = expm1(tau l) / expm1(l), l = ln Sigma0, with the limit tau at l = 0
    (expm1 keeps both factors relative-accurate near Sigma0 = 1, so only l = 0 itself needs the guard)."""
    ratio = torch.expm1(tau * log_sigma0) / torch.expm1(log_sigma0)
    return torch.where(log_sigma0 == 0, tau.expand_as(ratio), ratio)


def reference_tau(t: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    """tau = (T - t') / T at the reference's t' = linspace(1, T - 1, T)[t], float64."""
    T = num_timesteps
    t_ref = 1 + t.to(torch.float64) * ((T - 2) / (T - 1))
    return (T - t_ref) / T


def mean_power_spectrum(images: torch.Tensor) -> torch.Tensor:
    """E|F x|^2 averaged over images and channels: float64 [H, W] from [N, C, H, W]."""
    return to_fourier(images.to(torch.float64)).abs().square().mean(dim=(0, 1))


def radial_average(power: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(radii, mean power at each radius, number of frequencies) over the frequencies of equal |k|, DC first."""
    radius = radial_frequency(*power.shape).flatten().numpy()
    keys = np.round(radius, 9)
    radii, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=power.flatten().cpu().numpy())
    return radii, sums / counts, counts


def fit_power_law(power: torch.Tensor) -> dict:
    """Least-squares fit of log P(k) = log c1 - m log(c2 + |k|) over the non-DC frequencies of a power spectrum
    [H, W] (radially averaged, each radius weighted by its number of frequencies): for a given c2 the fit is linear in
    (log c1, m); c2 is found by a bounded scalar search over log c2 in [1e-6, 1] (c2 keeps the law finite at the DC;
    beyond the lowest non-zero frequency it would bend the law where it is observed). Returns c1, c2, m and the
    weighted rms residual in log10 units, `c2_at_bound` (the bound of the search c2 ended at, else None: the images do
    not determine c2 within the range), and how many non-DC radii had no power (`zero_power_radii`: left out; a
    log cannot fit them, e.g. the frequencies a nearest-neighbour upsampling leaves empty). The DC is left out: it
    carries the images' mean brightness, not the power law."""
    from scipy.optimize import minimize_scalar

    radii, mean_power, counts = radial_average(power)
    non_dc = radii > 0
    keep = non_dc & (mean_power > 0)
    radii, log_power, weights = radii[keep], np.log(mean_power[keep]), counts[keep].astype(np.float64)
    if len(radii) < 3 or not np.all(np.isfinite(log_power)):
        raise ValueError(f'fitting Sigma0 needs at least 3 distinct non-zero frequencies with positive power; the '
                         f'images have {len(radii)} of {int(non_dc.sum())}')

    def solve(c2):
        design = np.stack([np.ones_like(radii), -np.log(c2 + radii)], axis=1)
        sqrt_w = np.sqrt(weights)[:, None]
        coef, *_ = np.linalg.lstsq(design * sqrt_w, log_power * sqrt_w[:, 0], rcond=None)
        residual = log_power - design @ coef
        return coef, float(np.sum(weights * residual ** 2) / np.sum(weights))

    bounds = (math.log(C2_SEARCH[0]), math.log(C2_SEARCH[1]))
    result = minimize_scalar(lambda s: solve(math.exp(s))[1], bounds=bounds, method='bounded',
                             options=dict(xatol=1e-10))
    c2 = math.exp(result.x)
    (log_c1, m), mse = solve(c2)
    # The bounded search stops within about 1e-5 (in log c2) of a bound it presses against.
    at_bound = next((bound for bound in C2_SEARCH if abs(result.x - math.log(bound)) < 1e-3), None)
    return dict(c1=float(math.exp(log_c1)), c2=float(c2), m=float(m), rms_log10=math.sqrt(mse) / math.log(10),
                zero_power_radii=int(non_dc.sum() - keep.sum()), c2_at_bound=at_bound)


C2_SEARCH = (1e-6, 1.0)  # fit_power_law's range for c2 (see its docstring)


class FourierVPProcess:
    """Shared code of the per-frequency VP processes: corrupt, target, the network's time label, sampling.

    Subclasses give `name`, `num_steps` (T), `options()` and `alpha_bar(t, height, width)` -> float64
    [len(t), 1, H or 1, W or 1] (a scalar schedule may answer [len(t), 1, 1, 1]). The noise level passed around in
    training (the loop's `noise_level`) is the integer time t.
    """

    sampling: FourierSampling

    def noise_label(self, t: torch.Tensor) -> torch.Tensor:
        """What the network sees: t * 1000 / T (guided-diffusion's rescale_timesteps), float64."""
        return t.to(torch.float64) * (1000.0 / self.num_steps)

    def corrupt(self, y: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = Re F^-1[sqrt(abar_t) F y + sqrt(1 - abar_t) F eps] in y's dtype (the reference's q_sample). With a
        scalar abar this is sqrt(abar) y + sqrt(1 - abar) eps, computed without FFTs. Half-precision y (bf16, fp16)
        is computed in float32 and rounded once at the end: CUDA's FFTs take no bf16 (autocast leaves them alone)."""
        dtype = torch.promote_types(y.dtype, torch.float32)
        abar = self.alpha_bar(t.reshape(-1), y.shape[-2], y.shape[-1])
        signal, noise = abar.sqrt().to(dtype), (1 - abar).sqrt().to(dtype)
        y_in, eps = y.to(dtype), eps.to(dtype)
        if abar.shape[-2:] == (1, 1):
            return (signal * y_in + noise * eps).to(y.dtype)
        return to_pixels(signal * to_fourier(y_in) + noise * to_fourier(eps)).to(y.dtype)

    def target(self, y: torch.Tensor, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor | None = None):
        """What the network regresses: the white pixel noise eps. The loss passes it; without it, eps is recovered
        from (y, x, t) in float64 (exact up to x's rounding, which 1 / sqrt(1 - abar) amplifies near t = 0)."""
        if eps is not None:
            return eps
        abar = self.alpha_bar(t.reshape(-1), y.shape[-2], y.shape[-1])
        u = to_fourier(x.to(torch.float64)) - abar.sqrt() * to_fourier(y.to(torch.float64))
        return to_pixels(u / (1 - abar).sqrt()).to(x.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"


MAX_STEPS = 1_000_000  # SPD's and DDPM's references use 1000-4000; a snapshot's record is a file's say


def _check_steps(T) -> int:
    try:
        valid = not isinstance(T, bool) and 2 <= T <= MAX_STEPS and int(T) == T
    except (TypeError, ValueError, OverflowError):
        valid = False
    if not valid:
        raise ValueError(f'T (the number of diffusion steps) must be an integer from 2 to {MAX_STEPS:,}, got {T!r}')
    return int(T)


class SPDProcess(FourierVPProcess):
    """Shortest Path Diffusion: abar(k, tau) = (1 - Sigma0(k)^tau) / (1 - Sigma0(k)), Sigma0 = c1 / |c2 + |k||^m."""

    name = 'spd'

    def __init__(self, T: int = 4000, c1: float = CIFAR10_SIGMA0['c1'], c2: float = CIFAR10_SIGMA0['c2'],
                 m: float = CIFAR10_SIGMA0['m']):
        self.num_steps = _check_steps(T)
        self.c1, self.c2, self.m = float(c1), float(c2), float(m)
        if not (math.isfinite(self.c1) and self.c1 > 0):
            raise ValueError(f'c1 must be a positive number, got {c1!r}')
        if not (math.isfinite(self.c2) and self.c2 > 0):
            raise ValueError(f'c2 must be a positive number (Sigma0 at the DC is c1 / c2^m), got {c2!r}')
        if not (math.isfinite(self.m) and self.m >= 0):
            raise ValueError(f'm must be a non-negative number, got {m!r}')
        self.sampling = FourierSampling(self)
        self._log_sigma0 = {}

    def options(self) -> dict:
        return {'T': self.num_steps, 'c1': self.c1, 'c2': self.c2, 'm': self.m}

    def sigma0(self, height: int, width: int, device=None) -> torch.Tensor:
        """The modelled data spectrum Sigma0(k), float64 [H, W]."""
        return power_law_spectrum(self.c1, self.c2, self.m, height, width, device)

    def _log_sigma0_on(self, height, width, device) -> torch.Tensor:
        key = (height, width, str(device))
        if key not in self._log_sigma0:  # One small table per resolution and device; no host sync per call after.
            self._log_sigma0[key] = self.sigma0(height, width).log().to(device)
        return self._log_sigma0[key]

    def alpha_bar(self, t: torch.Tensor, height: int, width: int) -> torch.Tensor:
        tau = reference_tau(t, self.num_steps).reshape(-1, 1, 1, 1)
        return shortest_path_alpha_bar(self._log_sigma0_on(height, width, t.device), tau)


class DDPMProcess(FourierVPProcess):
    """The paper's DDPM control: one abar for all frequencies, guided-diffusion's linear beta scaled by 1000 / T."""

    name = 'ddpm'

    def __init__(self, T: int = 4000, beta_start: float = 1e-4, beta_end: float = 0.02):
        self.num_steps = _check_steps(T)
        self.beta_start, self.beta_end = float(beta_start), float(beta_end)
        scale = 1000.0 / self.num_steps
        betas = np.linspace(scale * self.beta_start, scale * self.beta_end, self.num_steps, dtype=np.float64)
        if not (np.all(betas > 0) and np.all(betas < 1)):
            raise ValueError(f'beta_start and beta_end scaled by 1000/T = {scale:g} must lie in (0, 1), got '
                             f'{betas[0]:g} .. {betas[-1]:g}')
        self._alpha_bar = torch.as_tensor(np.cumprod(1.0 - betas))
        # guided-diffusion's sampling script clips x0 to [-1, 1] (clip_denoised=True); for SPD it has no effect.
        self.sampling = FourierSampling(self, solver_defaults={'clip_x0': True})
        self._tables = {}

    def options(self) -> dict:
        return {'T': self.num_steps, 'beta_start': self.beta_start, 'beta_end': self.beta_end}

    def alpha_bar(self, t: torch.Tensor, height: int, width: int) -> torch.Tensor:
        key = str(t.device)
        if key not in self._tables:
            self._tables[key] = self._alpha_bar.to(t.device)
        return self._tables[key][t].reshape(-1, 1, 1, 1)
