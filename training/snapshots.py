"""Network snapshots (`network-snapshot-NNNNNN.pkl`, EDM's pickle format): what the training loop writes and what
generate.py, fid.py and LD3 read.

A snapshot is EDM's dict with our records beside it:
    ema             the EMA network (a persistent module: EDM's generate.py loads it)
    process         {'name', 'options'} of the forward process it was trained with (processes.process_record)
    loss            {'name', 'options'} of the loss config (losses.loss_record); the loss object is not pickled
    augment_pipe    the augmentation pipe (or None), as EDM
    dataset_kwargs  as EDM
EDM's own pickles (and its forks', and ours from before the records existed) have no `process`: they are read as
EDM's process, unless the network's class names another (`pickled_process`: GDD's GDDPrecond pickles are one-step
generators). They may hold a pickled `loss_fn`, which imports as our loss class of that name.

Importing this module registers the persistent classes a snapshot may hold with torch_utils.persistence (the safe
importer rebuilds them by name); a plug-in with persistent classes of its own registers its module the same way.
"""

import dataclasses
import glob
import os

import torch

import losses
import processes
from losses import aot, denoising, stf
from torch_utils import distributed as dist
from torch_utils import misc, persistence
from training import augment, networks, preconditioning, run_folder

for _module in (networks, preconditioning, augment, denoising, stf, aot):
    persistence.register_module(_module)


def save_snapshot(path: str, *, ema: torch.nn.Module, loss_kwargs: dict, process, augment_pipe=None,
                  dataset_kwargs: dict | None = None, extra: dict | None = None) -> None:
    """Write a snapshot atomically (persistence.save_network_pickle: CPU copies, eval mode, no gradients).
    extra: more plain-data entries (e.g. 'phema': the post-hoc EMA profile of a phema-*.pkl). A network holding a
    persistent class that the readers would not import (its module not registered above) is refused here, at a run's
    first snapshot, rather than by generate.py after the run."""
    for key, module in (('ema', ema), ('augment_pipe', augment_pipe)):
        missing = persistence.unregistered_classes(module) if isinstance(module, torch.nn.Module) else []
        if missing:
            raise ValueError(f"cannot write {path}: its {key} holds the persistent class(es) {', '.join(missing)}, "
                             f"which load_network_pickle would refuse: register their module with "
                             f"persistence.register_module in training/snapshots.py (docs/design.md §6, A persistent "
                             f"class)")
    persistence.save_network_pickle(path, dict(ema=ema, process=processes.process_record(process),
                                               loss=losses.loss_record(loss_kwargs), augment_pipe=augment_pipe,
                                               dataset_kwargs=dict(dataset_kwargs or {}), **(extra or {})))


@dataclasses.dataclass
class Snapshot:
    """A loaded snapshot: the EMA network, its process, and the whole imported dict (`data`)."""

    net: torch.nn.Module
    process: object
    data: dict


def read_snapshot(path_or_url: str) -> Snapshot:
    """Import a snapshot without running anything it embeds; the network stays on the CPU."""
    folder = os.path.expanduser(str(path_or_url))
    if os.path.isdir(folder):  # a run folder: name its newest snapshot
        # By kimg, not by name: from 1,000,000 kimg on (EDM's ImageNet-64 trains 2,500,000) the names have 7 digits,
        # and network-snapshot-1000000.pkl sorts before network-snapshot-999000.pkl.
        snapshots = sorted(glob.glob(os.path.join(glob.escape(folder), 'network-snapshot-*.pkl')),
                           key=lambda path: (run_folder.file_kimg(path) or -1, path))
        hint = f'; its newest snapshot is {snapshots[-1]}' if snapshots else ' (it holds no network-snapshot-*.pkl)'
        raise persistence.NetworkPickleError(f'{path_or_url} is a folder, not a network pickle{hint}')
    data = persistence.load_network_pickle(path_or_url)
    if 'ema' not in data:
        raise persistence.NetworkPickleError(f"{path_or_url}: no 'ema' network in the pickle "
                                             f"(keys: {', '.join(map(str, data))})")
    record = data.get('process')
    if record is None and getattr(type(data['ema']), 'process_required', False):
        raise persistence.NetworkPickleError(
            f"{path_or_url}: the network is {type(data['ema']).__name__}, which samples only with the forward process "
            f"it was trained with (its schedule is not in the network), but the pickle has no 'process' record "
            f"(train.py writes one into every snapshot; was the pickle re-saved without it?)")
    if record is None:  # EDM's process, unless the network's class names the one its pickles use (GDDPrecond).
        record = getattr(type(data['ema']), 'pickled_process', None)
    try:
        process = processes.build_process(record, source=str(path_or_url))
    except ValueError as err:
        raise persistence.NetworkPickleError(str(err)) from None
    reconstruction = data.get('phema')
    if isinstance(reconstruction, dict) and 'reconstructed_from' in reconstruction and 'misfit' not in reconstruction:
        # phema.py before 2026-12-01 21:17 left the least-squares coefficients as they came (summing to 0.82-1.01),
        # so every weight of its reconstructions is scaled; they sampled and were measured (fid.py --network=RUN_DIR
        # takes network-phema-*.pkl) without a word. Their record has no misfit, which every later one has (the
        # EMAs a run saves, phema-*.pkl, record neither).
        raise persistence.NetworkPickleError(
            f"{path_or_url}: a post-hoc EMA reconstructed by phema.py before 2026-12-01, whose coefficients did not "
            f"sum to 1 (every weight is scaled by their sum); reconstruct it again: python phema.py --run=RUN_DIR "
            f"--std={reconstruction.get('std')} --at={reconstruction.get('kimg')}")
    bad = misc.count_nonfinite(data['ema'])
    if bad:  # A diverged run's weights: sampling it would give black images without a word.
        total = sum(t.numel() for t in (*data['ema'].parameters(), *data['ema'].buffers()) if t.is_floating_point())
        raise persistence.NetworkPickleError(f"{path_or_url}: the network has {bad:,} non-finite values (NaN or inf) "
                                             f"among its {total:,} weights; it comes from a diverged run")
    return Snapshot(net=data['ema'], process=process, data=data)


def load_snapshot(path_or_url: str, device=None) -> Snapshot:
    """`read_snapshot` on every rank, rank 0 first (it downloads a URL into the cache once), as EDM; the network is
    moved to `device` in eval mode without gradients."""
    if dist.get_rank() != 0:
        dist.barrier()
    dist.print0(f'Loading network from "{path_or_url}"...')
    try:
        snapshot = read_snapshot(path_or_url)
    finally:
        if dist.get_rank() == 0:
            dist.barrier()
    snapshot.net = snapshot.net.eval().requires_grad_(False)
    if device is not None:
        snapshot.net = snapshot.net.to(device)
    return snapshot


def load_network(path_or_url: str, device) -> torch.nn.Module:
    """The EMA network of a snapshot on `device`, ready to sample (`load_snapshot(...).net`)."""
    return load_snapshot(path_or_url, device).net
