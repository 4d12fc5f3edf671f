"""Samplers: registries of ODE solvers and noise-level schedules, and `sample` which runs one.

A solver is `solver(denoiser, x, sigmas, class_labels=None, **options) -> x_0`: a pure function over the full grid
(length N + 1) in the style of k-diffusion's sampling.py; x is the starting sample at sigmas[0]. A schedule is
`schedule(num_steps, sigma_min, sigma_max, **options) -> float64 tensor`; `make_grid` turns it into a solver grid
with an explicit end convention ('zero': EDM's appended sigma = 0; 'sigma_min': stop at sigma_min).
"""

import inspect

import torch

from samplers.dpm_solver import dpmpp_2m, dpmpp_3m
from samplers.euler_heun import euler, heun
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
from samplers.unipc import unipc

SOLVERS = {
    "euler": euler,
    "heun": heun,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_3m": dpmpp_3m,
    "unipc": unipc,
    "ipndm": ipndm,
}

# Each solver's conventional grid end: EDM's samplers append sigma = 0; the multistep solvers' reference codes
# (DPM-Solver, UniPC, diff-sampler, LD3) stop at sigma_min.
DEFAULT_END = {
    "euler": "zero",
    "heun": "zero",
    "dpmpp_2m": "sigma_min",
    "dpmpp_3m": "sigma_min",
    "unipc": "sigma_min",
    "ipndm": "sigma_min",
}

__all__ = [
    "DEFAULT_END", "END_CONVENTIONS", "SCHEDULES", "SOLVERS", "SigmaGrid", "count_nfe", "default_sigma_range",
    "get_solver", "import_ld3_schedule", "load_ld3_vector", "load_schedule_file", "make_grid", "sample",
    "save_schedule_file", "solver_options",
]


def get_solver(name: str):
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}: expected one of {sorted(SOLVERS)}")
    return SOLVERS[name]


def solver_options(name: str) -> list[str]:
    """The keyword options a solver accepts (beyond denoiser, x, sigmas, class_labels)."""
    params = inspect.signature(get_solver(name)).parameters
    return [p.name for p in params.values() if p.kind == inspect.Parameter.KEYWORD_ONLY]


def count_nfe(solver: str, num_steps: int, end: str, denoise_to_zero: bool = False) -> int:
    """Denoiser calls per sample: N for the multistep solvers and Euler; EDM's Heun 2N - 1 with the appended zero
    (18 steps -> 35), 2N when the grid ends at sigma_min; +1 for a final denoise_to_zero."""
    get_solver(solver)
    if end not in END_CONVENTIONS:
        raise ValueError(f"end must be one of {END_CONVENTIONS}, got {end!r}")
    nfe = num_steps
    if solver == "heun":
        nfe = 2 * num_steps - 1 if end == "zero" else 2 * num_steps
    return nfe + int(bool(denoise_to_zero) and end == "sigma_min")


def sample(denoiser, latents: torch.Tensor, grid: SigmaGrid, *, solver: str = "heun", class_labels=None,
           randn_like=None, round_sigma=None, denoise_to_zero: bool = False, **solver_kwargs) -> torch.Tensor:
    """Run `solver` from unit-variance `latents` over `grid`; returns float64 samples.

    x_0 = latents (float64) * sigma_0, as EDM. randn_like / round_sigma go to solvers that take them (Heun);
    the grid's decoupled evaluation levels (LD3) go to the solver as eval_sigmas. denoise_to_zero: after a grid
    that ends at sigma_min, one more call returns D(x; sigma_min) (+1 NFE).
    """
    solver_fn = get_solver(solver)
    accepted = solver_options(solver)
    unknown = sorted(set(solver_kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"solver {solver!r} does not take option(s) {unknown}; it accepts {accepted}")
    kwargs = dict(solver_kwargs)
    if randn_like is not None and "randn_like" in accepted:
        kwargs["randn_like"] = randn_like
    if round_sigma is not None and "round_sigma" in accepted:
        kwargs["round_sigma"] = round_sigma
    if grid.eval_sigmas is not None:
        kwargs["eval_sigmas"] = grid.eval_sigmas
    sigmas = grid.sigmas
    x = latents.to(torch.float64) * sigmas[0]
    x = solver_fn(denoiser, x, sigmas, class_labels, **kwargs)
    if denoise_to_zero and grid.end == "sigma_min":
        x = denoiser(x, sigmas[-1], class_labels).to(torch.float64)
    return x
