"""Train diffusion-based generative models (EDM's train.py options and defaults, plus plug-in losses).

Examples:

\b
  # CIFAR-10 class-conditional DDPM++ with EDM preconditioning, 8 GPUs:
  torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs \\
      --data=datasets/cifar10-32x32.zip --cond=1 --arch=ddpmpp
\b
  # A tiny network on CPU (network size: --cbase, --cres, and the hidden --blocks / --attn):
  python train.py --outdir=runs --data=digits.zip --batch=32 --cbase=16 --cres=1,2 --blocks=1 --attn=4 \\
      --duration=0.01 --tick=1 --lr-rampup=1 --device=cpu
\b
  # CIFAR-10 uncond NCSN++ with STF targets (Newbeeer/stf: 1024 references per GPU), 8 GPUs:
  torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs \\
      --data=datasets/cifar10-32x32.zip --cond=0 --arch=ncsnpp --stf=1 --stf-refs=1024
\b
  # CIFAR-10 uncond NCSN++ with AOT pairing (large-scale-kim/EDM-AOT: batch 256 on 4 GPUs, pool 512 per GPU):
  torchrun --standalone --nproc_per_node=4 train.py --outdir=training-runs \\
      --data=datasets/cifar10-32x32.zip --cond=0 --arch=ncsnpp --batch=256 --aot=512

Additions to EDM's options: --loss (registry name; default follows --precond) and --loss-opt KEY=VALUE for its
constructor options, the plug-ins --stf/--stf-refs/--stf-mask-classes (STF targets) and --aot (AOT noise pairing),
which compose with each other and with the edm, vp and ve losses, --precision fp32|bf16|fp16 (torch.autocast;
fp16 adds a GradScaler), --compile, --device, --rng image|rank, --lr-rampup; hidden: --blocks (num_blocks) and
--attn (attn_resolutions) for tiny networks. --workers accepts 0 (load in the main process). --resume takes EDM's
training states (approximate resume through the safe pickle importer) and ours (exact resume; its seed is reused
unless --seed is given).
"""

import json
import os
import re
import secrets
import warnings

import click
import torch

import dnnlib
import losses
from losses.aot import aot_loss_kwargs
from losses.stf import stf_loss_kwargs
from torch_utils import distributed as dist
from training import training_loop

ARCH_PRESETS = {
    'ddpmpp': dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                   decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
                   channel_mult=[2, 2, 2]),
    'ncsnpp': dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
                   channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2]),
    'adm': dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4]),
}
PRECOND_CLASSES = {'vp': 'training.preconditioning.VPPrecond', 've': 'training.preconditioning.VEPrecond',
                   'edm': 'training.preconditioning.EDMPrecond'}


def parse_int_list(s):
    """'1,2,5-10' -> [1, 2, 5, 6, 7, 8, 9, 10]; lists pass through."""
    if isinstance(s, list):
        return s
    ranges = []
    range_re = re.compile(r'^(\d+)-(\d+)$')
    for p in s.split(','):
        p = p.strip()
        m = range_re.match(p)
        if m:
            ranges.extend(range(int(m.group(1)), int(m.group(2)) + 1))
        elif p:
            try:
                ranges.append(int(p))
            except ValueError:
                raise click.BadParameter(f'expected a comma-separated list of integers, got {s!r}') from None
    return ranges


def _run_dir(outdir: str, desc: str, nosubdir: bool) -> str:
    """EDM's naming: {id:05d}-{desc}, id = 1 + the largest numeric prefix among the directories in outdir."""
    if nosubdir:
        return outdir
    prev_run_ids = []
    if os.path.isdir(outdir):
        for name in os.listdir(outdir):
            match = re.match(r'^\d+', name)
            if match and os.path.isdir(os.path.join(outdir, name)):
                prev_run_ids.append(int(match.group()))
    return os.path.join(outdir, f'{max(prev_run_ids, default=-1) + 1:05d}-{desc}')


