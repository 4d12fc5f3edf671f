"""DPM-Solver++ multistep, 2M and 3M, data prediction (Lu et al. 2022), in EDM's sigma form (alpha = 1).

With lambda = -log(sigma), h = lambda_{i+1} - lambda_i, rho = sigma_{i+1} / sigma_i and phi_1 = expm1(-h) = rho - 1,
the first-order step is x <- rho x - phi_1 D_i; higher orders add finite differences of past D's (see
docs/solvers.md, "DPM-Solver++"). Conventional end: 'sigma_min' (no final denoise). A step to sigma = 0 (EDM's
appended zero) is the limit h -> inf of every order: x <- D_i.
"""

from typing import Literal

import torch

from samplers.solver_grid import read_grid, step_orders


def _dpmpp_multistep(denoiser, x, sigmas, class_labels, order, lower_order_final, variant, eval_sigmas,
                     exact_third_order=False):
    if variant not in ("dpmsolver", "taylor"):
        raise ValueError(f"DPM-Solver++ variant must be 'dpmsolver' or 'taylor', got {variant!r}")
    levels, eval_grid = read_grid(sigmas, eval_sigmas)
    orders = step_orders(levels, order, lower_order_final)
    num_positive = sum(1 for s in levels if s > 0)
    lambdas = -sigmas[:num_positive].log()  # the positive levels only: log(0) would poison LD3's gradients
    history = []  # the last `order` denoiser outputs, newest last
    for i, p in enumerate(orders):
        denoised = denoiser(x, eval_grid[i], class_labels).to(torch.float64)
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
            # d2 estimates h^2 D''/2, whose exact weight is -2 phi_3; the reference codes use -phi_3 (see dpmpp_3m).
            x = x_first + phi_2 * d1 - (2 * phi_3 if exact_third_order else phi_3) * d2
    return x


def dpmpp_2m(denoiser, x: torch.Tensor, sigmas: torch.Tensor, class_labels=None, *,
             lower_order_final: bool | int = True, variant: Literal["dpmsolver", "taylor"] = "dpmsolver",
             eval_sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """DPM-Solver++(2M). NFE = N. variant: 'dpmsolver' (x += -phi_1/2 * D1, k-diffusion's sample_dpmpp_2m) or
    'taylor' (x += (phi_1/h + 1) * D1). lower_order_final: see samplers.solver_grid.step_orders. eval_sigmas: LD3's
    decoupled levels (D evaluated at sigma', coefficients from sigma)."""
    return _dpmpp_multistep(denoiser, x, sigmas, class_labels, 2, lower_order_final, variant, eval_sigmas)


def dpmpp_3m(denoiser, x: torch.Tensor, sigmas: torch.Tensor, class_labels=None, *,
             lower_order_final: bool | int = True, variant: Literal["dpmsolver", "taylor"] = "dpmsolver",
             exact_third_order: bool = False, eval_sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """DPM-Solver++(3M): DPM-Solver's multistep third-order update, with warm-up steps of order 1 and 2 (the latter
    with `variant`). NFE = N. lower_order_final: see samplers.solver_grid.step_orders.

    exact_third_order: the reference update (DPM-Solver's dpm_solver_pytorch.py, copied by k-diffusion, diffusers,
    diff-sampler and LD3) is x <- rho x - phi_1 D + phi_2 D1 - phi_3 D2 with D2 = (D1_0 - D1_1) / (r0 + r1), which
    estimates h^2 D''/2 (not h^2 D'' as in the singlestep DPM-Solver-3), so its second-derivative term carries half
    the weight a third-order step needs: local error O(h^3), global order 2 (with a small constant). False (default)
    keeps that update, which every published "DPM-Solver++(3M)" number used; True weights D2 by -2 phi_3, which
    makes the step third order (global order 3, verified on a Gaussian with a closed-form solution). See
    docs/solvers.md, "DPM-Solver++(3M): published and exact update".
    """
    return _dpmpp_multistep(denoiser, x, sigmas, class_labels, 3, lower_order_final, variant, eval_sigmas,
                            exact_third_order)
