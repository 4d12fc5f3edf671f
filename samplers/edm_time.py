"""EDM's ablation ODE in time t (Karras et al. 2022, Section 3, Eq. 4 and Algorithm 1 in general form): the noise
level sigma(t) and the scaling s(t) are functions of a time variable, and Euler / Heun step in t:

    dx/dt = (sigma'(t) / sigma(t) + s'(t) / s(t)) x - sigma'(t) s(t) / sigma(t) D(x / s(t); sigma(t)).

With sigma(t) = t and s(t) = 1 (EDM's --schedule=linear --scaling=none) this is dx/dsigma = (x - D) / sigma, which
samplers/euler_heun.py integrates directly. The other choices are the original samplers' ODEs, which EDM's Figure 2
ablates: VP time, sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) (Song et al.'s VP SDE), and VE time,
sigma(t) = sqrt(t); VP scaling, s(t) = 1 / sqrt(1 + sigma(t)^2). The same grid of noise levels gives other samples in
another time: an Euler step is straight in t, not in sigma.

VP time needs beta_d and beta_min. EDM fits them so that sigma(1) = sigma_max and sigma(epsilon_s) = sigma_min with
epsilon_s = 1e-3, from the sampler's sigma range; here from the grid's ends (its first level and its last positive
one), which are that range for every grid but iDDPM's (whose levels are a table's, so its ends are the table entries
nearest the range).
"""

import math
from typing import Literal

import torch

from samplers.euler_heun import check_churn
from samplers.solver_grid import read_grid

ODE_SCHEDULES = ("linear", "vp", "ve")  # sigma(t)
ODE_SCALINGS = ("none", "vp")  # s(t)
VP_EPSILON_S = 1e-3  # EDM's epsilon_s: the VP time of sigma_min


class TimeODE:
    """sigma(t), its derivative and inverse, s(t), and the slope dx/dt, on float64 tensors."""

    def __init__(self, schedule: str, scaling: str, sigma_min: float, sigma_max: float):
        if schedule not in ODE_SCHEDULES:
            raise ValueError(f"ode_schedule must be one of {ODE_SCHEDULES}, got {schedule!r}")
        if scaling not in ODE_SCALINGS:
            raise ValueError(f"ode_scaling must be one of {ODE_SCALINGS}, got {scaling!r}")
        self.schedule, self.scaling = schedule, scaling
        if schedule == "vp":
            # sigma(1)^2 = sigma_max^2 and sigma(eps)^2 = sigma_min^2, i.e. beta_d / 2 + beta_min = ln(1 + sigma_max^2)
            # and beta_d eps^2 / 2 + beta_min eps = ln(1 + sigma_min^2): two linear equations in beta_d, beta_min.
            top, bottom, eps = math.log1p(sigma_max**2), math.log1p(sigma_min**2), VP_EPSILON_S
            self.beta_d = 2 * (bottom / eps - top) / (eps - 1)
            self.beta_min = top - self.beta_d / 2

    def sigma(self, t):
        if self.schedule == "vp":
            return torch.expm1(self.beta_d * t**2 / 2 + self.beta_min * t).sqrt()
        return t.sqrt() if self.schedule == "ve" else t

    def sigma_deriv(self, t):
        if self.schedule == "vp":
            # d sigma^2 / dt = (beta_d t + beta_min) exp(...) = (beta_d t + beta_min) (1 + sigma^2)
            sigma = self.sigma(t)
            return (self.beta_d * t + self.beta_min) * (1 + sigma**2) / (2 * sigma)
        return 0.5 / t.sqrt() if self.schedule == "ve" else torch.ones_like(t)

    def sigma_inv(self, sigma):
        if self.schedule == "vp":
            # beta_d t^2 / 2 + beta_min t = ln(1 + sigma^2), the positive root
            return ((self.beta_min**2 + 2 * self.beta_d * torch.log1p(sigma**2)).sqrt() - self.beta_min) / self.beta_d
        return sigma**2 if self.schedule == "ve" else sigma

    def s(self, t):
        return (1 + self.sigma(t) ** 2).rsqrt() if self.scaling == "vp" else torch.ones_like(t)

    def slope(self, denoiser, x, t, class_labels):
        """dx/dt at (x, t): one denoiser call at sigma(t) on the unscaled x / s(t). s'/s = -sigma sigma' s^2 under
        VP scaling (d/dt (1 + sigma^2)^(-1/2) = -sigma sigma' (1 + sigma^2)^(-3/2)), 0 without."""
        sigma, sigma_deriv, s = self.sigma(t), self.sigma_deriv(t), self.s(t)
        scaling_rate = -sigma * sigma_deriv * s**2 if self.scaling == "vp" else 0.0
        denoised = denoiser(x / s, sigma, class_labels).to(torch.float64)
        return (sigma_deriv / sigma + scaling_rate) * x - sigma_deriv * s / sigma * denoised


