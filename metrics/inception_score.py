"""Inception Score as StyleGAN2-ADA's `is50k`: p(y|x) from the Inception head without its output bias, 10 splits.

Split i holds images [i·N/S, (i+1)·N/S) in generation (file) order, never shuffled. Per split,
IS = exp(mean_j KL(p(y|x_j) ‖ p̄(y))); the result is the mean and the population std over the splits.

The streaming accumulator keeps per split only Σ_j p_j (one class vector) and Σ_j Σ_c p_jc log p_jc, because
mean_j Σ_c p_jc log p̄_c = Σ_c p̄_c log p̄_c: memory does not grow with the number of images, and ranks may
see images in any order as long as each image comes with its global index. It takes 0·log 0 = 0 (xlogy) where a
float32 softmax underflowed to exactly 0; StyleGAN2-ADA's formula, and `inception_score` below (which tests use as
its reference), give NaN there. Elsewhere the two agree to 3.5e-15 relative.
"""

import numpy as np
import torch

from torch_utils import distributed


def split_bounds(num_images: int, num_splits: int) -> list[int]:
    """Row boundaries [0, N/S, 2N/S, ..., N] with StyleGAN2-ADA's integer arithmetic i·N // S."""
    return [i * num_images // num_splits for i in range(num_splits + 1)]


def inception_score(probs, num_splits: int = 10) -> tuple[float, float]:
    """Direct computation from all class probabilities [N, C] in order: (mean, std) over the splits."""
    probs = np.asarray(probs, dtype=np.float64)
    bounds = split_bounds(len(probs), num_splits)
    scores = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        part = probs[lo:hi]
        marginal = part.mean(axis=0, keepdims=True)
        kl = part * (np.log(part) - np.log(marginal))
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores)), float(np.std(scores))


class InceptionScoreAccumulator:
    """Streaming Inception Score over `num_images` images identified by their global index."""

    def __init__(self, num_images: int, num_splits: int = 10):
        if num_images < num_splits:
            raise ValueError(f"the Inception Score needs at least {num_splits} images (one per split), "
                             f"got {num_images}")
        self.num_images = num_images
        self.num_splits = num_splits
        self.bounds = split_bounds(num_images, num_splits)
        self.prob_sum: torch.Tensor | None = None  # [S, C] float64: Σ_j p_jc per split
        self.plogp_sum: torch.Tensor | None = None  # [S] float64: Σ_j Σ_c p_jc log p_jc per split
        self._interior_bounds: torch.Tensor | None = None

    def _allocate(self, num_classes: int, device: torch.device) -> None:
        self.prob_sum = torch.zeros([self.num_splits, num_classes], dtype=torch.float64, device=device)
        self.plogp_sum = torch.zeros([self.num_splits], dtype=torch.float64, device=device)
        self._interior_bounds = torch.tensor(self.bounds[1:-1], dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, probs: torch.Tensor, indices: torch.Tensor) -> None:
        """probs [B, C] (softmax outputs), indices [B] global positions in 0..num_images-1."""
        if self.prob_sum is None:
            self._allocate(probs.shape[1], probs.device)
        probs = probs.to(torch.float64)
        split = torch.bucketize(indices.to(probs.device, torch.int64), self._interior_bounds, right=True)
        self.prob_sum.index_add_(0, split, probs)
        # xlogy gives 0·log 0 = 0 for classes whose probability underflowed to zero.
        self.plogp_sum.index_add_(0, split, torch.special.xlogy(probs, probs).sum(1))

    @torch.no_grad()
    def reduce_(self, num_classes: int, device: torch.device) -> None:
        if self.prob_sum is None:
            self._allocate(num_classes, device)
        distributed.all_reduce_sum_(self.prob_sum)
        distributed.all_reduce_sum_(self.plogp_sum)

    def compute(self) -> tuple[float, float, list[float]]:
        """(mean, population std, per-split scores) after reduce_()."""
        sizes = torch.tensor(np.diff(self.bounds), dtype=torch.float64)
        prob_sum, plogp_sum = self.prob_sum.cpu(), self.plogp_sum.cpu()
        marginal = prob_sum / sizes[:, None]
        kl = plogp_sum / sizes - torch.special.xlogy(marginal, marginal).sum(1)
        scores = torch.exp(kl).numpy()
        return float(np.mean(scores)), float(np.std(scores)), [float(s) for s in scores]
