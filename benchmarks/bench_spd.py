"""SPD's cost per training step: the Fourier corruption (two forward FFTs and one inverse per batch) against a whole
training step (forward + backward + Adam) of the same network with EDM's loss, at CIFAR-10 size.

    python benchmarks/bench_spd.py [--batch 16] [--arch ddpmpp] [--repeats 3] [--device cpu] [--threads 1]

Prints one JSON line holding every measurement: the mean seconds of SPD's `process.corrupt` (the FFT work), of a full
SPD step and of a full EDM step, and the FFT share of the SPD step (the issue asks for < 5 % on CPU).
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

import dnnlib  # noqa: E402
from losses import Batch  # noqa: E402
from losses.denoising import EDMLoss  # noqa: E402
from losses.spd import SPDLoss  # noqa: E402
from training.presets import ARCH_PRESETS, PRECOND_CLASSES  # noqa: E402


def _timed(fn, repeats, device):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sum(times) / len(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].replace('\n', ' '),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--batch', type=int, default=16, help='Images per step (32x32, 3 channels)')
    parser.add_argument('--arch', default='ddpmpp', choices=list(ARCH_PRESETS), help='Network family')
    parser.add_argument('--repeats', type=int, default=3, help='Timed steps per loss (after one warm-up)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cpu or cuda')
    parser.add_argument('--threads', type=int, default=None, help="CPU threads (None: torch's own count)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    images = torch.rand(args.batch, 3, 32, 32, device=device) * 2 - 1
    batch = Batch(images=images, labels=torch.zeros(args.batch, 0, device=device))
    spd = SPDLoss()
    t = torch.randint(0, 4000, [args.batch, 1, 1, 1], device=device)
    eps = torch.randn_like(images)
    corrupt = _timed(lambda: spd.process.corrupt(images, t, eps), args.repeats * 10, device)

    results = {}
    for name, loss_fn, precond in (('spd', spd, 'eps'), ('edm', EDMLoss(), 'edm')):
        kwargs = dict(ARCH_PRESETS[args.arch], class_name=PRECOND_CLASSES[precond], dropout=0.0)
        net = dnnlib.util.construct_class_by_name(**kwargs, img_resolution=32, img_channels=3,
                                                  label_dim=0).to(device).train()
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)

        def step(net=net, loss_fn=loss_fn, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(net, batch).sum().backward()
            optimizer.step()
        results[name] = _timed(step, args.repeats, device)
    print(json.dumps(dict(device=str(device), arch=args.arch, batch=args.batch, threads=torch.get_num_threads(),
                          spd_corrupt_s=corrupt, spd_step_s=results['spd'], edm_step_s=results['edm'],
                          fft_share_of_spd_step=corrupt / results['spd'],
                          spd_over_edm_step=results['spd'] / results['edm'])))


if __name__ == '__main__':
    main()
