"""Training-step overhead of STF (reference sets) and AOT (pool pairing) relative to plain EDM.

    python benchmarks/bench_stf_aot.py                        # CPU: DDPM++ CIFAR config, batch 8, R 1024, pool 512
    python benchmarks/bench_stf_aot.py --batch 64 --device cuda --precision bf16

Each mode runs the loop's work for one iteration on a synthetic CIFAR-sized dataset (random 32x32 RGB PNGs in an
EDM zip, read through ImageFolderDataset + InfiniteSampler + DataLoader as train.py does):
- edm: load b images, EDMLoss with AugmentPipe(p=0.12), backward, Adam;
- stf: the same with STFLoss, plus R reference images per step from the reference stream (augmented in the loss);
- aot: the same with AOTLoss, rows sliced from a pool; every N/b steps the pool is loaded, augmented, given noise and
  paired (scipy linear_sum_assignment), as the loop does.
Modes are interleaved (edm, stf, aot, edm, ...) so that load changes on a shared machine hit them alike; the median
seconds per step is reported with min-max. The pool and the reference set are also timed piece by piece.
"""

import io
import json
import os
import statistics
import sys
import tempfile
import time
import zipfile

import click
import numpy as np
import PIL.Image
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dnnlib  # noqa: E402
from losses import Batch, EDMLoss  # noqa: E402
from losses.aot import AOTLoss, assign_noise, pairwise_distances  # noqa: E402
from losses.stf import STFLoss, stf_targets  # noqa: E402
from training import training_loop as tl  # noqa: E402
from training.augment import AugmentPipe  # noqa: E402
from training.dataset import ImageFolderDataset, InfiniteSampler  # noqa: E402
from training.presets import ARCH_PRESETS  # noqa: E402

EDM = dict(class_name='losses.denoising.EDMLoss')


def write_random_dataset(path: str, num: int, resolution: int = 32, seed: int = 0) -> str:
    rnd = np.random.RandomState(seed)
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as zf:
        for idx in range(num):
            buf = io.BytesIO()
            image = rnd.randint(0, 256, size=[resolution, resolution, 3], dtype=np.uint8)
            PIL.Image.fromarray(image).save(buf, format='png', compress_level=0)
            zf.writestr(f'{idx // 1000:05d}/img{idx:08d}.png', buf.getvalue())
        zf.writestr('dataset.json', json.dumps({'labels': None}))
    return path


def loader(dataset, batch_size, seed, workers):
    sampler = InfiniteSampler(dataset, seed=seed)
    return iter(torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=batch_size, num_workers=workers,
                                            **(dict(prefetch_factor=2) if workers else {})))


def to_device(images, labels, device):
    return images.to(device).to(torch.float32) / 127.5 - 1, labels.to(device)


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


