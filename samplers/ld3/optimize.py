"""LD3's optimisation: learn a solver's grid (and decoupled evaluation grid) from teacher samples.

The student is the registered solver itself (samplers.sample over a grid whose tensors carry gradients), so LD3
learns the grid of exactly the code that generate.py runs, for every solver and option. The steps follow the
reference code (vinhsuhi/LD3 trainer.py): RMSprop on the grid logits, SGD on the evaluation offsets and on the
noises within a ball around the teacher's (the soft objective), model selection on a validation split after every
step, patience with learning-rate decay. See docs/solvers.md, "LD3".
"""

import copy
import dataclasses
import math
import time

import torch
import torch.utils.checkpoint

from metrics.lpips import load_lpips
from samplers import SCHEDULES, SigmaGrid, get_solver, sample, save_schedule_file
from samplers.ld3.grid import GridParameterization, steps_for_nfe
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
# The student: the registered solver over a grid that carries gradients.


def _checkpointed(denoiser):
    """The denoiser under activation checkpointing while autograd records: memory constant in NFE (LD3's --low_gpu)
    for about 1.3x the time."""
    def call(x, sigma, class_labels=None):
        if torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(denoiser, x, sigma, class_labels, use_reentrant=False)
        return denoiser(x, sigma, class_labels)
    return call


def _refuse_noise(solver: str, options: dict):
    """A randn_like for the student: LD3 fits one deterministic trajectory per noise, so a solver that draws fresh
    noise (e.g. Heun with S_churn > 0) has no grid to learn."""
    def randn_like(x):
        described = ", ".join(f"{k}={v}" for k, v in sorted(options.items()))
        raise ValueError(f"LD3 learns the grid of a deterministic sampler, but {solver}({described}) draws noise")
    return randn_like


