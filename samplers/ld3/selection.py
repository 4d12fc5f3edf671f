"""LD3's safeguards: score grids on teacher samples, pick the result on data the optimisation never saw, and report a
schedule against the hand-made grids on held-out teacher samples.

Why: LD3 (Tong et al., ICLR 2025) reports that a learned grid "consistently improves" few-step sampling, but its
recipe (start from logSNR, 50 training / 50 validation samples, model selection on the validation loss after every
step) can return a grid that is worse than EDM's rho = 7 on new noises (docs/ld3.md has the measurements). The
pieces here make the result never worse than the best hand-made grid on validation, and say so when a gain is within
its own noise:

- `score_grid`: per-sample distances (and squared errors) of a solver over a grid, from the original noises.
- `paired_gain`: the mean per-sample improvement of one grid over another on the same samples, and its standard
  error (the sample standard deviation of the paired differences / sqrt(n)): the noise of a gain measured on n
  teacher samples.
- `choose_result`: the learned grid replaces the best hand-made grid only when it is better on the validation split
  and on the held-out split (by more than `min_gain_se` paired standard errors, 0 by default); a gain within two
  standard errors is reported as within its noise.
- `evaluate_schedule`: a schedule file's grid against the hand-made grids on teacher samples it was not trained or
  selected on (`ld3.py evaluate`).
"""

import dataclasses
import math

import torch

from samplers import SigmaGrid
from samplers.generation import parse_int_list
from samplers.ld3.grid import HAND_MADE_GRIDS, hand_made_levels
from samplers.ld3.student import student_sample
from samplers.ld3.teacher import TeacherData

# Relative differences of mean losses below this are ties (resolved for the hand-made grid): they are rounding, not
# learning (a solver that is exact for the data gives every grid the same loss up to ~1e-8 relative, the teacher's
# samples being stored in float32), and no sampler is better for a change of one part in a million.
TIE_TOLERANCE = 1e-6

# A gain below this many paired standard errors is within its own noise: the log says so.
NOISE_SE = 2.0


