"""Noise-level grids (time discretisations) for the samplers, and learned schedule files.

A schedule is `schedule(num_steps, sigma_min, sigma_max, **options) -> float64 tensor` holding num_steps + 1
strictly decreasing noise levels from sigma_max down to sigma_min inclusive (no zero). The grid a solver
integrates over is built from it by `make_grid`, which applies one of two end conventions:

- 'zero' (EDM's generate.py): num_steps - 1 intervals from sigma_max to sigma_min, then an appended sigma = 0, so
  the last step is a pure denoise. `num_steps` counts the non-zero levels, i.e. the steps. EDM's 18-step CIFAR grid
  is `make_grid('edm', 18, 0.002, 80, end='zero')`.
- 'sigma_min' (DPM-Solver, UniPC, LD3, diff-sampler): num_steps intervals from sigma_max to sigma_min, and the output
  is returned at sigma_min (optionally followed by one extra denoising call, `denoise_to_zero`).

Either way the grid has num_steps + 1 entries and the solver takes num_steps steps.

A learned (LD3) schedule is a small JSON file (`save_schedule_file` / `load_schedule_file`): the solver it was
learned for, its options, the end convention, the grid, the decoupled evaluation grid, the NFE and provenance.
The reference LD3 code's `.pt` artefact (a vector of length 2(N + 1): grid then evaluation grid) can be read
directly (`load_ld3_vector`) or converted to a JSON file (`import_ld3_schedule`).
"""

import dataclasses
import json
import math
import os
import pickle

import numpy as np
import torch

from dnnlib import util
from torch_utils import persistence

END_CONVENTIONS = ("zero", "sigma_min")
SCHEDULE_FILE_FORMAT = "diffusion-toolkit-schedule"
SCHEDULE_FILE_VERSION = 1

# VP-SDE constants of EDM's VPPrecond / ablation sampler (beta_d = 19.9 since NVlabs/edm commit 62072d2).
VP_BETA_D = 19.9
VP_BETA_MIN = 0.1
VP_EPSILON_S = 1e-3


def _vp_sigma(t, beta_d, beta_min):
    return (torch.exp(0.5 * beta_d * t**2 + beta_min * t) - 1).sqrt()


def _vp_default_range():
    t = torch.tensor([VP_EPSILON_S, 1.0], dtype=torch.float64)
    sigma = _vp_sigma(t, VP_BETA_D, VP_BETA_MIN)
    return float(sigma[0]), float(sigma[1])


# Default (sigma_min, sigma_max) per schedule when the user gives none: EDM's ablation-sampler defaults for its
# vp / ve / iddpm discretisations, EDM's 0.002 ... 80 otherwise.
DEFAULT_SIGMA_RANGE = {"vp": _vp_default_range(), "ve": (0.02, 100.0), "iddpm": (0.002, 81.0)}
EDM_SIGMA_RANGE = (0.002, 80.0)


def default_sigma_range(schedule: str) -> tuple[float, float]:
    return DEFAULT_SIGMA_RANGE.get(schedule, EDM_SIGMA_RANGE)


def _check_args(num_steps, sigma_min, sigma_max):
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if not (0 < sigma_min < sigma_max < math.inf):
        raise ValueError(f"expected 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}")


def _indices(num_steps, device):
    return torch.arange(num_steps + 1, dtype=torch.float64, device=device)


