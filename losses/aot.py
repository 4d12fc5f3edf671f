"""Approximated Optimal Transport noise pairing (Kim et al., arXiv 2403.05069), as in large-scale-kim/EDM-AOT.

Each rank trains on pools of N images (`--aot N`, per GPU). A pool is augmented once, gets N unit-Gaussian noises,
and the noises are assigned to the images by an exact linear assignment (scipy's `linear_sum_assignment`) that
minimises the summed Euclidean (not squared) distance between the flattened [-1, 1] image and the noise, within each
class when the labels are one-hot classes. The loop then consumes the pool in order, b rows per accumulation round;
the wrapped loss draws sigma independently per row and uses sigma * z_paired as its noise (target, weight and
preconditioning unchanged). Both marginals are kept (the noises are a permutation of i.i.d. draws and every image is
used once), so the stock sampler stays valid; the paper samples with a large rho (Heun, rho 90 / 14 steps uncond,
rho 72 / 15 steps cond).

`AOTLoss` wraps any loss that reads `batch.noise` (EDM, VP, VE and STF). Under STF it runs, but STF's target is the
posterior mean for noise independent of the image: it replaces AOT's paired target, so the network learns STF's
denoiser at AOT's inputs (`check_data` warns). Its batch source (`PoolSource`) reads N
consecutive images of the rank's data stream, calls `prepare_pool` once under a torch RNG seeded by (seed, rank,
pool index), so that a resume in the middle of a pool rebuilds the same pool, and hands out the rows in order.

Background assignment (on by default, `BACKGROUND_ASSIGNMENT`): when a pool is loaded, the source also prepares the
next one (its images, augmentation, noise and cost matrix, on the device, under that pool's own seed) and solves its
assignment in a worker thread while the current pool trains (scipy releases the GIL; on CUDA the cost matrix reaches
the host by a non-blocking copy the worker waits for, so the training stream is never synchronised for it). The
random draws, the cost matrix and the solver call are the synchronous ones, so the pairs, the trajectory and exact
resume are unchanged (tests/test_aot.py); only the time at which the next pool's images are read moves forward.

The class stays persistent only so that snapshots written when losses were pickled still import.
"""

import concurrent.futures
import dataclasses

import numpy as np
import torch

import dnnlib
from losses.base import Batch
from losses.wrapper import LossWrapper
from torch_utils import persistence
from torch_utils.misc import stream_seed

__all__ = ['pairwise_distances', 'assign_noise', 'start_assignment', 'PendingPool', 'AOTLoss', 'PoolSource',
           'pool_seed', 'aot_loss_kwargs']

# Batch fields that hold one value per training image: a pool is handed out by slicing these.
_ROW_FIELDS = ('images', 'labels', 'noise', 'augment_labels')

# Prepare the next pool and solve its assignment in a worker thread while the current pool trains (exact: same draws,
# same cost matrix, same solver call). Tests switch it off to compare with the synchronous source.
BACKGROUND_ASSIGNMENT = True


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
    return torch.from_numpy(start_assignment(images, noise, labels).result()).to(images.device)


@torch.no_grad()
def start_assignment(images: torch.Tensor, noise: torch.Tensor, labels: torch.Tensor | None = None,
                     executor: concurrent.futures.Executor | None = None) -> concurrent.futures.Future:
    """`assign_noise`'s permutation as a future of an int64 numpy array: the cost matrix is computed now (queued on the
    device), the assignment is solved by `executor` (None: here, before returning). On CUDA the cost matrix and the
    classes go to pinned host memory by a non-blocking copy that the solver waits for (a CUDA event), so the caller's
    stream is not synchronised."""
    if noise.shape != images.shape:
        raise ValueError(f'assign_noise: noise {tuple(noise.shape)} must have the shape of the images '
                         f'{tuple(images.shape)} (one noise per image)')
    cost = pairwise_distances(images, noise)
    classes = labels.argmax(dim=1) if labels is not None and labels.ndim == 2 and labels.shape[1] > 0 else None
    ready = None
    if cost.device.type == 'cuda':
        cost, classes = (None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(
            t, non_blocking=True) for t in (cost, classes))
        ready = torch.cuda.Event()
        ready.record()
    if executor is None:
        future = concurrent.futures.Future()
        future.set_result(_solve_assignment(cost, classes, ready))
        return future
    return executor.submit(_solve_assignment, cost, classes, ready)


