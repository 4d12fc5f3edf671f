"""Samplers: the registries of ODE solvers and noise-level schedules, and `sample`, which runs a solver over a grid.

A solver is `solver(denoiser, x, sigmas, class_labels=None, **options) -> x`: a pure function over the full grid
(length N + 1) in the style of k-diffusion's sampling.py, with coefficients computed as tensor operations so that LD3
differentiates through the very code that generate.py runs; x is the starting sample at sigmas[0]. SOLVERS maps a name
to its SolverEntry (the function, its conventional grid end, its NFE rule, other names of its options). A schedule is
`schedule(num_steps, sigma_min, sigma_max, **options) -> float64 tensor`; `make_grid` turns it into a solver grid with
an explicit end convention ('zero': EDM's appended sigma = 0; 'sigma_min': stop at sigma_min). docs/solvers.md says how
to add a solver: one file and one line below.
"""

import torch

from samplers.dpm_solver import dpmpp_2m, dpmpp_3m
from samplers.edm_time import euler_time, heun_time
from samplers.euler_heun import churns, euler, heun, heun_nfe
from samplers.ipndm import ipndm
from samplers.schedules import (
    END_CONVENTIONS,
    SCHEDULES,
    SigmaGrid,
    default_sigma_range,
    import_ld3_schedule,
    load_ld3_vector,
    load_schedule_file,
    make_grid,
    save_schedule_file,
)
from samplers.solver_entry import SolverEntry
from samplers.unipc import unipc

# Conventional grid ends: EDM's samplers append sigma = 0; the multistep solvers' reference codes (DPM-Solver, UniPC,
# diff-sampler, LD3) stop at sigma_min.
SOLVERS = {
    "euler": SolverEntry(euler, default_end="zero"),
    "heun": SolverEntry(heun, default_end="zero", nfe=heun_nfe, adds_noise=churns),
    # EDM's ablation ODE in VP/VE time or with VP scaling (its Figure 2): the same steps in another time variable.
    "euler_time": SolverEntry(euler_time, default_end="zero"),
    "heun_time": SolverEntry(heun_time, default_end="zero", nfe=heun_nfe, adds_noise=churns),
    "dpmpp_2m": SolverEntry(dpmpp_2m, default_end="sigma_min", distinct_levels=True),
    "dpmpp_3m": SolverEntry(dpmpp_3m, default_end="sigma_min", distinct_levels=True),
    "unipc": SolverEntry(unipc, default_end="sigma_min", distinct_levels=True),
    "ipndm": SolverEntry(ipndm, default_end="sigma_min", aliases={"order": "max_order"}),
}

__all__ = [
    "END_CONVENTIONS", "SCHEDULES", "SOLVERS", "SigmaGrid", "SolverEntry", "count_nfe", "default_sigma_range",
    "get_solver", "import_ld3_schedule", "load_ld3_vector", "load_schedule_file", "make_grid", "sample",
    "save_schedule_file", "solver_options",
]


def get_solver(name: str) -> SolverEntry:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}: expected one of {sorted(SOLVERS)}")
    return SOLVERS[name]


def solver_options(name: str) -> list[str]:
    """The options a solver accepts (its keyword parameters, less the inputs `sample` supplies)."""
    return list(get_solver(name).options())


def count_nfe(solver: str, num_steps: int, end: str, denoise_to_zero: bool = False) -> int:
    """Denoiser calls per sample: the solver's NFE rule (N for Euler and the multistep solvers; EDM's Heun 2N - 1
    with the appended zero, 18 steps -> 35, and 2N when the grid ends at sigma_min), +1 for a final denoise_to_zero
    after a grid that ends at sigma_min."""
    entry = get_solver(solver)
    if end not in END_CONVENTIONS:
        raise ValueError(f"end must be one of {END_CONVENTIONS}, got {end!r}")
    return entry.nfe(num_steps, end) + int(bool(denoise_to_zero) and end == "sigma_min")


def sample(denoiser, latents: torch.Tensor, grid: SigmaGrid, *, solver: str = "heun", class_labels=None,
           randn_like=None, round_sigma=None, denoise_to_zero: bool = False, **options) -> torch.Tensor:
    """Run `solver` from unit-variance `latents` over `grid`; returns float64 samples, differentiable with respect to
    latents and the grid's tensors (LD3) when autograd is on.

    x_0 = latents (float64) * sigma_0, as EDM. randn_like / round_sigma go to solvers that declare them (Heun); the
    grid's decoupled evaluation levels (LD3) go to the solver as eval_sigmas. denoise_to_zero: after a grid that ends
    at sigma_min, one more call returns D(x; sigma_min) (+1 NFE).
    """
    entry = get_solver(solver)
    entry.check_options(options, solver)
    inputs = {"randn_like": randn_like, "round_sigma": round_sigma}
    kwargs = {name: value for name, value in inputs.items() if value is not None and entry.takes_input(name)}
    if grid.eval_sigmas is not None:
        if not entry.takes_input("eval_sigmas"):
            raise ValueError(f"solver {solver!r} takes no eval_sigmas, so it cannot use a decoupled evaluation grid")
        kwargs["eval_sigmas"] = grid.eval_sigmas
    sigmas = grid.sigmas
    x = latents.to(torch.float64) * sigmas[0]
    x = entry.function(denoiser, x, sigmas, class_labels, **options, **kwargs)
    if denoise_to_zero and grid.end == "sigma_min":
        x = denoiser(x, sigmas[-1], class_labels).to(torch.float64)
    return x
