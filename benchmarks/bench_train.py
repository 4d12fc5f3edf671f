"""Training-step speed of the CIFAR-10 configs: EDMPrecond + EDMLoss + AugmentPipe(p=0.12) forward, backward, Adam.

    python benchmarks/bench_train.py                                # CPU, batch 8, DDPM++ and NCSN++
    python benchmarks/bench_train.py --batch 64,128,256,512 --precision bf16 --compile 1   # on a GPU

Prints seconds per training step (median over --steps after --warmup) and images/s per (arch, batch). CPU
timings are only comparable on an idle machine.
"""

import os
import statistics
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dnnlib  # noqa: E402
from losses import Batch, EDMLoss  # noqa: E402
from samplers.generation import parse_int_list  # noqa: E402
from training import training_loop as tl  # noqa: E402
from training.augment import AugmentPipe  # noqa: E402
from training.presets import ARCH_PRESETS  # noqa: E402


def build(arch: str, resolution: int, channels: int, device: torch.device, fp16: bool):
    net = dnnlib.util.construct_class_by_name(class_name='training.preconditioning.EDMPrecond',
                                              img_resolution=resolution, img_channels=channels, label_dim=0,
                                              augment_dim=9, dropout=0.13, use_fp16=fp16, **ARCH_PRESETS[arch])
    return net.train().requires_grad_(True).to(device)


def time_steps(net, batch_size, resolution, channels, device, precision, compile_net, steps, warmup):
    """Median seconds per step of EDM's training step; the images are fixed random tensors."""
    loss_fn = EDMLoss()
    augment_pipe = AugmentPipe(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    scaler = torch.amp.GradScaler(device.type) if precision == 'fp16' else None
    forward = torch.compile(net) if compile_net else net
    images = torch.rand([batch_size, channels, resolution, resolution], device=device) * 2 - 1
    labels = torch.zeros([batch_size, 0], device=device)
    times = []
    for step in range(warmup + steps):
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with tl.autocast_context(device, precision):
            loss = loss_fn(forward, Batch(images, labels), augment_pipe=augment_pipe)
        loss = loss.sum().mul(1 / batch_size)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), max(times)


@click.command()
@click.option('--arch', help='Architectures', type=str, default='ddpmpp,ncsnpp', show_default=True)
@click.option('--batch', help='Batch sizes', type=parse_int_list, default='8', show_default=True)
@click.option('--precision', type=click.Choice(list(tl.PRECISIONS)), default='fp32', show_default=True)
@click.option('--fp16', help="EDM's fp16 network (CUDA)", type=bool, default=False, show_default=True)
@click.option('--compile', 'compile_net', help='torch.compile the network', type=bool, default=False,
              show_default=True)
@click.option('--device', type=click.Choice(['cuda', 'cpu']), default=None, help='[default: cuda if available]')
@click.option('--steps', help='Timed steps', type=click.IntRange(min=1), default=5, show_default=True)
@click.option('--warmup', help='Untimed steps first', type=click.IntRange(min=0), default=2, show_default=True)
@click.option('--threads', help='CPU threads (torch.set_num_threads)', type=click.IntRange(min=1), default=None)
@click.option('--tf32', help='Allow TF32 (EDM: off)', type=bool, default=False, show_default=True)
@click.option('--resolution', help='Image size', type=int, default=32, show_default=True)
@click.option('--channels', help='Image channels', type=int, default=3, show_default=True)
def main(arch, batch, precision, fp16, compile_net, device, steps, warmup, threads, tf32, resolution, channels):
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if threads is not None:
        torch.set_num_threads(threads)
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.manual_seed(0)
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'
    print(f'# {where}; torch {torch.__version__}; precision {precision}, fp16 net {fp16}, compile {compile_net}, '
          f'tf32 {tf32}; {resolution}x{resolution}x{channels}; median of {steps} steps after {warmup}')
    print(f"{'arch':<8} {'params':>11} {'batch':>6} {'s/step':>9} {'min':>8} {'max':>8} {'img/s':>9} {'peak GB':>8}")
    for name in arch.split(','):
        net = build(name, resolution, channels, device, fp16)
        num_params = sum(p.numel() for p in net.parameters())
        for batch_size in batch:
            if device.type == 'cuda':
                torch.cuda.reset_peak_memory_stats(device)
            median, fastest, slowest = time_steps(net, batch_size, resolution, channels, device, precision,
                                                  compile_net, steps, warmup)
            peak = f'{torch.cuda.max_memory_allocated(device) / 2**30:.2f}' if device.type == 'cuda' else 'n/a'
            print(f'{name:<8} {num_params:>11,} {batch_size:>6} {median:>9.3f} {fastest:>8.3f} {slowest:>8.3f} '
                  f'{batch_size / median:>9.1f} {peak:>8}', flush=True)
        del net


if __name__ == '__main__':
    main()
