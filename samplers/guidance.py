"""Guidance: plug-in corrections of the denoiser that every registered solver samples with.

`GUIDANCE` maps a name to a `GuidanceEntry`: the flag that enables it (and takes its main value), its options with
their flags, types and defaults, and `build(value, **options)`, which returns the guidance object. The sampler flags
of generate.py, fid.py calc --network (samplers/cli_options.py) are made from this registry, `SamplerConfig.guidance`
carries {name: {'value': ..., option: ...}}, and `GridSampling` (samplers/generation.py) describes and samples with
it; no CLI names a guidance. A guidance object has

    describe(net, grid, solver, solver_kwargs, denoise_to_zero) -> str    one clause for the sampler line (its cost)
    prepare(net, grid, solver, solver_kwargs, device) -> prepared         once per run (loads its networks)
    prepared.sample(net, grid, solver, solver_kwargs, inputs, denoise_to_zero) -> float64 images   per batch
    record() -> dict                                                      the settings as they resolve (defaults
                                                                          filled, files by content) for records

Discriminator guidance (DG; Kim et al., ICML 2023, alsdudrla10/DG). The probability-flow ODE in EDM's form is
dx/dsigma = (x - D(x; sigma)) / sigma = -sigma s(x; sigma), with the score s = (D - x) / sigma^2. DG samples with the
score s + w c, c = grad_x log(d / (1 - d)) of a discriminator d between real and generated images at level sigma.
The slope becomes (x - D) / sigma - w sigma c = (x - D_w) / sigma with

    D_w(x; sigma) = D(x; sigma) + w sigma^2 c(x; sigma),

so the guidance is a denoiser wrapper and every solver integrates the guided ODE unchanged. The reference (EDM-G++,
its generate.py) adds w * dg / sigma to Heun's Euler slope with dg = -(sigma^2 alpha) grad_{x_in} log(d / (1 - d)),
x_in = alpha x, i.e. -w sigma c since grad_x = alpha grad_{x_in}: the same correction. It guides Heun's predictor
evaluation with w (`--dg-weight`, its dg_weight_1st_order) and the corrector evaluation with a second weight
(`--dg-weight-corrector`, dg_weight_2nd_order, default 0; the reference's sampler fails with any other value, so a
non-zero one here has no reference to match), both entering the trapezoidal average: here the calls of
a solver with a corrector evaluation are told apart by their order (`CORRECTOR_CALLS`); every other solver evaluates
each step once and all its calls use w. Guidance acts only where the discriminator's VP time tau(sigma) lies in
[--dg-tau-min, --dg-tau-max] (0.01, 1), per sample (the reference decides for the whole batch on its smallest tau:
the same with one sigma per batch; see docs/solvers.md for boosting); elsewhere D_w = D. With w = 0 the network's
output is returned untouched (bit-identical to unguided sampling).

Cost: each guided call adds one discriminator gradient evaluation (a forward and a backward pass through the encoder
and the head), which NFE does not count; the sampler line states how many per image. Whether a call is in the tau
window is decided on the host from the grid's planned levels (`PreparedDG.in_window`; no device read per call): the
discriminator is skipped outside the window.

Boosting (`--dg-boost`, the reference's conditional setting): Heun with per-sample churn; at steps i = 0, 5, 10, ...
the samples whose last log ratio was negative get S_churn = 4 (gamma = min(4 / N, sqrt 2 - 1), S_noise = 1), and at
even steps their guidance is doubled. It needs per-sample noise levels inside a step, so it is its own sampler
(`boosted_heun`), for --solver=heun only.
"""

import copy
import dataclasses
import math
import os
import typing
from collections.abc import Callable

import torch

from dnnlib import util
from samplers import sample
from samplers.dg.discriminator import Discriminator, DiscriminatorError, clipped_log_ratio, load_discriminator
from samplers.euler_heun import check_churn
from samplers.solver_grid import host_levels
from torch_utils import distributed as dist

OUT_OF_WINDOW_LOG_RATIO = 1e7  # the reference's log ratio where guidance is off (never counts as "fake")


@dataclasses.dataclass(frozen=True)
class GuidanceOption:
    """One option of a guidance: its keyword, its command-line flag, type (float, int, bool, str) and default."""

    key: str
    flag: str
    type: type
    default: object
    help: str
    metavar: str | None = None