class Mode:
    """One training configuration: `step()` does one iteration's work and returns its seconds."""

    def __init__(self, name, loss_fn, net, dataset, batch, num_refs, pool_size, device, precision, workers):
        self.name, self.loss_fn, self.net, self.batch, self.device, self.precision = (
            name, loss_fn, net, batch, device, precision)
        self.augment_pipe = AugmentPipe(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
        self.optimizer = torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
        self.images = loader(dataset, pool_size or batch, 0, workers)
        self.references = loader(dataset, num_refs, 1, workers) if num_refs else None
        self.pool_size, self.pool, self.offset = pool_size, None, 0
        self.pool_seconds = []

    def next_batch(self):
        if not self.pool_size:
            return Batch(*to_device(*next(self.images), self.device))
        if self.pool is None or self.offset == self.pool_size:
            sync(self.device)
            start = time.perf_counter()
            images, labels = to_device(*next(self.images), self.device)
            self.pool = self.loss_fn.prepare_pool(Batch(images=images, labels=labels), self.augment_pipe)
            sync(self.device)
            self.pool_seconds.append(time.perf_counter() - start)
            self.offset = 0
        rows = slice(self.offset, self.offset + self.batch)
        self.offset += self.batch
        p = self.pool
        return Batch(images=p.images[rows], labels=p.labels[rows], noise=p.noise[rows],
                     augment_labels=p.augment_labels[rows])

    def step(self):
        """Seconds of one step, less any pool this step prepared (timed apart, in pool_seconds): the report adds
        the pool back amortised over its N/b steps, so it must not also sit in the step times."""
        pools_before = len(self.pool_seconds)
        sync(self.device)
        start = time.perf_counter()
        batch = self.next_batch()
        if self.references is not None:
            references, reference_labels = to_device(*next(self.references), self.device)
            batch = Batch(images=batch.images, labels=batch.labels, noise=batch.noise,
                          augment_labels=batch.augment_labels, references=references,
                          reference_labels=reference_labels)
        self.optimizer.zero_grad(set_to_none=True)
        with tl.autocast_context(self.device, self.precision):
            loss = self.loss_fn(self.net, batch, augment_pipe=self.augment_pipe)
        loss.sum().mul(1 / self.batch).backward()
        self.optimizer.step()
        sync(self.device)
        return time.perf_counter() - start - sum(self.pool_seconds[pools_before:])


def time_pieces(dataset, batch, num_refs, pool_size, device, repeats):
    """Seconds of the extra work, piece by piece (medians)."""
    pipe = AugmentPipe(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
    refs_loader = loader(dataset, num_refs, 1, 0)
    pool_loader = loader(dataset, pool_size, 2, 0)
    pieces = {k: [] for k in ('stf: load R refs', 'stf: augment R-b refs', 'stf: targets (B x R, fp64)',
                              'aot: load pool', 'aot: augment pool', 'aot: cost matrix (fp64)',
                              'aot: linear_sum_assignment', 'aot: cond 10 classes (cost + 10 solves)')}

    def timed(key, fn, *args):
        sync(device)
        start = time.perf_counter()
        out = fn(*args)
        sync(device)
        pieces[key].append(time.perf_counter() - start)
        return out

    from scipy.optimize import linear_sum_assignment
    sigma = torch.full([batch], 2.0, device=device)
    labels = torch.eye(10, device=device)[torch.arange(pool_size, device=device) % 10]
    for _ in range(repeats):
        refs, _ = timed('stf: load R refs', lambda it: to_device(*next(it), device), refs_loader)
        extra, _ = timed('stf: augment R-b refs', pipe, refs[:num_refs - batch])
        refs = torch.cat([refs[:batch], extra])
        x = refs[:batch] + 2.0 * torch.randn_like(refs[:batch])
        timed('stf: targets (B x R, fp64)', stf_targets, x, sigma, refs)
        images, _ = timed('aot: load pool', lambda it: to_device(*next(it), device), pool_loader)
        images, _ = timed('aot: augment pool', pipe, images)
        noise = torch.randn_like(images)
        cost = timed('aot: cost matrix (fp64)', lambda a, b: pairwise_distances(a, b).cpu().numpy(), images, noise)
        timed('aot: linear_sum_assignment', linear_sum_assignment, cost)
        timed('aot: cond 10 classes (cost + 10 solves)', assign_noise, images, noise, labels)
    return {k: statistics.median(v) for k, v in pieces.items()}


@click.command()
@click.option('--arch', type=click.Choice(list(ARCH_PRESETS)), default='ddpmpp', show_default=True)
@click.option('--batch', help='Per-GPU batch b', type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--refs', 'num_refs', help='STF reference set R', type=click.IntRange(min=1), default=1024,
              show_default=True)
@click.option('--pool', 'pool_size', help='AOT pool N', type=click.IntRange(min=1), default=512, show_default=True)
@click.option('--steps', help='Timed steps per mode', type=click.IntRange(min=1), default=6, show_default=True)
@click.option('--warmup', help='Untimed steps per mode first', type=click.IntRange(min=0), default=1,
              show_default=True)
@click.option('--pools', help='AOT pools to time (each N/b steps)', type=click.IntRange(min=1), default=3,
              show_default=True)
@click.option('--workers', help='DataLoader workers (train.py default: 1)', type=click.IntRange(min=0), default=1,
              show_default=True)
@click.option('--precision', type=click.Choice(list(tl.PRECISIONS)), default='fp32', show_default=True)
@click.option('--device', type=click.Choice(['cuda', 'cpu']), default=None, help='[default: cuda if available]')
@click.option('--threads', help='CPU threads (torch.set_num_threads)', type=click.IntRange(min=1), default=None)
def main(arch, batch, num_refs, pool_size, steps, warmup, pools, workers, precision, device, threads):
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if threads is not None:
        torch.set_num_threads(threads)
    if pool_size % batch:
        raise click.BadParameter(f'the pool {pool_size} must be a multiple of the batch {batch}', param_hint='--pool')
    tmp = tempfile.mkdtemp()
    dataset = ImageFolderDataset(write_random_dataset(os.path.join(tmp, 'random.zip'), 2 * max(num_refs, pool_size)),
                                 cache=True)
    torch.manual_seed(0)
    net = dnnlib.util.construct_class_by_name(class_name='training.preconditioning.EDMPrecond', img_resolution=32,
                                              img_channels=3, label_dim=0, augment_dim=9, dropout=0.13,
                                              **ARCH_PRESETS[arch]).train().requires_grad_(True).to(device)
    print(f'{arch} ({sum(p.numel() for p in net.parameters()) / 1e6:.1f} M parameters), batch {batch}, R {num_refs}, '
          f'pool {pool_size}, {device}, {precision}, {torch.get_num_threads()} threads, {workers} workers')

    pieces = time_pieces(dataset, batch, num_refs, pool_size, device, repeats=3)
    for key, seconds in pieces.items():
        print(f'  {key:<42s} {seconds * 1e3:9.1f} ms')

    modes = [Mode('edm', EDMLoss(), net, dataset, batch, 0, 0, device, precision, workers),
             Mode('stf', STFLoss(EDM, num_refs=num_refs), net, dataset, batch, num_refs, 0, device, precision,
                  workers),
             Mode('aot', AOTLoss(EDM, pool_size=pool_size), net, dataset, batch, 0, pool_size, device, precision,
                  workers)]
    times = {mode.name: [] for mode in modes}
    for _ in range(warmup):
        for mode in modes:
            mode.step()
    for _ in range(steps):
        for mode in modes:
            times[mode.name].append(mode.step())
    aot = modes[2]
    # AOT's pool work lands on one step in N/b; time more pools than the interleaved steps reached.
    while len(aot.pool_seconds) < pools + 1:
        aot.offset = aot.pool_size
        aot.next_batch()
    pool_seconds = statistics.median(aot.pool_seconds[1:])  # the first pool also warms the loader
    steps_per_pool = pool_size // batch
    aot_steps = times['aot']
    base = statistics.median(times['edm'])
    print(f'per step (median of {steps}, min-max):')
    for name in ('edm', 'stf'):
        med = statistics.median(times[name])
        print(f'  {name}: {med:7.3f} s  ({min(times[name]):.3f}-{max(times[name]):.3f})  {med / base:.3f}x edm')
    # The step times exclude pool preparation (Mode.step); the pool is added back amortised over its steps.
    aot_step = statistics.median(aot_steps)
    amortised = aot_step + pool_seconds / steps_per_pool
    print(f'  aot: {aot_step:7.3f} s  ({min(aot_steps):.3f}-{max(aot_steps):.3f}) + pool {pool_seconds:.3f} s / '
          f'{steps_per_pool} steps = {amortised:.3f} s  {amortised / base:.3f}x edm')
    # The extra work is additive, so its ratio to the plain step is less exposed to load changes than the step
    # medians above (which a shared machine can swing by 2x).
    stf_extra = pieces['stf: augment R-b refs'] + pieces['stf: targets (B x R, fp64)']
    where = 'in the DataLoader workers' if workers else 'in the main process too (--workers 0)'
    print(f'from the pieces (main-thread work; loading runs {where}): STF +{stf_extra:.3f} s/step '
          f'= {1 + stf_extra / base:.3f}x edm, +{pieces["stf: load R refs"]:.3f} s if loaded in the main process; '
          f'AOT +{pool_seconds / steps_per_pool:.4f} s/step = {1 + pool_seconds / steps_per_pool / base:.4f}x edm')


if __name__ == '__main__':
    main()
