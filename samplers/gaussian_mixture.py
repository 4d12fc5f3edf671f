"""Closed-form testbeds: distributions whose exact denoiser is cheap, so solvers and learned grids are measured against
the exact probability-flow ODE without a network (tests, benchmarks/bench_samplers.py, benchmarks/bench_ld3.py).

- GaussianMixture: the smooth, multi-scale testbed on which solvers are ranked (docs/solvers.md, "The
  Gaussian-mixture testbed").
- PointSet: the ideal denoiser of a finite point set, a memorising, multi-modal stress test of another character
  (the posterior collapses onto one point; do not rank solvers on it).
"""


import torch


class GaussianMixture:
    """sum_k N(mu_k, diag(var_k)) / K: d = 64, K = 16, means 0.4 N(0, I), per-component diagonal variances
    0.25 j^-1.5 (j = 1..d) randomly permuted, so the ODE has structure at every sigma from ~5 down to ~0.02, as images.

    Called as a denoiser, D(x; sigma) = E[y | y + sigma n = x] in closed form, differentiable in x and sigma (LD3)."""

    def __init__(self, dim: int = 64, components: int = 16, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.means = 0.4 * torch.randn(components, dim, generator=gen, dtype=torch.float64)
        spectrum = 0.25 * torch.arange(1, dim + 1, dtype=torch.float64) ** -1.5
        self.variances = torch.stack([spectrum[torch.randperm(dim, generator=gen)] for _ in range(components)])

    def log_likelihoods(self, x: torch.Tensor, sigma):
        """log N(x; mu_k, var_k + sigma^2) up to a constant [B, K], and the differences and variances it used."""
        var = self.variances + torch.as_tensor(sigma, dtype=torch.float64) ** 2  # [K, d]
        diff = x[:, None, :] - self.means  # [B, K, d]
        return -0.5 * ((diff**2 / var).sum(-1) + var.log().sum(-1)), diff, var

    def __call__(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        log_p, diff, var = self.log_likelihoods(x, sigma)
        responsibilities = torch.softmax(log_p, dim=1)
        return (responsibilities[:, :, None] * (self.means + self.variances / var * diff)).sum(1)

    def component(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """The most likely component of each sample of noise level sigma (its mode, for the mode-switch rate)."""
        return self.log_likelihoods(x, sigma)[0].argmax(1)


class PointSet:
    """The ideal denoiser of M points in d dimensions: D(x; sigma) = sum_m w_m y_m with w = softmax_m(-|x - y_m|^2 /
    (2 sigma^2)), the exact posterior mean of the empirical distribution (a network that memorised its training set).

    Points: y = Q diag(s) z with z ~ N(0, I), Q a random rotation and an image-like power-law spectrum s_j^2 ∝ j^-1
    (j = 1..d), scaled to a data RMS of 0.4 per coordinate (as GaussianMixture). Defaults: M = 512, d = 64. Squared
    distances are computed as |x|^2 - 2 x.y + |y|^2 (one matmul, no [B, M, d] tensor); in float64 the cancellation
    costs ~1e-14 in the logits at sigma_min = 0.002, far below what matters."""

    def __init__(self, num_points: int = 512, dim: int = 64, seed: int = 0, exponent: float = 1.0, rms: float = 0.4):
        gen = torch.Generator().manual_seed(seed)
        spectrum = torch.arange(1, dim + 1, dtype=torch.float64) ** -exponent
        spectrum *= rms**2 * dim / spectrum.sum()
        rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
        latent = torch.randn(num_points, dim, generator=gen, dtype=torch.float64)
        self.points = (latent * spectrum.sqrt()) @ rotation.T  # [M, d]
        self.square_norms = self.points.square().sum(1)  # [M]

    def log_weights(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """Unnormalised log posterior weights of the points [B, M]."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        square_distances = x.square().sum(1, keepdim=True) - 2 * x @ self.points.T + self.square_norms
        return -square_distances / (2 * sigma**2)

    def __call__(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        return torch.softmax(self.log_weights(x, sigma), dim=1) @ self.points

    def component(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """The nearest point of each sample (its mode, for the mode-switch rate)."""
        return self.log_weights(x, sigma).argmax(1)
