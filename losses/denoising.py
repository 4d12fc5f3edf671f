"""Denoising score-matching losses of EDM (Karras et al. 2022, Table 1): VPLoss, VELoss, EDMLoss.

Each loss draws a noise level sigma per image, noises the (augmented) clean image y and returns the per-element
loss weight(sigma) * (D(y + sigma * eps; sigma) - target)^2, image-shaped. The training loop reduces it.
The three losses differ only in the sigma sampler and the weight; they share `DenoisingLoss`, whose hooks
(`sample_sigma`, `weight`, `augment`, `noise`, `noisy_batch`) are what the wrappers build on: STF changes the
target, AOT supplies paired noise through `batch.noise`.

Randomness: `batch.random` (a per-image generator, see losses/base.py) if the loop gives one, else the global
torch RNG in EDM's order (sigma draw, augmentation, noise draw).

The process (how y and eps become the network input, and the default regression target) is EDM's scalar-sigma
process, `loss.process`; the loop records it in snapshots. The classes stay persistent only so that snapshots
written before snapshots stopped pickling losses (they now record `losses.loss_record`) still import.
"""

import math

import torch

from processes import EDMProcess
from torch_utils import persistence, training_stats

# Noise-level bins of the loss in stats.jsonl ('Loss/sigma<0.05', 'Loss/sigma0.05-0.2', ...): which noise levels a
# run learns, or fails to, at a glance (EDM2 logs the same). Log-spaced over EDM's training range.
SIGMA_BIN_EDGES = (0.05, 0.2, 0.5, 1, 2, 5, 20)


def check_weight_range(weight_fn, sigma_low: float, sigma_high: float, what: str) -> None:
    """ValueError naming --loss-opt unless the float32 weight `weight_fn(sigma)` is finite and positive at the two ends
    of the noise levels a loss draws. Options that pass the constructor's sign checks can still make every step's loss
    inf or NaN (P_mean=60: sigma^2 overflows float32); the loop then scrubs every step and saves an untrained network.
    The constructors pass their own class's formula, not `self.weight`: a subclass that overrides it (its own options
    set after super().__init__) is not called before it is built."""
    sigma = torch.tensor([sigma_low, sigma_high], dtype=torch.float32)
    weight = weight_fn(sigma)
    if not (torch.isfinite(sigma).all() and (sigma > 0).all() and torch.isfinite(weight).all() and (weight > 0).all()):
        raise ValueError(f"--loss-opt: {what} gives noise levels {sigma_low:.3g} ... {sigma_high:.3g}, whose float32 "
                         f"loss weight is not finite and positive ({weight.tolist()}); the steps that draw them "
                         f"would be non-finite")


def report_loss_by_sigma(loss: torch.Tensor, sigma: torch.Tensor) -> None:
    """Each image's mean loss under the training_stats name of its noise level's bin (no host sync)."""
    per_image = loss.detach().reshape(loss.shape[0], -1).mean(dim=1)
    training_stats.report_binned('Loss/sigma', per_image, sigma.reshape(-1).expand(loss.shape[0]), SIGMA_BIN_EDGES)


class DenoisingLoss:
    """Shared base: loss = weight(sigma) * (D(x; sigma) - target)^2 per element, x = process.corrupt(y, sigma, eps).

    Subclasses define `sample_sigma` and `weight`. The loss is called as `loss(net, batch, augment_pipe)`, where
    `batch` has `images` (float32 [N,C,H,W] in [-1,1]), `labels`, and optionally `noise` (unit Gaussian epsilon),
    `augment_labels` (images already augmented) and `random` (per-image generator).
    """

    process = EDMProcess()

    # What the loop asks every loss (wrappers override them; see losses/__init__.py).
    def batch_source(self, data, inner):
        """The source of this loss's batches, given the loop's default (EDM's stream): that default."""
        return inner

    def check_data(self, *, batch_gpu_total: int, batch_gpu: int, dataset_size: int) -> list[str]:
        """Refuse (ValueError) a batch layout or dataset the loss cannot train with; return warnings. None here."""
        return []

    # Randomness: per-image draws when the loop provides them, else the global torch RNG (EDM).
    @staticmethod
    def _randn(batch, shape, device):
        if getattr(batch, 'random', None) is not None:
            return batch.random.randn(*shape[1:])
        return torch.randn(shape, device=device)

    @staticmethod
    def _rand(batch, shape, device):
        if getattr(batch, 'random', None) is not None:
            return batch.random.rand(*shape[1:])
        return torch.rand(shape, device=device)

    def sample_sigma(self, batch, num, device) -> torch.Tensor:
        """Noise levels, shape [num, 1, 1, 1]."""
        raise NotImplementedError

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """Loss weight lambda(sigma)."""
        raise NotImplementedError

    def augment(self, batch, augment_pipe):
        """(y, augment_labels): the clean training target and the labels the network is conditioned on."""
        if getattr(batch, 'augment_labels', None) is not None:
            return batch.images, batch.augment_labels
        if augment_pipe is not None:
            return augment_pipe(batch.images)
        return batch.images, None

    def noise(self, batch, y) -> torch.Tensor:
        """Unit Gaussian eps: `batch.noise` when given (AOT's paired noise), else fresh N(0, I)."""
        return batch.noise if getattr(batch, 'noise', None) is not None else self._randn(batch, y.shape, y.device)

    def noisy_batch(self, batch, augment_pipe=None):
        """(sigma, weight, y, augment_labels, x): the draws in EDM's order (sigma, augmentation, noise) and the
        network input x = process.corrupt(y, sigma, eps). Wrappers that change only the target reuse it (STF)."""
        sigma = self.sample_sigma(batch, batch.images.shape[0], batch.images.device)
        weight = self.weight(sigma)
        y, augment_labels = self.augment(batch, augment_pipe)
        x = self.process.corrupt(y, sigma, self.noise(batch, y))
        return sigma, weight, y, augment_labels, x

    def __call__(self, net, batch, augment_pipe=None) -> torch.Tensor:
        sigma, weight, y, augment_labels, x = self.noisy_batch(batch, augment_pipe)
        D_x = net(x, sigma, batch.labels, augment_labels=augment_labels)
        loss = weight * ((D_x - self.process.target(y, x, sigma)) ** 2)
        report_loss_by_sigma(loss, sigma)
        return loss