def _solve_assignment(cost: torch.Tensor, classes: torch.Tensor | None, ready) -> np.ndarray:
    """The optimal permutation for the cost matrix (host tensor), within classes when given."""
    from scipy.optimize import linear_sum_assignment

    if ready is not None:
        ready.synchronize()  # the non-blocking copies have landed (waits without holding the GIL)
    cost = cost.numpy()
    perm = np.empty(cost.shape[0], dtype=np.int64)
    if classes is None:
        rows, cols = linear_sum_assignment(cost)
        perm[rows] = cols
    else:
        classes = classes.numpy()
        for cls in np.unique(classes):
            members = np.flatnonzero(classes == cls)
            rows, cols = linear_sum_assignment(cost[np.ix_(members, members)])
            perm[members[rows]] = members[cols]
    return perm


def pool_seed(seed: int, rank: int, pool_idx: int) -> int:
    """Seed of the torch RNG while a pool is prepared: a resumed run rebuilds the same pool."""
    return stream_seed(seed, 0xA07, rank, pool_idx)


class PendingPool:
    """A prepared pool whose noise pairing may still be being solved (`start_assignment`): `result()` waits for the
    permutation and returns the pool with `noise` paired (row i belongs to images[i]), on the noise's device."""

    def __init__(self, batch: Batch, noise: torch.Tensor, permutation: concurrent.futures.Future):
        self.batch, self.noise, self.permutation = batch, noise, permutation

    def result(self) -> Batch:
        perm = torch.from_numpy(self.permutation.result())
        if self.noise.device.type == 'cuda':
            perm = perm.pin_memory().to(self.noise.device, non_blocking=True)  # no host sync
        return dataclasses.replace(self.batch, noise=self.noise[perm.to(self.noise.device)])


class _Prepared:
    """A pool prepared synchronously, behind PendingPool's `result()`."""

    def __init__(self, batch: Batch):
        self.batch = batch

    def result(self) -> Batch:
        return self.batch


class PoolSource:
    """AOT's data: the rank's images in pools of N consecutive images of the inner stream, each prepared once by
    `prepare_pool(Batch, augment_pipe)` and handed out in order, batch_gpu rows per round. State: 'data_position'
    counts the images handed out, so a resume inside a pool re-reads that pool from its start (the inner stream must
    be seekable, as StreamSource is), rebuilds it under the same seed and skips the rows already trained on.

    start_pool(Batch, augment_pipe, executor) -> PendingPool: the same preparation with the assignment solved by
    `executor`. When given and `background` (default: BACKGROUND_ASSIGNMENT), loading a pool also starts the next one,
    whose assignment is then solved in a worker thread while this one trains."""

    def __init__(self, inner, data, pool_size: int, prepare_pool, start_pool=None, background: bool | None = None):
        self.inner, self.data, self.pool_size, self.prepare_pool = inner, data, int(pool_size), prepare_pool
        background = BACKGROUND_ASSIGNMENT if background is None else background
        self.start_pool = start_pool if background else None
        self._executor = None
        self._next = None  # the next pool, started when the current one was loaded
        start = inner.position
        self.skip = start % self.pool_size
        if self.skip:
            inner.seek(start - self.skip)
        self.consumed = start
        self.pool, self.offset = None, 0

    def _start_pool(self):
        """Read the next pool_size images and prepare them with the torch RNG seeded by (seed, rank, pool index);
        the surrounding random streams are left untouched. Returns a PendingPool (or its synchronous stand-in)."""
        pool_idx = self.inner.position // self.pool_size
        num_iterations = self.pool_size // self.data.batch_gpu_total
        parts = [batch for _ in range(num_iterations) for batch in self.inner.next_rounds()]
        batch = Batch(images=torch.cat([part.images for part in parts]),
                      labels=torch.cat([part.labels for part in parts]))
        device = self.data.device
        with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []), torch.no_grad():
            torch.manual_seed(pool_seed(self.data.seed, self.data.rank, pool_idx))
            if self.start_pool is None:
                return _Prepared(self.prepare_pool(batch, self.data.augment_pipe))
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                                       thread_name_prefix='aot-assignment')
            return self.start_pool(batch, self.data.augment_pipe, self._executor)

    def _load_pool(self) -> Batch:
        """The next pool, paired; in the background mode, the one after it is started here."""
        pending, self._next = (self._next or self._start_pool()), None
        if self.start_pool is not None:
            self._next = self._start_pool()  # its assignment is solved while this pool trains
        pool = pending.result()
        for name in _ROW_FIELDS:
            value = getattr(pool, name)
            if value is not None and value.shape[0] != self.pool_size:
                raise ValueError(f'prepare_pool returned {value.shape[0]} rows of {name!r}, expected {self.pool_size}')
        return pool

    def next_rounds(self):
        step = self.data.batch_gpu_total
        # A pool is consumed in whole steps. Only a resume with another per-rank batch can leave fewer rows than a
        # step at its end (the resumed position is not a multiple of the new step): those rows are passed over.
        while self.pool is None or self.offset + step > self.pool_size:
            if self.pool is not None:
                self.consumed += self.pool_size - self.offset
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
        # A resume re-reads the pool of `consumed` from its start: the stream's resume point must come before it.
        pool_start = (self.consumed - self.consumed % self.pool_size) * self.data.world_size
        resume_point = getattr(self.inner, 'resume_point', None)
        return {**self.inner.state_dict(), 'data_position': self.consumed * self.data.world_size,
                **({'data_stream_resume_point': resume_point(pool_start)} if resume_point is not None else {})}


