"""iPNDM (improved PNDM, Zhang & Chen 2022, as in diff-sampler and LD3): Adams-Bashforth on d = (x - D) / sigma in
sigma with the fixed (uniform-step) coefficients and a lower-order warm start. See docs/solvers.md, "iPNDM"."""

import torch

from samplers.solver_grid import read_grid

# Adams-Bashforth weights for orders 1..4, newest slope first.
_AB_WEIGHTS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def ipndm(denoiser, x: torch.Tensor, sigmas: torch.Tensor, class_labels=None, *, max_order: int = 4,
          eval_sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """iPNDM with order min(max_order, i + 1) at step i and no lower-order final steps. NFE = N.

    max_order: 4 as diff-sampler ("iPNDM-4"), 3 as LD3's configs ("iPNDM (3M)"). Conventional end: 'sigma_min'. A
    step to sigma = 0 (EDM's appended zero) returns D, as k-diffusion-style iPNDM does. eval_sigmas: LD3's
    decoupled evaluation levels (d = (x - D(x; sigma')) / sigma', stepped over the sigma grid).
    """
    if max_order not in _AB_WEIGHTS:
        raise ValueError(f"iPNDM max_order must be 1, 2, 3 or 4, got {max_order}")
    levels, eval_grid = read_grid(sigmas, eval_sigmas)
    slopes = []  # newest first
    for i in range(len(levels) - 1):
        denoised = denoiser(x, eval_grid[i], class_labels).to(torch.float64)
        if levels[i + 1] == 0:
            x = denoised
            continue
        slopes = ([(x - denoised) / eval_grid[i]] + slopes)[:max_order]
        weights = _AB_WEIGHTS[len(slopes)]
        slope = weights[0] * slopes[0]
        for w, d in zip(weights[1:], slopes[1:]):
            slope = slope + w * d
        x = x + (sigmas[i + 1] - sigmas[i]) * slope
    return x
