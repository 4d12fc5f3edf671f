"""LD3: learning the time discretisation of a sampler from a few teacher samples.

Tong, Hoang, Liu, Van den Broeck, Niepert, "Learning to Discretize Denoising Diffusion ODEs" (ICLR 2025,
arXiv 2405.15506); reference code vinhsuhi/LD3. See docs/samplers.md section 3.

1. Teacher data (`generate_teacher`): unit-variance noises drawn per seed exactly as generate.py draws them, the
   teacher's samples from a fine solver (default UniPC-3 bh1, 20 NFE on EDM's rho = 7 grid, as LD3's CIFAR-10
   recipe) and the class labels. Saved with `save_teacher_data` as a torch file that loads with weights_only=True.
2. Student grid (`GridParameterization`): sigma_k = exp(u_k) with u = log sigma running from log sigma_max to
   log sigma_min by a softmax-cumsum of one logit per step (LD3's `time_mode: lambda`), so the grid is strictly
   decreasing and hits both ends by construction. A second vector moves the interior levels at which the denoiser
   is evaluated (LD3's decoupled evaluation grid, used by the solvers as `eval_sigmas`).
3. Objective: distance (LPIPS, L2 or L1) between the student's sample and the teacher's, where the student may
   start from any noise within a ball of radius r = 0.001 C H W / NFE^2 (unit-noise scale) around the teacher's
   (LD3's soft objective; r = 0 is the hard one).
4. Optimisation as LD3: RMSprop on the logits, SGD on the evaluation offsets and the noises, 2 + 5 rounds, model
   selection on a validation split after every step, patience with learning-rate decay. The best grid is written
   as a schedule file (samplers.save_schedule_file) that generate.py --schedule uses with the same solver.

Differences from the reference code, on purpose:
- The student runs differentiable copies of this package's solvers (`STUDENT_SOLVERS`, checked against
  `samplers.SOLVERS` in the tests): every solver and option of generate.py works, and NFE is counted honestly.
- The evaluation offsets are clipped to a fraction `eval_window` (< 0.5) of each level's neighbouring gaps in
  log sigma, so the evaluation grid stays strictly decreasing; LD3 clips to 0.5 x the smallest gap between raw
  logits, which keeps the offsets inert until the logits separate.
- Each step keeps at least `MIN_STEP_FRACTION` of the log-sigma range, so extreme logits (a softmax that
  underflows) still give a strictly decreasing grid.
"""

import copy
import dataclasses
import hashlib
import math
import os
import time

import click
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from dnnlib import util
from samplers import (
    DEFAULT_END,
    SCHEDULES,
    SOLVERS,
    SigmaGrid,
    count_nfe,
    sample,
    save_schedule_file,
    solver_options,
)
from samplers.dpm_solver import step_orders

TEACHER_FILE_FORMAT = "ld3-teacher-data"
TEACHER_FILE_VERSION = 1
MIN_STEP_FRACTION = 1e-6  # smallest share of the log-sigma range one step may take
LOSSES = ("lpips", "l2", "l1")

# ---------------------------------------------------------------------------------------------------------------
# The learnable grid.


def steps_for_nfe(solver: str, nfe: int, end: str) -> int:
    """The number of steps N whose cost is `nfe` denoiser calls (see samplers.count_nfe)."""
    for num_steps in range(1, nfe + 2):
        if count_nfe(solver, num_steps, end) == nfe:
            return num_steps
    raise ValueError(f"solver {solver!r} with end={end!r} cannot spend exactly {nfe} NFE "
                     f"(heun costs 2N - 1 with end='zero' and 2N with end='sigma_min')")


class GridParameterization(torch.nn.Module):
    """Logits -> a strictly decreasing grid sigma_max = sigma_0 > ... > sigma_{P-1} = sigma_min, and offsets ->
    the decoupled evaluation grid. Float64 throughout.

    u = log sigma: u_k = u_0 + c_k (u_{P-1} - u_0), with c_k the cumulative sum of the step fractions
    f = m + (1 - (P - 1) m) softmax(logits), m = MIN_STEP_FRACTION (LD3's softmax-cumsum, its first logit
    dropped: it cancels in LD3's normalisation). Evaluation levels: u'_k = u_k + clip(offset_k, -w g_k^-, w g_k^+)
    for interior k, with g^-/g^+ the (detached) gaps to the next / previous level and w = eval_window < 0.5.

    end='zero' appends sigma = 0 (EDM's final denoising step) to both grids; it is not learned.
    """

    def __init__(self, num_levels: int, sigma_min: float, sigma_max: float, *, end: str = "sigma_min",
                 eval_window: float = 0.45, init: torch.Tensor | None = None):
        super().__init__()
        if num_levels < 3:
            raise ValueError(f"a learnable grid needs at least 3 positive noise levels (one interior level), got "
                             f"{num_levels}: use more steps")
        if not 0 < sigma_min < sigma_max < math.inf:
            raise ValueError(f"expected 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
        if not 0 <= eval_window < 0.5:
            raise ValueError(f"eval_window must lie in [0, 0.5) so that the evaluation grid stays strictly "
                             f"decreasing, got {eval_window}")
        if end not in ("zero", "sigma_min"):
            raise ValueError(f"end must be 'zero' or 'sigma_min', got {end!r}")
        self.num_levels = num_levels
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.end = end
        self.eval_window = float(eval_window)
        self.logits = torch.nn.Parameter(torch.zeros(num_levels - 1, dtype=torch.float64))
        self.offsets = torch.nn.Parameter(torch.zeros(num_levels, dtype=torch.float64))
        if init is not None:
            self.set_grid(init)

    @torch.no_grad()
    def set_grid(self, sigmas: torch.Tensor) -> None:
        """Set the logits so that the grid equals `sigmas` (its positive levels, sigma_max ... sigma_min) and zero
        the offsets."""
        levels = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
        levels = levels[levels > 0]
        if len(levels) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} positive levels, got {len(levels)}")
        if not (levels[1:] < levels[:-1]).all():
            raise ValueError(f"the grid must be strictly decreasing, got {levels.tolist()}")
        fractions = -torch.diff(levels.log()) / math.log(self.sigma_max / self.sigma_min)
        floor = MIN_STEP_FRACTION
        shares = ((fractions - floor) / (1 - len(fractions) * floor)).clamp_min(1e-300)
        self.logits.copy_(shares.log().to(self.logits.device))
        self.offsets.zero_()

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas, eval_sigmas): float64 grids of the solver's length (num_levels, plus the appended 0)."""
        num_steps = self.num_levels - 1
        fractions = MIN_STEP_FRACTION + (1 - num_steps * MIN_STEP_FRACTION) * torch.softmax(self.logits, dim=0)
        cumulative = torch.cumsum(fractions, dim=0)
        cumulative = cumulative / cumulative[-1]  # exactly 1 at the end despite rounding
        u_max, u_min = math.log(self.sigma_max), math.log(self.sigma_min)
        u_interior = u_max + cumulative[:-1] * (u_min - u_max)
        ends = self.logits.new_tensor([self.sigma_max, self.sigma_min])
        sigmas = torch.cat([ends[:1], u_interior.exp(), ends[1:]])  # endpoints exact, not exp(log(.))
        u = torch.cat([ends[:1].log(), u_interior, ends[1:].log()]).detach()
        gaps = u[:-1] - u[1:]  # > 0
        low = -self.eval_window * gaps[1:]  # towards the next (smaller) level
        high = self.eval_window * gaps[:-1]  # towards the previous (larger) level
        shift = torch.maximum(torch.minimum(self.offsets[1:-1], high), low)
        eval_sigmas = torch.cat([ends[:1], (u_interior + shift).exp(), ends[1:]])
        if self.end == "zero":
            zero = sigmas.new_zeros(1)
            sigmas, eval_sigmas = torch.cat([sigmas, zero]), torch.cat([eval_sigmas, zero])
        return sigmas, eval_sigmas


