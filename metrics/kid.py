"""Kernel Inception Distance (Binkowski et al., ICLR 2018) as torch-fidelity and clean-fid compute it: the unbiased
MMD^2 between generated and real Inception pool features with the cubic polynomial kernel
k(x, y) = (x.y / d + 1)^3, averaged over `num_subsets` random subsets of `subset_size` rows of each set (drawn
without replacement by numpy's RandomState(seed), generated rows first); its std over subsets is reported too.

Per subset of m rows:  MMD^2_u = (sum_{i != j} k(x_i, x_j) + sum_{i != j} k(y_i, y_j)) / (m (m - 1))
                                 - 2 sum_{i, j} k(x_i, y_j) / m^2
"""

import numpy as np
import torch

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_SEED = 2020  # torch-fidelity's default rng_seed


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(x.y / d + 1)^3 for all row pairs, in the inputs' dtype."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """The unbiased MMD^2 of two equal-size row sets under the cubic polynomial kernel (float64)."""
    x, y = x.to(torch.float64), y.to(torch.float64)
    m = x.shape[0]
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    off_diagonal = k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()
    return float(off_diagonal / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


def kernel_inception_distance(generated: torch.Tensor, real: torch.Tensor, num_subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE, seed: int = KID_SEED) -> tuple[float, float]:
    """(KID mean, KID std) over subsets of min(subset_size, generated rows, real rows) rows each.

    With at least subset_size rows in each set this is torch-fidelity's kid_features_to_metric (same seed, same draws,
    generated rows first). With fewer, torch-fidelity refuses ("KID subset size ... cannot be smaller than the number
    of samples"); here the subset shrinks to the smaller set instead, as clean-fid's kernel_distance does
    (min(n1, n2, max_subset_size)), so a small evaluation still gets a number.
    """
    num_generated, num_real = generated.shape[0], real.shape[0]
    m = min(subset_size, num_generated, num_real)
    if m < 2:
        raise ValueError(f'KID needs at least 2 generated and 2 real images, got {num_generated} and {num_real}')
    rng = np.random.RandomState(seed)
    values = []
    for _ in range(num_subsets):  # a few hundred small matmuls: not a per-image loop
        rows_generated = torch.as_tensor(rng.choice(num_generated, m, replace=False), device=generated.device)
        rows_real = torch.as_tensor(rng.choice(num_real, m, replace=False), device=real.device)
        values.append(mmd2_unbiased(generated[rows_generated], real[rows_real]))
    return float(np.mean(values)), float(np.std(values))
