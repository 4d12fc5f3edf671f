"""DPM-Solver++ multistep, 2M and 3M, data prediction (Lu et al. 2022), in EDM's sigma form (alpha = 1).

With lambda = -log(sigma), h = lambda_{i+1} - lambda_i, rho = sigma_{i+1} / sigma_i and phi_1 = expm1(-h) = rho - 1,
the first-order step is x <- rho x - phi_1 D_i; higher orders add finite differences of past D's (see
docs/samplers.md 2.3). Conventional end: 'sigma_min' (no final denoise). A step to sigma = 0 (EDM's appended zero)
is the limit h -> inf of every order: x <- D_i.
"""

import math

import torch

from samplers.euler_heun import _host_levels


def step_orders(levels: list[float], order: int, lower_order_final) -> list[int]:
    """Order of each step: warm-up min(order, i + 1); lower-order final steps min(order, M - i), where M counts the
    steps that end at a positive level (a step to 0 is a plain denoise, order 1).

    lower_order_final: True (always: UniPC, LD3, diff-sampler), False (never), or an int K to apply it only when
    M < K (the original DPM-Solver uses K = 10)."""
    num_steps = len(levels) - 1
    num_positive = sum(1 for s in levels[1:] if s > 0)
    if isinstance(lower_order_final, bool):
        apply_final = lower_order_final
    elif isinstance(lower_order_final, int):
        apply_final = num_positive < lower_order_final
    else:
        raise ValueError(f"lower_order_final must be True, False or an int threshold, got {lower_order_final!r}")
    orders = []
    for i in range(num_steps):
        if levels[i + 1] == 0:
            orders.append(1)
            continue
        p = min(order, i + 1)
        if apply_final:
            p = min(p, num_positive - i)
        orders.append(p)
    return orders


def _dpmpp_multistep(denoiser, x, sigmas, class_labels, order, lower_order_final, variant, eval_sigmas,
                     exact_third_order=False):
    if variant not in ("dpmsolver", "taylor"):
        raise ValueError(f"DPM-Solver++ variant must be 'dpmsolver' or 'taylor', got {variant!r}")
    levels, _ = _host_levels(sigmas, eval_sigmas)
    eval_grid = sigmas if eval_sigmas is None else eval_sigmas
    orders = step_orders(levels, order, lower_order_final)
    lambdas = [-math.log(s) if s > 0 else math.inf for s in levels]
    history = []  # the last `order` denoiser outputs, newest last
    for i, p in enumerate(orders):
        denoised = denoiser(x, eval_grid[i], class_labels).to(torch.float64)
        history = (history + [denoised])[-order:]
        if levels[i + 1] == 0:
            x = denoised
            continue
        h = lambdas[i + 1] - lambdas[i]
        phi_1 = math.expm1(-h)
        x_first = (levels[i + 1] / levels[i]) * x - phi_1 * denoised
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


def dpmpp_2m(denoiser, x: torch.Tensor, sigmas: torch.Tensor, class_labels=None, *, lower_order_final=True,
             variant: str = "dpmsolver", eval_sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """DPM-Solver++(2M). NFE = N. variant: 'dpmsolver' (x += -phi_1/2 * D1, k-diffusion's sample_dpmpp_2m) or
    'taylor' (x += (phi_1/h + 1) * D1). lower_order_final: see step_orders. eval_sigmas: LD3's decoupled levels
    (D evaluated at sigma', coefficients from sigma)."""
    return _dpmpp_multistep(denoiser, x, sigmas, class_labels, 2, lower_order_final, variant, eval_sigmas)


def dpmpp_3m(denoiser, x: torch.Tensor, sigmas: torch.Tensor, class_labels=None, *, lower_order_final=True,
             variant: str = "dpmsolver", exact_third_order: bool = False,
             eval_sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """DPM-Solver++(3M): DPM-Solver's multistep third-order update, with warm-up steps of order 1 and 2 (the latter
    with `variant`). NFE = N. lower_order_final: see step_orders.

    exact_third_order: the reference update (DPM-Solver's dpm_solver_pytorch.py, copied by k-diffusion, diffusers,
    diff-sampler and LD3) is x <- rho x - phi_1 D + phi_2 D1 - phi_3 D2 with D2 = (D1_0 - D1_1) / (r0 + r1), which
    estimates h^2 D''/2 (not h^2 D'' as in the singlestep DPM-Solver-3), so its second-derivative term carries half
    the weight a third-order step needs: local error O(h^3), global order 2 (with a small constant). False (default)
    keeps that update, which every published "DPM-Solver++(3M)" number used; True weights D2 by -2 phi_3, which
    makes the step third order (global order 3, verified on a Gaussian with a closed-form solution).
    """
    return _dpmpp_multistep(denoiser, x, sigmas, class_labels, 3, lower_order_final, variant, eval_sigmas,
                            exact_third_order)
