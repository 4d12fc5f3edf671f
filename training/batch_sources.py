"""Where a training iteration's data comes from: batch sources.

The loop asks its source for the next iteration's rounds (`next_rounds() -> list[Batch]`, one Batch of batch_gpu
images per accumulation round) and stores `state_dict()` in training states; that is all it knows about data.
EDM's source is `StreamSource`: the rank's share of InfiniteSampler's stream. A loss that needs data shaped
differently brings its own source by wrapping the one it is given (`loss.batch_source(data, inner)`): STF adds a
reference set from an independent stream (losses/stf.py), AOT reads pools and pairs them with noise (losses/aot.py).

A source is built once, after the networks and the loss and before the training state's RNG states are restored,
and it resumes from `data.resume` (the positions a previous run's `state_dict()` saved): building one may create
DataLoader iterators, which draw from the global torch RNG, exactly where the original loop did.
"""

import dataclasses
import multiprocessing
import multiprocessing.resource_tracker
import signal
import weakref

import torch

from losses.base import Batch
from torch_utils import distributed as dist
from training.dataset import InfiniteSampler


def _loader_worker_ignores_stop_signals(worker_id: int) -> None:
    """A scheduler's SIGTERM reaches every process of the job, and Ctrl-C's SIGINT every process of the terminal's
    foreground group: a loader worker that died of either would fail the training process's next batch before it
    could save (torch_utils.distributed.stop_on_signals). The workers end with their parent instead (torch's loader
    watches it)."""
    del worker_id
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # blocked since its start (DataContext.stream)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_worker_iterators = weakref.WeakSet()  # the live iterators stream() made whose workers ignore the stop signals


def worker_iterators() -> set:
    """The loader iterators with stop-signal-ignoring workers that are alive now (see shut_down_workers)."""
    return set(_worker_iterators)


def shut_down_workers(keep=()) -> None:
    """End the workers of the iterators stream() made (but those in `keep`) now, as their iterator's deletion would.
    A worker that ignores SIGTERM outlives torch's fallbacks: when a run fails in a process that goes on (a notebook,
    a sweep script keeping the error, whose traceback holds the iterator) and the iterator is later freed by the cycle
    collector, the queue that would carry its stop message is closed first; torch then sends SIGTERM, ignored, and at
    the process's exit multiprocessing terminates and joins it: the script never ended."""
    for iterator in worker_iterators() - set(keep):
        shut_down = getattr(iterator, '_shutdown_workers', None)  # what torch's iterator runs when deleted
        if shut_down is not None:
            shut_down()
        _worker_iterators.discard(iterator)


@dataclasses.dataclass
class DataContext:
    """What a batch source may use: the rank's view of the dataset and of the batch layout, and the resume point."""

    dataset: torch.utils.data.Dataset
    rank: int
    world_size: int
    seed: int
    batch_gpu: int                 # images per accumulation round on this rank
    num_rounds: int                # accumulation rounds per iteration
    device: torch.device
    loader_kwargs: dict            # DataLoader options (workers, pinning)
    augment_pipe: object = None    # the run's augmentation pipe (None without augmentation)
    resume: dict = dataclasses.field(default_factory=dict)  # saved state_dict() of the source, {} for a fresh run

    @property
    def batch_gpu_total(self) -> int:
        """Images per rank and iteration."""
        return self.batch_gpu * self.num_rounds

    def stream(self, *, seed: int, start_idx: int, batch_size: int, resume_from: dict | None = None) -> "SamplerStream":
        """A DataLoader iterator over the rank's share of an InfiniteSampler stream, from its start_idx-th draw
        (replayed from `resume_from`, a resume point of the same stream saved in the training state, where it fits)."""
        sampler = InfiniteSampler(dataset=self.dataset, rank=self.rank, num_replicas=self.world_size, seed=seed,
                                  start_idx=start_idx, resume_from=resume_from)
        return SamplerStream(self._iterate(sampler, batch_size), sampler)

    def _iterate(self, sampler: InfiniteSampler, batch_size: int):
        kwargs = dict(self.loader_kwargs)
        if kwargs.get('num_workers', 0) > 0:
            kwargs.setdefault('worker_init_fn', _loader_worker_ignores_stop_signals)
        loader = torch.utils.data.DataLoader(dataset=self.dataset, sampler=sampler, batch_size=batch_size, **kwargs)
        if kwargs.get('worker_init_fn') is not _loader_worker_ignores_stop_signals:
            return iter(loader)
        # A spawned worker takes seconds to import torch before worker_init_fn runs: a SIGINT/SIGTERM to the whole
        # job then killed it, and the next batch failed the run ("DataLoader worker is killed by signal") before it
        # could write its state. Started with the stop signals blocked (workers inherit the mask), a worker keeps
        # them pending until worker_init_fn ignores and unblocks them; this process gets its own copy at the unblock.
        # multiprocessing's resource tracker unblocks both in this process when the first spawned child starts it:
        # started here first, it leaves the mask alone.
        if (loader.multiprocessing_context or multiprocessing.get_context()).get_start_method() != 'fork':
            multiprocessing.resource_tracker.ensure_running()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            iterator = iter(loader)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        _worker_iterators.add(iterator)
        return iterator

    def to_batch(self, images: torch.Tensor, labels: torch.Tensor) -> Batch:
        """uint8 images from the dataset -> a Batch on the device, images in [-1, 1] (EDM's / 127.5 - 1). The copies
        are non-blocking: from the DataLoader's pinned memory they do not wait for the device (no host sync)."""
        return Batch(images=images.to(self.device, non_blocking=True).to(torch.float32) / 127.5 - 1,
                     labels=labels.to(self.device, non_blocking=True))


class SamplerStream:
    """DataContext.stream's iterator of (images, labels) batches; resume_point(draw) is its sampler's (what a
    training state keeps so that a resume does not replay the stream from the run's start)."""

    def __init__(self, iterator, sampler: InfiniteSampler):
        self._iterator, self.sampler = iterator, sampler

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._iterator)

    def resume_point(self, draw: int) -> dict | None:
        return self.sampler.resume_point(draw)


class StreamSource:
    """EDM's data: each round, the next batch_gpu images of the rank's stream (InfiniteSampler, seeded by the run's
    seed). State: 'data_position', the global number of images consumed (rank r resumes at data_position / world)."""

    def __init__(self, data: DataContext):
        self.data = data
        self._resume_from = data.resume.get('data_stream_resume_point')  # also for a seek (AOT's pools)
        position = int(data.resume.get('data_position', 0))
        if position % data.world_size != 0:
            dist.warn0(f'data position {position} is not a multiple of {data.world_size} ranks; rounding down',
                          stacklevel=2)
        self.seek(position // data.world_size)

    def seek(self, position: int) -> None:
        """Restart the rank's stream at its `position`-th image (images already read are read again)."""
        self.position = int(position)
        self._iterator = self.data.stream(seed=self.data.seed, start_idx=self.position,
                                          batch_size=self.data.batch_gpu, resume_from=self._resume_from)

    def next_rounds(self) -> list[Batch]:
        rounds = [self.data.to_batch(*next(self._iterator)) for _ in range(self.data.num_rounds)]
        self.position += self.data.batch_gpu_total
        return rounds

    def resume_point(self, draw: int) -> dict | None:
        """The stream's newest resume point at or before global draw `draw`."""
        return self._iterator.resume_point(draw)

    def state_dict(self) -> dict:
        position = self.position * self.data.world_size
        return {'data_position': position, 'data_stream_resume_point': self.resume_point(position)}