def integrate_in_time(denoiser, x: torch.Tensor, sigmas: torch.Tensor, class_labels, *, schedule: str, scaling: str,
                      second_order: bool, S_churn: float = 0.0, S_min: float = 0.0, S_max: float = math.inf,
                      S_noise: float = 1.0, randn_like=None, round_sigma=None) -> torch.Tensor:
    """Euler (second_order=False) or EDM's Heun over the grid `sigmas`, stepping in the time of `schedule` with the
    scaling `scaling`; x is the unscaled starting sample at sigmas[0] (latents * sigma_max, as samplers.sample makes
    it) and the result is unscaled too. Heun's churn as EDM's ablation sampler: the churned level sigma(t_hat) is
    rounded by the network's round_sigma, the noise is scaled by s(t_hat), and a fresh draw is taken at every step."""
    check_churn("heun_time", S_churn)
    levels, _ = read_grid(sigmas)  # Python floats for control flow: one device sync per grid (cached), not per step
    positive = [level for level in levels if level > 0]
    ode = TimeODE(schedule, scaling, positive[-1], levels[0])
    round_sigma = torch.as_tensor if round_sigma is None else round_sigma
    randn_like = torch.randn_like if randn_like is None else randn_like
    churn = second_order and S_churn > 0
    # The grid's levels in this time (t = 0 where sigma = 0: every schedule here has sigma(0) = 0).
    times = torch.where(sigmas > 0, ode.sigma_inv(sigmas), torch.zeros_like(sigmas))
    num_steps = len(sigmas) - 1
    x = x * ode.s(times[0])
    for i in range(num_steps):
        t_cur, t_next = times[i], times[i + 1]
        t_hat, x_hat = t_cur, x
        if churn:
            noise = randn_like(x)  # drawn at every step, as EDM, to keep the per-seed stream aligned with EDM's
            gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= levels[i] <= S_max else 0
            if gamma > 0:
                sigma_cur = ode.sigma(t_cur)
                t_hat = ode.sigma_inv(torch.as_tensor(round_sigma(sigma_cur + gamma * sigma_cur), dtype=torch.float64))
                x_hat = ode.s(t_hat) / ode.s(t_cur) * x + (ode.sigma(t_hat) ** 2 - sigma_cur**2).clamp(min=0).sqrt() \
                    * ode.s(t_hat) * S_noise * noise
        h = t_next - t_hat
        d_cur = ode.slope(denoiser, x_hat, t_hat, class_labels)
        x = x_hat + h * d_cur
        if second_order and levels[i + 1] > 0:  # EDM's Heun: no correction on a step that ends at sigma = 0
            d_prime = ode.slope(denoiser, x, t_next, class_labels)
            x = x_hat + h * (0.5 * d_cur + 0.5 * d_prime)
    return x / ode.s(times[-1])


# Registry functions (samplers.SOLVERS: euler_time, heun_time). generate.py's EDM flags --schedule=vp|ve and
# --scaling=vp beside --disc/--scaling choose them (samplers/cli_options.py); --solver=euler_time etc. directly too.
def euler_time(denoiser, x: torch.Tensor, sigmas: torch.Tensor, class_labels=None, *,
               ode_schedule: Literal["linear", "vp", "ve"] = "linear",
               ode_scaling: Literal["none", "vp"] = "none") -> torch.Tensor:
    """Euler in the time of `ode_schedule` (linear: sigma itself, vp, ve) with scaling `ode_scaling` (none, vp): EDM's
    ablation sampler with --solver=euler. NFE = N. With linear / none, samplers.euler_heun.euler."""
    return integrate_in_time(denoiser, x, sigmas, class_labels, schedule=ode_schedule, scaling=ode_scaling,
                             second_order=False)


def heun_time(denoiser, x: torch.Tensor, sigmas: torch.Tensor, class_labels=None, *,
              ode_schedule: Literal["linear", "vp", "ve"] = "linear", ode_scaling: Literal["none", "vp"] = "none",
              S_churn: float = 0.0, S_min: float = 0.0, S_max: float = math.inf,
              S_noise: float = 1.0, randn_like=None, round_sigma=None) -> torch.Tensor:
    """EDM's Heun (churn included) in the time of `ode_schedule` with scaling `ode_scaling`: EDM's ablation sampler
    with --solver=heun. NFE as heun's (2N - 1 with the appended zero). With linear / none, samplers.euler_heun.heun."""
    return integrate_in_time(denoiser, x, sigmas, class_labels, schedule=ode_schedule, scaling=ode_scaling,
                             second_order=True, S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise,
                             randn_like=randn_like, round_sigma=round_sigma)
