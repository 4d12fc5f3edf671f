"""Denoising score-matching losses of EDM (Karras et al. 2022, Table 1): VPLoss, VELoss, EDMLoss.

Each loss draws a noise level sigma per image, noises the (augmented) clean image y and returns the per-element
loss weight(sigma) * (D(y + sigma * eps; sigma) - target)^2, image-shaped. The training loop reduces it.
The three losses differ only in the sigma sampler and the weight; they share `DenoisingLoss`, whose hooks
(`sample_sigma`, `weight`, `target`, `noise`) are what later plug-ins override: STF changes the target, AOT
supplies paired noise through `batch.noise`.

Randomness: `batch.random` (a per-image generator, see losses/__init__.py) if the loop gives one, else the global
torch RNG in EDM's order (sigma draw, augmentation, noise draw).

Persistence constraint: snapshots pickle the loss object with this module's source, and EDM's generate.py executes
that source when unpickling, so this file imports only torch and torch_utils.persistence (numpy would be allowed).
"""

import torch

from torch_utils import persistence


class DenoisingLoss:
    """Shared base: loss = weight(sigma) * (D(y + n; sigma) - target)^2 per element, n = sigma * eps.

    Subclasses define `sample_sigma` and `weight`. The loss is called as `loss(net, batch, augment_pipe)`, where
    `batch` has `images` (float32 [N,C,H,W] in [-1,1]), `labels`, and optionally `noise` (unit Gaussian epsilon),
    `augment_labels` (images already augmented) and `random` (per-image generator).
    """

    def data_requirements(self) -> dict:
        """What the loss needs from the data besides images and labels (STF: references, AOT: a pool); none here."""
        return {}

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

    def noise(self, batch, y, sigma) -> torch.Tensor:
        """n = sigma * eps, eps from `batch.noise` when given (AOT's paired noise), else fresh N(0, I)."""
        eps = batch.noise if getattr(batch, 'noise', None) is not None else self._randn(batch, y.shape, y.device)
        return eps.to(y.dtype) * sigma

    def target(self, batch, y, x, sigma) -> torch.Tensor:
        """What D regresses: the clean image (STF replaces it with a reference-weighted mean)."""
        return y

    def __call__(self, net, batch, augment_pipe=None) -> torch.Tensor:
        sigma = self.sample_sigma(batch, batch.images.shape[0], batch.images.device)
        weight = self.weight(sigma)
        y, augment_labels = self.augment(batch, augment_pipe)
        x = y + self.noise(batch, y, sigma)
        D_x = net(x, sigma, batch.labels, augment_labels=augment_labels)
        return weight * ((D_x - self.target(batch, y, x, sigma)) ** 2)


@persistence.persistent_class
class VPLoss(DenoisingLoss):
    """Variance-preserving loss (Song et al. 2021): t ~ U(epsilon_t, 1), sigma = sigma_VP(t), weight 1/sigma^2."""

    def __init__(self, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5):
        self.beta_d = float(beta_d)
        self.beta_min = float(beta_min)
        self.epsilon_t = float(epsilon_t)

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

    def sample_sigma(self, batch, num, device):
        rnd_normal = self._randn(batch, [num, 1, 1, 1], device)
        return (rnd_normal * self.P_std + self.P_mean).exp()

    def weight(self, sigma):
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2