# ---------------------------------------------------------------------------------------------------------------
# Differentiable solvers: the same updates as samplers/*.py with tensor coefficients, so that gradients reach the
# grid. Same signatures and options as samplers.SOLVERS.


class _Caller:
    """denoiser(x, sigma, class_labels) in float64, optionally under activation checkpointing (memory constant
    in NFE: LD3's --low_gpu)."""

    def __init__(self, denoiser, class_labels, checkpoint: bool = False):
        self.denoiser, self.class_labels, self.checkpoint = denoiser, class_labels, checkpoint

    def _call(self, x, sigma):
        return self.denoiser(x, sigma, self.class_labels).to(torch.float64)

    def __call__(self, x, sigma):
        if self.checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._call, x, sigma, use_reentrant=False)
        return self._call(x, sigma)


def _grids(sigmas, eval_sigmas):
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D grid of length N + 1 >= 2, got shape {tuple(sigmas.shape)}")
    eval_sigmas = sigmas if eval_sigmas is None else eval_sigmas
    if eval_sigmas.shape != sigmas.shape:
        raise ValueError(f"eval_sigmas has shape {tuple(eval_sigmas.shape)}, sigmas {tuple(sigmas.shape)}")
    return sigmas.detach().tolist(), eval_sigmas  # host copy for the structure only: one sync per run


def student_euler(call, x, sigmas, *, eval_sigmas=None):
    levels, ev = _grids(sigmas, eval_sigmas)
    for i in range(len(levels) - 1):
        x = x + (sigmas[i + 1] - sigmas[i]) * ((x - call(x, ev[i])) / ev[i])
    return x


def student_heun(call, x, sigmas, *, eval_sigmas=None, S_churn=0.0, S_min=0.0, S_max=math.inf, S_noise=1.0,
                 randn_like=None, round_sigma=None):
    if S_churn > 0:
        raise ValueError("LD3 learns a deterministic sampler: heun with S_churn > 0 is not supported")
    levels, ev = _grids(sigmas, eval_sigmas)
    for i in range(len(levels) - 1):
        step = sigmas[i + 1] - sigmas[i]
        d_cur = (x - call(x, ev[i])) / ev[i]
        x_next = x + step * d_cur
        if levels[i + 1] > 0:
            d_prime = (x_next - call(x_next, ev[i + 1])) / ev[i + 1]
            x_next = x + step * (0.5 * d_cur + 0.5 * d_prime)
        x = x_next
    return x


def _student_dpmpp(call, x, sigmas, order, lower_order_final, variant, eval_sigmas, exact_third_order=False):
    if variant not in ("dpmsolver", "taylor"):
        raise ValueError(f"DPM-Solver++ variant must be 'dpmsolver' or 'taylor', got {variant!r}")
    levels, ev = _grids(sigmas, eval_sigmas)
    orders = step_orders(levels, order, lower_order_final)
    num_positive = sum(1 for s in levels if s > 0)
    lambdas = -sigmas[:num_positive].log()
    history = []
    for i, p in enumerate(orders):
        denoised = call(x, ev[i])
        history = (history + [denoised])[-order:]
        if levels[i + 1] == 0:
            x = denoised
            continue
        h = lambdas[i + 1] - lambdas[i]
        phi_1 = torch.expm1(-h)
        x_first = (sigmas[i + 1] / sigmas[i]) * x - phi_1 * denoised
        if p == 1:
            x = x_first
        elif p == 2:
            r0 = (lambdas[i] - lambdas[i - 1]) / h
            d1 = (history[-1] - history[-2]) / r0
            coef = -0.5 * phi_1 if variant == "dpmsolver" else phi_1 / h + 1
            x = x_first + coef * d1
        else:
            r0 = (lambdas[i] - lambdas[i - 1]) / h
            r1 = (lambdas[i - 1] - lambdas[i - 2]) / h
            d1_0 = (history[-1] - history[-2]) / r0
            d1_1 = (history[-2] - history[-3]) / r1
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_2 = phi_1 / h + 1
            phi_3 = phi_2 / h - 0.5
            x = x_first + phi_2 * d1 - (2 * phi_3 if exact_third_order else phi_3) * d2
    return x


def student_dpmpp_2m(call, x, sigmas, *, lower_order_final=True, variant="dpmsolver", eval_sigmas=None):
    return _student_dpmpp(call, x, sigmas, 2, lower_order_final, variant, eval_sigmas)


def student_dpmpp_3m(call, x, sigmas, *, lower_order_final=True, variant="dpmsolver", exact_third_order=False,
                     eval_sigmas=None):
    return _student_dpmpp(call, x, sigmas, 3, lower_order_final, variant, eval_sigmas, exact_third_order)


def student_unipc(call, x, sigmas, *, order=3, variant="bh1", lower_order_final=True, corrector=True,
                  eval_sigmas=None):
    if order < 1:
        raise ValueError(f"UniPC order must be >= 1, got {order}")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
    levels, ev = _grids(sigmas, eval_sigmas)
    num_steps = len(levels) - 1
    orders = step_orders(levels, order, lower_order_final)
    num_positive = sum(1 for s in levels if s > 0)
    lambdas = -sigmas[:num_positive].log()
    buffer = [call(x, ev[0])]
    for i, p in enumerate(orders):
        denoised = buffer[-1]
        if levels[i + 1] == 0:
            x = denoised
            continue
        h = lambdas[i + 1] - lambdas[i]
        hh = -h
        x_lin = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(hh) * denoised
        rks = [(lambdas[i - k] - lambdas[i]) / h for k in range(1, p)] + [torch.ones_like(h)]
        diffs = [(buffer[-1 - k] - denoised) / rks[k - 1] for k in range(1, p)]
        # B(h) and g_j = hh phi_{j+1}(hh) j! / B(h), as samplers.unipc._unipc_coefficients.
        b_h = hh if variant == "bh1" else torch.expm1(hh)
        h_phi_k = torch.expm1(hh) / hh - 1
        factorial, rhs = 1, []
        for j in range(1, p + 1):
            rhs.append(h_phi_k * factorial / b_h)
            factorial *= j + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        rhs = torch.stack(rhs)
        vandermonde = torch.stack([torch.stack([rk**j for rk in rks]) for j in range(p)])
        x_pred = x_lin
        if p >= 2:
            coefs = [0.5] if p == 2 else torch.linalg.solve(vandermonde[:-1, :-1], rhs[:-1]).unbind()
            x_pred = x_lin - b_h * sum(c * dk for c, dk in zip(coefs, diffs))
        if i + 1 >= num_steps:
            x = x_pred
            break
        denoised_next = call(x_pred, ev[i + 1])
        if corrector:
            coefs = [0.5] if p == 1 else torch.linalg.solve(vandermonde, rhs).unbind()
            correction = coefs[-1] * (denoised_next - denoised)
            for c, dk in zip(coefs[:-1], diffs):
                correction = correction + c * dk
            x = x_lin - b_h * correction
        else:
            x = x_pred
        buffer = (buffer + [denoised_next])[-order:]
    return x


