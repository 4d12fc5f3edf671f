"""A one-step generator's process: EDM's scalar-sigma process, sampled by default in one call at `sigma`.

GDD (losses/gdd.py) fine-tunes an EDM denoiser into a generator G(z) = D(sigma z; sigma) with sigma = 80: the
network is still a denoiser D(x; sigma) of EDM's process (corrupt/target are EDM's, and every solver can sample it),
but what it was trained for is one evaluation at sigma. Snapshots recording this process are sampled that way by
generate.py, fid.py --network (samplers/onestep.py) when no sampler option is given.
"""

from processes.edm import EDMProcess
from samplers.onestep import OneStepSampling


class OneStepProcess(EDMProcess):
    """x = y + sigma * eps (EDM); sampled as D(sigma z; sigma) in one step unless sampler options are given."""

    name = "one_step"

    def __init__(self, sigma: float = 80.0):
        self.sigma = float(sigma)
        self.sampling = OneStepSampling(self.sigma)

    def options(self) -> dict:
        return {"sigma": self.sigma}

    def __repr__(self) -> str:
        return f"OneStepProcess(sigma={self.sigma:g})"