def student_sample(denoiser, latents: torch.Tensor, sigmas: torch.Tensor, eval_sigmas: torch.Tensor | None = None,
                   *, solver: str, class_labels=None, end: str | None = None, checkpoint: bool = False,
                   **solver_kwargs) -> torch.Tensor:
    """samplers.sample over a grid given as tensors: x_0 = latents * sigmas[0], then the registered `solver`,
    differentiable with respect to latents, sigmas and eval_sigmas. Returns float64. end: the grid's end convention
    (None: read from sigmas[-1])."""
    if end is None:
        end = "zero" if float(sigmas[-1].detach()) == 0 else "sigma_min"
    grid = SigmaGrid(sigmas=sigmas, end=end, eval_sigmas=eval_sigmas)
    return sample(_checkpointed(denoiser) if checkpoint else denoiser, latents, grid, solver=solver,
                  class_labels=class_labels, randn_like=_refuse_noise(solver, solver_kwargs), **solver_kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Configuration and result.


@dataclasses.dataclass
class LD3Config:
    """LD3's hyper-parameters (defaults: vinhsuhi/LD3 configs/cifar10.yml and utils.adjust_hyper)."""

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
    init: str = "logsnr"  # starting grid: a SCHEDULES name (LD3: logsnr)
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint: bool = False  # activation checkpointing in the unroll

    def validate(self, num_items: int | None = None) -> None:
        get_solver(self.solver).check_options(self.solver_kwargs, self.solver)
        if self.loss not in DISTANCES:
            raise ValueError(f"unknown loss {self.loss!r}: expected one of {', '.join(DISTANCES)}")
        if self.init not in SCHEDULES:
            raise ValueError(f"init must be a schedule name ({', '.join(SCHEDULES)}), got {self.init!r}")
        for name in ("nfe", "num_train", "num_valid", "batch_size", "patience", "lr2_patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rounds_v1 < 0 or self.rounds_v2 < 0 or self.rounds_v1 + self.rounds_v2 < 1:
            raise ValueError("need rounds_v1 + rounds_v2 >= 1 training rounds")
        if self.prior_bound is not None and self.prior_bound < 0:
            raise ValueError(f"prior_bound must be >= 0, got {self.prior_bound}")
        if num_items is not None and num_items < self.num_train + self.num_valid:
            raise ValueError(f"the teacher data holds {num_items} samples, fewer than num_train + num_valid = "
                             f"{self.num_train} + {self.num_valid}")


@dataclasses.dataclass
class LD3Result:
    """The best grid found (by validation loss) and how training went."""

    sigmas: torch.Tensor
    eval_sigmas: torch.Tensor | None
    solver: str
    solver_kwargs: dict
    end: str
    nfe: int
    init_valid_loss: float
    best_valid_loss: float
    history: list
    train_time_s: float
    provenance: dict

    @property
    def grid(self) -> SigmaGrid:
        return SigmaGrid(sigmas=self.sigmas, end=self.end, eval_sigmas=self.eval_sigmas, schedule="ld3",
                         solver=self.solver, solver_kwargs=dict(self.solver_kwargs), provenance=self.provenance)

    def save(self, path: str) -> None:
        """Write the schedule file that generate.py --schedule reads (atomic JSON; floats round-trip exactly)."""
        save_schedule_file(path, self.sigmas, solver=self.solver, nfe=self.nfe, eval_sigmas=self.eval_sigmas,
                           end=self.end, solver_kwargs=self.solver_kwargs, provenance=self.provenance)


class _Split:
    """One data split on the device: the original noises, the current (shifted) noises, targets, labels."""

    def __init__(self, data: TeacherData, index: slice, device):
        self.original = data.latents[index].to(device, torch.float64)
        self.latents = self.original.clone()
        self.targets = data.images[index].to(device, torch.float32)
        self.labels = None if data.class_labels is None else data.class_labels[index].to(device)

    def __len__(self):
        return len(self.original)

    def max_shift(self) -> float:
        """The largest distance of a current noise from its original (unit-noise scale)."""
        return float((self.latents - self.original).flatten(1).norm(dim=1).max())

    def batch(self, index):
        return self.latents[index], self.original[index], self.targets[index], \
            None if self.labels is None else self.labels[index]


class _LD3Run:
    """One LD3 optimisation: the learnable grid, its two optimisers, the data splits, and the best grid so far. Its
    methods are the steps of the reference trainer."""

    def __init__(self, denoiser, teacher: TeacherData, config: LD3Config, device, distance_fn):
        self.denoiser, self.config, self.device = denoiser, config, device
        self.end = config.end or get_solver(config.solver).default_end
        num_steps = steps_for_nfe(config.solver, config.nfe, self.end)
        nfe = config.nfe
        sigma_max = teacher.sigma_max
        sigma_min = teacher.sigma_min if config.sigma_min is None else float(config.sigma_min)
        num_levels = num_steps + 1 if self.end == "sigma_min" else num_steps
        if num_levels < 3:
            raise ValueError(f"{config.solver} at {nfe} NFE with end={self.end!r} has {num_levels} positive noise "
                             f"levels; LD3 needs at least 3 (an interior level to learn)")
        init = SCHEDULES[config.init](num_levels - 1, sigma_min, sigma_max)
        self.grid = GridParameterization(num_levels, sigma_min, sigma_max, end=self.end,
                                         eval_window=config.eval_window, init=init).to(device)
        self.distance_fn = distance_fn if distance_fn is not None else make_distance(
            config.loss, lpips_vgg=config.lpips_vgg, lpips_lin=config.lpips_lin, lpips_resize=config.lpips_resize,
            device=device)
        numel = teacher.latents[0].numel()
        self.prior_bound = 0.001 * numel / nfe**2 if config.prior_bound is None else float(config.prior_bound)
        self.shift_lr = 12.0 / nfe if config.shift_lr is None else float(config.shift_lr)
        self.train = _Split(teacher, slice(0, config.num_train), device)
        self.valid = _Split(teacher, slice(config.num_train, config.num_train + config.num_valid), device)
        self.opt_logits = torch.optim.RMSprop([self.grid.logits], lr=config.lr_logits, momentum=config.momentum_logits)
        self.opt_offsets = torch.optim.SGD([self.grid.offsets], lr=config.lr_offsets / nfe)
        self.shuffle = torch.Generator().manual_seed(config.seed)
        self.valid_batch = config.valid_batch_size or len(self.valid)
        self.best_loss, self.best_params = math.inf, copy.deepcopy(self.grid.state_dict())
        self.count_worse, self.one_batch, self.lr2_floor_hits, self.stopped = 0, True, 0, False

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

    def best_grid(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The best grid on the host, and its evaluation grid (None where it equals the grid)."""
        self.grid.load_state_dict(self.best_params)
        with torch.no_grad():
            sigmas, eval_sigmas = (t.detach().cpu() for t in self.grid())
        return sigmas, None if torch.equal(sigmas, eval_sigmas) else eval_sigmas


def train_ld3(denoiser, teacher: TeacherData, config: LD3Config, *, device=None, progress: bool = False,
              log=None, distance_fn=None) -> LD3Result:
    """Learn `config.solver`'s grid at `config.nfe` from `teacher` (the first num_train samples train, the next
    num_valid validate) with LD3's algorithm; return the grid with the best validation loss.

    denoiser: D(x, sigma, class_labels) as the solvers call it (a network or any function), differentiable in x
    and sigma. log: a callable taking one line of text per round (e.g. print). distance_fn: a per-sample distance
    (student, teacher) -> [B] instead of config.loss's.
    """
    config.validate(len(teacher))
    start_time = time.time()
    if device is None:
        param = next(denoiser.parameters(), None) if isinstance(denoiser, torch.nn.Module) else None
        device = param.device if param is not None else teacher.latents.device
    run = _LD3Run(denoiser, teacher, config, torch.device(device), distance_fn)
    loss_name = config.loss if distance_fn is None else getattr(distance_fn, "__name__", type(distance_fn).__name__)
    num_rounds = config.rounds_v1 + config.rounds_v2
    init_valid_loss = run.validate(use_original=True)
    history = []
    bar = None
    if progress:
        import tqdm
        bar = tqdm.tqdm(total=num_rounds * math.ceil(len(run.train) / config.batch_size), unit="step",
                        desc=f"LD3 {config.solver} NFE {config.nfe}")
    try:
        for round_index in range(num_rounds):
            entry = run.train_round(round_index, bar)
            history.append(entry)
            if log is not None:
                log(f"LD3 round {entry['round']}/{num_rounds} ({entry['phase']}): train {entry['train_loss']:.6g}, "
                    f"valid {entry['valid_loss']:.6g}, best {entry['best_valid_loss']:.6g}, lr {entry['lr_logits']:.3g}"
                    f"/{entry['lr_offsets']:.3g}, noises moved {entry['noises_moved_train']}/"
                    f"{entry['noises_moved_valid']}, {entry['time_s']:.1f} s")
            if run.stopped:
                if log is not None:
                    log(f"LD3: the offsets' learning rate reached its floor {config.lr2_patience} times; stopping")
                break
    finally:
        if bar is not None:
            bar.close()

    sigmas, eval_sigmas = run.best_grid()
    train_time = time.time() - start_time
    provenance = _json_safe(dict(
        method="LD3 (Tong et al., ICLR 2025; arXiv 2405.15506)", teacher=_json_safe(teacher.info),
        num_train=config.num_train, num_valid=config.num_valid, loss=loss_name,
        prior_bound=run.prior_bound, init=config.init, init_valid_loss=init_valid_loss, best_valid_loss=run.best_loss,
        rounds=len(history), train_time_s=round(train_time, 3), history=history,
        config={k: v for k, v in dataclasses.asdict(config).items() if k not in ("solver", "solver_kwargs", "end")},
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), torch=torch.__version__))
    return LD3Result(sigmas=sigmas, eval_sigmas=eval_sigmas, solver=config.solver,
                     solver_kwargs=dict(config.solver_kwargs), end=run.end, nfe=config.nfe,
                     init_valid_loss=init_valid_loss, best_valid_loss=run.best_loss, history=history,
                     train_time_s=train_time, provenance=provenance)


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

