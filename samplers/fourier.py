"""Samplers for forward processes that are variance-preserving per Fourier frequency: Shortest Path Diffusion and its
DDPM control (processes/spd.py).

With u = F x the orthonormal 2-D DFT of each channel (unshifted layout), such a process is, per frequency k,

    u_t(k) = sqrt(abar_t(k)) u_0(k) + sqrt(1 - abar_t(k)) (F eps)(k),      eps ~ N(0, I) white in pixel space,

on integer times t = 0 .. T-1 (t = T-1 is the noise end); x_t = Re F^-1 u_t. The network predicts eps (in pixels).
Because F is unitary and F eps is white, E[F eps | x_t] = F E[eps | x_t]: every scalar DDPM/DDIM formula holds per
frequency with abar_t(k) in place of abar_t.

What the samplers need of a process (`schedule` below):
    num_steps                                   T
    alpha_bar(t, height, width) -> tensor       float64 [len(t), 1, H or 1, W or 1] on t's device
    noise_label(t) -> tensor                    the network's time input (DDPM's rescale_timesteps: t * 1000 / T)

Solvers (SOLVERS, SolverEntry as in samplers/__init__.py; options are typed from the signature):
    ancestral   the reference's sampler (mtkresearch/shortest-path-diffusion, fourier_diffusion.py p_sample): DDPM
                ancestral steps per frequency, fixed-large variance beta, no noise on the last step; over all T steps
                by default, or respaced over any subset of steps (guided-diffusion's respacing: beta from the kept
                abar), which the reference cannot do.
    ddim        deterministic DDIM (eta = 0) per frequency; the reference's `ddim_sample` over all steps, or respaced.
    heun        EDM's second-order Heun in the per-frequency variance-exploding form: u_k / sqrt(abar_k) =
                u_0(k) + sigma_k (F eps)(k) with sigma_k^2 = (1 - abar_k) / abar_k, whose probability-flow ODE is
                d(u_k / sqrt(abar_k)) = E[(F eps)(k) | x] d sigma_k. DDIM is its Euler method. The final step to
                sigma = 0 is an Euler step (EDM), so N time levels cost 2N - 1 evaluations (18 -> 35 NFE).
    dpmpp_2m    DPM-Solver++(2M) on the same ODE, per frequency in its own log-SNR: one evaluation per level; the
                few-step sampler (with an exact Gaussian E[eps | x_t], 35 NFE reproduce the data spectrum within 4 %,
                Heun's 35 NFE within about 10 %; tests/test_spd.py).

Time levels: `--steps` N picks N of the T integer times, from T-1 down to 0 (`time_steps`): spacing 'uniform'
(guided-diffusion's `space_timesteps`; the default of ancestral and ddim), 'quadratic' (DDIM's quadratic skip) or
'logsnr' (uniform in the frequency-averaged log SNR; the default of heun and dpmpp_2m).
"""

import dataclasses
import functools
from typing import Literal

import numpy as np
import torch

from samplers.solver_entry import SolverEntry, always_adds_noise

Spacing = Literal['uniform', 'quadratic', 'logsnr']

# The reference clamps per-step betas (nonunif_diffusion/script_util.py, compute_beta_from_alpha_bar_nonunif).
MAX_BETA = 0.999


