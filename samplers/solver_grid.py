"""What a solver reads from its grid before stepping: the levels on the host, the evaluation grid, each step's order.

Solvers compute their coefficients with tensor operations on `sigmas` (and `eval_sigmas`), so the coefficients stay on
the grid's device, a step never waits for the host, and LD3 gets gradients with respect to the grid from the same code
that generate.py runs. Only the control flow (how many steps, which step ends at sigma = 0, each step's order) is read
from a host copy of the grid, once per sampling run.
"""

import torch


def host_levels(sigmas: torch.Tensor) -> list[float]:
    """The grid's levels as Python floats, for control flow. Reading a device tensor waits for the device, so the
    floats are kept on the grid tensor itself (the batches of a run share one; an in-place change is seen by its
    version counter)."""
    if sigmas.requires_grad:  # a grid being learned (LD3): a new tensor every step
        return sigmas.detach().tolist()
    cached = getattr(sigmas, "_host_levels", None)
    if cached is None or cached[0] != sigmas._version:
        cached = (sigmas._version, sigmas.tolist())
        sigmas._host_levels = cached
    return list(cached[1])


def read_grid(sigmas: torch.Tensor, eval_sigmas: torch.Tensor | None = None) -> tuple[list[float], torch.Tensor]:
    """(levels, eval_grid): the grid's levels as Python floats, for control flow only (host_levels: one device sync
    per grid, not per batch), and the levels at which the denoiser is evaluated: eval_sigmas (LD3's decoupled grid)
    or sigmas itself."""
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D grid of length N + 1 >= 2, got shape {tuple(sigmas.shape)}")
    if eval_sigmas is None:
        eval_sigmas = sigmas
    if eval_sigmas.shape != sigmas.shape:
        raise ValueError(f"eval_sigmas has {len(eval_sigmas)} entries, sigmas {len(sigmas)}")
    return host_levels(sigmas), eval_sigmas


def step_orders(levels: list[float], order: int, lower_order_final, capped_warmup: bool = False) -> list[int]:
    """Order of each step of a multistep solver: warm-up min(order, i + 1); lower-order final steps min(order, M - i),
    where M counts the steps that end at a positive level (a step to 0 is a plain denoise, order 1). As in the
    reference codes (UniPC's and DPM-Solver's warm-up loops), the warm-up steps i < order - 1 are not capped when
    M >= order (UniPC order 4 over 4 steps: 1, 2, 3, 1); a grid shorter than the order, which they refuse, is capped
    throughout.

    lower_order_final: True (always: UniPC, LD3, diff-sampler), False (never), or an int K to apply it only when
    M < K (the original DPM-Solver uses K = 10). See docs/solvers.md, "Lower-order final steps".
    capped_warmup: the orders of this code before 2026-12-02, which capped the warm-up steps too (1, 2, 2, 1)."""
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
        if apply_final and (capped_warmup or i + 1 >= order or num_positive < order):
            p = min(p, num_positive - i)
        orders.append(p)
    return orders


def revised_step_orders(levels: list[float], order: int, lower_order_final) -> list[int] | None:
    """The step orders where versions before 2026-12-02 gave others (they capped the warm-up steps: only orders >= 4
    differ, e.g. UniPC order 4 over 4 steps was 1, 2, 2, 1), else None. generate.py records them and names them in
    its sampler line (which fid.py's results keep), so that images and results of an earlier version's orders, whose
    records lack them, are not taken for these: a resumed output folder mixed images of both."""
    orders = step_orders(levels, order, lower_order_final)
    return orders if orders != step_orders(levels, order, lower_order_final, capped_warmup=True) else None
