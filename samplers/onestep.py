"""One-step sampling: x = D(sigma z; sigma, c), one denoiser call per image (GDD's generators; any EDM denoiser).

`OneStepSampling` is the sampling object of processes.OneStepProcess (see processes/__init__.py for the contract).
Without sampler options (a default `SamplerConfig()`: no --solver, --steps, --schedule, ... on the command line) it
calls the network once, exactly as GDD's generate.py (`one_step_sampler`): the per-seed unit latents in float64
times sigma, the network forced to fp32 (force_fp32=True), the output in float64. With any sampler option the
snapshot is sampled as any EDM denoiser, by a solver of samplers.SOLVERS over a sigma grid (GridSampling). The speed
options (--precision, --compile, --cuda-graph) are not sampler options: they keep the one step (bf16 autocast
applies to it; the call passes force_fp32, so it runs uncompiled and without a graph, as accelerated.py's calls with
keyword arguments do).
"""

import dataclasses

import torch

from samplers.generation import GRID_SAMPLING, SPEED_FIELDS, SamplerConfig, SeedInputs


class OneStepSampling:
    """D(sigma z; sigma, c) when no sampler option is given; EDM's grid sampling otherwise."""

    learns_sigma_grids = False  # LD3 learns a solver's grid; a one-step generator has none to learn.
    why_no_ld3 = ("a one-step generator, sampled in one step (LD3 learns a multi-step solver's grid from that "
                  "solver's own many-step trajectory, which a network distilled for one step is not trained to give)")
    # Guidance is a sampler option: it moves the snapshot onto a grid, where GridSampling applies it (it was refused
    # after generation.json was written, though the snapshot is an EDM denoiser like any other there).
    takes_guidance = True

    def __init__(self, sigma: float):
        self.sigma = float(sigma)

    @staticmethod
    def is_one_step(config: SamplerConfig) -> bool:
        """True when the config asks for nothing but the defaults (the command line gave no sampler option); how
        fast the denoiser is called does not count."""
        default = SamplerConfig()
        return dataclasses.replace(config, **{name: getattr(default, name) for name in SPEED_FIELDS}) == default

    @staticmethod
    def _grid(method, net, config: SamplerConfig, *args):
        """A GridSampling call; --steps=1 (a grid ending at 0 needs 2 steps) gets an error naming the one step."""
        try:
            return method(net, config, *args)
        except ValueError as err:
            if config.num_steps == 1 and config.end != "sigma_min" and "needs num_steps >= 2" in str(err):
                raise ValueError("--steps=1: a one-step snapshot samples in one step without --steps (or any other "
                                 "sampler option); for a one-step grid use --steps=1 --end=sigma_min") from None
            raise

    def prepare(self, net, config: SamplerConfig, device=None):
        if not self.is_one_step(config):
            return "grid", self._grid(GRID_SAMPLING.prepare, net, config, device)
        return "one_step", torch.tensor(self.sigma, dtype=torch.float64, device=device)

    def draws_noise(self, net, config: SamplerConfig) -> bool:
        return not self.is_one_step(config) and GRID_SAMPLING.draws_noise(net, config)

    def record(self, net, config: SamplerConfig) -> dict:
        """The resolved settings for generation.json (GridSampling.record when sampled over a grid)."""
        if not self.is_one_step(config):
            return GRID_SAMPLING.record(net, config)
        return dict(one_step_sigma=self.sigma)

    def describe(self, net, config: SamplerConfig) -> str:
        if not self.is_one_step(config):
            # Said on the Sampler line, as the one step is: a generator distilled for one step need not be a
            # denoiser at the grid's other sigmas (a consistency-distilled trial's --steps=2 gave worse than noise).
            return (f"a one-step generator (trained at sigma {self.sigma:g}) sampled over a sigma grid as an EDM "
                    f"denoiser, which it may no longer be; without sampler options it samples in one step: "
                    + self._grid(GRID_SAMPLING.describe, net, config))
        network = "fp32 network" if config.precision == "fp32" else f"network under {config.precision} autocast"
        # --compile / --cuda-graph are taken (speed options, not sampler options) but the one call passes
        # force_fp32, which accelerated.py runs eager: said here, as the run recorded compile=true without a word.
        unused = [flag for flag, on in (("--compile", config.compile), ("--cuda-graph", config.cuda_graph)) if on]
        if unused:
            verb = "do" if len(unused) > 1 else "does"
            network += f"; eager: {' and '.join(unused)} {verb} not apply to the one call (force_fp32)"
        return (f"one step: D({self.sigma:g} z; {self.sigma:g}) (float64 input, {network}); 1 NFE per image "
                f"(any sampler option samples over a sigma grid instead)")

    def sample(self, net, plan, inputs: SeedInputs, config: SamplerConfig) -> torch.Tensor:
        kind, data = plan
        if kind == "grid":
            return GRID_SAMPLING.sample(net, data, inputs, config)
        x = inputs.latents.to(torch.float64) * data
        return net(x, data, inputs.class_labels, force_fp32=True).to(torch.float64)
