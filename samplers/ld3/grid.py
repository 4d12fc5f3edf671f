"""LD3's learnable time discretisation: logits -> a strictly decreasing noise-level grid, offsets -> the decoupled
evaluation grid (Tong et al., ICLR 2025, `time_mode: lambda`). See docs/solvers.md, "LD3"."""

import math

import torch

from samplers import END_CONVENTIONS, SCHEDULES, count_nfe

MIN_STEP_FRACTION = 1e-6  # smallest share of the log-sigma range one step may take

# The hand-made grids LD3 scores before learning (it starts from the best on the validation split, and never returns
# a grid worse than it): name -> (SCHEDULES name, options). EDM's rho = 7 and its neighbours, DPM-Solver's
# time_quadratic (rho = 2), logSNR (rho -> inf; LD3's own start) and uniform VP time (EDM's --disc=vp,
# diff-sampler's time_uniform). Uniform in sigma (LD3's time_uniform for EDM models) is left out: it is never
# competitive for EDM-style models (docs/solvers.md, "Grid ends"), but `init` may still name it.
HAND_MADE_GRIDS = {
    "edm_rho3": ("edm", {"rho": 3.0}),
    "edm_rho5": ("edm", {"rho": 5.0}),
    "edm_rho7": ("edm", {"rho": 7.0}),
    "edm_rho10": ("edm", {"rho": 10.0}),
    "time_quadratic": ("time_quadratic", {}),
    "logsnr": ("logsnr", {}),
    "vp_time_uniform": ("vp_time_uniform", {}),
}


def hand_made_grid_names() -> list[str]:
    """Every name `hand_made_levels` takes: HAND_MADE_GRIDS, then the other SCHEDULES with their default options."""
    return list(HAND_MADE_GRIDS) + [name for name in SCHEDULES if name not in HAND_MADE_GRIDS]


def hand_made_levels(name: str, num_levels: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """The positive levels sigma_max ... sigma_min (num_levels of them, float64) of a HAND_MADE_GRIDS name or of a
    SCHEDULES name with its default options ('edm' is rho = 7)."""
    schedule, options = HAND_MADE_GRIDS.get(name, (name, {}))
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown grid {name!r}: expected one of {', '.join(hand_made_grid_names())}")
    return SCHEDULES[schedule](num_levels - 1, sigma_min, sigma_max, **options).to(torch.float64)


def steps_for_nfe(solver: str, nfe: int, end: str) -> int:
    """The number of steps N whose cost is `nfe` denoiser calls (the solver's NFE rule, see samplers.count_nfe)."""
    for num_steps in range(1, nfe + 2):
        if count_nfe(solver, num_steps, end) == nfe:
            return num_steps
    costs = ", ".join(str(count_nfe(solver, n, end)) for n in range(1, 5))
    raise ValueError(f"solver {solver!r} with end={end!r} cannot spend exactly {nfe} NFE (1, 2, 3, 4 steps cost "
                     f"{costs})")


class GridParameterization(torch.nn.Module):
    """Logits -> a strictly decreasing grid sigma_max = sigma_0 > ... > sigma_{P-1} = sigma_min, and offsets ->
    the decoupled evaluation grid. Float64 throughout.

    u = log sigma: u_k = u_0 + c_k (u_{P-1} - u_0), with c_k the cumulative sum of the step fractions
    f = m + (1 - (P - 1) m) softmax(logits), m = MIN_STEP_FRACTION (LD3's softmax-cumsum, its first logit
    dropped: it cancels in LD3's normalisation). Evaluation levels: u'_k = u_k + clip(offset_k, -w g_k^-, w g_k^+)
    for interior k, with g^-/g^+ the (detached) gaps to the next / previous level and w = eval_window < 0.5.

    end='zero' appends sigma = 0 (EDM's final denoising step) to both grids; it is not learned.
    """

    def __init__(self, num_levels: int, sigma_min: float, sigma_max: float, *, end: str = "sigma_min",
                 eval_window: float = 0.45, init: torch.Tensor | None = None):
        super().__init__()
        if num_levels < 3:
            raise ValueError(f"a learnable grid needs at least 3 positive noise levels (one interior level), got "
                             f"{num_levels}: use more steps")
        if not 0 < sigma_min < sigma_max < math.inf:
            raise ValueError(f"expected 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
        if not 0 <= eval_window < 0.5:
            raise ValueError(f"eval_window must lie in [0, 0.5) so that the evaluation grid stays strictly "
                             f"decreasing, got {eval_window}")
        if end not in END_CONVENTIONS:
            raise ValueError(f"end must be one of {END_CONVENTIONS}, got {end!r}")
        self.num_levels = num_levels
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.end = end
        self.eval_window = float(eval_window)
        self.logits = torch.nn.Parameter(torch.zeros(num_levels - 1, dtype=torch.float64))
        self.offsets = torch.nn.Parameter(torch.zeros(num_levels, dtype=torch.float64))
        if init is not None:
            self.set_grid(init)

    @torch.no_grad()
    def set_grid(self, sigmas: torch.Tensor) -> None:
        """Set the logits so that the grid equals `sigmas` (its positive levels, sigma_max ... sigma_min) and zero
        the offsets."""
        levels = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
        levels = levels[levels > 0]
        if len(levels) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} positive levels, got {len(levels)}")
        if not (levels[1:] < levels[:-1]).all():
            raise ValueError(f"the grid must be strictly decreasing, got {levels.tolist()}")
        fractions = -torch.diff(levels.log()) / math.log(self.sigma_max / self.sigma_min)
        floor = MIN_STEP_FRACTION
        shares = ((fractions - floor) / (1 - len(fractions) * floor)).clamp_min(1e-300)
        self.logits.copy_(shares.log().to(self.logits.device))
        self.offsets.zero_()

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas, eval_sigmas): float64 grids of the solver's length (num_levels, plus the appended 0)."""
        num_steps = self.num_levels - 1
        fractions = MIN_STEP_FRACTION + (1 - num_steps * MIN_STEP_FRACTION) * torch.softmax(self.logits, dim=0)
        cumulative = torch.cumsum(fractions, dim=0)
        cumulative = cumulative / cumulative[-1]  # exactly 1 at the end despite rounding
        u_max, u_min = math.log(self.sigma_max), math.log(self.sigma_min)
        u_interior = u_max + cumulative[:-1] * (u_min - u_max)
        ends = self.logits.new_tensor([self.sigma_max, self.sigma_min])
        sigmas = torch.cat([ends[:1], u_interior.exp(), ends[1:]])  # endpoints exact, not exp(log(.))
        u = torch.cat([ends[:1].log(), u_interior, ends[1:].log()]).detach()
        gaps = u[:-1] - u[1:]  # > 0
        low = -self.eval_window * gaps[1:]  # towards the next (smaller) level
        high = self.eval_window * gaps[:-1]  # towards the previous (larger) level
        shift = torch.maximum(torch.minimum(self.offsets[1:-1], high), low)
        eval_sigmas = torch.cat([ends[:1], (u_interior + shift).exp(), ends[1:]])
        if self.end == "zero":
            zero = sigmas.new_zeros(1)
            sigmas, eval_sigmas = torch.cat([sigmas, zero]), torch.cat([eval_sigmas, zero])
        return sigmas, eval_sigmas