def to_fourier(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal 2-D DFT over the last two axes (numpy's unshifted layout)."""
    return torch.fft.fft2(x, norm='ortho')


def to_pixels(u: torch.Tensor) -> torch.Tensor:
    """Inverse of `to_fourier`, real part. Every filter here is real and even in k (radial), so the imaginary part
    is rounding only; tests check it (an asymmetric filter would hide behind .real)."""
    return torch.fft.ifft2(u, norm='ortho').real


@functools.lru_cache(maxsize=16)
def mean_log_snr(schedule, height: int, width: int) -> np.ndarray:
    """The frequency-averaged log SNR, mean_k ln(abar_k / (1 - abar_k)), at t = 0 .. T-1 (float64, decreasing)."""
    T, chunk = schedule.num_steps, max(1, 2 ** 22 // (height * width))
    values = []
    for start in range(0, T, chunk):
        abar = schedule.alpha_bar(torch.arange(start, min(start + chunk, T)), height, width)
        values.append((abar.log() - (-abar).log1p()).mean(dim=(1, 2, 3)))
    return torch.cat(values).numpy()


def time_steps(schedule, num_steps: int | None, spacing: str = 'uniform', height: int = 1, width: int = 1,
               device=None) -> torch.Tensor:
    """The integer times a sampler visits, decreasing from T-1 to 0 (int64). None or N >= T: all T steps.

    uniform:    guided-diffusion's space_timesteps (one section): round(c_i), c_0 = 0, c_{i+1} = c_i + (T-1) / (N-1)
                summed in floats step by step as there, so that its half-way ties round as they do (i (T-1) / (N-1)
                rounded directly differs from it by one step at a few levels of some grids).
    quadratic:  round((T-1) (i / (N-1))^2), more levels near the data (the shape of DDIM's quadratic skip, which
                stops at 0.8 T; this one spans the whole path).
    logsnr:     uniform in the frequency-averaged log SNR (`mean_log_snr`), the analogue of a log-sigma grid: every
                frequency's log sigma_k(t) is that curve plus a constant at both ends of the path.
    """
    T = int(schedule.num_steps)
    if num_steps is None or num_steps >= T:
        return torch.arange(T - 1, -1, -1, dtype=torch.int64, device=device)
    if num_steps < 2:
        raise ValueError(f'--steps must be at least 2 (from t = T-1 to t = 0), got {num_steps}')
    fraction = np.linspace(0, 1, num_steps)
    if spacing == 'uniform':
        stride, position, grid = (T - 1) / (num_steps - 1), 0.0, []
        for _ in range(num_steps):  # N <= T additions, once per sampling run
            grid.append(position)
            position += stride
    elif spacing == 'quadratic':
        grid = fraction ** 2 * (T - 1)
    elif spacing == 'logsnr':
        curve = mean_log_snr(schedule, height, width)
        targets = curve[0] + fraction * (curve[-1] - curve[0])
        grid = np.interp(-targets, -curve, np.arange(T, dtype=np.float64))  # the curve decreases in t
    else:
        raise ValueError(f"unknown time spacing {spacing!r}: expected uniform, quadratic or logsnr")
    # Rounded (half to even, as guided-diffusion's round), then made strictly increasing: a level that rounds onto
    # its predecessor moves up one, and the top ones stay below T.
    levels = [int(v) for v in np.round(grid)]
    levels[0], levels[-1] = 0, T - 1
    for i in range(1, num_steps):
        levels[i] = max(levels[i], levels[i - 1] + 1)
    for i in range(num_steps - 1, -1, -1):
        levels[i] = min(levels[i], T - num_steps + i)
    return torch.as_tensor(levels[::-1], dtype=torch.int64, device=device)


def _alpha_bars(schedule, steps: torch.Tensor, height: int, width: int) -> list:
    """abar at every level, then 1 after the last one (the clean end), as a list of broadcastable tensors."""
    table = schedule.alpha_bar(steps, height, width)
    return [table[i] for i in range(len(steps))] + [torch.ones_like(table[0])]


def _denoise(u, e, abar, clip_x0: bool):
    """(x0 estimate, eps estimate) in Fourier from u_t and F eps_hat; clip_x0: clip x0 to [-1, 1] in pixels and
    recompute eps from it (guided-diffusion's clip_denoised; in the reference's SPD sampler it had no effect, here it
    clips SPD's x0 in pixels too)."""
    x0 = (u - (1 - abar).sqrt() * e) / abar.sqrt()
    if clip_x0:
        x0 = to_fourier(to_pixels(x0).clamp(-1, 1))
        e = (u - abar.sqrt() * x0) / (1 - abar).sqrt()
    return x0, e


def ancestral(eps_model, x, schedule, num_steps=None, *, spacing: Spacing = 'uniform', clip_x0: bool = False,
              randn_like=None) -> torch.Tensor:
    """DDPM ancestral sampling per frequency with fixed-large variance: from t to the next kept time s,
    alpha = abar_t / abar_s, beta = min(1 - alpha, 0.999), u_s = (u_t - beta / sqrt(1 - abar_t) F eps_hat) / sqrt(alpha)
    + sqrt(beta) F z, with no noise on the last step (which returns the x0 estimate). Over all T steps this is the
    reference's p_sample loop; clip_x0 is guided-diffusion's clip_denoised (the DDPM control's default)."""
    randn_like = randn_like if randn_like is not None else torch.randn_like
    steps = time_steps(schedule, num_steps, spacing, x.shape[-2], x.shape[-1], device=x.device)
    abars = _alpha_bars(schedule, steps, x.shape[-2], x.shape[-1])
    u = to_fourier(x)
    for i in range(len(steps)):
        abar_t, abar_s = abars[i], abars[i + 1]
        e = to_fourier(eps_model(to_pixels(u), steps[i]))
        if clip_x0:
            _, e = _denoise(u, e, abar_t, True)
        beta = (1 - abar_t / abar_s).clamp(max=MAX_BETA)
        u = (u - beta / (1 - abar_t).sqrt() * e) / (1 - beta).sqrt()
        if i + 1 < len(steps):
            u = u + beta.sqrt() * to_fourier(randn_like(x))
    return to_pixels(u)


def ddim(eps_model, x, schedule, num_steps=None, *, spacing: Spacing = 'uniform', clip_x0: bool = False
         ) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) per frequency: u_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s) F eps_hat. Over all
    T steps it equals the reference's ddim_sample (written there with alpha_t = abar_t / abar_{t-1})."""
    steps = time_steps(schedule, num_steps, spacing, x.shape[-2], x.shape[-1], device=x.device)
    abars = _alpha_bars(schedule, steps, x.shape[-2], x.shape[-1])
    u = to_fourier(x)
    for i in range(len(steps)):
        abar_t, abar_s = abars[i], abars[i + 1]
        e = to_fourier(eps_model(to_pixels(u), steps[i]))
        x0, e = _denoise(u, e, abar_t, clip_x0)
        u = abar_s.sqrt() * x0 + (1 - abar_s).sqrt() * e
    return to_pixels(u)


def heun(eps_model, x, schedule, num_steps=None, *, spacing: Spacing = 'logsnr') -> torch.Tensor:
    """EDM's Heun (2nd order) per frequency in the variance-exploding form v = u / sqrt(abar), dv = E[F eps | x]
    d sigma, sigma^2 = (1 - abar) / abar: v_next = v + (sigma_next - sigma) (d + d') / 2 with d' evaluated at the Euler
    (DDIM) prediction; the last step, to sigma = 0, is Euler (x0 estimate)."""
    steps = time_steps(schedule, num_steps, spacing, x.shape[-2], x.shape[-1], device=x.device)
    abars = _alpha_bars(schedule, steps, x.shape[-2], x.shape[-1])
    u = to_fourier(x)
    for i in range(len(steps)):
        abar_t, abar_s = abars[i], abars[i + 1]
        d = to_fourier(eps_model(to_pixels(u), steps[i]))
        x0 = (u - (1 - abar_t).sqrt() * d) / abar_t.sqrt()
        u_euler = abar_s.sqrt() * x0 + (1 - abar_s).sqrt() * d
        if i + 1 == len(steps):
            u = u_euler
            break
        d_next = to_fourier(eps_model(to_pixels(u_euler), steps[i + 1]))
        # In v: v_s = v_t + (sigma_s - sigma_t) (d + d') / 2; times sqrt(abar_s) for u, written without 1/sqrt(abar)
        # blow-ups: sqrt(abar_s) sigma_s = sqrt(1 - abar_s), sqrt(abar_s) sigma_t = sqrt(abar_s / abar_t (1 - abar_t)).
        ratio = abar_s / abar_t
        u = ratio.sqrt() * u + ((1 - abar_s).sqrt() - (ratio * (1 - abar_t)).sqrt()) * (d + d_next) / 2
    return to_pixels(u)


def dpmpp_2m(eps_model, x, schedule, num_steps=None, *, spacing: Spacing = 'logsnr') -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) per frequency, each frequency in its own lambda_k = ln sqrt(abar_k / (1 -
    abar_k)): u_s = sqrt((1 - abar_s) / (1 - abar_t)) u_t - sqrt(abar_s) expm1(-h) D with D the x0 estimate,
    extrapolated linearly from the previous step's (1 + 1/(2r), -1/(2r), r = h_prev / h), first order on the first
    step and the last (to the clean end: the x0 estimate). One evaluation per level. In the VE form u / sqrt(abar)
    each step integrates the ODE exactly for a constant x0 estimate; it is the few-step sampler of choice here (an
    oracle Gaussian reproduces its spectrum within 4 % at 35 NFE on the logsnr spacing; Heun needs about 70)."""
    steps = time_steps(schedule, num_steps, spacing, x.shape[-2], x.shape[-1], device=x.device)
    abars = _alpha_bars(schedule, steps, x.shape[-2], x.shape[-1])
    u = to_fourier(x)
    previous = None
    for i in range(len(steps)):
        abar_t, abar_s = abars[i], abars[i + 1]
        e = to_fourier(eps_model(to_pixels(u), steps[i]))
        x0 = (u - (1 - abar_t).sqrt() * e) / abar_t.sqrt()
        if i + 1 == len(steps):
            u = x0
            break
        h = 0.5 * ((abar_s.log() - (-abar_s).log1p()) - (abar_t.log() - (-abar_t).log1p()))
        if previous is None:
            denoised = x0
        else:
            r = previous[1] / h
            denoised = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous[0]
        u = ((1 - abar_s) / (1 - abar_t)).sqrt() * u - abar_s.sqrt() * torch.expm1(-h) * denoised
        previous = (x0, h)
    return to_pixels(u)


def heun_nfe(num_steps: int, end: str = 'zero') -> int:
    return 2 * num_steps - 1


def one_per_level(num_steps: int, end: str = 'zero') -> int:
    return num_steps


# The entry's `default_end` is unused by Fourier sampling (its grid always ends at t = 0, then the clean end).
SOLVERS = {
    'ancestral': SolverEntry(ancestral, default_end='zero', nfe=one_per_level, adds_noise=always_adds_noise),
    'ddim': SolverEntry(ddim, default_end='zero', nfe=one_per_level),
    'heun': SolverEntry(heun, default_end='zero', nfe=heun_nfe),
    'dpmpp_2m': SolverEntry(dpmpp_2m, default_end='zero', nfe=one_per_level),
}

@dataclasses.dataclass(frozen=True)
class FourierPlan:
    """A prepared run: the solver's name, its options (spacing included) and the number of time levels (None: all)."""

    solver: str
    options: dict
    num_steps: int | None


