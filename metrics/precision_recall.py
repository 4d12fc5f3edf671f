"""Improved precision and recall (Kynkäänniemi et al. 2019) as StyleGAN2-ADA's `pr50k3_full`.

Features are float16 (VGG16 4096-d). The radius of a manifold point is its distance to its (k+1)-th nearest
manifold point (the +1 skips the point itself); a probe is covered when it lies within the radius of some manifold
point. precision = covered fraction of generated probes against the real manifold; recall = covered fraction of
real probes against the generated manifold. Distances are `torch.cdist` in float16 as in StyleGAN2-ADA
(float32 rounded to float16 on CPU).

Memory: distances are computed in [row_batch, col_batch] blocks; the k+1 smallest distances of each row are
merged block by block, so no [N, N] (nor [row_batch, N]) matrix is ever held. Row blocks are spread over ranks
(rank r takes blocks r, r + world, ...) and the per-row results are summed across ranks.
"""

import torch

from torch_utils import distributed


def _row_blocks(num_rows: int, row_batch_size: int, rank: int, world_size: int):
    starts = range(0, num_rows, row_batch_size)
    for start in list(starts)[rank::world_size]:
        yield start, min(start + row_batch_size, num_rows)


def _distances(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Euclidean distances [rows, cols] in the features' dtype.

    On CUDA this is StyleGAN2-ADA's exact call (float16 cdist). CPU torch has no float16 cdist for small blocks
    (its direct path): compute in float32 and round to float16, so radii and comparisons still use float16 values.
    """
    if rows.dtype == torch.float16 and rows.device.type == "cpu":
        return torch.cdist(rows.float().unsqueeze(0), cols.float().unsqueeze(0))[0].to(torch.float16)
    return torch.cdist(rows.unsqueeze(0), cols.unsqueeze(0))[0]


@torch.no_grad()
def manifold_radii(manifold: torch.Tensor, nhood_size: int = 3, row_batch_size: int = 10000,
                   col_batch_size: int = 10000) -> torch.Tensor:
    """Distance of each manifold point to its (nhood_size + 1)-th nearest manifold point, in manifold.dtype."""
    num = manifold.shape[0]
    if num < nhood_size + 1:
        raise ValueError(f"precision/recall with k={nhood_size} needs at least {nhood_size + 1} points per set, "
                         f"got {num}")
    radii = torch.zeros([num], dtype=torch.float32, device=manifold.device)
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    for row_lo, row_hi in _row_blocks(num, row_batch_size, rank, world_size):
        rows = manifold[row_lo:row_hi]
        smallest = None  # [rows, <= k+1] ascending: the k+1 smallest distances seen so far
        for col_lo in range(0, num, col_batch_size):
            block = _distances(rows, manifold[col_lo:col_lo + col_batch_size]).to(torch.float32)
            # The block's own k+1 smallest first, then merged: concatenating the whole block to the running ones
            # copied it (400 MB at 10000 x 10000), and the previous block stayed alive while the next was computed.
            nearest = block.topk(min(nhood_size + 1, block.shape[1]), dim=1, largest=False).values
            del block
            candidates = nearest if smallest is None else torch.cat([smallest, nearest], dim=1)
            smallest = candidates.topk(min(nhood_size + 1, candidates.shape[1]), dim=1, largest=False).values
        radii[row_lo:row_hi] = smallest[:, nhood_size]
    distributed.all_reduce_sum_(radii)  # every row was filled by exactly one rank
    return radii.to(manifold.dtype)


@torch.no_grad()
def coverage(probes: torch.Tensor, manifold: torch.Tensor, radii: torch.Tensor, row_batch_size: int = 10000,
             col_batch_size: int = 10000) -> float:
    """Fraction of probes within the radius of at least one manifold point."""
    covered = torch.zeros([probes.shape[0]], dtype=torch.float64, device=probes.device)
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    for row_lo, row_hi in _row_blocks(probes.shape[0], row_batch_size, rank, world_size):
        rows = probes[row_lo:row_hi]
        hit = torch.zeros([rows.shape[0]], dtype=torch.bool, device=probes.device)
        for col_lo in range(0, manifold.shape[0], col_batch_size):
            block = _distances(rows, manifold[col_lo:col_lo + col_batch_size])
            hit |= (block <= radii[col_lo:col_lo + col_batch_size]).any(dim=1)
            del block  # before the next one is computed
        covered[row_lo:row_hi] = hit.to(torch.float64)
    distributed.all_reduce_sum_(covered)
    return float(covered.mean().item())


def precision_recall(real_features: torch.Tensor, gen_features: torch.Tensor, nhood_size: int = 3,
                     row_batch_size: int = 10000, col_batch_size: int = 10000,
                     dtype: torch.dtype = torch.float16) -> tuple[float, float]:
    """(precision, recall) of generated features against real ones; every rank must call it with the same sets."""
    if real_features.ndim != 2 or gen_features.ndim != 2 or real_features.shape[1] != gen_features.shape[1]:
        raise ValueError(f"expected real and generated features [N, D] of one D, got {list(real_features.shape)} "
                         f"and {list(gen_features.shape)}")
    real_features = real_features.to(dtype)
    gen_features = gen_features.to(real_features.device, dtype)
    results = []
    for manifold, probes in [(real_features, gen_features), (gen_features, real_features)]:
        radii = manifold_radii(manifold, nhood_size, row_batch_size, col_batch_size)
        results.append(coverage(probes, manifold, radii, row_batch_size, col_batch_size))
    return results[0], results[1]