_AB_WEIGHTS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
               4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def student_ipndm(call, x, sigmas, *, max_order=4, eval_sigmas=None):
    if max_order not in _AB_WEIGHTS:
        raise ValueError(f"iPNDM max_order must be 1, 2, 3 or 4, got {max_order}")
    levels, ev = _grids(sigmas, eval_sigmas)
    slopes = []  # newest first
    for i in range(len(levels) - 1):
        denoised = call(x, ev[i])
        if levels[i + 1] == 0:
            x = denoised
            continue
        slopes = ([(x - denoised) / ev[i]] + slopes)[:max_order]
        weights = _AB_WEIGHTS[len(slopes)]
        slope = weights[0] * slopes[0]
        for w, d in zip(weights[1:], slopes[1:]):
            slope = slope + w * d
        x = x + (sigmas[i + 1] - sigmas[i]) * slope
    return x


STUDENT_SOLVERS = {
    "euler": student_euler,
    "heun": student_heun,
    "dpmpp_2m": student_dpmpp_2m,
    "dpmpp_3m": student_dpmpp_3m,
    "unipc": student_unipc,
    "ipndm": student_ipndm,
}
assert set(STUDENT_SOLVERS) == set(SOLVERS), "every registered solver needs a differentiable twin for LD3"


def student_sample(denoiser, latents: torch.Tensor, sigmas: torch.Tensor, eval_sigmas: torch.Tensor | None = None,
                   *, solver: str, class_labels=None, checkpoint: bool = False, **solver_kwargs) -> torch.Tensor:
    """samplers.sample for LD3: x_0 = latents * sigmas[0], then `solver` over the grid, differentiable with respect
    to latents, sigmas and eval_sigmas. Returns float64."""
    if solver not in STUDENT_SOLVERS:
        raise ValueError(f"unknown solver {solver!r}: expected one of {sorted(STUDENT_SOLVERS)}")
    unknown = sorted(set(solver_kwargs) - set(solver_options(solver)))
    if unknown:
        raise ValueError(f"solver {solver!r} does not take option(s) {unknown}; it accepts {solver_options(solver)}")
    x = latents.to(torch.float64) * sigmas[0]
    call = _Caller(denoiser, class_labels, checkpoint)
    return STUDENT_SOLVERS[solver](call, x, sigmas, eval_sigmas=eval_sigmas, **solver_kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Losses: per-sample distances between student and teacher samples (model space, images in [-1, 1]).


def l2_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error (LD3's L2)."""
    return (x - y).square().flatten(1).mean(1)


def l1_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample mean absolute error (LD3's L1)."""
    return (x - y).abs().flatten(1).mean(1)


# LPIPS(vgg) v0.1 (Zhang et al. 2018), the distance LD3 uses: torchvision's ImageNet VGG16 and the LPIPS linear
# heads. 397923af is the start of the sha256 of torchvision's file (its naming convention).
LPIPS_VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LPIPS_VGG16_SHA256_PREFIX = "397923af"
LPIPS_LIN_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
_VGG16_LAYERS = (  # torchvision vgg16().features: (index, in, out) of each conv; 'M' = 2x2 max pool
    (0, 3, 64), (2, 64, 64), "M", (5, 64, 128), (7, 128, 128), "M", (10, 128, 256), (12, 256, 256), (14, 256, 256),
    "M", (17, 256, 512), (19, 512, 512), (21, 512, 512), "M", (24, 512, 512), (26, 512, 512), (28, 512, 512))
_LPIPS_TAPS = (2, 7, 14, 21, 28)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (after these convs)
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


class LPIPSUnavailableError(RuntimeError):
    """The LPIPS weights could not be fetched or read."""


class LPIPS(torch.nn.Module):
    """LPIPS(vgg) distance per sample, differentiable, for images in [-1, 1] with 1 or 3 channels.

    d(x, y) = sum_l mean_hw w_l . (n(f_l(x)) - n(f_l(y)))^2, n = unit norm over channels (as the lpips package,
    version 0.1). resize: bilinear resize to resize x resize first (LD3 compares CIFAR images at 32 x 32; the five
    VGG stages need at least 16 x 16).
    """

    def __init__(self, vgg_state: dict, lin_state: dict, resize: int | None = None):
        super().__init__()
        self.convs = torch.nn.ModuleList()
        for layer in _VGG16_LAYERS:
            if layer == "M":
                continue
            index, c_in, c_out = layer
            conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1)
            conv.weight.data.copy_(_state_tensor(vgg_state, f"features.{index}.weight", (c_out, c_in, 3, 3)))
            conv.bias.data.copy_(_state_tensor(vgg_state, f"features.{index}.bias", (c_out,)))
            self.convs.append(conv)
        self.lins = torch.nn.ParameterList()
        for k, channels in enumerate((64, 128, 256, 512, 512)):
            self.lins.append(torch.nn.Parameter(_state_tensor(lin_state, f"lin{k}.model.1.weight",
                                                              (1, channels, 1, 1)).clone()))
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1))
        self.resize = resize
        self.requires_grad_(False).eval()

    def _features(self, x):
        taps, conv_iter = [], iter(self.convs)
        for layer in _VGG16_LAYERS:
            if layer == "M":
                x = F.max_pool2d(x, 2)
                continue
            x = F.relu(next(conv_iter)(x))
            if layer[0] in _LPIPS_TAPS:
                taps.append(x)
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS compares NCHW images with 1 or 3 channels, got shape {tuple(x.shape)}")
        images = torch.cat([x, y]).to(torch.float32)
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        if self.resize is not None and tuple(images.shape[2:]) != (self.resize, self.resize):
            images = F.interpolate(images, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        if min(images.shape[2:]) < 16:
            raise ValueError(f"LPIPS(vgg) needs images of at least 16 x 16 pixels, got {tuple(images.shape[2:])}: "
                             f"set lpips_resize (--lpips-resize), e.g. 32")
        images = (images - self.shift) / self.scale
        distance = 0
        for taps, lin in zip(self._features(images), self.lins):
            norm = taps.square().sum(1, keepdim=True).add(1e-20).sqrt()  # lpips: f / (|f| + 1e-10); finite grads
            f_x, f_y = (taps / (norm + 1e-10)).chunk(2)
            distance = distance + F.conv2d((f_x - f_y).square(), lin).mean([1, 2, 3])
        return distance


def _state_tensor(state: dict, key: str, shape: tuple) -> torch.Tensor:
    if key not in state:
        raise LPIPSUnavailableError(f"the LPIPS weights lack {key!r}")
    tensor = state[key]
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(shape):
        got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise LPIPSUnavailableError(f"LPIPS weight {key!r} should have shape {shape}, got {got}")
    return tensor.to(torch.float32)


def _lpips_hint() -> str:
    return (f"LPIPS needs torchvision's VGG16 weights ({LPIPS_VGG16_URL}) and the LPIPS v0.1 linear weights "
            f"({LPIPS_LIN_URL}; the lpips pip package ships them as lpips/weights/v0.1/vgg.pth). Offline, fetch both "
            f"elsewhere and pass --lpips-vgg PATH --lpips-lin PATH (library: lpips_vgg=, lpips_lin=), or put them "
            f"in the download cache {util.make_cache_dir_path('downloads')} ($DNNLIB_CACHE_DIR moves it); or train "
            f"with --loss l2 or l1.")


def load_lpips(vgg: str | None = None, lin: str | None = None, *, resize: int | None = None,
               device=None, verbose: bool = True) -> LPIPS:
    """LPIPS(vgg) from local paths or URLs (None: the canonical URLs, downloaded once into the dnnlib cache).
    Weights are read with torch.load(weights_only=True): no code runs."""
    states = []
    for what, source, default in (("VGG16", vgg, LPIPS_VGG16_URL), ("linear", lin, LPIPS_LIN_URL)):
        url = source or default
        try:
            path = util.open_url(url, return_filename=True, verbose=verbose)
        except (OSError, ValueError) as err:
            raise LPIPSUnavailableError(f"could not fetch the LPIPS {what} weights from {url}: {err}\n"
                                        f"{_lpips_hint()}") from err
        if source is None and default == LPIPS_VGG16_URL:
            sha256 = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    sha256.update(chunk)
            digest = sha256.hexdigest()
            if not digest.startswith(LPIPS_VGG16_SHA256_PREFIX):
                raise LPIPSUnavailableError(f"{path} (from {url}) has sha256 {digest}, expected it to start with "
                                            f"{LPIPS_VGG16_SHA256_PREFIX}: delete it and download again")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise LPIPSUnavailableError(f"could not read the LPIPS {what} weights {path}: {err}\n"
                                        f"{_lpips_hint()}") from err
        if not isinstance(state, dict):
            raise LPIPSUnavailableError(f"{path}: expected a state dict, got {type(state).__name__}")
        states.append(state)
    return LPIPS(*states, resize=resize).to(device)


def make_loss(name: str, *, lpips_vgg=None, lpips_lin=None, lpips_resize=None, device=None):
    """Per-sample distance function d(student, teacher) -> [B] by name ('lpips', 'l2', 'l1')."""
    if name == "l2":
        return l2_distance
    if name == "l1":
        return l1_distance
    if name == "lpips":
        return load_lpips(lpips_vgg, lpips_lin, resize=lpips_resize, device=device)
    raise ValueError(f"unknown loss {name!r}: expected one of {', '.join(LOSSES)}")


# ---------------------------------------------------------------------------------------------------------------
# Teacher data.


@dataclasses.dataclass
class TeacherData:
    """Noises (unit variance, as drawn per seed), the teacher's samples from them, class labels, and the teacher's
    description (`info`: solver, options, grid `sigmas`, NFE, network, ...)."""

    latents: torch.Tensor
    images: torch.Tensor
    class_labels: torch.Tensor | None = None
    seeds: torch.Tensor | None = None
    info: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.latents.shape != self.images.shape:
            raise ValueError(f"teacher latents {tuple(self.latents.shape)} and images {tuple(self.images.shape)} "
                             f"differ in shape")
        if self.class_labels is not None and len(self.class_labels) != len(self.latents):
            raise ValueError(f"{len(self.class_labels)} class labels for {len(self.latents)} samples")
        if "sigmas" not in self.info:
            raise ValueError("teacher info must hold the teacher's grid 'sigmas'")

    def __len__(self):
        return len(self.latents)

    @property
    def sigma_max(self) -> float:
        return float(self.info["sigmas"][0])

    @property
    def sigma_min(self) -> float:
        return float(min(s for s in self.info["sigmas"] if s > 0))


@torch.no_grad()
def teacher_samples(denoiser, latents: torch.Tensor, grid: SigmaGrid, *, solver: str, solver_kwargs=None,
                    class_labels=None, batch_size: int = 256, denoise_to_zero: bool = False) -> torch.Tensor:
    """Run the teacher on `latents` in batches (samplers.sample); float64 out."""
    outputs = []
    for start in range(0, len(latents), batch_size):
        labels = None if class_labels is None else class_labels[start:start + batch_size]
        outputs.append(sample(denoiser, latents[start:start + batch_size], grid, solver=solver, class_labels=labels,
                              round_sigma=getattr(denoiser, "round_sigma", None), denoise_to_zero=denoise_to_zero,
                              **(solver_kwargs or {})))
    return torch.cat(outputs)


@torch.no_grad()
def generate_teacher(net, seeds, *, solver: str = "unipc", num_steps: int = 20, schedule: str = "edm",
                     solver_kwargs: dict | None = None, schedule_kwargs: dict | None = None, end: str | None = None,
                     sigma_min: float | None = None, sigma_max: float | None = None, class_idx: int | None = None,
                     batch_size: int = 64, device=None, network: str = "", progress: bool = False) -> TeacherData:
    """Teacher data for `seeds`: each noise and label is drawn from its seed's generator exactly as generate.py
    draws them, so a teacher sample equals generate.py's image for that seed with the same sampler settings.
    Defaults: LD3's CIFAR-10 teacher, UniPC order 3 bh1, 20 NFE on EDM's rho = 7 grid, ending at sigma_min."""
    from samplers.generation import SamplerConfig, _class_labels, build_grid
    from torch_utils.misc import StackedRandomGenerator
    device = torch.device(device or "cpu")
    config = SamplerConfig(solver=solver, schedule=schedule, num_steps=num_steps, sigma_min=sigma_min,
                           sigma_max=sigma_max, end=end, solver_kwargs=dict(solver_kwargs or {}),
                           schedule_kwargs=dict(schedule_kwargs or {}))
    grid, solver, solver_kwargs = build_grid(net, config, device)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("generate_teacher: no seeds")
    batches = [seeds[i:i + batch_size] for i in range(0, len(seeds), batch_size)]
    if progress:
        import tqdm
        batches = tqdm.tqdm(batches, unit="batch", desc="teacher")
    latents, images, labels = [], [], []
    for batch_seeds in batches:
        rnd = StackedRandomGenerator(device, batch_seeds)
        batch_latents = rnd.randn([len(batch_seeds), net.img_channels, net.img_resolution, net.img_resolution])
        batch_labels = _class_labels(net, rnd, len(batch_seeds), class_idx, device)
        images.append(teacher_samples(net, batch_latents, grid, solver=solver, solver_kwargs=solver_kwargs,
                                      class_labels=batch_labels, batch_size=len(batch_seeds)).cpu())
        latents.append(batch_latents.cpu())
        labels.append(None if batch_labels is None else batch_labels.cpu())
    info = dict(solver=solver, solver_kwargs=dict(solver_kwargs), schedule=str(schedule),
                schedule_kwargs=dict(schedule_kwargs or {}), num_steps=grid.num_steps, end=grid.end,
                nfe=count_nfe(solver, grid.num_steps, grid.end), sigmas=[float(s) for s in grid.sigmas.tolist()],
                network=str(network), class_idx=class_idx)
    return TeacherData(latents=torch.cat(latents), images=torch.cat(images).to(torch.float32),
                       class_labels=None if labels[0] is None else torch.cat(labels),
                       seeds=torch.tensor(seeds, dtype=torch.int64), info=info)


def save_teacher_data(path: str, data: TeacherData) -> None:
    """torch.save of plain tensors, numbers and strings (loads with weights_only=True), written atomically."""
    doc = dict(format=TEACHER_FILE_FORMAT, version=TEACHER_FILE_VERSION, latents=data.latents.cpu(),
               images=data.images.cpu(), class_labels=None if data.class_labels is None else data.class_labels.cpu(),
               seeds=None if data.seeds is None else data.seeds.cpu(), info=dict(data.info))
    with util.atomic_output(path, "wb") as f:
        torch.save(doc, f)


def load_teacher_data(path: str) -> TeacherData:
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"teacher data file not found: {path}") from None
    except Exception as err:
        raise ValueError(f"{path}: not a readable teacher data file ({err})") from None
    if not isinstance(doc, dict) or doc.get("format") != TEACHER_FILE_FORMAT:
        raise ValueError(f"{path}: not LD3 teacher data (expected a dict with format={TEACHER_FILE_FORMAT!r}; "
                         f"write it with `python -m samplers.ld3 gen-data`)")
    if doc.get("version") != TEACHER_FILE_VERSION:
        raise ValueError(f"{path}: unsupported teacher data version {doc.get('version')!r}, "
                         f"expected {TEACHER_FILE_VERSION}")
    try:
        return TeacherData(latents=doc["latents"], images=doc["images"], class_labels=doc.get("class_labels"),
                           seeds=doc.get("seeds"), info=dict(doc["info"]))
    except (KeyError, ValueError) as err:
        raise ValueError(f"{path}: malformed teacher data: {err}") from None


