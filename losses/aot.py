"""Approximated Optimal Transport noise pairing (Kim et al., arXiv 2403.05069), as in large-scale-kim/EDM-AOT.

Each rank trains on pools of N images (`--aot N`, per GPU). A pool is augmented once, gets N unit-Gaussian noises,
and the noises are assigned to the images by an exact linear assignment (scipy's `linear_sum_assignment`) that
minimises the summed Euclidean (not squared) distance between the flattened [-1, 1] image and the noise, within each
class when the labels are one-hot classes. The loop then consumes the pool in order, b rows per accumulation round;
the wrapped loss draws sigma independently per row and uses sigma * z_paired as its noise (target, weight and
preconditioning unchanged). Both marginals are kept (the noises are a permutation of i.i.d. draws and every image is
used once), so the stock sampler stays valid; the paper samples with a large rho (Heun, rho 90 / 14 steps uncond,
rho 72 / 15 steps cond).

`AOTLoss` wraps any loss that reads `batch.noise` (EDM, VP, VE and STF). Its batch source (`PoolSource`) reads N
consecutive images of the rank's data stream, calls `prepare_pool` once under a torch RNG seeded by (seed, rank,
pool index), so that a resume in the middle of a pool rebuilds the same pool, and hands out the rows in order.

The class stays persistent only so that snapshots written when losses were pickled still import.
"""

import dataclasses

import numpy as np
import torch

import dnnlib
from losses.base import Batch
from losses.wrapper import LossWrapper
from torch_utils import persistence
from torch_utils.misc import stream_seed

__all__ = ['pairwise_distances', 'assign_noise', 'AOTLoss', 'PoolSource', 'pool_seed', 'aot_loss_kwargs']

# Batch fields that hold one value per training image: a pool is handed out by slicing these.
_ROW_FIELDS = ('images', 'labels', 'noise', 'augment_labels')


@torch.no_grad()
def pairwise_distances(images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Euclidean distances [N, M] between flattened images [N, ...] and noises [M, ...], computed in float64.

    float64 matmul (autocast off): immune to TF32 and accurate to ~1e-12 relative, negligible work next to a step.
    """
    with torch.autocast(device_type=images.device.type, enabled=False):
        a = images.reshape(images.shape[0], -1).to(torch.float64)
        b = noise.reshape(noise.shape[0], -1).to(torch.float64)
        squared = a.square().sum(1, keepdim=True) - 2 * (a @ b.T) + b.square().sum(1)
    return squared.clamp_(min=0).sqrt_()


@torch.no_grad()
def assign_noise(images: torch.Tensor, noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Permutation `perm` [N] (on the images' device) minimising sum_i ||images[i] - noise[perm[i]]||.

    With one-hot labels [N, L > 0] the assignment is solved within each class (argmax of the label); rows never pair
    across classes. One device-to-host copy of the N x N distance matrix per pool; scipy solves on the CPU.
    """
    from scipy.optimize import linear_sum_assignment

    num = images.shape[0]
    if noise.shape != images.shape:
        raise ValueError(f'assign_noise: noise {tuple(noise.shape)} must have the shape of the images '
                         f'{tuple(images.shape)} (one noise per image)')
    cost = pairwise_distances(images, noise).cpu().numpy()
    perm = np.empty(num, dtype=np.int64)
    if labels is None or labels.ndim != 2 or labels.shape[1] == 0:
        rows, cols = linear_sum_assignment(cost)
        perm[rows] = cols
    else:
        classes = labels.argmax(dim=1).cpu().numpy()
        for cls in np.unique(classes):
            members = np.flatnonzero(classes == cls)
            rows, cols = linear_sum_assignment(cost[np.ix_(members, members)])
            perm[members[rows]] = members[cols]
    return torch.from_numpy(perm).to(images.device)


def pool_seed(seed: int, rank: int, pool_idx: int) -> int:
    """Seed of the torch RNG while a pool is prepared: a resumed run rebuilds the same pool."""
    return stream_seed(seed, 0xA07, rank, pool_idx)


class PoolSource:
    """AOT's data: the rank's images in pools of N consecutive images of the inner stream, each prepared once by
    `prepare_pool(Batch, augment_pipe)` and handed out in order, batch_gpu rows per round. State: 'data_position'
    counts the images handed out, so a resume inside a pool re-reads that pool from its start (the inner stream must
    be seekable, as StreamSource is), rebuilds it under the same seed and skips the rows already trained on."""

    def __init__(self, inner, data, pool_size: int, prepare_pool):
        self.inner, self.data, self.pool_size, self.prepare_pool = inner, data, int(pool_size), prepare_pool
        start = inner.position
        self.skip = start % self.pool_size
        if self.skip:
            inner.seek(start - self.skip)
        self.consumed = start
        self.pool, self.offset = None, 0

    def _load_pool(self) -> Batch:
        """The next pool_size images, prepared with the torch RNG seeded by (seed, rank, pool index); the
        surrounding random streams are left untouched."""
        pool_idx = self.inner.position // self.pool_size
        num_iterations = self.pool_size // self.data.batch_gpu_total
        parts = [batch for _ in range(num_iterations) for batch in self.inner.next_rounds()]
        images = torch.cat([batch.images for batch in parts])
        labels = torch.cat([batch.labels for batch in parts])
        device = self.data.device
        with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []), torch.no_grad():
            torch.manual_seed(pool_seed(self.data.seed, self.data.rank, pool_idx))
            pool = self.prepare_pool(Batch(images=images, labels=labels), self.data.augment_pipe)
        for name in _ROW_FIELDS:
            value = getattr(pool, name)
            if value is not None and value.shape[0] != self.pool_size:
                raise ValueError(f'prepare_pool returned {value.shape[0]} rows of {name!r}, expected {self.pool_size}')
        return pool

    def next_rounds(self):
        if self.pool is None or self.offset == self.pool_size:
            self.pool = self._load_pool()
            self.offset, self.skip = self.skip, 0
        batch_gpu = self.data.batch_gpu
        rounds = []
        for k in range(self.data.num_rounds):
            rows = slice(self.offset + k * batch_gpu, self.offset + (k + 1) * batch_gpu)
            rounds.append(dataclasses.replace(self.pool, **{name: getattr(self.pool, name)[rows]
                                                            for name in _ROW_FIELDS
                                                            if getattr(self.pool, name) is not None}))
        self.offset += self.data.batch_gpu_total
        self.consumed += self.data.batch_gpu_total
        return rounds

    def state_dict(self) -> dict:
        return {**self.inner.state_dict(), 'data_position': self.consumed * self.data.world_size}


