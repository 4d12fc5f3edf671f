"""LD3's student: the registered solver over a grid whose tensors carry gradients, so LD3 learns the grid of exactly
the code that generate.py runs, for every solver and option."""

import torch
import torch.utils.checkpoint

from samplers import SigmaGrid, sample


def _checkpointed(denoiser):
    """The denoiser under activation checkpointing while autograd records: memory constant in NFE (LD3's --low_gpu)
    for about 1.3x the time."""
    def call(x, sigma, class_labels=None):
        if torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(denoiser, x, sigma, class_labels, use_reentrant=False)
        return denoiser(x, sigma, class_labels)
    return call


def _refuse_noise(solver: str, options: dict):
    """A randn_like for the student: LD3 fits one deterministic trajectory per noise, so a solver that draws fresh
    noise (e.g. Heun with S_churn > 0) has no grid to learn."""
    def randn_like(x):
        described = ", ".join(f"{k}={v}" for k, v in sorted(options.items()))
        raise ValueError(f"LD3 learns the grid of a deterministic sampler, but {solver}({described}) draws noise")
    return randn_like


def check_deterministic(grid: SigmaGrid, solver: str, solver_kwargs: dict) -> None:
    """ValueError when `solver` with these options draws noise on `grid` (e.g. Heun with S_churn > 0): LD3 fits the
    teacher's image as a function of its noise, which such a sampler's image is not. Found by running the solver on
    one zero pixel with a zero denoiser (no network call), so no solver needs a rule here."""
    def zero_denoiser(x, sigma, class_labels=None):
        return torch.zeros_like(x)
    sample(zero_denoiser, torch.zeros(1, 1, 1, 1, dtype=torch.float64, device=grid.sigmas.device), grid, solver=solver,
           randn_like=_refuse_noise(solver, solver_kwargs), **solver_kwargs)


def student_sample(denoiser, latents: torch.Tensor, sigmas: torch.Tensor, eval_sigmas: torch.Tensor | None = None,
                   *, solver: str, class_labels=None, end: str | None = None, checkpoint: bool = False,
                   **solver_kwargs) -> torch.Tensor:
    """samplers.sample over a grid given as tensors: x_0 = latents * sigmas[0], then the registered `solver`,
    differentiable with respect to latents, sigmas and eval_sigmas. Returns float64. end: the grid's end convention
    (None: read from sigmas[-1])."""
    if end is None:
        end = "zero" if float(sigmas[-1].detach()) == 0 else "sigma_min"
    grid = SigmaGrid(sigmas=sigmas, end=end, eval_sigmas=eval_sigmas)
    return sample(_checkpointed(denoiser) if checkpoint else denoiser, latents, grid, solver=solver,
                  class_labels=class_labels, randn_like=_refuse_noise(solver, solver_kwargs), **solver_kwargs)