@dataclasses.dataclass(frozen=True)
class GuidanceEntry:
    """A guidance method: the flag that enables it and takes its main value, its options, and its constructor
    `build(value, **options) -> guidance object` (which checks the options: ValueError naming the flag)."""

    flag: str
    metavar: str
    help: str
    options: tuple[GuidanceOption, ...]
    build: Callable

    def option(self, key: str) -> GuidanceOption:
        return next(o for o in self.options if o.key == key)

    def defaults(self) -> dict:
        return {o.key: o.default for o in self.options}


# ---------------------------------------------------------------------------------------------------------------------
# Discriminator guidance.


def heun_corrector_calls(levels: list[float]) -> list[bool]:
    """For each call EDM's Heun makes over the grid `levels`: whether it is a corrector evaluation (at sigma_{i+1},
    after the Euler step of step i; none for a step that ends at 0)."""
    calls = []
    for i in range(len(levels) - 1):
        calls.append(False)
        if levels[i + 1] > 0:
            calls.append(True)
    return calls


# Solvers that evaluate the denoiser twice per step, a predictor then a corrector: the role of each call, in order.
CORRECTOR_CALLS = {"heun": heun_corrector_calls}


class Correction(typing.NamedTuple):
    term: torch.Tensor       # sigma^2 grad_x log(d / (1 - d)), [N, C, H, W] float64 (0 outside the tau window)
    log_ratio: torch.Tensor  # log(d / (1 - d)) [N] float64 (1e7 outside the window)
    active: torch.Tensor     # [N] bool: tau(sigma) inside the window
    evaluated: bool          # whether the discriminator ran (some sample inside the window)


def dg_correction(disc: Discriminator, x: torch.Tensor, sigma, class_labels=None, *, tau_min: float = 0.01,
                  tau_max: float = 1.0, in_window: bool | None = None) -> Correction:
    """DG's correction of the denoiser at x and the noise levels sigma (a scalar or one per sample): sigma^2 times
    the gradient of the clipped log ratio, zero where tau(sigma) is outside [tau_min, tau_max]. The gradient is
    taken through the encoder input in float32 and scaled back to x, as the reference does.

    in_window: the caller's host-side answer to "is some sample inside the window" (GuidedDenoiser knows each call's
    level before sampling); None: asked of the device here, one host sync."""
    x = x.detach()
    x_in, scale, tau = disc.encoder_input(x, sigma)
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand_as(scale)
    active = (tau >= tau_min) & (tau <= tau_max)
    if in_window is None:
        in_window = bool(active.any())
    if not in_window:  # host decision: outside the window the discriminator is not run
        return Correction(torch.zeros_like(x, dtype=torch.float64), torch.full_like(tau, OUT_OF_WINDOW_LOG_RATIO),
                          active, False)
    x_in = x_in.detach().requires_grad_(True)
    with torch.enable_grad():
        log_ratio = clipped_log_ratio(disc.logit_from_input(x_in, sigma, tau, class_labels))
        (grad_in,) = torch.autograd.grad(log_ratio.sum(), x_in)
    factor = torch.where(active, sigma ** 2 * scale, torch.zeros_like(scale)).reshape(-1, 1, 1, 1)
    log_ratio = torch.where(active, log_ratio.detach().to(torch.float64), OUT_OF_WINDOW_LOG_RATIO)
    return Correction(factor * grad_in.to(torch.float64), log_ratio, active, True)


class GuidedDenoiser:
    """D_w(x; sigma) = D(x; sigma) + w_k sigma^2 c(x; sigma) for the k-th call of a sampling run, w_k from
    `weights` (one per call the solver makes). A call with w_k = 0 returns the network's output itself."""

    def __init__(self, net, guidance: "PreparedDG", weights: list[float]):
        self.net, self.guidance, self.weights = net, guidance, list(weights)
        self.calls = 0
        self.discriminator_calls = 0

    def __call__(self, x, sigma, class_labels=None):
        denoised = self.net(x, sigma, class_labels)
        if self.calls >= len(self.weights):
            raise RuntimeError(f"the solver made more than the {len(self.weights)} denoiser calls DG expected")
        weight, in_window = self.weights[self.calls], self.guidance.in_window[self.calls]
        self.calls += 1
        if weight == 0:
            return denoised
        correction = self.guidance.correction(x, sigma, class_labels, in_window=in_window)
        self.discriminator_calls += int(correction.evaluated)
        return denoised.to(torch.float64) + weight * correction.term

    def check_finished(self) -> None:
        if self.calls != len(self.weights):
            raise RuntimeError(f"DG expected {len(self.weights)} denoiser calls and the solver made {self.calls}")


