"""UniPC (Zhao et al., NeurIPS 2023): the UniP-p predictor with the UniC-p corrector, data prediction, B(h) variants
bh1 and bh2, in EDM's sigma form (alpha = 1). See docs/solvers.md, "UniPC".

The corrector at step i -> i + 1 needs D at the predicted point x~_{i+1}, which is the evaluation the next step
needs anyway, so UniPC costs one NFE per step: the buffer keeps D(x~_{i+1}) while the trajectory continues from the
corrected x_{i+1} (as the reference implementation). No corrector on the final step. Conventional end: 'sigma_min'.
A step to sigma = 0 (EDM's appended zero) is x <- D_i, the h -> inf limit, using the buffered D.
"""

from typing import Literal

import torch

from samplers.solver_grid import read_grid, step_orders


def _unipc_coefficients(hh: torch.Tensor, rks: list[torch.Tensor], variant: str):
    """B(h), the right-hand side g_j = hh * phi_{j+1}(hh) * j! / B(h), j = 1..p, of the UniP/UniC systems, and their
    Vandermonde matrix [r_k^(j-1)]."""
    b_h = hh if variant == "bh1" else torch.expm1(hh)
    h_phi_k = torch.expm1(hh) / hh - 1  # hh * phi_2(hh)
    factorial = 1
    rhs = []
    for j in range(1, len(rks) + 1):
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    powers = torch.arange(len(rks), dtype=hh.dtype, device=hh.device)
    vandermonde = torch.stack(rks)[None, :] ** powers[:, None]
    return b_h, torch.stack(rhs), vandermonde


def _solve(matrix: torch.Tensor, rhs: torch.Tensor) -> list[torch.Tensor]:
    # solve_ex, not solve: solve checks for a singular matrix, which waits for the device at every step. The r_k of
    # a strictly decreasing grid are distinct, so the Vandermonde matrix is regular.
    return list(torch.linalg.solve_ex(matrix, rhs).result.unbind())


def unipc(denoiser, x: torch.Tensor, sigmas: torch.Tensor, class_labels=None, *, order: int = 3,
          variant: Literal["bh1", "bh2"] = "bh1", lower_order_final: bool | int = True, corrector: bool = True,
          eval_sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """UniPC-p, p = order >= 1 (usually 1, 2 or 3; accuracy order p + 1 with the corrector).

    variant: 'bh1' (B(h) = -h; UniPC's and LD3's default) or 'bh2' (B(h) = expm1(-h); diff-sampler's and diffusers'
    default; UniP-2 bh2 is DPM-Solver++(2M)). lower_order_final: see samplers.solver_grid.step_orders (UniPC: always).
    corrector=False gives the UniP predictor alone. eval_sigmas: LD3's decoupled evaluation levels. NFE = N.
    """
    if order < 1:
        raise ValueError(f"UniPC order must be >= 1, got {order}")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
    levels, eval_grid = read_grid(sigmas, eval_sigmas)
    num_steps = len(levels) - 1
    orders = step_orders(levels, order, lower_order_final)
    num_positive = sum(1 for s in levels if s > 0)
    lambdas = -sigmas[:num_positive].log()  # the positive levels only: log(0) would poison LD3's gradients
    buffer = [denoiser(x, eval_grid[0], class_labels).to(torch.float64)]  # D's, newest last, at lambdas[i - k]
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
        b_h, rhs, vandermonde = _unipc_coefficients(hh, rks, variant)

        x_pred = x_lin
        if p >= 2:
            coefs = [0.5] if p == 2 else _solve(vandermonde[:-1, :-1], rhs[:-1])
            x_pred = x_lin - b_h * sum(c * dk for c, dk in zip(coefs, diffs))
        if i + 1 >= num_steps:
            x = x_pred
            break
        denoised_next = denoiser(x_pred, eval_grid[i + 1], class_labels).to(torch.float64)
        if corrector:
            coefs = [0.5] if p == 1 else _solve(vandermonde, rhs)
            correction = coefs[-1] * (denoised_next - denoised)
            for c, dk in zip(coefs[:-1], diffs):
                correction = correction + c * dk
            x = x_lin - b_h * correction
        else:
            x = x_pred
        buffer = (buffer + [denoised_next])[-order:]
    return x
