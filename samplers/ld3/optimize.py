"""LD3's optimisation: learn a solver's grid (and decoupled evaluation grid) from teacher samples.

The student is the registered solver itself (samplers.sample over a grid whose tensors carry gradients), so LD3
learns the grid of exactly the code that generate.py runs, for every solver and option. The steps follow the
reference code (vinhsuhi/LD3 trainer.py): RMSprop on the grid logits, SGD on the evaluation offsets and on the
noises within a ball around the teacher's (the soft objective), model selection on a validation split after every
step, patience with learning-rate decay.

Around it, the safeguards of selection.py (on by default; `guard=False, init='logsnr', num_holdout=0` is LD3 as
published): the hand-made grids are scored on the validation split first and learning starts from the best; the
result is the learned grid only when it beats that grid on validation and, beyond its noise, on held-out teacher
samples. See docs/ld3.md.
"""

import copy
import dataclasses
import math
import time

import torch

from metrics.lpips import load_lpips
from samplers import SigmaGrid, get_solver, make_grid, save_schedule_file
from samplers.ld3.grid import HAND_MADE_GRIDS, GridParameterization, hand_made_grid_names, steps_for_nfe
from samplers.ld3.selection import (
    TIE_TOLERANCE,
    Choice,
    GridScore,
    TeacherSplit,
    choose_result,
    hand_made_grids,
    score_grid,
)
from samplers.ld3.student import check_deterministic, student_sample
from samplers.ld3.teacher import TeacherData

# ---------------------------------------------------------------------------------------------------------------
# Distances between the student's and the teacher's samples (model space, images in [-1, 1]), per sample.


