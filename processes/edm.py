"""EDM's scalar-sigma process (Karras et al. 2022): x = y + sigma * eps with white Gaussian eps.

The VP, VE, iDDPM and EDM formulations are all this process seen through a preconditioning and a sigma schedule
(EDM, Table 1), so one process serves every preconditioner in training/preconditioning.py and every solver in
samplers/. The network is the denoiser D(x; sigma) the solvers speak; the prior at the first grid level
sigma_0 is N(0, sigma_0^2 I), i.e. the unit latents times sigma_0 (EDM's `latents * t_steps[0]`).
"""

import torch

from samplers.generation import GRID_SAMPLING


class EDMProcess:
    """x = y + sigma * eps; the network regresses y; sampled by the ODE/SDE solvers of samplers/ over a sigma grid."""

    name = "edm"
    sampling = GRID_SAMPLING  # generate.py, fid.py --network and LD3 sample through it

    def options(self) -> dict:
        return {}

    # Training.
    @staticmethod
    def corrupt(y: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The noisy input: y + sigma * eps (eps in y's dtype, as EDM's `y + n`)."""
        return y + eps.to(y.dtype) * sigma

    @staticmethod
    def target(y: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """What the denoiser regresses: the clean image."""
        return y

    def __repr__(self) -> str:
        return "EDMProcess()"
