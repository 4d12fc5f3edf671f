"""A Gaussian mixture with its exact denoiser: the CPU testbed on which solvers and learned grids are measured against
the exact probability-flow ODE (tests, benchmarks/bench_samplers.py, benchmarks/bench_ld3.py). See docs/solvers.md,
"The Gaussian-mixture testbed"."""

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
