"""Loss registry and the contract between a loss and the training loop.

A loss is a class registered by name in `LOSSES`. The loop builds it from `loss_kwargs`
(`class_name` + constructor kwargs, as in EDM's training_options.json) and, per accumulation round, calls

    loss(net, batch, augment_pipe=None) -> per-element (image-shaped) or per-sample loss tensor

The loop reduces it as EDM does: loss.sum() * loss_scaling / batch_gpu_total, then DDP averages over ranks.

Optional hooks a loss may define (the loop uses defaults otherwise):
- `data_requirements() -> dict`: what it needs beyond images and labels; the loop provides it through `Batch`
  and the loss never touches the data loader. The denoising losses need nothing ({}); the loop refuses
  requirements it cannot provide, naming them. It provides:
  - {'references': R} (STF): every iteration, R more raw images and labels per rank from an independent shuffled
    stream over the training set (its own seed and position, kept in training states), in `Batch.references` /
    `Batch.reference_labels`, shared by all accumulation rounds and phases of the iteration.
  - {'pool': N} (AOT): the rank's training images come in pools of N consecutive images of its data stream. The
    loop calls `prepare_pool(Batch(images, labels), augment_pipe) -> Batch` once per pool, under a torch RNG
    seeded by (seed, rank, pool index) so that a resume inside a pool rebuilds it exactly, and hands out its rows
    (images, labels, noise, augment_labels) in order, batch_gpu per round. N must be a multiple of the per-rank
    batch per iteration.
  Reference sets and pools are per rank (as in the STF and AOT reference code), so with them the trajectory depends
  on the number of ranks even with rng='image'.
- `extra_networks(net) -> dict[str, Module]`: networks the loss trains besides the denoiser (GDD: a
  discriminator). The loop moves them to the device, wraps them in DDP and saves them in training states.
- `phases(networks, optimizer_kwargs) -> list[Phase]`: the optimisation steps of one iteration. The default is one
  phase training `networks['net']` with the configured optimizer (EDM). GDD: generator, discriminator, lazy R1.

This module may import anything; `losses/denoising.py` may not (see there).
"""

import dataclasses
import inspect
from collections.abc import Callable

import numpy as np
import torch

import dnnlib
from dnnlib.util import parse_bool

from .denoising import DenoisingLoss, EDMLoss, VELoss, VPLoss

__all__ = ['Batch', 'PerImageRandom', 'Phase', 'default_phases', 'LOSSES', 'DEFAULT_LOSS_FOR_PRECOND',
           'DenoisingLoss', 'EDMLoss', 'VPLoss', 'VELoss', 'loss_options', 'parse_loss_options', 'loss_kwargs',
           'describe_losses']


@dataclasses.dataclass
class Batch:
    """One accumulation round of data, as a loss sees it.

    images: float32 [N, C, H, W] in [-1, 1] (uint8 / 127.5 - 1), not augmented unless `augment_labels` is set.
    labels: float32 [N, label_dim] (one-hot for class labels; label_dim may be 0).
    noise: unit-Gaussian epsilon per image (AOT's paired noise); None = the loss draws it.
    references: reference images for STF-style targets; None when not requested.
    augment_labels: set when the loop already augmented `images` (AOT pairs augmented images); None otherwise.
    random: per-image random draws (`PerImageRandom`); None = the loss uses the global torch RNG (EDM).
    reference_labels: labels of `references` (STF's class masking); None when not requested.
    """

    images: torch.Tensor
    labels: torch.Tensor
    noise: torch.Tensor | None = None
    references: torch.Tensor | None = None
    augment_labels: torch.Tensor | None = None
    random: 'PerImageRandom | None' = None
    reference_labels: torch.Tensor | None = None


class PerImageRandom:
    """Random draws that depend only on (seed, key, stream, call number, image position in the global batch).

    Each `randn`/`rand` call draws the tensor for the whole global batch from a generator seeded by
    (seed, key, stream, call number) and returns this micro-batch's rows. Rank r, accumulation round k with
    world size W and batch_gpu b holds the global rows (k*b + i)*W + r, i < b: exactly the rows whose images
    InfiniteSampler hands to it (global draw g goes to rank g % W). So every image gets the same sigma and noise
    whatever the number of ranks, batch_gpu or accumulation rounds, and after a resume: a run's trajectory does
    not depend on how its batch is laid out over devices (up to floating-point summation order).

    Cost: each call draws global_batch rows instead of batch_gpu (e.g. 512 x 3072 normals per round for CIFAR-10
    at batch 512): negligible next to the network on GPU, and it holds no state between steps.
    """

    def __init__(self, seed: int, key: int, global_batch: int, rows: slice, device, stream: int = 0):
        self.seed = int(seed)
        self.key = int(key)
        self.stream = int(stream)
        self.global_batch = int(global_batch)
        self.rows = rows
        self.device = torch.device(device)
        self._calls = 0
        self._generator = None

    @classmethod
    def for_round(cls, seed, key, batch_size, world_size, rank, batch_gpu, round_idx, device, stream=0):
        """The rows of rank `rank`, accumulation round `round_idx`, in a global batch of `batch_size`."""
        start = round_idx * batch_gpu * world_size + rank
        rows = slice(start, (round_idx + 1) * batch_gpu * world_size, world_size)
        return cls(seed, key, batch_size, rows, device, stream)

    def _next_generator(self) -> torch.Generator:
        words = np.random.SeedSequence([self.seed, self.key, self.stream, self._calls]).generate_state(2, np.uint32)
        self._calls += 1
        if self._generator is None:
            self._generator = torch.Generator(self.device)
        self._generator.manual_seed((int(words[0]) | (int(words[1]) << 32)) & ((1 << 63) - 1))
        return self._generator

    def randn(self, *shape, dtype=torch.float32) -> torch.Tensor:
        """N(0, 1) draws of shape [rows, *shape]."""
        full = torch.randn([self.global_batch, *shape], generator=self._next_generator(), device=self.device,
                           dtype=dtype)
        return full[self.rows].contiguous()

    def rand(self, *shape, dtype=torch.float32) -> torch.Tensor:
        """U[0, 1) draws of shape [rows, *shape]."""
        full = torch.rand([self.global_batch, *shape], generator=self._next_generator(), device=self.device,
                          dtype=dtype)
        return full[self.rows].contiguous()


