"""Forward processes: how clean data becomes noisy, what the network regresses, and how a snapshot is sampled.

A process is a small object (see `processes/edm.py` for the reference one):

    name                                   its registry name, recorded in snapshots
    options() -> dict                      what else is needed to rebuild it (plain numbers, strings, lists)
    corrupt(y, noise_level, eps) -> x      training: the noisy input at a noise level (EDM: y + sigma * eps)
    target(y, x, noise_level) -> tensor    training: what the network regresses (EDM: y)
    solvers                                the solver registry (name -> SolverEntry) that samples it
    sample(net, latents, class_labels, plan, randn_like) -> images, and prepare(net, config, device) -> plan:
                                           sampling, from the per-seed unit Gaussian latents generate.py draws

A loss owns its process (`loss.process`); the training loop writes `process_record(loss.process)` into every
snapshot, and generate.py, fid.py --network and LD3 rebuild it with `build_process(snapshot record)`, so a snapshot
is sampled the way it was trained without any option and without a branch on the method. Pickles that record no
process (EDM's and its forks', and ours before processes existed) are EDM's scalar-sigma process.

Adding a process: a module here with its class, and one line in PROCESSES.
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