def build_config(opts: dnnlib.EasyDict, world_size: int) -> tuple[dnnlib.EasyDict, str]:
    """Loop kwargs from the CLI options (EDM's train.py logic) and the run-dir description."""
    c = dnnlib.EasyDict()
    c.dataset_kwargs = dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=opts.data,
                                       use_labels=opts.cond, xflip=opts.xflip, cache=opts.cache)
    c.data_loader_kwargs = dnnlib.EasyDict(num_workers=opts.workers)
    if opts.workers > 0:
        c.data_loader_kwargs.prefetch_factor = 2
    if opts.device == 'cuda':
        c.data_loader_kwargs.pin_memory = True
    c.network_kwargs = dnnlib.EasyDict()
    c.loss_kwargs = dnnlib.EasyDict()
    c.optimizer_kwargs = dnnlib.EasyDict(class_name='torch.optim.Adam', lr=opts.lr, betas=[0.9, 0.999], eps=1e-8)

    # Validate the dataset and fill in its resolution and size, as EDM.
    try:
        dataset_obj = dnnlib.util.construct_class_by_name(**c.dataset_kwargs)
    except (OSError, ValueError) as err:
        raise click.ClickException(f'--data: {err}') from err
    dataset_name = dataset_obj.name
    c.dataset_kwargs.resolution = dataset_obj.resolution
    c.dataset_kwargs.max_size = len(dataset_obj)
    if opts.cond and not dataset_obj.has_labels:
        raise click.ClickException('--cond=True requires labels specified in dataset.json')
    del dataset_obj

    # Network architecture, preconditioning and loss.
    c.network_kwargs.update(ARCH_PRESETS[opts.arch])
    c.network_kwargs.class_name = PRECOND_CLASSES[opts.precond]
    loss_name = opts.loss if opts.loss is not None else losses.DEFAULT_LOSS_FOR_PRECOND[opts.precond]
    try:
        c.loss_kwargs = losses.loss_kwargs(loss_name, losses.parse_loss_options(loss_name, opts.loss_opt))
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint='--loss-opt') from err
    if not opts.stf and (opts.stf_refs is not None or opts.stf_mask_classes is not None):
        raise click.UsageError('--stf-refs and --stf-mask-classes need --stf=1')
    stf_refs = opts.stf_refs if opts.stf_refs is not None else 1024
    if opts.stf:
        c.loss_kwargs = stf_loss_kwargs(c.loss_kwargs, num_refs=stf_refs,
                                        mask_classes=opts.stf_mask_classes is not False)
    if opts.aot is not None:
        c.loss_kwargs = aot_loss_kwargs(c.loss_kwargs, pool_size=opts.aot)
    if opts.cbase is not None:
        c.network_kwargs.model_channels = opts.cbase
    if opts.cres is not None:
        c.network_kwargs.channel_mult = opts.cres
    if opts.blocks is not None:
        c.network_kwargs.num_blocks = opts.blocks
    if opts.attn is not None:
        c.network_kwargs.attn_resolutions = opts.attn
    if opts.augment:
        c.augment_kwargs = dnnlib.EasyDict(class_name='training.augment.AugmentPipe', p=opts.augment)
        c.augment_kwargs.update(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
        c.network_kwargs.augment_dim = 9
    c.network_kwargs.update(dropout=opts.dropout, use_fp16=opts.fp16)

    # Batch accounting, checked here so the error names the options.
    if opts.batch % world_size != 0:
        raise click.BadParameter(f'{opts.batch} is not divisible by the number of processes ({world_size})',
                                 param_hint='--batch')
    if opts.batch_gpu is not None and (opts.batch // world_size) % min(opts.batch_gpu, opts.batch // world_size):
        raise click.BadParameter(f'the per-process batch {opts.batch // world_size} (--batch {opts.batch} / '
                                 f'{world_size} processes) is not a multiple of {opts.batch_gpu}',
                                 param_hint='--batch-gpu')
    batch_per_gpu = opts.batch // world_size
    if opts.aot is not None and opts.aot % batch_per_gpu != 0:
        raise click.BadParameter(f'the pool of {opts.aot} images per GPU must be a multiple of the per-GPU batch per '
                                 f'step, {batch_per_gpu} (--batch {opts.batch} / {world_size} processes)',
                                 param_hint='--aot')
    micro_batch = min(opts.batch_gpu or batch_per_gpu, batch_per_gpu)
    if opts.stf and stf_refs < micro_batch:
        raise click.BadParameter(f'the reference set of {stf_refs} images per GPU must hold the per-GPU micro-batch '
                                 f'of {micro_batch} images', param_hint='--stf-refs')

    # Training options.
    c.total_kimg = max(int(opts.duration * 1000), 1)
    c.ema_halflife_kimg = int(opts.ema * 1000)
    c.lr_rampup_kimg = opts.lr_rampup
    c.update(batch_size=opts.batch, batch_gpu=opts.batch_gpu)
    c.update(loss_scaling=opts.ls, cudnn_benchmark=opts.bench)
    c.update(kimg_per_tick=opts.tick, snapshot_ticks=opts.snap, state_dump_ticks=opts.dump)
    c.update(precision=opts.precision, compile=opts.compile, rng=opts.rng, device=opts.device)

    # Random seed.
    if opts.seed is not None:
        c.seed = opts.seed
    else:
        c.seed = dist.broadcast_object(secrets.randbelow(1 << 31) if dist.get_rank() == 0 else None)

    # Transfer learning and resume.
    if opts.transfer is not None:
        if opts.resume is not None:
            raise click.UsageError('--transfer and --resume cannot be specified at the same time')
        c.resume_pkl = opts.transfer
        c.ema_rampup_ratio = None
    elif opts.resume is not None:
        kimg = training_loop.parse_state_kimg(opts.resume)
        if kimg is None or not os.path.isfile(opts.resume):
            raise click.BadParameter(f'{opts.resume!r} is not a training-state-NNNNNN.pt file from a previous run',
                                     param_hint='--resume')
        state = training_loop.load_training_state(opts.resume)
        if state is not None:  # ours: exact resume
            if opts.seed is None:
                c.seed = int(state['seed'])
            del state
        else:  # EDM's: weights from the matching snapshot, then the pickled net and optimizer state
            c.resume_pkl = os.path.join(os.path.dirname(opts.resume), f'network-snapshot-{kimg:06d}.pkl')
            if not os.path.isfile(c.resume_pkl):
                raise click.BadParameter(f'an EDM training state needs {c.resume_pkl} beside it', param_hint='--resume')
            c.resume_kimg = kimg
        c.resume_state_dump = opts.resume

    # Description string.
    cond_str = 'cond' if c.dataset_kwargs.use_labels else 'uncond'
    dtype_str = 'fp16' if (opts.fp16 or opts.precision == 'fp16') else opts.precision
    desc = (f'{dataset_name:s}-{cond_str:s}-{opts.arch:s}-{opts.precond:s}-gpus{world_size:d}-'
            f'batch{c.batch_size:d}-{dtype_str:s}')
    if opts.stf:
        desc += f'-stf{stf_refs}'
    if opts.aot is not None:
        desc += f'-aot{opts.aot}'
    if opts.desc is not None:
        desc += f'-{opts.desc}'
    return c, desc


@click.command(help=__doc__)
# Main options.
@click.option('--outdir', help='Where to save the results', metavar='DIR', type=str, required=True)
@click.option('--data', help='Path to the dataset', metavar='ZIP|DIR', type=str, required=True)
@click.option('--cond', help='Train class-conditional model', metavar='BOOL', type=bool, default=False,
              show_default=True)
@click.option('--arch', help='Network architecture', type=click.Choice(list(ARCH_PRESETS)), default='ddpmpp',
              show_default=True)
@click.option('--precond', help='Preconditioning & default loss', type=click.Choice(list(PRECOND_CLASSES)),
              default='edm', show_default=True)
@click.option('--loss', help='Loss (registry name)  [default: follows --precond]',
              type=click.Choice(list(losses.LOSSES)))
@click.option('--loss-opt', help=f'Loss option KEY=VALUE, repeatable ({losses.describe_losses()})', metavar='KEY=VALUE',
              multiple=True)
# Plug-ins (compose with each other and with --loss edm|vp|ve).
@click.option('--stf', help='Stable Target Field targets (Xu et al. 2023)', metavar='BOOL', type=bool, default=False,
              show_default=True)
@click.option('--stf-refs', help='STF reference set per GPU, incl. its micro-batch  [default: 1024]', metavar='INT',
              type=click.IntRange(min=1))
@click.option('--stf-mask-classes', help='STF with --cond: only references of the sample\'s class; 0 = mix classes '
              'like the reference code (Newbeeer/stf)  [default: 1]', metavar='BOOL', type=bool)
@click.option('--aot', help='AOT noise-image pairing (Kim et al. 2024) over pools of this many images per GPU',
              metavar='INT', type=click.IntRange(min=1))
# Hyperparameters.
@click.option('--duration', help='Training duration', metavar='MIMG', type=click.FloatRange(min=0, min_open=True),
              default=200, show_default=True)
@click.option('--batch', help='Total batch size', metavar='INT', type=click.IntRange(min=1), default=512,
              show_default=True)
@click.option('--batch-gpu', help='Limit batch size per GPU', metavar='INT', type=click.IntRange(min=1))
@click.option('--cbase', help='Channel multiplier  [default: varies]', metavar='INT', type=click.IntRange(min=1))
@click.option('--cres', help='Channels per resolution  [default: varies]', metavar='LIST', type=parse_int_list)
@click.option('--blocks', help='Residual blocks per resolution (tiny nets)', metavar='INT', type=click.IntRange(min=1),
              hidden=True)
@click.option('--attn', help='Resolutions with attention (tiny nets)', metavar='LIST', type=parse_int_list,
              hidden=True)
@click.option('--lr', help='Learning rate', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=10e-4,
              show_default=True)
@click.option('--lr-rampup', help='Learning-rate ramp-up', metavar='KIMG', type=click.FloatRange(min=0), default=10000,
              show_default=True)
@click.option('--ema', help='EMA half-life', metavar='MIMG', type=click.FloatRange(min=0), default=0.5,
              show_default=True)
@click.option('--dropout', help='Dropout probability', metavar='FLOAT', type=click.FloatRange(min=0, max=1),
              default=0.13, show_default=True)
@click.option('--augment', help='Augment probability', metavar='FLOAT', type=click.FloatRange(min=0, max=1),
              default=0.12, show_default=True)
@click.option('--xflip', help='Enable dataset x-flips', metavar='BOOL', type=bool, default=False, show_default=True)
# Performance-related.
@click.option('--fp16', help='Run the network in fp16 (EDM)', metavar='BOOL', type=bool, default=False,
              show_default=True)
@click.option('--precision', help='Autocast precision (fp16 adds a GradScaler)',
              type=click.Choice(list(training_loop.PRECISIONS)), default='fp32', show_default=True)
@click.option('--compile', help='torch.compile the network', metavar='BOOL', type=bool, default=False,
              show_default=True)
@click.option('--ls', help='Loss scaling', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=1,
              show_default=True)
@click.option('--bench', help='Enable cuDNN benchmarking', metavar='BOOL', type=bool, default=True, show_default=True)
@click.option('--cache', help='Cache dataset in CPU memory', metavar='BOOL', type=bool, default=True, show_default=True)
@click.option('--workers', help='DataLoader worker processes (0 = main process)', metavar='INT',
              type=click.IntRange(min=0), default=1, show_default=True)
@click.option('--device', help='Device  [default: cuda if available, else cpu]', type=click.Choice(['cuda', 'cpu']))
@click.option('--rng', help='Sigma/noise randomness: per image (independent of GPU count) or per rank (EDM)',
              type=click.Choice(['image', 'rank']), default='image', show_default=True)
# I/O-related.
@click.option('--desc', help='String to include in result dir name', metavar='STR', type=str)
@click.option('--nosubdir', help='Do not create a subdirectory for results', is_flag=True)
@click.option('--tick', help='How often to print progress', metavar='KIMG', type=click.IntRange(min=1), default=50,
              show_default=True)
@click.option('--snap', help='How often to save snapshots', metavar='TICKS', type=click.IntRange(min=1), default=50,
              show_default=True)
@click.option('--dump', help='How often to dump state', metavar='TICKS', type=click.IntRange(min=1), default=500,
              show_default=True)
@click.option('--seed', help='Random seed  [default: random]', metavar='INT', type=int)
@click.option('--transfer', help='Transfer learning from network pickle', metavar='PKL|URL', type=str)
@click.option('--resume', help='Resume from previous training state', metavar='PT', type=str)
@click.option('-n', '--dry-run', help='Print training options and exit', is_flag=True)
def main(**kwargs):
    opts = dnnlib.EasyDict(kwargs)
    if opts.device is None:
        opts.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    elif opts.device == 'cuda' and not torch.cuda.is_available():
        raise click.BadParameter('CUDA is not available on this machine', param_hint='--device')
    if opts.fp16 and opts.precision != 'fp32':
        raise click.UsageError('use either --fp16 (EDM: the network in fp16) or --precision (autocast), not both')
    if opts.device == 'cpu' and opts.fp16:
        warnings.warn('--fp16 has no effect on the CPU (the network runs in fp32)', stacklevel=1)
    dist.init(device=opts.device)
    dist.excepthook_abort_all_ranks()
    world_size = dist.get_world_size()

    c, desc = build_config(opts, world_size)
    c.run_dir = dist.broadcast_object(_run_dir(opts.outdir, desc, opts.nosubdir) if dist.get_rank() == 0 else None)

    dist.print0()
    dist.print0('Training options:')
    dist.print0(json.dumps(c, indent=2))
    dist.print0()
    dist.print0(f'Output directory:        {c.run_dir}')
    dist.print0(f'Dataset path:            {c.dataset_kwargs.path}')
    dist.print0(f'Class-conditional:       {c.dataset_kwargs.use_labels}')
    dist.print0(f'Network architecture:    {opts.arch}')
    dist.print0(f'Preconditioning & loss:  {opts.precond}, {c.loss_kwargs.class_name}')
    dist.print0(f'Number of processes:     {world_size}')
    dist.print0(f'Batch size:              {c.batch_size}')
    dist.print0(f'Mixed-precision:         fp16 network {c.network_kwargs.use_fp16}, autocast {c.precision}')
    dist.print0()

    if opts.dry_run:
        dist.print0('Dry run; exiting.')
        return

    logger = None
    dist.print0('Creating output directory...')
    if dist.get_rank() == 0:
        os.makedirs(c.run_dir, exist_ok=True)
        with dnnlib.util.atomic_output(os.path.join(c.run_dir, 'training_options.json'), 'wt') as f:
            json.dump(c, f, indent=2)
        logger = dnnlib.util.Logger(file_name=os.path.join(c.run_dir, 'log.txt'), file_mode='a', should_flush=True)
    dist.barrier()
    try:
        training_loop.training_loop(**c)
    finally:
        if logger is not None:
            logger.close()


if __name__ == '__main__':
    torch.multiprocessing.set_start_method('spawn')
    main()