@persistence.persistent_class
class VPLoss(DenoisingLoss):
    """Variance-preserving loss (Song et al. 2021): t ~ U(epsilon_t, 1), sigma = sigma_VP(t), weight 1/sigma^2."""

    def __init__(self, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5):
        self.beta_d = float(beta_d)
        self.beta_min = float(beta_min)
        self.epsilon_t = float(epsilon_t)
        # sigma(t) must be real and positive on [epsilon_t, 1]: a negative t or exponent gives NaN.
        if not (0 < self.epsilon_t < 1 and self.beta_d >= 0 and self.beta_min >= 0):
            raise ValueError(f"--loss-opt: VP needs 0 < epsilon_t < 1, beta_d >= 0 and beta_min >= 0, got "
                             f"epsilon_t={self.epsilon_t:g}, beta_d={self.beta_d:g}, beta_min={self.beta_min:g}")
        check_weight_range(lambda sigma: VPLoss.weight(self, sigma), float(VPLoss.sigma(self, self.epsilon_t)),
                           float(VPLoss.sigma(self, 1.0)),
                           f"beta_d={self.beta_d:g}, beta_min={self.beta_min:g}, epsilon_t={self.epsilon_t:g}")

    def sigma(self, t):
        """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

    def sample_sigma(self, batch, num, device):
        rnd_uniform = self._rand(batch, [num, 1, 1, 1], device)
        return self.sigma(1 + rnd_uniform * (self.epsilon_t - 1))

    def weight(self, sigma):
        return 1 / sigma ** 2


@persistence.persistent_class
class VELoss(DenoisingLoss):
    """Variance-exploding loss (Song et al. 2021): sigma log-uniform on [sigma_min, sigma_max], weight 1/sigma^2."""

    def __init__(self, sigma_min=0.02, sigma_max=100):
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        if not 0 < self.sigma_min <= self.sigma_max:  # log-uniform: sigma_min = 0 draws sigma = 0, weight inf
            raise ValueError(f"--loss-opt: VE needs 0 < sigma_min <= sigma_max, got sigma_min={self.sigma_min:g}, "
                             f"sigma_max={self.sigma_max:g}")
        check_weight_range(lambda sigma: VELoss.weight(self, sigma), self.sigma_min, self.sigma_max,
                           f"sigma_min={self.sigma_min:g}, sigma_max={self.sigma_max:g}")

    def sample_sigma(self, batch, num, device):
        rnd_uniform = self._rand(batch, [num, 1, 1, 1], device)
        return self.sigma_min * ((self.sigma_max / self.sigma_min) ** rnd_uniform)

    def weight(self, sigma):
        return 1 / sigma ** 2


@persistence.persistent_class
class EDMLoss(DenoisingLoss):
    """EDM loss: ln(sigma) ~ N(P_mean, P_std^2), weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""

    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean = float(P_mean)
        self.P_std = float(P_std)
        self.sigma_data = float(sigma_data)
        if not (self.sigma_data > 0 and self.P_std >= 0):  # sigma_data = 0: weight sigma^2 / 0 = inf at every step
            raise ValueError(f"--loss-opt: EDM needs sigma_data > 0 and P_std >= 0, got "
                             f"sigma_data={self.sigma_data:g}, P_std={self.P_std:g}")
        # ln sigma within 5 standard deviations of P_mean (all but 6e-7 of the draws); exp() of at most 700: float64.
        low, high = (math.exp(min(self.P_mean + k * self.P_std, 700)) for k in (-5, 5))
        check_weight_range(lambda sigma: EDMLoss.weight(self, sigma), low, high,
                           f"P_mean={self.P_mean:g}, P_std={self.P_std:g}")

    def sample_sigma(self, batch, num, device):
        rnd_normal = self._randn(batch, [num, 1, 1, 1], device)
        return (rnd_normal * self.P_std + self.P_mean).exp()

    def weight(self, sigma):
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2