def l2_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error (LD3's L2)."""
    return (x - y).square().flatten(1).mean(1)


def l1_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample mean absolute error (LD3's L1)."""
    return (x - y).abs().flatten(1).mean(1)


def _lpips_distance(lpips_vgg=None, lpips_lin=None, lpips_resize=None, device=None):
    return load_lpips(lpips_vgg, lpips_lin, resize=lpips_resize, device=device)


# name -> builder(**options) of a distance d(student, teacher) -> [B]; only LPIPS reads the options (where its
# weights are, the size it compares at).
DISTANCES = {
    "lpips": _lpips_distance,
    "l2": lambda **options: l2_distance,
    "l1": lambda **options: l1_distance,
}


def make_distance(name: str, *, lpips_vgg=None, lpips_lin=None, lpips_resize=None, device=None):
    """The per-sample distance function d(student, teacher) -> [B] named `name` (see DISTANCES)."""
    if name not in DISTANCES:
        raise ValueError(f"unknown distance {name!r}: expected one of {', '.join(DISTANCES)}")
    return DISTANCES[name](lpips_vgg=lpips_vgg, lpips_lin=lpips_lin, lpips_resize=lpips_resize, device=device)


# ---------------------------------------------------------------------------------------------------------------
# Configuration and result.

MAX_AUTO_HOLDOUT = 1000  # the automatic held-out split takes at most this many of the remaining teacher samples


def grid_levels(solver: str, nfe: int, end: str) -> int:
    """The positive noise levels of `solver`'s grid at `nfe` NFE (a grid ending at 0 has one fewer)."""
    num_steps = steps_for_nfe(solver, nfe, end)
    return num_steps + 1 if end == "sigma_min" else num_steps


@dataclasses.dataclass
class LD3Config:
    """LD3's hyper-parameters (defaults: vinhsuhi/LD3 configs/cifar10.yml and utils.adjust_hyper), and the
    safeguards (init, candidates, guard, num_holdout, min_gain_se; see docs/ld3.md). One bound is not LD3's:
    `eval_window` limits each evaluation offset by its own neighbouring log-sigma gaps, where LD3's code uses
    win_rate times the smallest gap between its raw logits (docs/ld3.md §3)."""

    solver: str = "ipndm"
    nfe: int = 6
    solver_kwargs: dict = dataclasses.field(default_factory=dict)
    end: str | None = None  # None: the solver's convention (its registry entry's default_end)
    sigma_min: float | None = None  # None: the teacher grid's smallest positive level
    loss: str = "lpips"  # the distance to the teacher: a DISTANCES name, 'lpips' | 'l2' | 'l1'
    lpips_vgg: str | None = None  # path or URL of torchvision's VGG16 weights (None: download)
    lpips_lin: str | None = None  # path or URL of the LPIPS v0.1 linear weights (None: download)
    lpips_resize: int | None = None
    num_train: int = 50
    num_valid: int = 50
    batch_size: int = 2
    valid_batch_size: int | None = None  # None: the whole validation split per call
    rounds_v1: int = 2  # rounds training the grid only
    rounds_v2: int = 5  # rounds training the grid and the evaluation offsets
    lr_logits: float = 5e-3  # RMSprop
    momentum_logits: float = 0.9
    lr_offsets: float = 0.1  # SGD, divided by NFE as LD3
    min_lr_logits: float = 5e-5
    min_lr_offsets: float = 1e-6
    lr_decay: float = 0.8
    patience: int = 5
    lr2_patience: int = 5  # stop after the offsets' lr floor was hit this many times
    shift_lr: float | None = None  # SGD on the noises; None: 12 / NFE
    shift_lr_decay: float = 0.5
    prior_bound: float | None = None  # radius on the unit-noise scale; None: 0.001 * numel / NFE^2; 0: hard loss
    eval_window: float = 0.45
    decoupled: bool = True  # learn the evaluation grid (rounds_v2)
    # The starting grid: 'best' (the best of `candidates` on the validation split) or a grid name
    # (grid.hand_made_grid_names(); LD3 as published starts from 'logsnr').
    init: str = "best"
    candidates: tuple | None = None  # the hand-made grids scored first (None: all of grid.HAND_MADE_GRIDS)
    # Return the learned grid only when it beats the best hand-made grid on validation and on the held-out split, by
    # more than min_gain_se paired standard errors there (a gain within two is warned about); False: LD3 as published
    # (its best grid on validation, unchecked).
    guard: bool = True
    # Teacher samples held out for that final choice (those after the validation split). None: with the guard, all
    # remaining samples (at most MAX_AUTO_HOLDOUT), or, when none remain, the second half of the validation split.
    num_holdout: int | None = None
    min_gain_se: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint: bool = False  # activation checkpointing in the unroll

    def candidate_names(self) -> list[str]:
        """The hand-made grids scored before learning: `candidates`, plus `init` when it names another grid."""
        names = list(HAND_MADE_GRIDS if self.candidates is None else self.candidates)
        if self.init != "best" and self.init not in names:
            names.append(self.init)
        return names

    def split_sizes(self, num_items: int) -> tuple[int, int, int, str | None]:
        """(train, validation, held-out) sample counts for `num_items` teacher samples, and a note when the
        held-out split had to come out of the validation split."""
        train, valid = self.num_train, self.num_valid
        if self.num_holdout is not None or not self.guard:
            return train, valid, self.num_holdout or 0, None
        rest = num_items - train - valid
        if rest > 0:
            return train, valid, min(rest, MAX_AUTO_HOLDOUT), None
        if valid < 2:
            return train, valid, 0, ("no teacher samples beyond training and validation, and only one validation "
                                     "sample: the final choice is checked on validation (biased)")
        holdout = valid // 2
        return train, valid - holdout, holdout, (
            f"no teacher samples beyond the {train} training and {valid} validation samples: the last {holdout} "
            f"validation samples are held out for the final choice (give {train + 2 * valid} teacher samples to keep "
            f"{valid} for validation)")

    def validate(self, num_items: int | None = None) -> None:
        get_solver(self.solver).check_options(self.solver_kwargs, self.solver)
        if not get_solver(self.solver).takes_input("eval_sigmas"):
            raise ValueError(f"solver {self.solver!r} takes no decoupled evaluation grid, half of what LD3 learns")
        if self.loss not in DISTANCES:
            raise ValueError(f"unknown loss {self.loss!r}: expected one of {', '.join(DISTANCES)}")
        names = hand_made_grid_names()
        if self.init != "best" and self.init not in names:
            raise ValueError(f"init must be 'best' or a grid name ({', '.join(names)}), got {self.init!r}")
        if self.candidates is not None:
            unknown = [name for name in self.candidates if name not in names]
            if unknown or not self.candidates:
                raise ValueError(f"candidates must be grid names ({', '.join(names)}), got {list(self.candidates)}")
        for name in ("nfe", "num_train", "num_valid", "batch_size", "patience", "lr2_patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        end = self.end or get_solver(self.solver).default_end
        levels = grid_levels(self.solver, self.nfe, end)  # before any network is loaded or log written
        if levels < 3:
            raise ValueError(f"--nfe {self.nfe}: {self.solver} with end={end!r} has {levels} positive noise levels; "
                             f"LD3 needs at least 3 (an interior level to learn)")
        # What the solver checks only when it runs (an option's value: iPNDM's order; noise drawn: Heun's churn), on
        # a stand-in grid of the same steps: refused here, before the network is loaded, not once training began.
        check_deterministic(make_grid("edm", steps_for_nfe(self.solver, self.nfe, end), end=end), self.solver,
                            self.solver_kwargs)
        if self.rounds_v1 < 0 or self.rounds_v2 < 0 or self.rounds_v1 + self.rounds_v2 < 1:
            raise ValueError(f"need --rounds-v1 + --rounds-v2 >= 1 training rounds (each >= 0), got "
                             f"{self.rounds_v1} + {self.rounds_v2}")
        if self.prior_bound is not None and self.prior_bound < 0:
            raise ValueError(f"prior_bound must be >= 0, got {self.prior_bound}")
        if self.num_holdout is not None and self.num_holdout < 0:
            raise ValueError(f"num_holdout must be >= 0, got {self.num_holdout}")
        if not self.min_gain_se >= 0:
            raise ValueError(f"min_gain_se must be >= 0, got {self.min_gain_se}")
        if num_items is not None:
            needed = self.num_train + self.num_valid + (self.num_holdout or 0)
            if num_items < needed:
                holdout = bool(self.num_holdout)
                raise ValueError(f"the teacher data holds {num_items} samples, fewer than --num-train + --num-valid"
                                 f"{' + --holdout' if holdout else ''} = {self.num_train} + {self.num_valid}"
                                 f"{' + ' + str(self.num_holdout) if holdout else ''}")


@dataclasses.dataclass
class LD3Result:
    """The grid returned (the learned one, or the best hand-made grid when learning did not beat it) and how
    training went. Losses are mean distances to the teacher on the validation split from the original noises,
    except best_valid_loss (LD3's own criterion, from the noises as the soft objective moved them)."""

    sigmas: torch.Tensor
    eval_sigmas: torch.Tensor | None
    solver: str
    solver_kwargs: dict
    end: str
    nfe: int
    start: str  # the grid LD3 started from
    chosen: str  # 'learned', or the name of the hand-made grid returned instead
    reason: str  # why (selection.choose_result)
    init_valid_loss: float  # the start's validation loss
    best_valid_loss: float  # LD3's best validation loss during training
    valid_loss: float  # the returned grid's validation loss
    history: list
    train_time_s: float
    provenance: dict
    # The learned candidate (the best round's grid) even where the hand-made grid was returned; None when LD3 never
    # improved on its start.
    learned_sigmas: torch.Tensor | None = None
    learned_eval_sigmas: torch.Tensor | None = None

    @property
    def grid(self) -> SigmaGrid:
        return SigmaGrid(sigmas=self.sigmas, end=self.end, eval_sigmas=self.eval_sigmas, schedule="ld3",
                         solver=self.solver, solver_kwargs=dict(self.solver_kwargs), provenance=self.provenance)

    def save(self, path: str) -> None:
        """Write the schedule file that generate.py --schedule reads (atomic JSON; floats round-trip exactly)."""
        save_schedule_file(path, self.sigmas, solver=self.solver, nfe=self.nfe, eval_sigmas=self.eval_sigmas,
                           end=self.end, solver_kwargs=self.solver_kwargs, provenance=self.provenance)


# ---------------------------------------------------------------------------------------------------------------
# The optimisation.


class _LD3Run:
    """One LD3 optimisation: the learnable grid, its two optimisers, the data splits, and the best grid so far. Its
    methods are the steps of the reference trainer."""

    def __init__(self, denoiser, teacher: TeacherData, config: LD3Config, device, distance_fn,
                 train: TeacherSplit, valid: TeacherSplit):
        self.denoiser, self.config, self.device = denoiser, config, device
        self.end = config.end or get_solver(config.solver).default_end
        nfe = config.nfe
        self.sigma_max = teacher.sigma_max
        self.sigma_min = teacher.sigma_min if config.sigma_min is None else float(config.sigma_min)
        self.num_levels = grid_levels(config.solver, config.nfe, self.end)
        if self.num_levels < 3:
            raise ValueError(f"{config.solver} at {nfe} NFE with end={self.end!r} has {self.num_levels} "
                             f"positive noise levels; LD3 needs at least 3 (an interior level to learn)")
        self.grid = GridParameterization(self.num_levels, self.sigma_min, self.sigma_max, end=self.end,
                                         eval_window=config.eval_window).to(device)
        self.distance_fn = distance_fn if distance_fn is not None else make_distance(
            config.loss, lpips_vgg=config.lpips_vgg, lpips_lin=config.lpips_lin, lpips_resize=config.lpips_resize,
            device=device)
        numel = teacher.latents[0].numel()
        self.prior_bound = 0.001 * numel / nfe**2 if config.prior_bound is None else float(config.prior_bound)
        self.shift_lr = 12.0 / nfe if config.shift_lr is None else float(config.shift_lr)
        self.train, self.valid = train, valid
        self.opt_logits = torch.optim.RMSprop([self.grid.logits], lr=config.lr_logits, momentum=config.momentum_logits)
        self.opt_offsets = torch.optim.SGD([self.grid.offsets], lr=config.lr_offsets / nfe)
        self.shuffle = torch.Generator().manual_seed(config.seed)
        self.valid_batch = config.valid_batch_size or len(self.valid)
        self.best_loss, self.best_params, self.best_version = math.inf, None, 0
        self.count_worse, self.one_batch, self.lr2_floor_hits, self.stopped = 0, True, 0, False

    def start_from(self, levels: torch.Tensor) -> None:
        self.grid.set_grid(levels)
        self.best_params = copy.deepcopy(self.grid.state_dict())

    def score(self, sigmas, eval_sigmas, split: TeacherSplit) -> GridScore:
        """A grid's per-sample losses on a split from its original noises."""
        return score_grid(self.denoiser, split, sigmas.to(self.device), eval_sigmas, solver=self.config.solver,
                          solver_kwargs=self.config.solver_kwargs, end=self.end, distance_fn=self.distance_fn,
                          batch_size=self.config.valid_batch_size or 256)

    def grid_of(self, params) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas, eval_sigmas) of a saved state of the parameterisation, on the device, without gradients."""
        self.grid.load_state_dict(params)
        with torch.no_grad():
            return tuple(t.detach() for t in self.grid())

    def student_losses(self, latents, targets, labels) -> torch.Tensor:
        """Per-sample distance between the student's samples from `latents` and the teacher's."""
        sigmas, eval_sigmas = self.grid()
        output = student_sample(self.denoiser, latents, sigmas, eval_sigmas, solver=self.config.solver,
                                class_labels=labels, end=self.end, checkpoint=self.config.checkpoint,
                                **self.config.solver_kwargs)
        return self.distance_fn(output, targets)

    @torch.no_grad()
    def validate(self, split=None, use_original: bool = False, limit: int | None = None) -> float:
        """Mean student loss over (the first `limit` items of) a split, from its current or its original noises."""
        split = self.valid if split is None else split
        total, count = 0.0, 0
        items = len(split) if limit is None else min(limit, len(split))
        for start in range(0, items, self.valid_batch):
            index = slice(start, min(start + self.valid_batch, items))
            latents, original, targets, labels = split.batch(index)
            total += float(self.student_losses(original if use_original else latents, targets, labels).sum())
            count += index.stop - index.start
        return total / count

    def select_model(self, phase_v1: bool) -> None:
        """LD3's _examine_checkpoint: validate; keep the best grid; on lost patience reload it and decay the
        learning rates (the first time, switch from one validation batch to the full split instead)."""
        config = self.config
        loss = self.validate(limit=self.valid_batch if self.one_batch else None)
        if loss < self.best_loss:
            self.best_loss, self.best_params, self.count_worse = loss, copy.deepcopy(self.grid.state_dict()), 0
            self.best_version += 1
        else:
            self.count_worse += 1
        if self.count_worse < config.patience:
            return
        self.grid.load_state_dict(self.best_params)
        self.count_worse = 0
        if self.one_batch:
            self.one_batch = False
            self.best_loss = self.validate()
            return
        for group in self.opt_logits.param_groups:
            group["lr"] = max(config.lr_decay * group["lr"], config.min_lr_logits)
        if not phase_v1:
            for group in self.opt_offsets.param_groups:
                group["lr"] = max(config.lr_decay * group["lr"], config.min_lr_offsets)
            if self.opt_offsets.param_groups[0]["lr"] <= config.min_lr_offsets:
                self.lr2_floor_hits += 1
                self.stopped = self.lr2_floor_hits >= config.lr2_patience

    def step(self, split, index, train_params: bool) -> tuple[float, int]:
        """One LD3 step on a batch: a gradient step on the noises (and on the grid when train_params), projection
        onto the ball of radius prior_bound, and each sample keeps its new noise only where its loss went down.
        Returns the batch's mean loss and how many noises moved."""
        latents, original, targets, labels = split.batch(index)
        noise = latents.clone().requires_grad_(self.prior_bound > 0)
        losses = self.student_losses(noise, targets, labels)
        loss = losses.mean()
        if loss.requires_grad:
            loss.backward()
        if train_params:
            self._step_grid()
        moved = 0
        if self.prior_bound > 0 and noise.grad is not None:
            with torch.no_grad():
                candidate = self._project(noise - self.shift_lr * noise.grad, original)
                improved = self.student_losses(candidate, targets, labels) < losses.detach()
                split.latents[index] = torch.where(improved.view(-1, *[1] * (candidate.ndim - 1)), candidate,
                                                   latents)
                moved = int(improved.sum())
        return float(loss.detach()), moved

    def _step_grid(self) -> None:
        for param in (self.grid.logits, self.grid.offsets):
            if param.grad is not None:
                torch.nn.utils.clip_grad_norm_([param], self.config.grad_clip)
        self.opt_logits.step()
        self.opt_offsets.step()
        self.opt_logits.zero_grad(set_to_none=True)
        self.opt_offsets.zero_grad(set_to_none=True)

    def _project(self, candidate, original):
        """The candidate noises pulled back onto the ball of radius prior_bound around the original noises."""
        delta = (candidate - original).flatten(1)
        norm = delta.norm(dim=1)
        scale = torch.where(norm > self.prior_bound, self.prior_bound / norm.clamp_min(1e-30), torch.ones_like(norm))
        return original + (delta * scale[:, None]).view_as(original)

    def train_round(self, round_index: int, bar=None) -> dict:
        """One pass over the training split (v1: the grid only; v2: grid and evaluation offsets), then a noise step on
        the validation split (soft objective); returns the round's history entry."""
        config = self.config
        round_start = time.time()
        phase_v1 = round_index < config.rounds_v1
        self.grid.logits.requires_grad_(True)
        self.grid.offsets.requires_grad_(config.decoupled and not phase_v1)
        if round_index > 0:
            self.grid.load_state_dict(self.best_params)
            self.count_worse = 0
        self.select_model(phase_v1)
        train_losses, moved_train, moved_valid = [], 0, 0
        order = torch.randperm(len(self.train), generator=self.shuffle).to(self.device)
        for start in range(0, len(self.train), config.batch_size):
            loss, moved = self.step(self.train, order[start:start + config.batch_size], train_params=True)
            train_losses.append(loss)
            moved_train += moved
            self.select_model(phase_v1)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(train=f"{loss:.4g}", best=f"{self.best_loss:.4g}")
            if self.stopped:
                break
        if self.prior_bound > 0 and not self.stopped:  # the validation noises move too (parameters frozen)
            self.grid.requires_grad_(False)
            for start in range(0, len(self.valid), config.batch_size):
                index = torch.arange(start, min(start + config.batch_size, len(self.valid)), device=self.device)
                moved_valid += self.step(self.valid, index, train_params=False)[1]
            if moved_valid == 0:
                self.shift_lr *= config.shift_lr_decay
        return dict(round=round_index + 1, phase="v1" if phase_v1 else "v2",
                    train_loss=sum(train_losses) / max(len(train_losses), 1), valid_loss=self.validate(),
                    best_valid_loss=self.best_loss, lr_logits=self.opt_logits.param_groups[0]["lr"],
                    lr_offsets=self.opt_offsets.param_groups[0]["lr"], shift_lr=self.shift_lr,
                    noises_moved_train=moved_train, noises_moved_valid=moved_valid,
                    max_noise_shift=max(split.max_shift() for split in (self.train, self.valid)),
                    time_s=round(time.time() - round_start, 3))


def _levels_text(sigmas) -> str:
    return ", ".join(f"{s:.4g}" for s in torch.as_tensor(sigmas).tolist())


def train_ld3(denoiser, teacher: TeacherData, config: LD3Config, *, device=None, progress: bool = False,
              log=None, distance_fn=None) -> LD3Result:
    """Learn `config.solver`'s grid at `config.nfe` from `teacher` with LD3's algorithm, inside the safeguards.

    Splits, in the teacher data's order: num_train samples train, num_valid validate (LD3's model selection and the
    choice among the rounds' best grids), then the held-out ones decide the final choice (LD3Config.split_sizes).
    Steps: (1) score the hand-made grids on the validation and held-out samples; the best is the grid to beat and
    LD3's start (unless `init` names another); (2) LD3's rounds, noting each round's best grid and its validation
    loss; (3) with the guard, return the learned grid only when selection.choose_result says it beats the grid to
    beat on both splits, else that grid, so the result is at least as good as every hand-made grid on all the
    samples it did not train on; without the guard, LD3's best grid.

    denoiser: D(x, sigma, class_labels) as the solvers call it (a network or any function), differentiable in x
    and sigma. log: a callable taking one line of text at a time (e.g. print): the hand-made scores, the start, each
    round, the choice and why; with progress, the lines written while the progress bar shows are written as
    tqdm.write does (the bar is cleared first and drawn again after), so they never run into it.
    distance_fn: a per-sample distance (student, teacher) -> [B] instead of config.loss's.
    """
    config.validate(len(teacher))
    say = log if log is not None else (lambda line: None)
    start_time = time.time()
    if device is None:
        param = next(denoiser.parameters(), None) if isinstance(denoiser, torch.nn.Module) else None
        device = param.device if param is not None else teacher.latents.device
    device = torch.device(device)
    num_train, num_valid, num_holdout, split_note = config.split_sizes(len(teacher))
    splits = dict(train=TeacherSplit(teacher, 0, num_train, device),
                  valid=TeacherSplit(teacher, num_train, num_valid, device),
                  holdout=TeacherSplit(teacher, num_train + num_valid, num_holdout, device))
    if split_note:
        say(f"LD3: {split_note}")
    run = _LD3Run(denoiser, teacher, config, device, distance_fn, splits["train"], splits["valid"])
    loss_name = config.loss if distance_fn is None else getattr(distance_fn, "__name__", type(distance_fn).__name__)

    # (1) The hand-made grids on the validation and held-out splits; the best of them is the grid to beat. Choosing it
    # on the held-out samples too makes it look better there than it is: the final test is biased towards it (safe).
    names = config.candidate_names()
    grids = hand_made_grids(names, run.num_levels, run.sigma_min, run.sigma_max, run.end)
    valid_scores = {name: run.score(grids[name], None, splits["valid"]) for name in names}
    holdout_scores = {name: run.score(grids[name], None, splits["holdout"]) for name in names} if num_holdout else {}
    hand_made_losses = {name: float(torch.cat([valid_scores[name].losses] + ([holdout_scores[name].losses]
                                                                             if num_holdout else [])).mean())
                        for name in names}
    baseline = min(names, key=lambda name: hand_made_losses[name])
    start = baseline if config.init == "best" else config.init
    scored_on = f"{num_valid} validation" + (f" + {num_holdout} held-out" if num_holdout else "")
    say(f"LD3: hand-made grids on the {scored_on} samples ({loss_name}): "
        + ", ".join(f"{name} {hand_made_losses[name]:.6g}" for name in names) + f"; best {baseline}")
    say(f"LD3: starting from {start} (validation loss {valid_scores[start].loss:.6g}): {_levels_text(grids[start])}")
    run.start_from(grids[start])

    # (2) LD3's rounds. After each, the best grid so far (LD3's selection) is scored on the validation split from the
    # original noises; these round bests are the learned candidates.
    num_rounds = config.rounds_v1 + config.rounds_v2
    history, round_bests, scored_version = [], [], None
    bar, log_line = None, say
    if progress:
        import tqdm
        bar = tqdm.tqdm(total=num_rounds * math.ceil(len(run.train) / config.batch_size), unit="step",
                        desc=f"LD3 {config.solver} NFE {config.nfe}")

        def say(line):  # as tqdm.write: clear the bar, print the line on its own, draw the bar again below it
            with tqdm.tqdm.external_write_mode():
                log_line(line)
    try:
        for round_index in range(num_rounds):
            entry = run.train_round(round_index, bar)
            if run.best_version != scored_version:
                scored_version = run.best_version
                params = copy.deepcopy(run.best_params)
                sigmas, eval_sigmas = run.grid_of(params)
                round_bests.append(dict(round=entry["round"], version=run.best_version, params=params,
                                        score=run.score(sigmas, eval_sigmas, splits["valid"])))
            entry["best_grid_valid_loss"] = round_bests[-1]["score"].loss
            history.append(entry)
            say(f"LD3 round {entry['round']}/{num_rounds} ({entry['phase']}): train {entry['train_loss']:.6g}, "
                f"valid {entry['valid_loss']:.6g}, best {entry['best_valid_loss']:.6g} (its validation loss "
                f"{entry['best_grid_valid_loss']:.6g}), lr {entry['lr_logits']:.3g}/{entry['lr_offsets']:.3g}, "
                f"noises moved {entry['noises_moved_train']}/{entry['noises_moved_valid']}, {entry['time_s']:.1f} s")
            if run.stopped:
                say(f"LD3: the offsets' learning rate reached its floor {config.lr2_patience} times; stopping")
                break
    finally:
        if bar is not None:
            bar.close()
            say = log_line

    # (3) The result. The learned candidate: with the guard, the round best with the lowest validation loss from the
    # original noises (version 1 is the start itself, not learned); without it, LD3's own best grid.
    if config.guard:
        learned = [best for best in round_bests if best["version"] > 1]
        learned = min(learned, key=lambda best: best["score"].loss) if learned else None
    else:
        learned = round_bests[-1]
    learned_valid = None if learned is None else learned["score"]
    learned_holdout = None
    if config.guard and num_holdout and learned is not None:
        learned_holdout = run.score(*run.grid_of(learned["params"]), splits["holdout"])
    if config.guard:
        choice = choose_result(baseline, valid_scores[baseline], learned_valid, holdout_scores.get(baseline),
                               learned_holdout, min_gain_se=config.min_gain_se)
    else:
        choice = Choice("learned", "LD3 as published: its best grid on the validation loss, unchecked (guard off)")
        if learned_valid.loss > valid_scores[baseline].loss * (1 + TIE_TOLERANCE):
            choice.warning = True
            choice.reason += (f"; it is worse on validation than the hand-made {baseline} ({learned_valid.loss:.6g} "
                              f"vs {valid_scores[baseline].loss:.6g})")
    learned_sigmas = learned_eval_sigmas = None
    if learned is not None:
        learned_sigmas, learned_eval_sigmas = (t.cpu() for t in run.grid_of(learned["params"]))
        learned_eval_sigmas = None if torch.equal(learned_sigmas, learned_eval_sigmas) else learned_eval_sigmas
    if choice.chosen == "learned":
        sigmas, eval_sigmas, valid_loss = learned_sigmas, learned_eval_sigmas, learned_valid.loss
        say(f"LD3: {'Warning: ' if choice.warning else ''}returning the grid learned by round {learned['round']}: "
            f"{choice.reason}")
    else:
        sigmas, eval_sigmas, valid_loss = grids[baseline].cpu(), None, valid_scores[baseline].loss
        say(f"LD3: {'Warning: ' if choice.warning else ''}returning the hand-made grid {baseline}: {choice.reason}")

    train_time = time.time() - start_time
    result_record = dict(choice.as_dict(), valid_loss=valid_loss,
                         round=learned["round"] if choice.chosen == "learned" else None,
                         learned_valid_loss=None if learned_valid is None else learned_valid.loss,
                         learned_round=None if learned is None else learned["round"],
                         holdout_loss=None if learned_holdout is None else learned_holdout.loss,
                         baseline_holdout_loss=holdout_scores[baseline].loss if num_holdout else None)
    provenance = _json_safe(dict(
        method="LD3 (Tong et al., ICLR 2025; arXiv 2405.15506)", teacher=_json_safe(teacher.info),
        num_train=num_train, num_valid=num_valid, num_holdout=num_holdout,
        splits={name: split.describe() for name, split in splits.items()}, loss=loss_name,
        prior_bound=run.prior_bound, init=config.init, guard=config.guard,
        start=dict(name=start, valid_loss=valid_scores[start].loss, sigmas=grids[start]),
        hand_made_valid_losses={name: valid_scores[name].loss for name in names},
        hand_made_holdout_losses={name: score.loss for name, score in holdout_scores.items()} or None,
        best_hand_made=dict(name=baseline, valid_loss=valid_scores[baseline].loss,
                            holdout_loss=holdout_scores[baseline].loss if num_holdout else None),
        result=result_record, init_valid_loss=valid_scores[start].loss, best_valid_loss=run.best_loss,
        rounds=len(history), train_time_s=round(train_time, 3), history=history,
        config={k: v for k, v in dataclasses.asdict(config).items() if k not in ("solver", "solver_kwargs", "end")},
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), torch=torch.__version__))
    return LD3Result(sigmas=sigmas, eval_sigmas=eval_sigmas, solver=config.solver,
                     solver_kwargs=dict(config.solver_kwargs), end=run.end, nfe=config.nfe, start=start,
                     chosen=choice.chosen, reason=choice.reason, init_valid_loss=valid_scores[start].loss,
                     best_valid_loss=run.best_loss, valid_loss=valid_loss, history=history, train_time_s=train_time,
                     provenance=provenance, learned_sigmas=learned_sigmas, learned_eval_sigmas=learned_eval_sigmas)


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return repr(obj)
    return obj