# ---------------------------------------------------------------------------------------------------------------
# Training.


@dataclasses.dataclass
class LD3Config:
    """LD3's hyper-parameters (defaults: vinhsuhi/LD3 configs/cifar10.yml and utils.adjust_hyper)."""

    solver: str = "ipndm"
    nfe: int = 6
    solver_kwargs: dict = dataclasses.field(default_factory=dict)
    end: str | None = None  # None: the solver's convention (samplers.DEFAULT_END)
    sigma_min: float | None = None  # None: the teacher grid's smallest positive level
    loss: str = "lpips"  # 'lpips' | 'l2' | 'l1'
    lpips_vgg: str | None = None  # path or URL of torchvision's VGG16 weights (None: download)
    lpips_lin: str | None = None  # path or URL of the LPIPS v0.1 linear weights (None: download)
    lpips_resize: int | None = None
    num_train: int = 50
    num_valid: int = 50
    batch_size: int = 2
    valid_batch_size: int | None = None  # None: the whole validation split per call
    rounds_v1: int = 2  # rounds training the grid only
    rounds_v2: int = 5  # rounds training the grid and the evaluation offsets
    lr_logits: float = 5e-3  # RMSprop
    momentum_logits: float = 0.9
    lr_offsets: float = 0.1  # SGD, divided by NFE as LD3
    min_lr_logits: float = 5e-5
    min_lr_offsets: float = 1e-6
    lr_decay: float = 0.8
    patience: int = 5
    lr2_patience: int = 5  # stop after the offsets' lr floor was hit this many times
    shift_lr: float | None = None  # SGD on the noises; None: 12 / NFE
    shift_lr_decay: float = 0.5
    prior_bound: float | None = None  # radius on the unit-noise scale; None: 0.001 * numel / NFE^2; 0: hard loss
    eval_window: float = 0.45
    decoupled: bool = True  # learn the evaluation grid (rounds_v2)
    init: str = "logsnr"  # starting grid: a SCHEDULES name (LD3: logsnr)
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint: bool = False  # activation checkpointing in the unroll

    def validate(self, num_items: int | None = None) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}: expected one of {sorted(SOLVERS)}")
        unknown = sorted(set(self.solver_kwargs) - set(solver_options(self.solver)))
        if unknown:
            raise ValueError(f"solver {self.solver!r} does not take option(s) {unknown}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}: expected one of {', '.join(LOSSES)}")
        if self.init not in SCHEDULES:
            raise ValueError(f"init must be a schedule name ({', '.join(SCHEDULES)}), got {self.init!r}")
        for name in ("nfe", "num_train", "num_valid", "batch_size", "patience", "lr2_patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rounds_v1 < 0 or self.rounds_v2 < 0 or self.rounds_v1 + self.rounds_v2 < 1:
            raise ValueError("need rounds_v1 + rounds_v2 >= 1 training rounds")
        if self.prior_bound is not None and self.prior_bound < 0:
            raise ValueError(f"prior_bound must be >= 0, got {self.prior_bound}")
        if num_items is not None and num_items < self.num_train + self.num_valid:
            raise ValueError(f"the teacher data holds {num_items} samples, fewer than num_train + num_valid = "
                             f"{self.num_train} + {self.num_valid}")


@dataclasses.dataclass
class LD3Result:
    """The best grid found (by validation loss) and how training went."""

    sigmas: torch.Tensor
    eval_sigmas: torch.Tensor | None
    solver: str
    solver_kwargs: dict
    end: str
    nfe: int
    init_valid_loss: float
    best_valid_loss: float
    history: list
    train_time_s: float
    provenance: dict

    @property
    def grid(self) -> SigmaGrid:
        return SigmaGrid(sigmas=self.sigmas, end=self.end, eval_sigmas=self.eval_sigmas, schedule="ld3",
                         solver=self.solver, solver_kwargs=dict(self.solver_kwargs), provenance=self.provenance)

    def save(self, path: str) -> None:
        """Write the schedule file that generate.py --schedule reads (atomic JSON; floats round-trip exactly)."""
        save_schedule_file(path, self.sigmas, solver=self.solver, nfe=self.nfe, eval_sigmas=self.eval_sigmas,
                           end=self.end, solver_kwargs=self.solver_kwargs, provenance=self.provenance)


class _Split:
    """One data split on the device: the original noises, the current (shifted) noises, targets, labels."""

    def __init__(self, data: TeacherData, index: slice, device):
        self.original = data.latents[index].to(device, torch.float64)
        self.latents = self.original.clone()
        self.targets = data.images[index].to(device, torch.float32)
        self.labels = None if data.class_labels is None else data.class_labels[index].to(device)

    def __len__(self):
        return len(self.original)

    def max_shift(self) -> float:
        """The largest distance of a current noise from its original (unit-noise scale)."""
        return float((self.latents - self.original).flatten(1).norm(dim=1).max())

    def batch(self, index):
        return self.latents[index], self.original[index], self.targets[index], \
            None if self.labels is None else self.labels[index]


def train_ld3(denoiser, teacher: TeacherData, config: LD3Config, *, device=None, progress: bool = False,
              log=None, loss_fn=None) -> LD3Result:
    """Learn `config.solver`'s grid at `config.nfe` from `teacher` (the first num_train samples train, the next
    num_valid validate) with LD3's algorithm; return the grid with the best validation loss.

    denoiser: D(x, sigma, class_labels) as the solvers call it (a network or any function), differentiable in x
    and sigma. log: a callable taking one line of text per round (e.g. print). loss_fn: overrides config.loss with
    a per-sample distance function (student, teacher) -> [B].
    """
    config.validate(len(teacher))
    start_time = time.time()
    if device is None:
        param = next(denoiser.parameters(), None) if isinstance(denoiser, torch.nn.Module) else None
        device = param.device if param is not None else teacher.latents.device
    device = torch.device(device)
    end = config.end or DEFAULT_END[config.solver]
    num_steps = steps_for_nfe(config.solver, config.nfe, end)
    nfe = config.nfe
    sigma_max = teacher.sigma_max
    sigma_min = teacher.sigma_min if config.sigma_min is None else float(config.sigma_min)
    num_levels = num_steps + 1 if end == "sigma_min" else num_steps
    if num_levels < 3:
        raise ValueError(f"{config.solver} at {nfe} NFE with end={end!r} has {num_levels} positive noise levels; "
                         f"LD3 needs at least 3 (an interior level to learn)")
    init = SCHEDULES[config.init](num_levels - 1, sigma_min, sigma_max)
    grid = GridParameterization(num_levels, sigma_min, sigma_max, end=end, eval_window=config.eval_window,
                                init=init).to(device)
    loss_name = config.loss if loss_fn is None else getattr(loss_fn, "__name__", type(loss_fn).__name__)
    if loss_fn is None:
        loss_fn = make_loss(config.loss, lpips_vgg=config.lpips_vgg, lpips_lin=config.lpips_lin,
                            lpips_resize=config.lpips_resize, device=device)
    numel = teacher.latents[0].numel()
    prior_bound = 0.001 * numel / nfe**2 if config.prior_bound is None else float(config.prior_bound)
    shift_lr = 12.0 / nfe if config.shift_lr is None else float(config.shift_lr)
    train = _Split(teacher, slice(0, config.num_train), device)
    valid = _Split(teacher, slice(config.num_train, config.num_train + config.num_valid), device)
    opt_logits = torch.optim.RMSprop([grid.logits], lr=config.lr_logits, momentum=config.momentum_logits)
    opt_offsets = torch.optim.SGD([grid.offsets], lr=config.lr_offsets / nfe)
    shuffle = torch.Generator().manual_seed(config.seed)

    def per_sample_loss(latents, targets, labels):
        sigmas, eval_sigmas = grid()
        output = student_sample(denoiser, latents, sigmas, eval_sigmas, solver=config.solver, class_labels=labels,
                                checkpoint=config.checkpoint, **config.solver_kwargs)
        return loss_fn(output, targets)

    valid_batch = config.valid_batch_size or len(valid)
    state = dict(best=math.inf, best_params=copy.deepcopy(grid.state_dict()), count_worse=0, one_batch=True,
                 lr2_floor_hits=0, stop=False)

    @torch.no_grad()
    def validate(split=valid, use_original=False, limit=None):
        total, count = 0.0, 0
        items = len(split) if limit is None else min(limit, len(split))
        for start in range(0, items, valid_batch):
            index = slice(start, min(start + valid_batch, items))
            latents, original, targets, labels = split.batch(index)
            total += float(per_sample_loss(original if use_original else latents, targets, labels).sum())
            count += index.stop - index.start
        return total / count

    def examine(phase_v1: bool):
        """LD3's _examine_checkpoint: validate; keep the best; on lost patience reload it and decay the lrs."""
        loss = validate(limit=valid_batch if state["one_batch"] else None)
        if loss < state["best"]:
            state.update(best=loss, best_params=copy.deepcopy(grid.state_dict()), count_worse=0)
        else:
            state["count_worse"] += 1
        if state["count_worse"] >= config.patience:
            grid.load_state_dict(state["best_params"])
            state["count_worse"] = 0
            if state["one_batch"]:  # LD3: the first time, switch to the full validation set, no decay
                state["one_batch"] = False
                state["best"] = validate()
                return loss
            for group in opt_logits.param_groups:
                group["lr"] = max(config.lr_decay * group["lr"], config.min_lr_logits)
            if not phase_v1:
                for group in opt_offsets.param_groups:
                    group["lr"] = max(config.lr_decay * group["lr"], config.min_lr_offsets)
                if opt_offsets.param_groups[0]["lr"] <= config.min_lr_offsets:
                    state["lr2_floor_hits"] += 1
                    state["stop"] = state["lr2_floor_hits"] >= config.lr2_patience
        return loss

    def shift_noises(split, index, latents, original, targets, labels, train_params: bool):
        """One LD3 step on a batch: gradient step on the noises (and on the grid when train_params), projection
        onto the ball of radius prior_bound, and keep each sample's new noise only where its loss went down."""
        noise = latents.clone().requires_grad_(prior_bound > 0)
        losses = per_sample_loss(noise, targets, labels)
        loss = losses.mean()
        reference = losses.detach()
        if loss.requires_grad:
            loss.backward()
        if train_params:
            for param in (grid.logits, grid.offsets):
                if param.grad is not None:
                    torch.nn.utils.clip_grad_norm_([param], config.grad_clip)
            opt_logits.step()
            opt_offsets.step()
            opt_logits.zero_grad(set_to_none=True)
            opt_offsets.zero_grad(set_to_none=True)
        moved = 0
        if prior_bound > 0 and noise.grad is not None:
            with torch.no_grad():
                candidate = noise - shift_lr * noise.grad
                delta = (candidate - original).flatten(1)
                norm = delta.norm(dim=1)
                scale = torch.where(norm > prior_bound, prior_bound / norm.clamp_min(1e-30), torch.ones_like(norm))
                candidate = original + (delta * scale[:, None]).view_as(original)
                improved = per_sample_loss(candidate, targets, labels) < reference
                split.latents[index] = torch.where(improved.view(-1, *[1] * (candidate.ndim - 1)), candidate,
                                                   latents)
                moved = int(improved.sum())
        return float(loss.detach()), moved

    num_rounds = config.rounds_v1 + config.rounds_v2
    iters_per_round = math.ceil(len(train) / config.batch_size)
    init_valid_loss = validate(use_original=True)
    history = []
    bar = None
    if progress:
        import tqdm
        bar = tqdm.tqdm(total=num_rounds * iters_per_round, unit="step", desc=f"LD3 {config.solver} NFE {nfe}")
    try:
        for round_index in range(num_rounds):
            round_start = time.time()
            phase_v1 = round_index < config.rounds_v1
            grid.logits.requires_grad_(True)
            grid.offsets.requires_grad_(config.decoupled and not phase_v1)
            if round_index > 0:
                grid.load_state_dict(state["best_params"])
                state["count_worse"] = 0
            examine(phase_v1)
            train_losses, moved_train, moved_valid = [], 0, 0
            order = torch.randperm(len(train), generator=shuffle).to(device)
            for start in range(0, len(train), config.batch_size):
                index = order[start:start + config.batch_size]
                loss, moved = shift_noises(train, index, *train.batch(index), train_params=True)
                train_losses.append(loss)
                moved_train += moved
                examine(phase_v1)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(train=f"{loss:.4g}", best=f"{state['best']:.4g}")
                if state["stop"]:
                    break
            if prior_bound > 0 and not state["stop"]:  # the validation noises move too (parameters frozen)
                grid.requires_grad_(False)
                for start in range(0, len(valid), config.batch_size):
                    index = torch.arange(start, min(start + config.batch_size, len(valid)), device=device)
                    moved_valid += shift_noises(valid, index, *valid.batch(index), train_params=False)[1]
                if moved_valid == 0:
                    shift_lr *= config.shift_lr_decay
            entry = dict(round=round_index + 1, phase="v1" if phase_v1 else "v2",
                         train_loss=sum(train_losses) / max(len(train_losses), 1),
                         valid_loss=validate(), best_valid_loss=state["best"],
                         lr_logits=opt_logits.param_groups[0]["lr"], lr_offsets=opt_offsets.param_groups[0]["lr"],
                         shift_lr=shift_lr, noises_moved_train=moved_train, noises_moved_valid=moved_valid,
                         max_noise_shift=max(split.max_shift() for split in (train, valid)),
                         time_s=round(time.time() - round_start, 3))
            history.append(entry)
            if log is not None:
                log(f"LD3 round {entry['round']}/{num_rounds} ({entry['phase']}): train {entry['train_loss']:.6g}, "
                    f"valid {entry['valid_loss']:.6g}, best {entry['best_valid_loss']:.6g}, lr {entry['lr_logits']:.3g}"
                    f"/{entry['lr_offsets']:.3g}, noises moved {moved_train}/{moved_valid}, {entry['time_s']:.1f} s")
            if state["stop"]:
                if log is not None:
                    log(f"LD3: the offsets' learning rate reached its floor {config.lr2_patience} times; stopping")
                break
    finally:
        if bar is not None:
            bar.close()

    grid.load_state_dict(state["best_params"])
    with torch.no_grad():
        sigmas, eval_sigmas = (t.detach().cpu() for t in grid())
    if torch.equal(sigmas, eval_sigmas):
        eval_sigmas = None
    train_time = time.time() - start_time
    provenance = _json_safe(dict(
        method="LD3 (Tong et al., ICLR 2025; arXiv 2405.15506)", teacher=_json_safe(teacher.info),
        num_train=config.num_train, num_valid=config.num_valid, loss=loss_name,
        prior_bound=prior_bound, init=config.init, init_valid_loss=init_valid_loss, best_valid_loss=state["best"],
        rounds=len(history), train_time_s=round(train_time, 3), history=history,
        config={k: v for k, v in dataclasses.asdict(config).items() if k not in ("solver", "solver_kwargs", "end")},
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), torch=torch.__version__))
    return LD3Result(sigmas=sigmas, eval_sigmas=eval_sigmas, solver=config.solver,
                     solver_kwargs=dict(config.solver_kwargs), end=end, nfe=nfe, init_valid_loss=init_valid_loss,
                     best_valid_loss=state["best"], history=history, train_time_s=train_time, provenance=provenance)


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return repr(obj)
    return obj


