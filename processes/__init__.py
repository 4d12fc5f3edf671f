"""Forward processes: how clean data becomes noisy, what the network regresses, and how a snapshot is sampled.

A process is a small object (see `processes/edm.py` for the reference one):

    name                                   its registry name, recorded in snapshots
    options() -> dict                      what else is needed to rebuild it (plain numbers, strings, lists)
    corrupt(y, noise_level, eps) -> x      training: the noisy input at a noise level (EDM: y + sigma * eps)
    target(y, x, noise_level) -> tensor    training: what the network regresses (EDM: y). DenoisingLoss calls it
                                           with these three; a target that needs eps (SPD's eps, a flow's velocity
                                           eps - y) takes `eps=None` too and is called by the loss's own __call__
    sampling                               how a snapshot is sampled, from the per-seed unit Gaussian latents
                                           generate.py draws: an object with
        prepare(net, config, device) -> plan, describe(net, config) -> str, sample(net, plan, inputs, config) -> x
                                           (config: samplers.generation.SamplerConfig, inputs: SeedInputs); EDM's
                                           GRID_SAMPLING (samplers/generation.py) samples over a sigma grid.
        A process with solvers of its own (samplers/fourier.py's FourierSampling is the example) also has
        solvers (name -> SolverEntry) and solver_for(solver, num_steps) -> name (the default), against which the
        CLIs resolve --solver/--solver-opt; refuse_grid_flags(given) (ValueError naming the sigma-grid flags as
        typed; its presence also makes the CLIs refuse --preset); learns_sigma_grids = False and why_no_ld3 (ld3.py's
        refusal); takes_guidance = False (or guidance support). Optional: record(net, config) -> dict
        (generation.json), draws_noise(net, config) -> bool.

A loss owns its process (`loss.process`); the training loop writes `process_record(loss.process)` into every
snapshot, and generate.py, fid.py --network and LD3 rebuild it with `build_process(snapshot record)`, so a snapshot
is sampled the way it was trained without any option and without a branch on the method. Pickles that record no
process (EDM's and its forks', and ours before processes existed) are EDM's scalar-sigma process.

Adding a process: a module here with its class, and one line in PROCESSES; its sampling object in samplers/ (the
process layer imports samplers, not the reverse). A network of its own (not a denoiser D(x; sigma)) is a persistent
class registered in training/snapshots.py and a --precond in training/presets.py PRECOND_CLASSES, declared by the loss
(`preconditionings`); training.preconditioning.EpsPrecond (raw output F(x; time label), c_in = 1) already serves any
process whose network predicts something from a time label. docs/design.md §6.
"""

import reprlib

from processes.edm import EDMProcess
from processes.one_step import OneStepProcess
from processes.spd import DDPMProcess, SPDProcess

PROCESSES = {
    "edm": EDMProcess,
    "spd": SPDProcess,    # Shortest Path Diffusion: VP per Fourier frequency (processes/spd.py)
    "ddpm": DDPMProcess,  # SPD's DDPM control: the same objects with one linear-beta schedule
    "one_step": OneStepProcess,
}

__all__ = ["PROCESSES", "EDMProcess", "OneStepProcess", "build_process", "process_record"]


def process_record(process) -> dict:
    """What a snapshot stores about its process: {'name': registry name, 'options': constructor options}."""
    name = getattr(process, "name", None)
    if PROCESSES.get(name) is not type(process):
        raise ValueError(f"process {process!r} is not registered in processes.PROCESSES under its name {name!r}")
    return {"name": name, "options": dict(process.options())}


def build_process(record: dict | None, source: str = "snapshot"):
    """The process a snapshot records; None (no record: EDM's and its forks' pickles) is EDM's process."""
    if record is None:
        return EDMProcess()
    if not isinstance(record, dict) or not isinstance(record.get("name"), str):
        raise ValueError(f"{source}: malformed process record {record!r} (expected {{'name': ..., 'options': ...}})")
    cls = PROCESSES.get(record["name"])
    if cls is None:
        raise ValueError(f"{source}: trained with the process {record['name']!r}, which this version does not know "
                         f"(known: {', '.join(PROCESSES)})")
    options = record.get("options") or {}
    try:
        return cls(**options)
    except TypeError as err:
        shown = reprlib.repr(options)  # bounded: a file's options may share containers at every level
        raise ValueError(f"{source}: cannot rebuild process {record['name']!r} from options {shown}: {err}") \
            from None