def format_int_list(values) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (EDM's seed syntax, read back by samplers.generation.parse_int_list)."""
    values = [int(v) for v in values]
    parts, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[i - 1] + 1:
            first, last = values[start], values[i - 1]
            parts.append(str(first) if first == last else f"{first}-{last}")
            start = i
    return ",".join(parts)


class TeacherSplit:
    """Teacher samples [first, first + count) on the device: the original noises, the current ones (the soft
    objective moves them), the teacher's samples and the labels."""

    def __init__(self, data: TeacherData, first: int, count: int, device):
        index = slice(first, first + count)
        self.first, self.count = first, count
        self.original = data.latents[index].to(device, torch.float64)
        self.latents = self.original.clone()
        self.targets = data.images[index].to(device, torch.float32)
        self.labels = None if data.class_labels is None else data.class_labels[index].to(device)
        self.seeds = None if data.seeds is None else [int(s) for s in data.seeds[index].tolist()]

    def __len__(self):
        return self.count

    def describe(self) -> dict:
        """Which teacher samples this split holds (for the schedule file): first index, count, seeds."""
        return dict(first=self.first, count=self.count,
                    seeds=None if self.seeds is None else format_int_list(self.seeds))

    def max_shift(self) -> float:
        """The largest distance of a current noise from its original (unit-noise scale)."""
        return float((self.latents - self.original).flatten(1).norm(dim=1).max()) if self.count else 0.0

    def batch(self, index):
        return self.latents[index], self.original[index], self.targets[index], \
            None if self.labels is None else self.labels[index]


@dataclasses.dataclass
class GridScore:
    """A grid's per-sample distances to the teacher (`losses`, the training distance) and mean squared errors per
    coordinate (`squared_errors`), float64 on the host."""

    losses: torch.Tensor
    squared_errors: torch.Tensor

    @property
    def loss(self) -> float:
        return float(self.losses.mean())

    @property
    def rms(self) -> float:
        """Root mean squared error per coordinate over all samples (model space)."""
        return math.sqrt(float(self.squared_errors.mean()))


@torch.no_grad()
def score_grid(denoiser, split: TeacherSplit, sigmas: torch.Tensor, eval_sigmas: torch.Tensor | None, *,
               solver: str, solver_kwargs: dict, end: str, distance_fn, batch_size: int | None = None) -> GridScore:
    """The solver over (sigmas, eval_sigmas) from the split's original noises, scored against the teacher."""
    losses, squared_errors = [], []
    batch_size = batch_size or max(len(split), 1)
    for start in range(0, len(split), batch_size):
        index = slice(start, min(start + batch_size, len(split)))
        _, original, targets, labels = split.batch(index)
        output = student_sample(denoiser, original, sigmas, eval_sigmas, solver=solver, class_labels=labels, end=end,
                                **solver_kwargs)
        losses.append(distance_fn(output, targets).detach().to(torch.float64).cpu())
        squared_errors.append((output - targets).square().flatten(1).mean(1).cpu())
    empty = torch.zeros(0, dtype=torch.float64)
    return GridScore(losses=torch.cat(losses) if losses else empty,
                     squared_errors=torch.cat(squared_errors) if squared_errors else empty)


def paired_gain(baseline: torch.Tensor, candidate: torch.Tensor) -> tuple[float, float]:
    """(mean of baseline - candidate, its standard error) over the same samples: how much lower the candidate's
    per-sample loss is, and the noise of that number (sample standard deviation of the differences / sqrt(n); inf
    for n < 2). A gain within about two standard errors may be luck of the samples.

    One sample says nothing of the noise: its standard error is unknown, not 0 (with 0, a learned grid better on a
    single held-out sample passed --min-gain-se=2 as "inf standard errors", without a warning)."""
    diff = (baseline - candidate).to(torch.float64)
    if len(diff) < 2:
        return float(diff.mean()) if len(diff) else 0.0, math.inf
    return float(diff.mean()), float(diff.std() / math.sqrt(len(diff)))


def hand_made_grids(names, num_levels: int, sigma_min: float, sigma_max: float, end: str) -> dict:
    """name -> the solver grid (float64; sigma = 0 appended for end='zero') of each hand-made grid named."""
    grids = {}
    for name in names:
        levels = hand_made_levels(name, num_levels, sigma_min, sigma_max)
        grids[name] = torch.cat([levels, levels.new_zeros(1)]) if end == "zero" else levels
    return grids


@dataclasses.dataclass
class Choice:
    """The final choice between the learned grid and the best hand-made one (`chosen`: 'learned' or its name)."""

    chosen: str
    reason: str
    warning: bool = False  # the reason is a warning (a gain within its noise, a biased check)
    gain: float | None = None  # mean per-sample gain of the learned grid over the hand-made one, where tested
    gain_se: float | None = None
    tested_on: str | None = None  # 'holdout' or 'validation'

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def choose_result(baseline_name: str, valid_baseline: GridScore, valid_learned: GridScore | None,
                  holdout_baseline: GridScore | None, holdout_learned: GridScore | None, *,
                  min_gain_se: float = 0.0) -> Choice:
    """The learned grid wins only when (1) its validation loss is below the hand-made grid's, and (2) on the held-out
    split (the validation split when there is none: a biased check, said so) its mean per-sample gain exceeds the
    rounding tolerance and `min_gain_se` paired standard errors. Otherwise the hand-made grid is kept, with the
    reason. A gain within its noise (below NOISE_SE standard errors) is a warning either way.

    The learned grid was not chosen on the held-out samples, so its gain there is an unbiased estimate. With
    min_gain_se = 0 (the default) a learned grid that is in truth slightly worse can win, but then loses at most
    ~0.17 standard errors in expectation and is flagged; with min_gain_se = 2 it wins about 2 % of the time
    (one-sided normal test), but real gains that rest on rare samples (mode switches the learned grid avoids) are
    given up. docs/ld3.md has the measured cases of both."""
    if valid_learned is None:
        return Choice(baseline_name, "LD3 never improved on its starting grid")
    if not valid_learned.loss < valid_baseline.loss * (1 - TIE_TOLERANCE):
        return Choice(baseline_name, f"the learned grid's validation loss {valid_learned.loss:.6g} is not below "
                      f"{baseline_name}'s {valid_baseline.loss:.6g}: learning did not improve on it")
    if holdout_baseline is not None and len(holdout_baseline.losses) > 0:
        base, learned, tested_on = holdout_baseline, holdout_learned, "holdout"
        where = f"the {len(base.losses)} held-out samples"
    else:
        base, learned, tested_on = valid_baseline, valid_learned, "validation"
        where = f"the {len(base.losses)} validation samples (no held-out split: biased towards the learned grid)"
    gain, se = paired_gain(base.losses, learned.losses)
    stats = dict(gain=gain, gain_se=se, tested_on=tested_on)
    noise = " (one sample: its standard error is unknown)" if math.isinf(se) else \
        f" ± {se:.2g} (paired standard error, {gain / se if se > 0 else math.inf:.1f} of them)"
    summary = f"on {where}: loss {learned.loss:.6g} vs {base.loss:.6g} for {baseline_name}, gain {gain:.3g}{noise}"
    if gain <= TIE_TOLERANCE * base.loss:
        return Choice(baseline_name, f"the learned grid is not better {summary}", warning=True, **stats)
    if gain <= min_gain_se * se:
        return Choice(baseline_name, f"the learned grid's gain is within its noise (below the required "
                      f"{min_gain_se:g} standard errors) {summary}", warning=True, **stats)
    if gain <= NOISE_SE * se:
        return Choice("learned", f"the learned grid is better {summary}, but within its noise (< {NOISE_SE:g} "
                      f"standard errors): the gain may not hold on new samples", warning=True, **stats)
    return Choice("learned", f"the learned grid is better {summary}", warning=tested_on == "validation", **stats)


# ---------------------------------------------------------------------------------------------------------------
# Held-out evaluation of a schedule file (ld3.py evaluate).


def used_seeds(provenance: dict) -> list[int] | None:
    """The teacher seeds a learned schedule was trained, validated or selected on (None: the file does not say)."""
    splits = provenance.get("splits")
    if not isinstance(splits, dict):
        return None
    seeds = []
    for split in splits.values():
        if not isinstance(split, dict) or split.get("seeds") is None:
            return None
        if split["seeds"]:
            seeds.extend(parse_int_list(split["seeds"]))
    return seeds


def unseen_samples(teacher: TeacherData, provenance: dict) -> tuple[torch.Tensor, str]:
    """Indices of the teacher samples a schedule was not trained or selected on (by seed), and a note on how they
    were chosen. Raises ValueError when that cannot be told or nothing is left."""
    seeds = used_seeds(provenance)
    if seeds is None:
        if provenance.get("splits") is not None:
            raise ValueError("the schedule file's splits record no seeds (its teacher data had none), so the "
                             "samples it was learned on cannot be told apart")
        return torch.arange(len(teacher)), "the schedule file does not say which teacher samples it was learned " \
            "on: all samples used"
    if teacher.seeds is None:
        raise ValueError("the teacher data holds no seeds, so the samples the schedule was learned on cannot be "
                         "told apart (write it with `ld3.py gen-data`)")
    used = torch.tensor(sorted(set(seeds)), dtype=torch.int64)
    keep = ~torch.isin(teacher.seeds.to(torch.int64), used)
    index = keep.nonzero().flatten()
    if len(index) == 0:
        raise ValueError(f"all {len(teacher)} teacher samples were used to learn the schedule (seeds "
                         f"{format_int_list(sorted(set(seeds)))}): generate teacher data with other seeds")
    left_out = len(teacher) - len(index)
    note = f"{len(index)} of {len(teacher)} teacher samples (" + (
        f"the {left_out} the schedule was learned on left out)" if left_out else "none was used to learn the schedule)")
    return index, note


@dataclasses.dataclass
class EvaluationRow:
    name: str
    loss: float
    rms: float
    gain: float | None = None  # vs the best hand-made grid, per sample (positive: better)
    gain_se: float | None = None


@dataclasses.dataclass
class Evaluation:
    rows: list  # EvaluationRow, the schedule's first, then the hand-made grids by loss
    best_hand_made: str
    num_samples: int
    note: str


def subset(teacher: TeacherData, index: torch.Tensor) -> TeacherData:
    return TeacherData(latents=teacher.latents[index], images=teacher.images[index],
                       class_labels=None if teacher.class_labels is None else teacher.class_labels[index],
                       seeds=None if teacher.seeds is None else teacher.seeds[index], info=dict(teacher.info))


def evaluate_schedule(denoiser, teacher: TeacherData, grid: SigmaGrid, *, distance_fn, solver: str | None = None,
                      solver_kwargs: dict | None = None, candidates=None, batch_size: int = 64, device=None,
                      name: str = "schedule", progress: bool = False) -> Evaluation:
    """`grid` (a schedule file's) against the hand-made grids of the same solver, NFE, end and sigma range, on the
    teacher samples it was not trained or selected on (by seed, from its provenance). Rows: mean distance, RMS
    error per coordinate, and the per-sample gain over the best hand-made grid on these samples with its standard
    error."""
    solver = solver or grid.solver
    if solver is None:
        raise ValueError("the schedule does not record its solver: pass one")
    solver_kwargs = dict(grid.solver_kwargs if solver_kwargs is None else solver_kwargs)
    index, note = unseen_samples(teacher, grid.provenance)
    device = torch.device(device or "cpu")
    split = TeacherSplit(subset(teacher, index), 0, len(index), device)
    sigmas = grid.sigmas.to(device, torch.float64)
    positive = sigmas[sigmas > 0]
    sigma_min, sigma_max = float(positive[-1]), float(positive[0])
    common = dict(solver=solver, solver_kwargs=solver_kwargs, end=grid.end, distance_fn=distance_fn,
                  batch_size=batch_size)
    eval_sigmas = None if grid.eval_sigmas is None else grid.eval_sigmas.to(device, torch.float64)
    names = list(HAND_MADE_GRIDS) if candidates is None else list(candidates)
    hand_made = hand_made_grids(names, len(positive), sigma_min, sigma_max, grid.end)
    jobs = [(sigmas, eval_sigmas), *((levels.to(device), None) for levels in hand_made.values())]
    if progress:  # every grid samples all the held-out noises: minutes for a real network
        import tqdm
        jobs = tqdm.tqdm(jobs, unit="grid", desc="evaluate")
    learned, *hand_made_scores = [score_grid(denoiser, split, s, e, **common) for s, e in jobs]
    scores = dict(zip(hand_made, hand_made_scores))
    best = min(scores, key=lambda n: scores[n].loss)
    rows = []
    for row_name, score in [(name, learned), *sorted(scores.items(), key=lambda item: item[1].loss)]:
        gain, se = paired_gain(scores[best].losses, score.losses)
        rows.append(EvaluationRow(row_name, score.loss, score.rms, gain, se))
    return Evaluation(rows=rows, best_hand_made=best, num_samples=len(index), note=note)