# ---------------------------------------------------------------------------------------------------------------
# Command line: python -m samplers.ld3 gen-data | train


def _solver_cli_options(fn):
    """generate.py's solver options (same names and meaning)."""
    options = [
        click.option("--order", help="UniPC order (1-3) / iPNDM max order (1-4)", metavar="INT",
                     type=click.IntRange(min=1, max=4), default=None),
        click.option("--variant", help="UniPC: bh1|bh2; DPM-Solver++: dpmsolver|taylor",
                     type=click.Choice(["bh1", "bh2", "dpmsolver", "taylor"]), default=None),
        click.option("--lower-order-final", "lower_order_final", help="DPM-Solver++, UniPC: always|never|below10",
                     type=click.Choice(["always", "never", "below10"]), default=None),
        click.option("--exact-third-order/--reference-third-order", "exact_third_order", default=None,
                     help="DPM-Solver++(3M): truly third-order step instead of the reference codes' update"),
        click.option("--end", help="Grid end: append sigma=0 and denoise, or stop at sigma_min  [default: the "
                     "solver's convention]", type=click.Choice(["zero", "sigma_min"]), default=None),
        click.option("--device", help="Torch device  [default: cuda if available, else cpu]", default=None),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _device(device):
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


@click.group()
def cli():
    """LD3: learn a sampler's time discretisation from teacher samples (Tong et al., ICLR 2025).

    \b
    # 1. Teacher data: 100 noises and UniPC-3 samples at 20 NFE (LD3's CIFAR-10 recipe)
    python -m samplers.ld3 gen-data --network=edm-cifar10-32x32-uncond-vp.pkl --seeds=0-99 --out=teacher.pt
    \b
    # 2. Learn iPNDM's grid at 6 NFE (50 train / 50 validation samples, LPIPS loss)
    python -m samplers.ld3 train --data=teacher.pt --solver=ipndm --order=3 --nfe=6 --out=ipndm-nfe6.json
    \b
    # 3. Sample with it (the file brings its solver, options and grid)
    python generate.py --network=... --outdir=out --seeds=100-49999 --schedule=ipndm-nfe6.json
    """


@cli.command("gen-data", context_settings={"show_default": True})
@click.option("--network", "network", help="Network pickle filename", metavar="PATH|URL", required=True)
@click.option("--out", "out", help="Teacher data file to write (.pt)", metavar="PATH", required=True)
@click.option("--seeds", help="Random seeds (e.g. 0-99); noises and labels are drawn per seed as generate.py does",
              metavar="LIST", default="0-99")
@click.option("--batch", "batch_size", help="Maximum batch size", metavar="INT", type=click.IntRange(min=1),
              default=64)
@click.option("--solver", help="Teacher solver", type=click.Choice(sorted(SOLVERS)), default="unipc")
@click.option("--steps", "num_steps", help="Teacher steps", metavar="INT", type=click.IntRange(min=1), default=20)
@click.option("--schedule", help=f"Teacher grid: {', '.join(SCHEDULES)} or a schedule file", default="edm")
@click.option("--rho", help="Time step exponent (edm, vp_time_uniform)  [default: 7 for edm]", metavar="FLOAT",
              type=click.FloatRange(min=0, min_open=True), default=None, show_default=False)
@click.option("--sigma_min", help="Lowest noise level  [default: 0.002]", metavar="FLOAT", type=float, default=None,
              show_default=False)
@click.option("--sigma_max", help="Highest noise level  [default: 80]", metavar="FLOAT", type=float, default=None,
              show_default=False)
@click.option("--class", "class_idx", help="Class label  [default: random]", metavar="INT",
              type=click.IntRange(min=0), default=None, show_default=False)
@_solver_cli_options
def gen_data(network, out, seeds, batch_size, solver, num_steps, schedule, rho, sigma_min, sigma_max, class_idx,
             end, device, **solver_cli):
    """Sample teacher data: noises, teacher samples and labels, for `train`."""
    import generate
    from samplers.generation import describe, parse_int_list
    try:
        seeds = parse_int_list(seeds)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--seeds") from None
    if not seeds:
        raise click.BadParameter("no seeds given", param_hint="--seeds")
    config = generate.build_sampler_config(solver, schedule, num_steps, sigma_min, sigma_max, rho, end, False,
                                           **solver_cli)
    device = _device(device)
    net = generate.load_network(network, device)
    try:
        summary = describe(net, config)
        data = generate_teacher(net, seeds, solver=config.solver, num_steps=config.num_steps,
                                schedule=config.schedule, solver_kwargs=config.solver_kwargs,
                                schedule_kwargs=config.schedule_kwargs, end=config.end, sigma_min=config.sigma_min,
                                sigma_max=config.sigma_max, class_idx=class_idx, batch_size=batch_size,
                                device=device, network=network, progress=True)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    save_teacher_data(out, data)
    print(f"Teacher: {summary}")
    print(f'Wrote {len(data)} teacher samples to "{out}".')


@cli.command("train", context_settings={"show_default": True})
@click.option("--data", "data_path", help="Teacher data from gen-data", metavar="PATH", required=True)
@click.option("--out", "out", help="Schedule file to write (.json)", metavar="PATH", required=True)
@click.option("--network", "network", help="Network pickle  [default: the one the teacher data names]",
              metavar="PATH|URL", default=None, show_default=False)
@click.option("--solver", help="Student solver", type=click.Choice(sorted(SOLVERS)), required=True)
@click.option("--nfe", help="Student NFE (denoiser calls per sample)", metavar="INT", type=click.IntRange(min=1),
              required=True)
@click.option("--loss", help="Distance to the teacher", type=click.Choice(LOSSES), default="lpips")
@click.option("--lpips-vgg", "lpips_vgg", help=f"VGG16 weights  [default: {LPIPS_VGG16_URL}]", metavar="PATH|URL",
              default=None, show_default=False)
@click.option("--lpips-lin", "lpips_lin", help=f"LPIPS linear weights  [default: {LPIPS_LIN_URL}]",
              metavar="PATH|URL", default=None, show_default=False)
@click.option("--lpips-resize", "lpips_resize", help="Resize images to this size for LPIPS  [default: none]",
              metavar="INT", type=click.IntRange(min=16), default=None, show_default=False)
@click.option("--num-train", "num_train", help="Training samples (the first ones)", type=click.IntRange(min=1),
              default=50)
@click.option("--num-valid", "num_valid", help="Validation samples (the next ones)", type=click.IntRange(min=1),
              default=50)
@click.option("--batch", "batch_size", help="Training batch size", type=click.IntRange(min=1), default=2)
@click.option("--valid-batch", "valid_batch_size", help="Validation batch size  [default: all]",
              type=click.IntRange(min=1), default=None, show_default=False)
@click.option("--rounds-v1", "rounds_v1", help="Rounds learning the grid only", type=click.IntRange(min=0), default=2)
@click.option("--rounds-v2", "rounds_v2", help="Rounds learning grid and evaluation grid", type=click.IntRange(min=0),
              default=5)
@click.option("--lr", "lr_logits", help="RMSprop learning rate of the grid logits", type=float, default=5e-3)
@click.option("--lr-offsets", "lr_offsets", help="SGD learning rate of the evaluation offsets (divided by NFE)",
              type=float, default=0.1)
@click.option("--shift-lr", "shift_lr", help="SGD learning rate of the noises  [default: 12 / NFE]", type=float,
              default=None, show_default=False)
@click.option("--prior-bound", "prior_bound", help="Noise ball radius (unit-noise scale; 0: hard loss)  "
              "[default: 0.001 C H W / NFE^2]", type=click.FloatRange(min=0), default=None, show_default=False)
@click.option("--eval-window", "eval_window", help="Evaluation offsets as a fraction of the neighbouring gaps",
              type=click.FloatRange(min=0, max=0.5, max_open=True), default=0.45)
@click.option("--decouple/--no-decouple", "decoupled", help="Learn the decoupled evaluation grid", default=True)
@click.option("--init", help="Starting grid", type=click.Choice(sorted(SCHEDULES)), default="logsnr")
@click.option("--seed", help="Shuffling seed", type=int, default=0)
@click.option("--checkpoint", "checkpoint", help="Activation checkpointing (less memory, ~1.3x time)", is_flag=True)
@click.option("--log", "log_path", help="Log file  [default: OUT with .log.txt]", metavar="PATH", default=None,
              show_default=False)
@_solver_cli_options
def train(data_path, out, network, solver, nfe, end, device, log_path, order, variant, lower_order_final,
          exact_third_order, **options):
    """Learn the grid of SOLVER at NFE from teacher data; write a schedule file for generate.py --schedule."""
    import generate
    try:
        data = load_teacher_data(data_path)
    except (FileNotFoundError, ValueError) as err:
        raise click.BadParameter(str(err), param_hint="--data") from None
    network = network or data.info.get("network")
    if not network:
        raise click.UsageError(f"{data_path} names no network: pass --network")
    solver_kwargs = generate.build_sampler_config(solver, "edm", None, None, None, None, end, False, order=order,
                                                  variant=variant, lower_order_final=lower_order_final,
                                                  exact_third_order=exact_third_order).solver_kwargs
    config = LD3Config(solver=solver, nfe=nfe, solver_kwargs=solver_kwargs, end=end, **options)
    try:
        config.validate(len(data))
        steps_for_nfe(solver, nfe, config.end or DEFAULT_END[solver])
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    device = _device(device)
    net = generate.load_network(network, device)
    if tuple(data.latents.shape[1:]) != (net.img_channels, net.img_resolution, net.img_resolution):
        raise click.UsageError(f"{data_path} holds samples of shape {tuple(data.latents.shape[1:])}, but the network "
                               f"makes {(net.img_channels, net.img_resolution, net.img_resolution)}")
    if data.info.get("network") and os.path.abspath(str(data.info["network"])) != os.path.abspath(network):
        print(f"Warning: the teacher data was sampled from {data.info['network']}, training with {network}")
    log_path = log_path or (os.path.splitext(out)[0] + ".log.txt")
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    with open(log_path, "a") as log_file:
        def log(line):
            print(line)
            log_file.write(line + "\n")
            log_file.flush()

        log(f"LD3: {solver}({', '.join(f'{k}={v}' for k, v in sorted(solver_kwargs.items()))}) at {nfe} NFE, "
            f"end={config.end or DEFAULT_END[solver]}, loss={config.loss}, {config.num_train} train / "
            f"{config.num_valid} validation samples of {data_path}")
        try:
            result = train_ld3(net, data, config, device=device, progress=True, log=log)
        except LPIPSUnavailableError as err:
            raise click.ClickException(str(err)) from None
        result.provenance.update(network=str(network), teacher_data=os.path.abspath(data_path))
        result.save(out)
        log(f"Validation loss {result.init_valid_loss:.6g} ({config.init} grid) -> {result.best_valid_loss:.6g}; "
            f"grid {', '.join(f'{s:.4g}' for s in result.sigmas.tolist())}")
        log(f'Training time: {result.train_time_s:.1f} s. Wrote "{out}".')


if __name__ == "__main__":
    cli()