@dataclasses.dataclass
class Phase:
    """One optimisation step of a training iteration (StyleGAN2-ADA's phases).

    name: for messages and optimizer/scaler keys in training states ('main'; GDD: 'G', 'D', 'R1').
    network: key in the loop's networks dict ('net' is the denoiser) whose parameters this phase trains; the
        phase's loss_fn receives that network DDP-wrapped and the others unwrapped, without gradients.
    optimizer: over (a subset of) that network's parameters; param groups may hold 'base_lr', else their
        initial 'lr' is taken as the base for the loop's learning-rate ramp.
    loss_fn(networks, batch, augment_pipe) -> loss tensor reduced by the loop like EDM's (sum / batch_gpu_total).
    interval, offset: the phase runs at iterations i >= offset with (i - offset) % interval == 0 (lazy R1: 16, 16).
    stat_name: training_stats name of the reported loss (EDM: 'Loss/loss').
    """

    name: str
    network: str
    optimizer: torch.optim.Optimizer
    loss_fn: Callable
    interval: int = 1
    offset: int = 0
    stat_name: str = 'Loss/loss'

    def runs_at(self, iteration: int) -> bool:
        return iteration >= self.offset and (iteration - self.offset) % self.interval == 0


def default_phases(loss, networks: dict, optimizer_kwargs: dict) -> list[Phase]:
    """EDM's single phase: all parameters of networks['net'], one optimizer, the loss called every iteration."""
    optimizer = dnnlib.util.construct_class_by_name(params=networks['net'].parameters(), **optimizer_kwargs)

    def loss_fn(nets, batch, augment_pipe):
        return loss(nets['net'], batch, augment_pipe=augment_pipe)

    return [Phase(name='main', network='net', optimizer=optimizer, loss_fn=loss_fn)]


# ---------------------------------------------------------------------------------------------------------------------
# Registry: name -> class. --precond picks the default loss (EDM's train.py pairs them); --loss overrides.

LOSSES = {
    'edm': EDMLoss,
    'vp': VPLoss,
    've': VELoss,
}

DEFAULT_LOSS_FOR_PRECOND = {'vp': 'vp', 've': 've', 'edm': 'edm'}


def _loss_class(name: str):
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(LOSSES)}")
    return LOSSES[name]


def loss_options(name: str) -> dict:
    """The constructor options of loss `name` with their defaults, e.g. {'P_mean': -1.2, 'P_std': 1.2, ...}."""
    signature = inspect.signature(_loss_class(name).__init__)
    options = {}
    for param in list(signature.parameters.values())[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        options[param.name] = None if param.default is param.empty else param.default
    return options


def _convert(text: str, default, what: str):
    try:
        if isinstance(default, bool):
            return parse_bool(text)
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, (list, tuple)):
            return [float(v) if any(c in v for c in '.eE') else int(v) for v in text.split(',') if v.strip()]
        if isinstance(default, str):
            return text
        try:
            return float(text) if any(c in text for c in '.eE') else int(text)
        except ValueError:
            return text
    except ValueError:
        raise ValueError(f"{what}: cannot read {text!r} as {type(default).__name__} "
                         f"(default {default!r})") from None


def parse_loss_options(name: str, items) -> dict:
    """Parse ['KEY=VALUE', ...] into constructor kwargs of loss `name`, typed like the defaults."""
    options = loss_options(name)
    kwargs = {}
    for item in items or ():
        key, sep, value = str(item).partition('=')
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        if key not in options:
            valid = ', '.join(options) or 'none'
            raise ValueError(f"loss {name!r} has no option {key!r}; its options are: {valid}")
        kwargs[key] = _convert(value.strip(), options[key], f"option {key!r} of loss {name!r}")
    return kwargs


def loss_kwargs(name: str, options: dict | None = None) -> dnnlib.EasyDict:
    """EDM-style config entry: EasyDict(class_name='losses.denoising.EDMLoss', **options)."""
    cls = _loss_class(name)
    unknown = set(options or {}) - set(loss_options(name))
    if unknown:
        raise ValueError(f"loss {name!r} has no option(s) {', '.join(sorted(unknown))}; "
                         f"its options are: {', '.join(loss_options(name))}")
    return dnnlib.EasyDict(class_name=f'{cls.__module__}.{cls.__qualname__}', **(options or {}))


def describe_losses() -> str:
    """One line per registered loss with its options and defaults (for --help)."""
    return '; '.join(f"{name}: " + ', '.join(f"{k}={v}" for k, v in loss_options(name).items())
                     for name in LOSSES)