@persistence.persistent_class
class AOTLoss(LossWrapper):
    """A denoising loss fed with AOT-paired noise from per-rank pools of `pool_size` images.

    base_kwargs: the wrapped loss config (default EDM), e.g. an STF config from losses.stf.stf_loss_kwargs.
    pool_size: N images per rank and pool (`--aot`); must be a multiple of the per-rank batch per step.
    """

    def __init__(self, base_kwargs=None, pool_size=512):
        super().__init__(base_kwargs)
        self.pool_size = int(pool_size)
        if self.pool_size < 1:
            raise ValueError(f'AOTLoss: pool_size (--aot) must be >= 1, got {pool_size}')
        if isinstance(self.base, AOTLoss):
            raise ValueError('AOT is already applied to this loss')

    def batch_source(self, data, inner):
        # The pool replaces the plain stream underneath whatever the wrapped losses add on top (STF's references).
        return self.base.batch_source(data, PoolSource(inner, data, self.pool_size, self.prepare_pool))

    def check_data(self, *, batch_gpu_total: int, batch_gpu: int, dataset_size: int) -> list[str]:
        warnings = self.base.check_data(batch_gpu_total=batch_gpu_total, batch_gpu=batch_gpu,
                                        dataset_size=dataset_size)
        if self.pool_size % batch_gpu_total != 0:
            raise ValueError(f'--aot: the pool of {self.pool_size} images per GPU must be a multiple of the per-GPU '
                             f'batch per step, {batch_gpu_total} (batch size / number of processes)')
        if self.pool_size > dataset_size:
            warnings = [*warnings, f'--aot: a pool of {self.pool_size} images per GPU is larger than the dataset '
                                   f'({dataset_size} images), so it pairs repeated images']
        return warnings

    @torch.no_grad()
    def prepare_pool(self, batch, augment_pipe=None):
        """Augment the pool once, draw one unit noise per image (global torch RNG) and pair them.

        Returns the batch with augmented `images`, their `augment_labels` (None without augmentation) and the
        paired `noise` (noise[i] belongs to images[i]), all with the pool's N rows.
        """
        images, augment_labels = batch.images, None
        if augment_pipe is not None:
            images, augment_labels = augment_pipe(images)
        noise = torch.randn_like(images)
        perm = assign_noise(images, noise, batch.labels)
        return dataclasses.replace(batch, images=images, augment_labels=augment_labels, noise=noise[perm])

    def __call__(self, net, batch, augment_pipe=None):
        if getattr(batch, 'noise', None) is None:
            raise ValueError('AOTLoss needs the paired noise of its pool in batch.noise; its batch source '
                             '(PoolSource) provides it')
        return self.base(net, batch, augment_pipe=augment_pipe)


def aot_loss_kwargs(base_kwargs: dict, pool_size: int = 512) -> dnnlib.EasyDict:
    """Config entry wrapping a loss config (EDM, VP, VE or STF) with AOT noise pairing over pools of `pool_size`."""
    base = dict(base_kwargs)
    if base.get('class_name', '').endswith('.AOTLoss'):
        raise ValueError('AOT is already applied to this loss')
    return dnnlib.EasyDict(class_name='losses.aot.AOTLoss', base_kwargs=base, pool_size=int(pool_size))
