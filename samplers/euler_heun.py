"""Euler and EDM's Heun sampler (Karras et al. 2022, Algorithms 1 and 2) for the probability-flow ODE
dx/dsigma = (x - D(x; sigma)) / sigma.

Solvers take the full grid `sigmas` (length N + 1, float64, decreasing); the last entry is 0 (EDM's convention:
the last step denoises) or sigma_min (the output is returned at sigma_min). They work in float64 and cast the
denoiser's output to float64, as EDM does. Step sizes are tensor operations on the grid (see samplers.solver_grid).
"""

import math

import torch

from samplers.solver_grid import read_grid


def euler(denoiser, x: torch.Tensor, sigmas: torch.Tensor, class_labels=None, *,
          eval_sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """Euler in sigma (= DDIM = DPM-Solver++ order 1): x <- x + (sigma_next - sigma) * (x - D) / sigma.

    NFE = N. With a final sigma = 0 the last step lands on D itself. Conventional end: 'zero' (EDM's ablation
    sampler). eval_sigmas: LD3's decoupled evaluation levels (D and the slope use sigma', the step uses sigma).
    """
    levels, eval_grid = read_grid(sigmas, eval_sigmas)
    for i in range(len(levels) - 1):
        denoised = denoiser(x, eval_grid[i], class_labels).to(torch.float64)
        d = (x - denoised) / eval_grid[i]
        x = x + (sigmas[i + 1] - sigmas[i]) * d
    return x


def heun_nfe(num_steps: int, end: str) -> int:
    """EDM's Heun: two calls per step, but none for the correction of a step that ends at sigma = 0 (18 steps with
    EDM's appended zero -> 35 NFE)."""
    return 2 * num_steps - 1 if end == "zero" else 2 * num_steps


def churns(options: dict) -> bool:
    """Heun's registry rule (SolverEntry.adds_noise): its steps draw fresh noise when S_churn > 0."""
    return float(options.get("S_churn", 0.0)) > 0


def check_churn(solver: str, S_churn: float) -> None:
    """ValueError unless S_churn >= 0. A negative or NaN S_churn fails `S_churn > 0` and sampled deterministically
    while generation.json recorded the value given; the --S_churn flag refuses it, --solver-opt S_churn=-1 did not."""
    if not S_churn >= 0:
        raise ValueError(f"{solver}: S_churn must be >= 0 (0: deterministic), got {S_churn}")


def heun(denoiser, x: torch.Tensor, sigmas: torch.Tensor, class_labels=None, *, S_churn: float = 0.0,
         S_min: float = 0.0, S_max: float = math.inf, S_noise: float = 1.0, randn_like=None, round_sigma=None,
         eval_sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """EDM's stochastic Heun sampler (Algorithm 2; Algorithm 1 when S_churn = 0).

    Per step: churn gamma = min(S_churn / N, sqrt(2) - 1) when S_min <= sigma_i <= S_max, with N = len(sigmas) - 1
    (EDM's num_steps, the grid including its final 0); an Euler step; a trapezoidal correction unless the next level
    is 0. NFE = 2N - 1 with EDM's final 0, 2N when the grid ends at sigma_min. Conventional end: 'zero'.

    randn_like: the per-seed noise source (torch_utils.misc.StackedRandomGenerator.randn_like); with S_churn > 0 it
    is drawn at every step as EDM does, so the noise stream matches EDM's. round_sigma: the network's, applied to
    the churned level. With EDM's grid and options the operations are EDM's edm_sampler's, in the same order, on
    0-dim device tensors like EDM's, so the result is bit-identical to it.
    """
    check_churn("heun", S_churn)
    levels, eval_grid = read_grid(sigmas, eval_sigmas)
    num_steps = len(levels) - 1
    churn = S_churn > 0
    if churn and eval_sigmas is not None:
        raise ValueError("heun: eval_sigmas (a decoupled evaluation grid) cannot be combined with S_churn > 0")
    if randn_like is None:
        randn_like = torch.randn_like
    if round_sigma is None:
        round_sigma = torch.as_tensor
    for i in range(num_steps):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        t_hat, x_hat, t_eval = t_cur, x, eval_grid[i]
        if churn:
            gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= levels[i] <= S_max else 0
            noise = randn_like(x)  # drawn at every step, as EDM, to keep the per-seed stream aligned with EDM's
            if gamma > 0:
                t_hat = torch.as_tensor(round_sigma(t_cur + gamma * t_cur))
                x_hat = x + (t_hat**2 - t_cur**2).sqrt() * S_noise * noise
            t_eval = t_hat
        denoised = denoiser(x_hat, t_eval, class_labels).to(torch.float64)
        d_cur = (x_hat - denoised) / t_eval
        x = x_hat + (t_next - t_hat) * d_cur
        if levels[i + 1] > 0:
            denoised = denoiser(x, eval_grid[i + 1], class_labels).to(torch.float64)
            d_prime = (x - denoised) / eval_grid[i + 1]
            x = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x