def edm(num_steps: int, sigma_min: float, sigma_max: float, *, rho: float = 7.0, device=None) -> torch.Tensor:
    """Karras et al. (2022) eq. 5: uniform in sigma^(1/rho). Same float64 expression as EDM's edm_sampler."""
    _check_args(num_steps, sigma_min, sigma_max)
    i = _indices(num_steps, device)
    return (sigma_max ** (1 / rho) + i / num_steps * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def logsnr(num_steps: int, sigma_min: float, sigma_max: float, *, device=None) -> torch.Tensor:
    """Uniform in lambda = -log(sigma), i.e. geometric in sigma (edm with rho -> inf; k-diffusion's exponential)."""
    _check_args(num_steps, sigma_min, sigma_max)
    i = _indices(num_steps, device)
    return torch.exp(math.log(sigma_max) + i / num_steps * (math.log(sigma_min) - math.log(sigma_max)))


def sigma_uniform(num_steps: int, sigma_min: float, sigma_max: float, *, device=None) -> torch.Tensor:
    """Uniform in sigma: LD3's and DPM-Solver-v3's 'time_uniform' for an EDM model wrapped as VE (t = sigma)."""
    _check_args(num_steps, sigma_min, sigma_max)
    i = _indices(num_steps, device)
    return sigma_max + i / num_steps * (sigma_min - sigma_max)


def time_quadratic(num_steps: int, sigma_min: float, sigma_max: float, *, device=None) -> torch.Tensor:
    """DPM-Solver's 'time_quadratic' with model time t = sigma: uniform in sqrt(sigma) (= edm with rho = 2)."""
    return edm(num_steps, sigma_min, sigma_max, rho=2.0, device=device)


def vp_time_uniform(num_steps: int, sigma_min: float, sigma_max: float, *, rho: float = 1.0,
                    epsilon_s: float = VP_EPSILON_S, device=None) -> torch.Tensor:
    """Uniform in the time t of a VP-SDE whose beta_d, beta_min are solved so that sigma(1) = sigma_max and
    sigma(epsilon_s) = sigma_min (EDM's --disc=vp; diff-sampler's 'time_uniform'). rho != 1 spaces t uniformly in
    t^(1/rho) instead (diff-sampler's exponent; DEIS tAB uses rho = 2)."""
    _check_args(num_steps, sigma_min, sigma_max)
    if not 0 < epsilon_s < 1:
        raise ValueError(f"epsilon_s must lie in (0, 1), got {epsilon_s}")
    beta_d = 2 * (math.log(sigma_min**2 + 1) / epsilon_s - math.log(sigma_max**2 + 1)) / (epsilon_s - 1)
    beta_min = math.log(sigma_max**2 + 1) - 0.5 * beta_d
    i = _indices(num_steps, device)
    t = (1 + i / num_steps * (epsilon_s ** (1 / rho) - 1)) ** rho
    return _vp_sigma(t, beta_d, beta_min)


def vp(num_steps: int, sigma_min: float, sigma_max: float, *, epsilon_s: float = VP_EPSILON_S,
       device=None) -> torch.Tensor:
    """EDM's 'vp' discretisation (ablation sampler --disc=vp): vp_time_uniform with rho = 1. Its default sigma
    range is the VP model's, sigma(epsilon_s) = 0.0105 ... sigma(1) = 152.2 (see DEFAULT_SIGMA_RANGE)."""
    return vp_time_uniform(num_steps, sigma_min, sigma_max, rho=1.0, epsilon_s=epsilon_s, device=device)


def ve(num_steps: int, sigma_min: float, sigma_max: float, *, device=None) -> torch.Tensor:
    """EDM's 've' discretisation: geometric in t = sigma^2 (so geometric in sigma); default range 0.02 ... 100."""
    _check_args(num_steps, sigma_min, sigma_max)
    i = _indices(num_steps, device)
    t = sigma_max**2 * ((sigma_min**2 / sigma_max**2) ** (i / num_steps))
    return t.sqrt()


def iddpm_sigma_table(C_1: float = 0.001, C_2: float = 0.008, M: int = 1000) -> torch.Tensor:
    """The improved-DDPM cosine schedule's noise levels u_0 > ... > u_M = 0 in EDM's sigma units (float64, CPU).

    alpha_bar(j) = sin^2(pi j / (2 M (C_2 + 1))) is evaluated in float32, as in EDM's ablation sampler (its j is an
    integer tensor, so torch computes the cosine schedule in float32) and the recursion in float64: EDM's levels to
    1e-15 (in float64 throughout they differ from EDM's by up to 4.6e-4 relative, at sigma_min)."""
    j = torch.arange(M + 1)
    alpha_bar = (0.5 * math.pi * j / M / (C_2 + 1)).sin() ** 2  # float32
    ratio = (alpha_bar[:-1] / alpha_bar[1:]).clip(min=C_1).tolist()  # alpha_bar(j - 1) / alpha_bar(j), j = 1 .. M
    u = [0.0] * (M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = math.sqrt((u[j] ** 2 + 1) / ratio[j - 1] - 1)
    return torch.tensor(u, dtype=torch.float64)


def iddpm(num_steps: int, sigma_min: float, sigma_max: float, *, C_1: float = 0.001, C_2: float = 0.008,
          M: int = 1000, device=None) -> torch.Tensor:
    """EDM's 'iddpm' discretisation: num_steps + 1 entries of the iDDPM table within [sigma_min, sigma_max], picked
    at evenly spaced (rounded) indices. Default range 0.002 ... 81."""
    _check_args(num_steps, sigma_min, sigma_max)
    u = iddpm_sigma_table(C_1, C_2, M)
    u = u[(u >= sigma_min) & (u <= sigma_max)]
    if len(u) < num_steps + 1:
        raise ValueError(f"the iDDPM table has only {len(u)} levels in [{sigma_min}, {sigma_max}]; "
                         f"cannot pick {num_steps + 1}")
    index = ((len(u) - 1) / num_steps * _indices(num_steps, None)).round().to(torch.int64)
    return u[index].to(device)


SCHEDULES = {
    "edm": edm,
    "logsnr": logsnr,
    "sigma_uniform": sigma_uniform,
    "time_quadratic": time_quadratic,
    "vp_time_uniform": vp_time_uniform,
    "vp": vp,
    "ve": ve,
    "iddpm": iddpm,
}


@dataclasses.dataclass
class SigmaGrid:
    """A solver's full grid: `sigmas` (float64, length num_steps + 1, decreasing, ending at 0 or sigma_min per
    `end`), and an optional decoupled evaluation grid `eval_sigmas` (LD3: the solver's coefficients use `sigmas`,
    the denoiser is evaluated at `eval_sigmas`)."""

    sigmas: torch.Tensor
    end: str
    eval_sigmas: torch.Tensor | None = None
    schedule: str = ""
    solver: str | None = None  # the solver a learned grid was fitted for (None: any)
    solver_kwargs: dict = dataclasses.field(default_factory=dict)
    provenance: dict = dataclasses.field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    def to(self, device) -> "SigmaGrid":
        eval_sigmas = None if self.eval_sigmas is None else self.eval_sigmas.to(device)
        return dataclasses.replace(self, sigmas=self.sigmas.to(device), eval_sigmas=eval_sigmas)


def is_schedule_file(name: str) -> bool:
    return str(name).endswith((".json", ".pt")) or os.path.sep in str(name) or os.path.isfile(str(name))


def make_grid(schedule: str = "edm", num_steps: int | None = 18, sigma_min: float | None = None,
              sigma_max: float | None = None, *, end: str = "zero", sigma_range: tuple[float, float] | None = None,
              round_sigma=None, device=None, **schedule_kwargs) -> SigmaGrid:
    """Build a solver grid from a schedule name (see SCHEDULES) or a schedule file (.json, or LD3's .pt).

    sigma_min / sigma_max: None picks the schedule's default range (EDM's per-discretisation defaults).
    sigma_range: the network's supported (sigma_min, sigma_max); the requested range is clamped to it as EDM does.
    round_sigma: the network's round_sigma, applied to the non-zero levels as EDM does (identity for EDM/VP/VE).
    A file's grid is used as stored (no clamping or rounding); num_steps, when given, must match it.
    """
    if end not in END_CONVENTIONS:
        raise ValueError(f"end must be one of {END_CONVENTIONS}, got {end!r}")
    if schedule not in SCHEDULES:
        if not is_schedule_file(schedule):
            raise ValueError(f"unknown schedule {schedule!r}: expected one of {sorted(SCHEDULES)} "
                             f"or the path of a schedule file (.json, or LD3's .pt)")
        if schedule_kwargs:
            raise ValueError(f"schedule file {schedule!r} takes no schedule options, got {sorted(schedule_kwargs)}")
        grid = load_schedule_file(schedule) if not str(schedule).endswith(".pt") else load_ld3_vector(schedule)
        if num_steps is not None and num_steps != grid.num_steps:
            raise ValueError(f"schedule file {schedule!r} holds a {grid.num_steps}-step grid, "
                             f"but {num_steps} steps were requested (--steps: leave it out with a schedule file)")
        return grid.to(device)
    if num_steps is None:
        num_steps = 18
    default_min, default_max = default_sigma_range(schedule)
    sigma_min = default_min if sigma_min is None else sigma_min
    sigma_max = default_max if sigma_max is None else sigma_max
    if sigma_range is not None:
        sigma_min = max(sigma_min, sigma_range[0])
        sigma_max = min(sigma_max, sigma_range[1])
    if end == "zero" and num_steps < 2:
        raise ValueError("end='zero' needs num_steps >= 2 (sigma_max ... sigma_min, then 0): use --steps >= 2, "
                         "or --end=sigma_min for a grid of one step")
    try:
        levels = SCHEDULES[schedule](num_steps - 1 if end == "zero" else num_steps, sigma_min, sigma_max,
                                     device=device, **schedule_kwargs)
    except (OverflowError, ZeroDivisionError) as err:  # e.g. rho = 1e-9: sigma ** (1 / rho)
        raise ValueError(f"the {schedule!r} schedule cannot be computed in float64 for sigma {sigma_min:g} ... "
                         f"{sigma_max:g}{_options_text(schedule_kwargs)} ({err})") from None
    levels = levels.to(torch.float64)
    if round_sigma is not None:
        levels = torch.as_tensor(round_sigma(levels)).to(torch.float64)
    # Levels a solver can step through: finite, positive and non-increasing (round_sigma may repeat one; the solvers
    # that cannot take that refuse it later). rho below ~0.3 loses sigma_min^(1/rho) beside sigma_max^(1/rho) in
    # float64 and ends at 0, which sampled NaN images that were saved black without a word.
    bad = ~torch.isfinite(levels) | (levels <= 0)
    if bad.any() or (levels[1:] > levels[:-1]).any() or (len(levels) > 1 and levels[-1] >= levels[0]):
        raise ValueError(f"the {schedule!r} schedule for sigma {sigma_min:g} ... {sigma_max:g}"
                         f"{_options_text(schedule_kwargs)} gives noise levels that are not finite, positive and "
                         f"decreasing in float64: {[float(f'{v:.6g}') for v in levels.tolist()]}; choose other "
                         f"--rho / --sigma_min / --sigma_max")
    if end == "zero":
        levels = torch.cat([levels, torch.zeros_like(levels[:1])])
    return SigmaGrid(sigmas=levels, end=end, schedule=schedule)


def _options_text(schedule_kwargs: dict) -> str:
    return "".join(f", {key}={value:g}" if isinstance(value, float) else f", {key}={value}"
                   for key, value in sorted(schedule_kwargs.items()))


# ---------------------------------------------------------------------------------------------------------------
# Schedule files.


def _validate_levels(values, what: str, end: str, path: str) -> torch.Tensor:
    levels = torch.as_tensor(np.asarray(values, dtype=np.float64))
    if levels.ndim != 1 or len(levels) < 2:
        raise ValueError(f"{path}: {what} must be a list of at least 2 noise levels, got shape {tuple(levels.shape)}")
    if not torch.isfinite(levels).all():
        raise ValueError(f"{path}: {what} contains non-finite values")
    positive = levels[:-1] if end == "zero" else levels
    if (positive <= 0).any() or (end == "zero" and levels[-1] != 0):
        expected = "positive levels then a final 0" if end == "zero" else "positive levels"
        raise ValueError(f"{path}: {what} must hold {expected} (end={end!r}), got {levels.tolist()}")
    if not (levels[1:] < levels[:-1]).all():
        raise ValueError(f"{path}: {what} must be strictly decreasing, got {levels.tolist()}")
    return levels


def save_schedule_file(path: str, sigmas, *, solver: str, nfe: int, eval_sigmas=None, end: str = "sigma_min",
                       solver_kwargs: dict | None = None, provenance: dict | None = None) -> None:
    """Write a learned schedule as JSON (atomically). Floats are written with repr, so they reload bit-exactly.

    provenance: a JSON-able record of how the grid was made, stored as given. LD3's (samplers/ld3) holds the start
    grid, every hand-made grid's and every round's validation loss, the train / validation / held-out splits with
    their seeds (ld3.py evaluate leaves those seeds out) and the final choice with its held-out gain: docs/ld3.md,
    "What is reported"."""
    sigmas = [float(s) for s in torch.as_tensor(sigmas, dtype=torch.float64).tolist()]
    if eval_sigmas is not None:
        eval_sigmas = [float(s) for s in torch.as_tensor(eval_sigmas, dtype=torch.float64).tolist()]
    doc = {
        "format": SCHEDULE_FILE_FORMAT,
        "version": SCHEDULE_FILE_VERSION,
        "solver": solver,
        "solver_kwargs": dict(solver_kwargs or {}),
        "nfe": int(nfe),
        "num_steps": len(sigmas) - 1,
        "end": end,
        "sigmas": sigmas,
        "eval_sigmas": eval_sigmas,
        "provenance": dict(provenance or {}),
    }
    _check_schedule_doc(doc, path)
    # atomic_output: a failed write (a full disk) is an OutputPathError naming `path`, and the temporary file of a
    # killed writer is removed by the next (a bare '{path}.tmp-{pid}' was neither).
    with util.atomic_output(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def _check_schedule_doc(doc, path) -> SigmaGrid:
    if not isinstance(doc, dict) or doc.get("format") != SCHEDULE_FILE_FORMAT:
        raise ValueError(f"{path}: not a schedule file (expected a JSON object with format={SCHEDULE_FILE_FORMAT!r})")
    if doc.get("version") != SCHEDULE_FILE_VERSION:
        raise ValueError(f"{path}: unsupported schedule file version {doc.get('version')!r}, "
                         f"expected {SCHEDULE_FILE_VERSION}")
    for key in ("solver", "nfe", "end", "sigmas"):
        if key not in doc:
            raise ValueError(f"{path}: missing key {key!r}")
    end = doc["end"]
    if end not in END_CONVENTIONS:
        raise ValueError(f"{path}: end must be one of {END_CONVENTIONS}, got {end!r}")
    sigmas = _validate_levels(doc["sigmas"], "sigmas", end, path)
    eval_sigmas = None
    if doc.get("eval_sigmas") is not None:
        eval_sigmas = _validate_levels(doc["eval_sigmas"], "eval_sigmas", end, path)
        if len(eval_sigmas) != len(sigmas):
            raise ValueError(f"{path}: eval_sigmas has {len(eval_sigmas)} entries, sigmas {len(sigmas)}")
    if "num_steps" in doc and doc["num_steps"] != len(sigmas) - 1:
        raise ValueError(f"{path}: num_steps={doc['num_steps']} but sigmas has {len(sigmas)} entries")
    from samplers import count_nfe, SOLVERS  # noqa: I001 -- late import: samplers/__init__ imports this module
    solver = doc["solver"]
    if solver not in SOLVERS:
        raise ValueError(f"{path}: unknown solver {solver!r}, expected one of {sorted(SOLVERS)}")
    expected_nfe = count_nfe(solver, len(sigmas) - 1, end)
    if doc["nfe"] != expected_nfe:
        raise ValueError(f"{path}: nfe={doc['nfe']} but solver {solver!r} with {len(sigmas) - 1} steps "
                         f"(end={end!r}) costs {expected_nfe}")
    solver_kwargs = doc.get("solver_kwargs") or {}
    if not isinstance(solver_kwargs, dict):
        raise ValueError(f"{path}: solver_kwargs must be an object of option names and values, got {solver_kwargs!r}")
    try:
        SOLVERS[solver].check_options(solver_kwargs, solver)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return SigmaGrid(sigmas=sigmas, end=end, eval_sigmas=eval_sigmas, schedule=str(path), solver=solver,
                     solver_kwargs=dict(solver_kwargs), provenance=dict(doc.get("provenance") or {}))


def load_schedule_file(path: str) -> SigmaGrid:
    """Read a JSON schedule file written by save_schedule_file (or by hand) and validate it."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"schedule file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON, so not a schedule file (ld3.py train writes JSON; LD3's own "
                         f"tensor file ends in .pt) ({type(e).__name__}: {e})") from None
    return _check_schedule_doc(doc, path)


# LD3 (vinhsuhi/LD3) solver names -> ours and the options its configs use (configs/cifar10.yml: order 3, bh1): a
# translation table for LD3's own artefacts, not a solver registry (a new solver needs no line here).
LD3_SOLVERS = {
    "euler": ("euler", {}),
    "ipndm": ("ipndm", {"max_order": 3}),
    "dpm_solver++": ("dpmpp_3m", {}),
    "uni_pc": ("unipc", {"order": 3, "variant": "bh1"}),
}
LD3_VECTOR_SOURCE = "LD3 .pt"


_MAX_VECTOR_LENGTH = 100_000


def load_ld3_vector(path: str, solver: str | None = None, solver_kwargs: dict | None = None) -> SigmaGrid:
    """Read LD3's artefact: a `.pt` holding a tensor of length 2(N + 1) (sigma grid, then evaluation grid), or a
    dict with it under 'best_t_steps' (best_v1.pt / best_v2.pt). LD3 grids end at sigma_min (no final denoise)."""
    try:
        # weights_only alone still handed TorchScript archives to torch.jit.load before torch 2.6
        obj = persistence.safe_torch_load(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"LD3 schedule file not found: {path}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:  # e.g. a JSON schedule file named .pt
        raise ValueError(f"{path}: not LD3's .pt vector (a torch file; schedule files from ld3.py train are JSON and "
                         f"end in .json): {e}") from None
    if isinstance(obj, dict):
        if "best_t_steps" not in obj:
            raise ValueError(f"{path}: expected a tensor or a dict with key 'best_t_steps', got keys {sorted(obj)}")
        obj = obj["best_t_steps"]
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"{path}: expected a tensor of length 2(N + 1), got {type(obj).__name__}")
    if obj.numel() > _MAX_VECTOR_LENGTH:  # before any copy: a view with stride 0 can describe 1e9 values in 1 KB
        raise ValueError(f"{path}: a tensor of {obj.numel():,} values; LD3's vector has 2(N + 1), a few dozen")
    vector = obj.detach().to(torch.float64).flatten()
    if len(vector) < 4 or len(vector) % 2:
        raise ValueError(f"{path}: expected a vector of even length 2(N + 1) >= 4, got length {len(vector)}")
    half = len(vector) // 2
    sigmas = _validate_levels(vector[:half].numpy(), "grid (first half)", "sigma_min", path)
    eval_sigmas = _validate_levels(vector[half:].numpy(), "evaluation grid (second half)", "sigma_min", path)
    if solver is not None and solver in LD3_SOLVERS:
        solver, default_kwargs = LD3_SOLVERS[solver]
        solver_kwargs = {**default_kwargs, **(solver_kwargs or {})}
    return SigmaGrid(sigmas=sigmas, end="sigma_min", eval_sigmas=eval_sigmas, schedule=str(path), solver=solver,
                     solver_kwargs=dict(solver_kwargs or {}),
                     provenance={"source": LD3_VECTOR_SOURCE, "path": str(path)})


def learned_solver_options(grid: SigmaGrid, solver: str) -> dict:
    """The options of `solver` that a schedule file's grid was learned with: those the file records, or for LD3's
    .pt vector, which records none, those of LD3's configs (LD3_SOLVERS)."""
    if grid.solver is None and grid.provenance.get("source") == LD3_VECTOR_SOURCE:
        return dict({ours: options for ours, options in LD3_SOLVERS.values()}.get(solver, {}))
    return dict(grid.solver_kwargs)


def import_ld3_schedule(pt_path: str, json_path: str, solver: str, *, solver_kwargs: dict | None = None,
                        provenance: dict | None = None) -> SigmaGrid:
    """Convert LD3's `.pt` vector into this project's JSON schedule file. `solver` is ours or LD3's name."""
    grid = load_ld3_vector(pt_path, solver, solver_kwargs)
    from samplers import count_nfe
    info = {"source": "LD3 (vinhsuhi/LD3) best_t_steps", "imported_from": os.path.abspath(pt_path),
            **(provenance or {})}
    if grid.solver is None:
        raise ValueError("import_ld3_schedule: a solver name is required")
    nfe = count_nfe(grid.solver, grid.num_steps, "sigma_min")
    save_schedule_file(json_path, grid.sigmas, solver=grid.solver, nfe=nfe,
                       eval_sigmas=grid.eval_sigmas, end="sigma_min", solver_kwargs=grid.solver_kwargs,
                       provenance=info)
    return load_schedule_file(json_path)