def boost_churn_mask(step: int, log_ratio: torch.Tensor, period: int = 5) -> torch.Tensor:
    """Boosting's churn: at steps 0, period, 2 period, ... the samples whose last log ratio is negative."""
    return (log_ratio < 0) & (step % period == 0)


def boost_weight_factor(step: int, log_ratio: torch.Tensor, weight: float, period: int = 2) -> torch.Tensor:
    """Boosting's guidance weight per sample: doubled at steps 0, period, ... where the log ratio is negative."""
    factor = torch.full_like(log_ratio, float(weight), dtype=torch.float64)
    return torch.where((log_ratio < 0) & (step % period == 0), 2 * factor, factor)


def boosted_heun(net, correction: Callable, x, sigmas, class_labels=None, *, weight: float = 1.0,
                 weight_corrector: float = 0.0, S_churn: float = 0.0, S_min: float = 0.0, S_max: float = math.inf,
                 S_noise: float = 1.0, randn_like=None, round_sigma=None, boost_churn: float = 4.0,
                 churn_period: int = 5, weight_period: int = 2) -> torch.Tensor:
    """The reference's EDM-G++ sampler with boosting: EDM's Heun with DG, where at steps i % churn_period == 0 the
    samples whose last log ratio is negative are churned with S_churn = boost_churn (S_noise = 1), and at steps
    i % weight_period == 0 the guidance of the samples whose current log ratio is negative is doubled.

    correction(x, sigma, class_labels) -> Correction: `dg_correction` of the discriminator.
    Noise levels are per sample inside a step (a boosted sample's churned level); the noise is drawn from randn_like
    at every step, as the reference does. The grid's last entry may be 0 (no corrector on that step) or sigma_min.
    """
    check_churn("heun with --dg", S_churn)  # a negative churn: sqrt of a negative number, NaN images
    if randn_like is None:
        randn_like = torch.randn_like
    if round_sigma is None:
        round_sigma = torch.as_tensor
    levels = host_levels(sigmas)
    num_steps = len(levels) - 1
    batch = x.shape[0]
    log_ratio = torch.full([batch], math.inf, dtype=torch.float64, device=x.device)
    for i in range(num_steps):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        churn = torch.full([batch], float(S_churn), dtype=torch.float64, device=x.device)
        noise_scale = torch.full([batch], float(S_noise), dtype=torch.float64, device=x.device)
        boosted = boost_churn_mask(i, log_ratio, churn_period)
        churn = torch.where(boosted, boost_churn, churn)
        noise_scale = torch.where(boosted, 1.0, noise_scale)
        gamma = churn / num_steps
        gamma = torch.minimum(gamma, torch.full_like(gamma, math.sqrt(2) - 1)) if S_min <= levels[i] <= S_max \
            else torch.zeros_like(gamma)
        t_hat = torch.as_tensor(round_sigma(t_cur + gamma * t_cur)).to(torch.float64)
        noise = randn_like(x)
        x_hat = x + ((t_hat ** 2 - t_cur ** 2).sqrt() * noise_scale).reshape(-1, 1, 1, 1) * noise
        t_hat_ = t_hat.reshape(-1, 1, 1, 1)
        denoised = net(x_hat, t_hat, class_labels).to(torch.float64)
        if weight != 0:
            guide = correction(x_hat, t_hat, class_labels)
            log_ratio = guide.log_ratio
            factor = boost_weight_factor(i, log_ratio, weight, weight_period)
            denoised = denoised + factor.reshape(-1, 1, 1, 1) * guide.term
        d_cur = (x_hat - denoised) / t_hat_
        x = x_hat + (t_next - t_hat_) * d_cur
        if levels[i + 1] > 0:
            denoised = net(x, t_next, class_labels).to(torch.float64)
            if weight_corrector != 0:
                denoised = denoised + weight_corrector * correction(x, t_next, class_labels).term
            d_prime = (x - denoised) / t_next
            x = x_hat + (t_next - t_hat_) * (0.5 * d_cur + 0.5 * d_prime)
    return x


