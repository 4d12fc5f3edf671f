"""Approximated Optimal Transport noise pairing (Kim et al., arXiv 2403.05069), as in large-scale-kim/EDM-AOT.

Each rank trains on pools of N images (`--aot N`, per GPU). A pool is augmented once, gets N unit-Gaussian noises,
and the noises are assigned to the images by an exact linear assignment (scipy's `linear_sum_assignment`) that
minimises the summed Euclidean (not squared) distance between the flattened [-1, 1] image and the noise, within each
class when the labels are one-hot classes. The loop then consumes the pool in order, b rows per accumulation round;
the wrapped loss draws sigma independently per row and uses sigma * z_paired as its noise (target, weight and
preconditioning unchanged). Both marginals are kept (the noises are a permutation of i.i.d. draws and every image is
used once), so the stock sampler stays valid; the paper samples with a large rho (Heun, rho 90 / 14 steps uncond,
rho 72 / 15 steps cond).

`AOTLoss` wraps any loss that reads `batch.noise` (EDM, VP, VE and STF): it declares {'pool': N}; the training loop
reads N consecutive images of the rank's data stream, calls `prepare_pool` once under a torch RNG seeded by (seed,
rank, pool index), so that a resume in the middle of a pool rebuilds the same pool, and hands out the rows.

Persistence constraint: snapshots pickle the loss with this module's source, which EDM's generate.py executes when
unpickling; so this file imports only torch, numpy, dnnlib and torch_utils at the top (scipy inside the function).
"""

import dataclasses

import numpy as np
import torch

import dnnlib
from torch_utils import persistence

__all__ = ['pairwise_distances', 'assign_noise', 'AOTLoss', 'aot_loss_kwargs']


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


@persistence.persistent_class
class AOTLoss:
    """A denoising loss fed with AOT-paired noise from per-rank pools of `pool_size` images.

    base_kwargs: the wrapped loss config (default EDM), e.g. an STF config from losses.stf.stf_loss_kwargs.
    pool_size: N images per rank and pool (`--aot`); must be a multiple of the per-rank batch per step.
    """

    def __init__(self, base_kwargs=None, pool_size=512):
        self.base_kwargs = dict(base_kwargs) if base_kwargs is not None else dict(
            class_name='losses.denoising.EDMLoss')
        self.pool_size = int(pool_size)
        if self.pool_size < 1:
            raise ValueError(f'AOTLoss: pool_size (--aot) must be >= 1, got {pool_size}')
        self.base = dnnlib.util.construct_class_by_name(**self.base_kwargs)

    def data_requirements(self) -> dict:
        requirements = dict(self.base.data_requirements()) if hasattr(self.base, 'data_requirements') else {}
        if 'pool' in requirements:
            raise ValueError(f'AOTLoss: the wrapped loss {type(self.base).__name__} already asks for a pool')
        requirements['pool'] = self.pool_size
        return requirements

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
            raise ValueError('AOTLoss needs the paired noise of its pool in batch.noise; the training loop provides '
                             'it when data_requirements() asks for a pool')
        return self.base(net, batch, augment_pipe=augment_pipe)


def aot_loss_kwargs(base_kwargs: dict, pool_size: int = 512) -> dnnlib.EasyDict:
    """Config entry wrapping a loss config (EDM, VP, VE or STF) with AOT noise pairing over pools of `pool_size`."""
    base = dict(base_kwargs)
    if base.get('class_name', '').endswith('.AOTLoss'):
        raise ValueError('AOT is already applied to this loss')
    return dnnlib.EasyDict(class_name='losses.aot.AOTLoss', base_kwargs=base, pool_size=int(pool_size))