@persistence.persistent_class
class AOTLoss(LossWrapper):
    """A denoising loss fed with AOT-paired noise from per-rank pools of `pool_size` images.

    base_kwargs: the wrapped loss config (default EDM), e.g. an STF config from losses.stf.stf_loss_kwargs.
    pool_size: N images per rank and pool (`--aot`); must be a multiple of the per-rank batch per step.
    """

    # What generate.py and fid.py say when the sampler's steps draw fresh noise (losses.stochastic_sampling_notes).
    stochastic_sampling_note = ("was trained with AOT-paired noise: the network learned the paths of the paired "
                                "interpolation (an ODE), and noise drawn during sampling, independent of the image, "
                                "leaves them")

    def __init__(self, base_kwargs=None, pool_size=512):
        super().__init__(base_kwargs)
        self.pool_size = int(pool_size)
        if self.pool_size < 1:
            raise ValueError(f'AOTLoss: pool_size (--aot) must be >= 1, got {pool_size}')
        if isinstance(self.base, AOTLoss):
            raise ValueError('AOT is already applied to this loss')
        # AOT feeds its pools through the base's batch source and its paired noise to a loss that reads batch.noise
        # (the denoising losses' `noise` hook); a loss without them (GDD) would fail only once training starts.
        self.require_hooks(self.innermost(), ('batch_source', 'noise'), '--aot',
                           'AOT pairs noise with images for a denoising loss')

    def batch_source(self, data, inner):
        # The pool replaces the plain stream underneath whatever the wrapped losses add on top (STF's references).
        return self.base.batch_source(data, PoolSource(inner, data, self.pool_size, self.prepare_pool,
                                                       start_pool=self.start_pool))

    def check_data(self, *, batch_gpu_total: int, batch_gpu: int, dataset_size: int) -> list[str]:
        warnings = self.base.check_data(batch_gpu_total=batch_gpu_total, batch_gpu=batch_gpu,
                                        dataset_size=dataset_size)
        if self.pool_size % batch_gpu_total != 0:
            raise ValueError(f'--aot: the pool of {self.pool_size} images per GPU must be a multiple of the per-GPU '
                             f'batch per step, {batch_gpu_total} (batch size / number of processes)')
        if self.pool_size > dataset_size:
            warnings = [*warnings, f'--aot: a pool of {self.pool_size} images per GPU is larger than the dataset '
                                   f'({dataset_size} images), so it pairs repeated images']
        wrapped = []
        loss = self.base
        while loss is not None:
            wrapped.append(loss)
            loss = getattr(loss, 'base', None)
        if any(getattr(loss, 'target_assumes_independent_noise', False) for loss in wrapped):
            warnings = [*warnings, '--aot: the wrapped loss\'s target (STF\'s) is the posterior mean for noise drawn '
                                   'independently of the image, so it replaces the paired target: the network learns '
                                   'the unpaired denoiser at AOT\'s inputs, not AOT\'s (1-D toy at sigma = 3: paired '
                                   'E[y | x] = 1.00, STF under AOT 0.16, unpaired 0.16)']
        return warnings

    @torch.no_grad()
    def prepare_pool(self, batch, augment_pipe=None):
        """Augment the pool once, draw one unit noise per image (global torch RNG) and pair them.

        Returns the batch with augmented `images`, their `augment_labels` (None without augmentation) and the
        paired `noise` (noise[i] belongs to images[i]), all with the pool's N rows.
        """
        return self.start_pool(batch, augment_pipe).result()

    @torch.no_grad()
    def start_pool(self, batch, augment_pipe=None, executor=None) -> PendingPool:
        """`prepare_pool` with the assignment solved by `executor` (None: now): the same random draws in the same
        order (augmentation, then the noise), the same cost matrix and solver call, so the same pool."""
        images, augment_labels = batch.images, None
        if augment_pipe is not None:
            images, augment_labels = augment_pipe(images)
        noise = torch.randn_like(images)
        return PendingPool(dataclasses.replace(batch, images=images, augment_labels=augment_labels), noise,
                           start_assignment(images, noise, batch.labels, executor))

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