class FourierSampling:
    """How a per-frequency VP process is sampled (processes/spd.py): a solver of `SOLVERS` over `--steps` of its T
    integer times, from the unit latents as x_{T-1} (the reference's start: N(0, I) in pixels). The same three
    methods as samplers.generation.GridSampling, plus the solver registry (`solvers`, `default_solver`) that the
    CLIs resolve --solver and --solver-opt against once the snapshot is loaded.

    Without --solver: the reference's ancestral sampler over all T steps, or DPM-Solver++(2M) on the logsnr spacing
    when --steps asks for fewer (the few-step sampler; ancestral and DDIM need hundreds of steps). Flags of sigma-grid
    sampling (--schedule, --sigma_min, --sigma_max, --rho, --end, --denoise-to-zero) are refused in one line.
    `solver_defaults`: option values the process prefers (the DDPM control: clip_x0=True, as guided-diffusion's
    sampling script); --solver-opt overrides them.
    """

    learns_sigma_grids = False  # LD3 learns sigma grids of x = y + sigma n; it does not apply here.
    solvers = SOLVERS
    default_solver = 'ancestral'
    few_step_solver = 'dpmpp_2m'

    def __init__(self, schedule, solver_defaults: dict | None = None):
        self.schedule = schedule
        self.solver_defaults = dict(solver_defaults or {})

    def refuse_grid_flags(self, given: dict) -> None:
        """ValueError naming the sigma-grid flags in `given` (flag as the user typed it -> value; None or False: not
        given). The CLIs call it with their flags before the config is built, so that EDM's --disc, which the config
        holds as its --schedule, is refused under the name the user gave."""
        not_here = [flag for flag, value in given.items() if value is not None and value is not False]
        if not_here:
            raise ValueError(f"{', '.join(not_here)} {'does' if len(not_here) == 1 else 'do'} not apply to the "
                             f"{self.schedule.name!r} process: it is sampled over its own {self.schedule.num_steps} "
                             f"time steps (choose --steps, --solver {'|'.join(self.solvers)} and --solver-opt "
                             f"spacing=uniform|quadratic|logsnr)")

    def _resolve(self, config) -> FourierPlan:
        self.refuse_grid_flags({flag: None if value == default else value for flag, value, default in (
            ('--schedule', config.schedule, 'edm'), ('--sigma_min', config.sigma_min, None),
            ('--sigma_max', config.sigma_max, None), ('--rho', config.schedule_kwargs.get('rho'), None),
            ('--end', config.end, None), ('--denoise-to-zero', config.denoise_to_zero, False))})
        if config.num_steps is not None and config.num_steps < 2:
            raise ValueError(f"--steps must be at least 2 (from t = T-1 to t = 0), got {config.num_steps}")
        T = self.schedule.num_steps
        if config.num_steps is not None and config.num_steps > T:
            # Capped silently before, which also switched the default solver to all-T ancestral.
            raise ValueError(f"--steps {config.num_steps} is more than the {T} time steps of the snapshot's "
                             f"{self.schedule.name!r} process (T = {T}): give --steps {T} or fewer (without --steps: "
                             f"all {T}, ancestral)")
        if getattr(config, 'guidance', None):
            from samplers.guidance import GUIDANCE

            flags = [GUIDANCE[name].flag if name in GUIDANCE else name for name in config.guidance]
            raise ValueError(f"{', '.join(flags)} ({', '.join(config.guidance)} guidance) does not apply to the "
                             f"{self.schedule.name!r} process (it guides sigma-grid solvers)")
        solver = self.solver_for(config.solver, config.num_steps)
        if solver not in self.solvers:
            raise ValueError(f"unknown solver {solver!r} for the {self.schedule.name!r} process: expected one of "
                             f"{', '.join(self.solvers)}")
        entry = self.solvers[solver]
        options = {k: v for k, v in self.solver_defaults.items() if k in entry.options()}
        options.update(config.solver_kwargs)
        entry.check_options(options, solver)
        return FourierPlan(solver=solver, options=options, num_steps=config.num_steps)

    def solver_for(self, solver: str | None, num_steps: int | None) -> str:
        """--solver, else ancestral over all T steps, or the few-step solver when --steps asks for fewer."""
        if solver is not None:
            return solver
        few = num_steps is not None and num_steps < self.schedule.num_steps
        return self.few_step_solver if few else self.default_solver

    def prepare(self, net, config, device=None) -> FourierPlan:
        return self._resolve(config)

    def draws_noise(self, net, config) -> bool:
        """Whether the solver's steps draw fresh noise (ancestral: yes; the default over all T steps)."""
        plan = self._resolve(config)
        entry = self.solvers[plan.solver]
        return entry.adds_noise({**entry.defaults(), **plan.options})

    def record(self, net, config) -> dict:
        """The plan as it resolves (generate.py's output-folder record, generation.json): the solver after the
        default choice, every option of it with the defaults filled in, and the time steps visited, so that
        `--steps=8` and `--steps=8 --solver=dpmpp_2m --solver-opt spacing=logsnr` record the same. The spacing is left
        out: the steps are what it decides (all T steps are the same run under any spacing)."""
        plan = self._resolve(config)
        entry = self.solvers[plan.solver]
        options = entry.defaults()
        options.update(plan.options)
        spacing = options.pop('spacing', 'uniform')
        steps = time_steps(self.schedule, plan.num_steps, spacing, net.img_resolution, net.img_resolution)
        return dict(solver=plan.solver, solver_options=options, steps=[int(t) for t in steps])

    def describe(self, net, config) -> str:
        plan = self._resolve(config)
        entry = self.solvers[plan.solver]
        spacing = plan.options.get('spacing', entry.options()['spacing'].default)
        steps = time_steps(self.schedule, plan.num_steps, spacing, net.img_resolution, net.img_resolution)
        text = ', '.join(f'{k}={v}' for k, v in sorted(plan.options.items()))
        which = 'all' if len(steps) == self.schedule.num_steps else spacing
        return (f"solver={plan.solver}({text}) process={self.schedule.name} steps={len(steps)} of "
                f"T={self.schedule.num_steps} ({which}), t={int(steps[0])}..{int(steps[-1])}; "
                f"{entry.nfe(len(steps), 'zero')} NFE per image")

    def sample(self, net, plan: FourierPlan, inputs, config) -> torch.Tensor:
        labels, schedule = inputs.class_labels, self.schedule

        def eps_model(x, t):
            noise_labels = schedule.noise_label(t.reshape(1)).to(torch.float32).expand(x.shape[0])
            return net(x.to(torch.float32), noise_labels, labels).to(torch.float64)

        entry = self.solvers[plan.solver]
        kwargs = dict(plan.options)
        if entry.takes_input('randn_like'):
            kwargs['randn_like'] = inputs.randn_like
        return entry.function(eps_model, inputs.latents.to(torch.float64), schedule, plan.num_steps, **kwargs)
