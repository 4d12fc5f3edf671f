"""What a loss exchanges with the training loop: Batch, PerImageRandom, Phase (and EDM's single phase).

The contract (see losses/__init__.py for the registry and docs/design.md for the whole picture): per accumulation
round the loop calls `phase.loss_fn(networks, batch, augment_pipe)`, which returns a per-element (image-shaped) or
per-sample loss; the loop reduces it as EDM does (sum * loss_scaling / batch_gpu_total) and DDP averages over ranks.
"""

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

import dnnlib

__all__ = ['Batch', 'PerImageRandom', 'Phase', 'constant_lr', 'default_phases']


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
    grad_scale: under --precision fp16, the phase's GradScaler scale (a 0-d float32 tensor on the device) for a loss
        that differentiates inside itself (R1's gradient penalty): it scales the inner outputs and divides the
        gradient by it, AMP's gradient-penalty recipe, so that the inner fp16 backward does not underflow; None
        otherwise.
    """

    images: torch.Tensor
    labels: torch.Tensor
    noise: torch.Tensor | None = None
    references: torch.Tensor | None = None
    augment_labels: torch.Tensor | None = None
    random: 'PerImageRandom | None' = None
    reference_labels: torch.Tensor | None = None
    grad_scale: torch.Tensor | None = None


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
    lr_schedule(cur_nimg) -> multiplier of each param group's base_lr before the step; None = the loop's EDM ramp
        (min(cur_nimg / lr_rampup, 1)). A phase that wants a constant rate (GDD) gives `constant_lr`.
    grad_sync: how several processes agree on the gradients. 'ddp': the network is wrapped in DistributedDataParallel
        (gradients averaged while the backward runs; needs one forward per backward and every trained parameter
        used). 'allreduce': no DDP wrapper; the loop averages the phase's gradients over the ranks after its last
        backward (one flat all-reduce, StyleGAN2-ADA's way): for losses that call the network several times per
        backward (a GAN discriminator on fakes and reals) or leave trained parameters without a gradient (R1: the
        output bias). A network trained by any 'allreduce' phase gets no DDP wrapper; its weights and buffers are
        broadcast from rank 0 once, as DDP would.
    after_step(networks, cur_nimg) -> None: called after each optimizer step of the phase, under torch.no_grad(), with
        the unwrapped networks (the loop's dict) and the images seen before this step: a loss-side update that
        follows the step, such as a consistency model's EMA target (an extra network no optimizer covers, saved in
        training states: a resumed run continues it exactly).
    compilable: whether --compile may compile the phase's network. False for a phase that differentiates twice (R1's
        gradient penalty: torch.compile's AOT autograd has no double backward); a network trained by such a phase
        runs eagerly in all its phases.
    """

    name: str
    network: str
    optimizer: torch.optim.Optimizer
    loss_fn: Callable
    interval: int = 1
    offset: int = 0
    stat_name: str = 'Loss/loss'
    lr_schedule: Callable[[int], float] | None = None
    grad_sync: str = 'ddp'
    compilable: bool = True
    after_step: Callable[[dict, int], None] | None = None

    def runs_at(self, iteration: int) -> bool:
        return iteration >= self.offset and (iteration - self.offset) % self.interval == 0


def default_phases(loss, networks: dict, optimizer_kwargs: dict) -> list[Phase]:
    """EDM's single phase: all parameters of networks['net'], one optimizer, the loss called every iteration."""
    optimizer = dnnlib.util.construct_class_by_name(params=networks['net'].parameters(), **optimizer_kwargs)

    def loss_fn(nets, batch, augment_pipe):
        return loss(nets['net'], batch, augment_pipe=augment_pipe)

    return [Phase(name='main', network='net', optimizer=optimizer, loss_fn=loss_fn)]


def constant_lr(cur_nimg: int) -> float:
    """A Phase.lr_schedule without ramp-up: the base learning rate throughout."""
    return 1.0