def _count_calls(net, grid, solver: str, solver_kwargs: dict, denoise_to_zero: bool) -> list[float]:
    """The noise level of each denoiser call the solver makes over `grid` (a dry run on one pixel per channel with
    D(x) = x; the levels do not depend on x, and a churned level only on the options)."""
    levels = []

    def record(x, sigma, class_labels=None):
        levels.append(float(torch.as_tensor(sigma).reshape(-1)[0]))
        return x

    latents = torch.zeros([1, int(getattr(net, "img_channels", 1) or 1), 1, 1], dtype=torch.float64,
                          device=grid.sigmas.device)
    sample(record, latents, grid, solver=solver, randn_like=torch.zeros_like, round_sigma=getattr(net, "round_sigma",
           None), denoise_to_zero=denoise_to_zero, **solver_kwargs)
    return levels


@dataclasses.dataclass
class DiscriminatorGuidance:
    """DG's options (see the module docstring); `value` is the DG pickle's path or URL."""

    value: str
    weight: float = 2.0
    weight_corrector: float = 0.0
    tau_min: float = 0.01
    tau_max: float = 1.0
    boost: bool = False

    def __post_init__(self):
        flags = {o.key: o.flag for o in DG_OPTIONS}
        for key in ("weight", "weight_corrector", "tau_min", "tau_max"):
            if not math.isfinite(float(getattr(self, key))):
                raise ValueError(f"{flags[key]} must be a finite number, got {getattr(self, key)}")
        for key in ("weight", "weight_corrector"):  # a negative weight guides toward "generated" (the reference: >= 0)
            if float(getattr(self, key)) < 0:
                raise ValueError(f"{flags[key]} must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.tau_min <= self.tau_max <= 1:
            raise ValueError(f"--dg-tau-min and --dg-tau-max must satisfy 0 <= min <= max <= 1 (VP time), got "
                             f"{self.tau_min} and {self.tau_max}")

    @property
    def adds_noise(self) -> bool:
        """Boosting churns the samples it picks: fresh noise beyond the solver's own (GridSampling.draws_noise)."""
        return bool(self.boost)

    def load(self) -> Discriminator:
        return _load_cached(self.value)

    def record(self) -> dict:
        """The options as they resolve (defaults filled, numbers as floats) and the discriminator by its content
        (sha256; a URL that is not downloaded by its address): the same settings record the same, wherever the
        pickle lies."""
        digest = util.file_sha256(str(self.value))
        return dict(weight=float(self.weight), weight_corrector=float(self.weight_corrector),
                    tau_min=float(self.tau_min), tau_max=float(self.tau_max), boost=bool(self.boost),
                    discriminator_sha256=digest, discriminator=None if digest else str(self.value))

    def check(self, net, grid, solver: str, solver_kwargs: dict) -> Discriminator:
        """The discriminator, after checking that it fits the network and the solver (ValueError naming the flag)."""
        if self.weight_corrector != 0 and solver not in CORRECTOR_CALLS:
            raise ValueError(f"--dg-weight-corrector applies to solvers with a corrector evaluation "
                             f"({', '.join(CORRECTOR_CALLS)}); solver {solver!r} evaluates each step once, with "
                             f"--dg-weight")
        if self.boost and solver != "heun":
            raise ValueError(f"--dg-boost is the reference's boosted Heun (per-sample churn); it needs --solver=heun, "
                             f"not {solver!r}")
        if self.boost and grid.eval_sigmas is not None:
            raise ValueError("--dg-boost cannot use a decoupled evaluation grid (a learned schedule file)")
        disc = self.load()
        res, channels = int(getattr(net, "img_resolution", 0)), int(getattr(net, "img_channels", 0))
        if (disc.img_resolution, disc.img_channels) != (res, channels):
            raise ValueError(f"--dg: the discriminator {self.value} was trained on {disc.img_channels}x"
                             f"{disc.img_resolution}x{disc.img_resolution} images; the network samples {channels}x"
                             f"{res}x{res}")
        label_dim = int(getattr(net, "label_dim", 0) or 0)
        if disc.needs_labels and disc.label_dim != label_dim:
            raise ValueError(f"--dg: the discriminator {self.value} reads class labels of {disc.label_dim} classes; "
                             f"the network has label_dim = {label_dim}")
        return disc

    def _weights(self, net, grid, solver, solver_kwargs, denoise_to_zero):
        levels = _count_calls(net, grid, solver, solver_kwargs, denoise_to_zero)
        roles = CORRECTOR_CALLS.get(solver, lambda lv: [False] * (len(lv) - 1))(grid.sigmas.tolist())
        roles = roles + [False] * (len(levels) - len(roles))  # a final denoise_to_zero is a plain evaluation
        if len(roles) != len(levels):
            raise RuntimeError(f"DG: solver {solver!r} makes {len(levels)} calls but its call roles list {len(roles)}")
        weights = [self.weight_corrector if corrector else self.weight for corrector in roles]
        return levels, weights

    def describe(self, net, grid, solver: str, solver_kwargs: dict, denoise_to_zero: bool = False) -> str:
        disc = self.check(net, grid, solver, solver_kwargs)
        levels, weights = self._weights(net, grid, solver, solver_kwargs, denoise_to_zero)
        taus = disc.vp.tau(torch.tensor(levels, dtype=torch.float64)).tolist()
        guided = sum(1 for w, t in zip(weights, taus) if w != 0 and self.tau_min <= t <= self.tau_max)
        weights_text = f"w={self.weight:g}" + (f", corrector w={self.weight_corrector:g}"
                                               if solver in CORRECTOR_CALLS else "")
        digest = util.file_sha256(str(self.value))  # the line is recorded with generate.py's images
        name = os.path.basename(str(self.value)) + (f" sha256:{digest[:12]}" if digest else "")
        return (f"discriminator guidance {name} ({disc.encoder_kind} encoder, "
                f"{'conditional' if disc.conditional else 'unconditional'}; {weights_text}; tau "
                f"{self.tau_min:g}..{self.tau_max:g}{'; boosting' if self.boost else ''}): "
                f"+{'about ' if self.boost else ''}{guided} discriminator gradient evaluations per image (forward and "
                f"backward through encoder and head; not counted in NFE)")

    def prepare(self, net, grid, solver: str, solver_kwargs: dict, device=None,
                denoise_to_zero: bool = False) -> "PreparedDG":
        disc = self.check(net, grid, solver, solver_kwargs)
        device = torch.device(device) if device is not None else grid.sigmas.device
        disc = disc if device.type == "cpu" else _copy_to(disc, device)
        levels, weights = self._weights(net, grid, solver, solver_kwargs, denoise_to_zero)
        return PreparedDG(self, disc, weights, levels)


class PreparedDG:
    """DG ready to sample: the discriminator on the device, the weight of each denoiser call and whether its level
    is inside the tau window (decided on the host from the planned levels, as `describe` counts the evaluations:
    no device-to-host read per call)."""

    def __init__(self, options: DiscriminatorGuidance, disc: Discriminator, weights: list[float],
                 levels: list[float]):
        self.options, self.disc, self.weights = options, disc, weights
        taus = disc.vp.tau(torch.tensor(levels, dtype=torch.float64)).tolist()
        self.in_window = [options.tau_min <= tau <= options.tau_max for tau in taus]

    def correction(self, x, sigma, class_labels=None, in_window: bool | None = None):
        return dg_correction(self.disc, x, sigma, class_labels, tau_min=self.options.tau_min,
                             tau_max=self.options.tau_max, in_window=in_window)

    def sample(self, net, grid, solver: str, solver_kwargs: dict, inputs, denoise_to_zero: bool = False):
        """One batch: the solver over the guided denoiser (the discriminator reads the batch's class labels, the
        ones the solver passes to the network), or the boosted Heun."""
        round_sigma = getattr(net, "round_sigma", None)
        if self.options.weight == 0 and self.options.weight_corrector == 0:  # unguided, bit for bit (also boosted)
            return sample(net, inputs.latents, grid, solver=solver, class_labels=inputs.class_labels,
                          randn_like=inputs.randn_like, round_sigma=round_sigma, denoise_to_zero=denoise_to_zero,
                          **solver_kwargs)
        if self.options.boost:
            x = inputs.latents.to(torch.float64) * grid.sigmas[0]
            x = boosted_heun(net, self.correction, x, grid.sigmas, inputs.class_labels, weight=self.options.weight,
                             weight_corrector=self.options.weight_corrector, randn_like=inputs.randn_like,
                             round_sigma=round_sigma, **solver_kwargs)
            if denoise_to_zero and grid.end == "sigma_min":
                x = net(x, grid.sigmas[-1], inputs.class_labels).to(torch.float64)
            return x
        denoiser = GuidedDenoiser(net, self, self.weights)
        x = sample(denoiser, inputs.latents, grid, solver=solver, class_labels=inputs.class_labels,
                   randn_like=inputs.randn_like, round_sigma=round_sigma, denoise_to_zero=denoise_to_zero,
                   **solver_kwargs)
        denoiser.check_finished()
        return x


def _copy_to(disc: Discriminator, device) -> Discriminator:
    return copy.deepcopy(disc).to(device)  # the cached CPU copy stays for the next run


_LOADED: dict = {}


def _load_cached(path: str) -> Discriminator:
    """A DG pickle, read once per process (describe and prepare of one run read it once); keyed by path and, for a
    local file, its size and modification time."""
    try:
        stat = os.stat(path)
        key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    except OSError:
        key = (str(path),)
    if key not in _LOADED:
        # Under torchrun every rank loads: rank 0 first (a URL is downloaded into the cache once), then the others
        # read the cache copy, as training.snapshots.load_snapshot and metrics.detectors.load_detector do.
        rank = dist.get_rank()
        if rank != 0:
            dist.barrier()
        try:
            _LOADED[key] = load_discriminator(path)
        except DiscriminatorError as err:
            raise ValueError(str(err)) from None
        finally:
            if rank == 0:
                dist.barrier()
    return _LOADED[key]


DG_OPTIONS = (
    GuidanceOption("weight", "--dg-weight", float, 2.0, "DG weight w on the solver's slope (the reference's "
                   "dg_weight_1st_order; DG's CIFAR-10 settings: 2 unconditional, 1 conditional with --dg-boost)",
                   "FLOAT"),
    GuidanceOption("weight_corrector", "--dg-weight-corrector", float, 0.0, "DG weight on Heun's corrector "
                   "evaluation (the reference's dg_weight_2nd_order)", "FLOAT"),
    GuidanceOption("tau_min", "--dg-tau-min", float, 0.01, "DG acts only at VP times tau(sigma) >= this", "FLOAT"),
    GuidanceOption("tau_max", "--dg-tau-max", float, 1.0, "DG acts only at VP times tau(sigma) <= this", "FLOAT"),
    GuidanceOption("boost", "--dg-boost", bool, False, "The reference's boosting (conditional CIFAR-10): churn and "
                   "doubled guidance for samples the discriminator calls fake (heun only)"),
)


GUIDANCE = {
    "dg": GuidanceEntry(flag="--dg", metavar="PKL", help="Discriminator guidance with this discriminator (a DG "
                        "pickle from train_dg.py)", options=DG_OPTIONS, build=DiscriminatorGuidance),
}


GUIDANCE_METHODS = ("describe", "prepare", "record")  # what a guidance object must have (the module docstring)


def guidance_record(specs: dict | None) -> dict:
    """{name: the guidance's record()} of SamplerConfig.guidance: what generation.json compares."""
    guidance = build_guidance(specs)
    return {} if guidance is None else {next(iter(specs)): guidance.record()}


def build_guidance(specs: dict | None):
    """The guidance object of SamplerConfig.guidance ({name: {'value': ..., options}}), or None."""
    if not specs:
        return None
    if len(specs) > 1:
        raise ValueError(f"one guidance at a time, got {', '.join(GUIDANCE[name].flag for name in specs)}")
    ((name, options),) = specs.items()
    if name not in GUIDANCE:
        raise ValueError(f"unknown guidance {name!r}: expected one of {', '.join(GUIDANCE)}")
    guidance = GUIDANCE[name].build(**options)
    # Checked here, before any image: generate.py calls record() only when it writes generation.json.
    missing = [method for method in GUIDANCE_METHODS if not callable(getattr(guidance, method, None))]
    if missing:
        raise TypeError(f"guidance {name!r}: {type(guidance).__name__} has no {', '.join(missing)} (a guidance "
                        f"object needs {', '.join(GUIDANCE_METHODS)}: samplers/guidance.py)")
    return guidance
