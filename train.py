"""Train diffusion-based generative models (EDM's train.py options and defaults, plus plug-in losses).

Examples:

\b
  # CIFAR-10 class-conditional DDPM++ with EDM preconditioning, 8 GPUs:
  torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs \\
      --data=datasets/cifar10-32x32.zip --cond=1 --arch=ddpmpp
\b
  # A tiny network on CPU, on the digits of `dataset_tool.py --source=digits` (32x32; network size: --cbase,
  # --cres, and the hidden --blocks / --attn):
  python train.py --outdir=runs --data=datasets/digits-32x32.zip --batch=32 --cbase=16 --cres=1,2 --blocks=1 \\
      --attn=16 --duration=0.01 --tick=1 --lr-rampup=1 --device=cpu
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
which compose with each other and with the denoising losses (edm, vp, ve, and any losses.DenoisingLoss added; --aot
also with spd, ddpm and gdd), --precision fp32|bf16|fp16 (torch.autocast; fp16 adds a GradScaler), --compile
0|1|regional, --channels-last and --fused-adam (GPU kernel choices, not bit-identical to the defaults, which are
EDM's; neither gained on an H200 in bf16: docs/performance.md), --device, --rng image|rank, --lr-rampup; hidden:
--blocks (num_blocks) and --attn (attn_resolutions) for tiny networks. --workers accepts 0 (load in the main
process). --resume takes EDM's training states (approximate resume through the safe pickle importer) and ours (exact
resume): a state file, a run directory (its newest valid state) or `auto` (the newest valid state under --outdir,
else a fresh start). A state written by this version remembers the run's options, so `--resume=STATE` alone
continues the run; options given with it override (the change is printed, with whether the continuation stays
exact), and options that would change the network are refused. --max-nonfinite stops a diverged run.
"""

import contextlib
import json
import os
import re
import signal
import traceback
import warnings

import click
import torch

import dnnlib
import losses
from torch_utils import distributed as dist
from training import resume, run_folder, train_options, training_loop
from training.dataset import DatasetError, unwrap_worker_error
from training.presets import ARCH_PRESETS, PRECOND_CLASSES, PRESET_SOURCES, TRAIN_PRESETS, preset_command
from training.train_options import CompileMode, FiniteFloat


@click.command(help=__doc__, epilog=train_options.presets_epilog())
# Main options.
@click.option('--outdir', help='Where to save the results  [required unless --resume has them]', metavar='DIR',
              type=str)
@click.option('--data', help='Path to the dataset  [required unless --resume has them]', metavar='ZIP|DIR', type=str)
@click.option('--cond', help='Train class-conditional model', metavar='BOOL', type=bool, default=False,
              show_default=True)
@click.option('--arch', help='Network architecture', type=click.Choice(list(ARCH_PRESETS)), default='ddpmpp',
              show_default=True)
@click.option('--precond', help='Preconditioning & default loss  [default: edm; with --init the pickle\'s, or the '
              'one the loss declares]', type=click.Choice(list(PRECOND_CLASSES)))
@click.option('--loss', help='Loss (registry name)  [default: follows --precond]',
              type=click.Choice(list(losses.LOSSES)))
@click.option('--loss-opt', help=f'Loss option KEY=VALUE, repeatable ({losses.describe_losses()})', metavar='KEY=VALUE',
              multiple=True)
# Plug-ins (losses.LOSS_WRAPPERS; compose with each other and with the denoising losses).
@train_options.wrapper_options
# Hyperparameters.
@click.option('--duration', help='Training duration (whole kimg; a fraction rounds up)', metavar='MIMG',
              type=FiniteFloat(min=0, min_open=True), default=200, show_default=True)
@click.option('--batch', help='Total batch size', metavar='INT', type=click.IntRange(min=1), default=512,
              show_default=True)
@click.option('--batch-gpu', help='Limit batch size per GPU', metavar='INT', type=click.IntRange(min=1))
@click.option('--cbase', help='Channel multiplier  [default: varies]', metavar='INT', type=click.IntRange(min=1))
@click.option('--cres', help='Channels per resolution  [default: varies]', metavar='LIST', type=str,
              callback=train_options.channel_list)
@click.option('--blocks', help='Residual blocks per resolution (tiny nets)', metavar='INT', type=click.IntRange(min=1),
              hidden=True)
@click.option('--attn', help='Resolutions with attention (tiny nets)', metavar='LIST', type=str,
              callback=train_options.resolution_list, hidden=True)
@click.option('--lr', help='Learning rate', metavar='FLOAT', type=FiniteFloat(min=0, min_open=True), default=10e-4,
              show_default=True)
@click.option('--lr-rampup', help='Learning-rate ramp-up', metavar='KIMG', type=FiniteFloat(min=0), default=10000,
              show_default=True)
@click.option('--ema', help='EMA half-life', metavar='MIMG', type=FiniteFloat(min=0), default=0.5,
              show_default=True)
@click.option('--ema-rampup', 'ema_rampup', help='EMA ramp-up: the half-life is at most this fraction of the images '
              'seen so far (EDM; 0 = none: the --ema half-life from the first step)', metavar='RATIO',
              type=FiniteFloat(min=0), default=0.05, show_default=True)
@click.option('--dropout', help='Dropout probability', metavar='FLOAT', type=FiniteFloat(min=0, max=1),
              default=0.13, show_default=True)
@click.option('--augment', help='Augment probability', metavar='FLOAT', type=FiniteFloat(min=0, max=1),
              default=0.12, show_default=True)
@click.option('--xflip', help='Enable dataset x-flips', metavar='BOOL', type=bool, default=False, show_default=True)
# Performance-related.
@click.option('--fp16', help='Run the network in fp16 (EDM)', metavar='BOOL', type=bool, default=False,
              show_default=True)
@click.option('--precision', help='Autocast precision (fp16 adds a GradScaler)',
              type=click.Choice(list(training_loop.PRECISIONS)), default='fp32', show_default=True)
@click.option('--compile', help='torch.compile the network: whole (1) or per U-Net block (regional: compiles in a '
              'fraction of the time)', metavar='BOOL|regional', type=CompileMode(), default=False, show_default=True)
@click.option('--channels-last', 'channels_last', help='Weights in channels_last memory format (not '
              'bit-identical; on an H200, eager bf16, 25% slower: docs/performance.md)', metavar='BOOL', type=bool,
              default=False, show_default=True)
@click.option('--fused-adam', 'fused_adam', help="Adam's fused kernel instead of torch's default (foreach); not "
              'bit-identical', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--ls', help='Loss scaling', metavar='FLOAT', type=FiniteFloat(min=0, min_open=True), default=1,
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
@click.option('--seed', help='Random seed  [default: random]', metavar='INT', type=click.IntRange(0, 2**31 - 1))
@click.option('--transfer', help='Transfer learning from network pickle', metavar='PKL|URL', type=str)
@click.option('--init', help="Start from a pickle's EMA network: its class, constructor options and weights (EDM's, "
              "ours, forks'); --precond swaps its preconditioning; the EMA starts from it", metavar='PKL|URL',
              type=str)
@click.option('--resume', help='Resume from a training state, a run directory (its newest state) or auto (the newest '
              'state of the run under --outdir written to last, else start anew)', metavar='PT|DIR|auto', type=str)
@click.option('--preset', help='A published configuration (EDM, STF, AOT, GDD, SPD and its DDPM control; '
              'training/presets.py): its options, under the ones given explicitly; --preset=list prints them with '
              'their sources', metavar='NAME|list')
@click.option('--phema', help='Post-hoc EMA (EDM2): relative widths of the power-function EMAs to keep beside every '
              'snapshot, e.g. 0.05,0.10 (then phema.py reconstructs any width)', metavar='LIST', type=str,
              callback=train_options.width_list, default=None)
@click.option('--max-nonfinite', help='Stop after this many consecutive steps with non-finite losses or gradients',
              metavar='STEPS', type=click.IntRange(min=1), default=100, show_default=True)
@click.option('-n', '--dry-run', help='Print training options and exit', is_flag=True)
def main(**kwargs):
    try:
        # Each run shows its warnings and writes them into its log.txt: Python shows a warning once per code location
        # and process, so in a process that goes on (a notebook) a later run with the same option warning had none.
        # Entering catch_warnings forgets which were shown; the filters stay as they are (also those the run's
        # imports add).
        with warnings.catch_warnings():
            pass
        _main(**kwargs)
    except click.UsageError as err:  # an error about an option the preset set: say so (the user never typed it)
        preset = TRAIN_PRESETS.get(kwargs.get('preset'), {})
        named = [f'--{key.replace("_", "-")}' for key in preset
                 if re.search(rf'--{key.replace("_", "-")}(?![-\w])', err.format_message())]
        if named:
            err.message = f'{err.message} ({", ".join(named)}: from --preset={kwargs["preset"]})'
        raise
    finally:
        if not _PROCESS_ENDS_WITH_THE_RUN:
            dist.restore_signal_handlers()  # the process may go on (a notebook): Ctrl-C and SIGTERM act on it again


# train.py as the process's program (below): the process ends with the run, so the stop handlers stay to its end. Given
# back in main's `finally`, a SIGTERM while the process exits (torchrun's agent sends one to the ranks still exiting
# once a rank has left with 143) killed it (-15) instead of letting it exit with the stop's code.
_PROCESS_ENDS_WITH_THE_RUN = False


def _log_other_rank_error(run_dir: str, text: str) -> None:
    """A rank other than 0 appends an error only it met (a damaged image its loader read) to log.txt: rank 0 writes
    the log and reports it as "another rank ended", so the log of a failed multi-GPU run names the cause. One
    appended write; a run folder this node does not see (not on a shared disk) only loses the line."""
    try:
        with open(os.path.join(run_dir, 'log.txt'), 'a') as f:
            f.write(f'Error on rank {dist.get_rank()}: {text.rstrip()}\n')
    except OSError:
        return


def _check_same_resume(state: str | None) -> None:
    """Every rank resolved --resume (auto: from what it sees under --outdir) to the same training state, or all to a
    fresh start. Ranks that continue from different states (a node that does not see the shared --outdir, or sees an
    older listing of it) train different networks for different lengths and hang at the end. Also the point where
    every rank has passed its checks: rank 0 changes nothing in --outdir before it."""
    if dist.get_world_size() == 1:
        return
    states = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(states, state)
    if len(set(states)) > 1:
        ranks = [rank for rank, other in enumerate(states) if other != states[0]]
        raise click.UsageError(f'the ranks resolve --resume differently: rank 0 to {states[0] or "a new run"}, rank '
                               f'{ranks[0]} to {states[ranks[0]] or "a new run"}; --outdir must be one folder that '
                               f'every node sees alike (a shared file system)')


def _main(**kwargs):
    opts = dnnlib.EasyDict(kwargs)
    ctx = click.get_current_context()
    early_warnings, stop_keeping_warnings = train_options.keep_warnings(ctx)
    explicit = {name for name in kwargs if ctx.get_parameter_source(name) in (
        click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)}
    if opts.preset == 'list':
        for name in TRAIN_PRESETS:
            print(f'{name}  ({PRESET_SOURCES.get(name, "")})\n  {preset_command(name)}')
        return
    arch_given = 'arch' in explicit  # on the command line itself (a preset's architecture yields to --init)
    preset_notes = train_options.apply_preset(opts, explicit)
    if opts.transfer is not None and opts.resume is not None:
        raise click.UsageError('--transfer and --resume cannot be specified at the same time')
    # Paths as given, ~ expanded (the shell leaves --outdir=~/runs alone) and absolute, before a saved run's are
    # compared with them.
    for name in ('outdir', 'data', 'init', 'transfer'):
        if opts[name] is not None and '://' not in opts[name]:
            opts[name] = os.path.abspath(os.path.expanduser(opts[name]))
    if opts.resume is not None and opts.resume != 'auto':
        opts.resume = os.path.expanduser(opts.resume)
    resume_arg = opts.resume
    if opts.device is None:
        opts.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    elif opts.device == 'cuda' and not torch.cuda.is_available():
        raise click.BadParameter('CUDA is not available on this machine', param_hint='--device')
    # The process group before any check that reads the file system: one node may see other files than another (a
    # folder not mounted there, a node-local copy missing), and a rank that ends before joining the group left the
    # other nodes waiting in it for the whole timeout (30 minutes), in silence; torchrun ends only its own node's
    # ranks. A rank that ends after joining ends the others at their next collective (_check_same_resume's).
    dist.init(device=opts.device)
    dist.excepthook_abort_all_ranks()
    resume_notes, passed_over = resume.resolve_resume(opts, explicit)
    for name in ('outdir', 'data'):
        if opts[name] is None:
            raise click.UsageError(f"Missing option '--{name}'" + (' (the training state does not record it)'
                                                                  if opts.resume else ''))
    # Recorded absolute (training_options.json, the state's options): a resume from another folder finds them.
    for name in ('outdir', 'data', 'init', 'transfer', 'resume'):
        if opts[name] is not None and '://' not in opts[name]:
            opts[name] = os.path.abspath(opts[name])
    if opts.desc is not None and ('/' in opts.desc or os.sep in opts.desc):
        raise click.BadParameter(f'{opts.desc!r}: the run directory name may not hold a path separator',
                                 param_hint='--desc')
    if opts.init is not None and arch_given:
        raise click.UsageError('--arch: --init takes the architecture from the pickle')
    restarted = resume_arg == 'auto' and opts.resume is None and not passed_over
    leftovers = run_folder.check_nosubdir(opts.outdir, opts.resume, restarted) if opts.nosubdir else []
    if opts.fp16 and opts.precision != 'fp32':
        raise click.UsageError('use either --fp16 (EDM: the network in fp16) or --precision (autocast), not both')
    if opts.device == 'cpu' and opts.fp16:
        warnings.warn('--fp16 has no effect on the CPU (the network runs in fp32)', stacklevel=1)
    try:
        dnnlib.util.check_output_path(opts.outdir, '--outdir', is_dir=True)
    except dnnlib.util.OutputPathError as err:
        raise click.UsageError(str(err)) from None
    _check_same_resume(opts.resume)
    dist.stop_on_signals()
    world_size = dist.get_world_size()
    if dist.get_rank() == 0:
        run_folder.remove_stale_temp_files(opts.outdir)
        if opts.nosubdir and not opts.dry_run:
            resumes_here = opts.resume is not None and os.path.dirname(opts.resume) == opts.outdir
            run_folder.set_aside_before_run(opts.outdir, training_loop.parse_state_kimg(opts.resume) if resumes_here
                                            else None, leftovers)

    # Where a loss's reference trains with other values than train.py's defaults (EDM's), a run that leaves the
    # option out is told (GDD: no augmentation, dropout 0; EDM's 0.12 and 0.13 otherwise apply, unannounced).
    if opts.resume is None:
        for option, value in getattr(losses.LOSSES.get(opts.loss), 'reference_options', {}).items():
            if option not in explicit and opts[option] != value:
                warnings.warn(f'--loss={opts.loss}: its reference trains with --{option}={value}; this run has '
                              f'train.py\'s default --{option}={opts[option]:g} (EDM\'s): pass --{option}={value} '
                              f'for the reference\'s setting', stacklevel=1)

    c, desc = train_options.build_config(opts, world_size)
    dataset = c.pop('dataset')
    resume_nimg = c.pop('resume_nimg', None)
    if resume_nimg is not None and resume_nimg >= round(c.total_kimg * 1000):
        # A finished run (e.g. killed after its last state was written, then --resume=auto): EDM's loop would train
        # one more step and write the last tick again, so the result would depend on whether the kill came first.
        dist.print0(f'{opts.resume} is at {resume_nimg / 1000:g} kimg, the end of the run '
                    f'(--duration={opts.duration:g} Mimg): nothing to train; a larger --duration continues it')
        return
    c.state_extras = dict(train_options=json.dumps({k: v for k, v in opts.items() if k != 'dry_run'}))
    c.run_dir = dist.broadcast_object(run_folder.next_run_dir(opts.outdir, desc, opts.nosubdir, create=not opts.dry_run)
                                      if dist.get_rank() == 0 else None)

    # The summary, printed now and written at the top of log.txt once the run directory exists.
    summary = ['', 'Training options:', json.dumps({k: v for k, v in c.items() if k != 'state_extras'}, indent=2), '',
               f'Output directory:        {c.run_dir}',
               f'Dataset path:            {c.dataset_kwargs.path}',
               f'Class-conditional:       {c.dataset_kwargs.use_labels}',
               f'Network architecture:    {opts.arch if opts.init is None else "from " + opts.init}',
               f'Preconditioning & loss:  {c.network_kwargs.class_name}, {c.loss_kwargs.class_name}',
               f'Number of processes:     {world_size}',
               f'Batch size:              {c.batch_size}',
               f'Mixed-precision:         fp16 network {c.network_kwargs.use_fp16}, autocast {c.precision}']
    if opts.preset is not None:
        summary.append(f'Preset:                  {opts.preset} ({PRESET_SOURCES.get(opts.preset, "")})')
        if preset_notes:
            summary.append(f'  explicit options win: {", ".join(preset_notes)}')
    if opts.resume is not None:
        summary.append(f'Resuming from:           {opts.resume}')
        summary += [f'  changed {note}' for note in resume_notes]
    summary.append('')
    for line in summary:
        dist.print0(line)

    if opts.dry_run:
        dist.print0('Dry run; exiting.')
        return

    logger = None
    dist.print0('Creating output directory...')
    run_dir_is_new = not opts.nosubdir  # a numbered folder, made for this run by run_folder.next_run_dir(create=True)
    if dist.get_rank() == 0:
        os.makedirs(c.run_dir, exist_ok=True)
        options_path = os.path.join(c.run_dir, 'training_options.json')
        recorded = {k: v for k, v in c.items() if k != 'state_extras'}
        # --nosubdir resumed in the run's own folder: the options file is rewritten, and the state it names is in
        # this folder; the run this folder itself continued (training.run_chain) is kept for report.py, fid.py and
        # phema.py, which would otherwise lose everything before it.
        if opts.nosubdir and opts.resume is not None and os.path.dirname(opts.resume) == c.run_dir:
            try:
                with open(options_path) as f:
                    earlier = json.load(f)
                earlier = earlier.get('continued_state_dump') or earlier.get('resume_state_dump')
            except (OSError, ValueError, AttributeError):
                earlier = None
            if isinstance(earlier, str) and os.path.dirname(earlier) != c.run_dir:
                recorded['continued_state_dump'] = earlier
        with dnnlib.util.atomic_output(options_path, 'wt') as f:
            json.dump(recorded, f, indent=2)
        logger = dnnlib.util.Logger(file_name=os.path.join(c.run_dir, 'log.txt'), file_mode='a', should_flush=True)
        stop_keeping_warnings()  # the log catches what is printed from now on; these came before it
        if early_warnings:
            summary += ['Warnings before this log began:', *(f'  {text}' for text in early_warnings), '']
        logger.file.write('\n'.join(summary) + '\n')  # into log.txt only: the terminal has it already
    stop_keeping_warnings()  # on every rank (rank 0 stopped above)
    dist.barrier()
    try:
        training_loop.training_loop(**c, dataset=dataset)
        if dist.stop_agreed():  # into log.txt too
            dist.print0(f'Stopped by a signal at {c.run_dir}; `--resume=auto --outdir={opts.outdir}` continues')
    except (training_loop.NonFiniteTrainingError, training_loop.ResumeMismatchError, DatasetError,
            dnnlib.util.OutputPathError) as err:  # the last: a snapshot or state could not be written (disk full)
        if isinstance(err, DatasetError):  # a damaged image met in training (a loader worker wraps its message)
            err = unwrap_worker_error(err)
        if logger is not None and logger.file is not None:
            with contextlib.suppress(OSError):  # a full disk: the terminal has it (click prints it)
                logger.file.write(f'Error: {err}\n')  # Into log.txt only: click prints it on the terminal.
            logger.close()
        elif isinstance(err, DatasetError):  # met by this rank's loader alone: rank 0 sees "another rank ended"
            _log_other_rank_error(c.run_dir, str(err))
        if isinstance(err, training_loop.ResumeMismatchError) and run_dir_is_new and dist.get_rank() == 0:
            run_folder.remove_unstarted_run_dir(c.run_dir)
        raise click.ClickException(str(err)) from None
    except BaseException as err:
        if logger is not None and logger.file is not None:
            # The fatal error belongs in log.txt too (only there: the terminal gets it from the excepthook). When a
            # collective failed because another rank ended, that rank's error is the cause: say so in one line.
            with contextlib.suppress(OSError):  # a full disk: the terminal has it
                logger.file.write(f'Error: another rank ended ({str(err).splitlines()[0][:200]}); its own error, '
                                  f'printed by that rank, is the cause\n' if dist.is_peer_failure(err) else
                                  traceback.format_exc())
        raise
    finally:
        if logger is not None:
            logger.close()
    if dist.stop_agreed():
        # Stopped early by SIGTERM or Ctrl-C, its state written: not a finished run (a job script that requeues on a
        # non-zero exit should). The shell's code for the signal (143, 130; 143 on a rank that was only told by
        # another). Outside the try: an exit, not an error with a traceback in log.txt.
        if _PROCESS_ENDS_WITH_THE_RUN:
            # Under torchrun, the rank that leaves first makes the agent SIGTERM the others while they exit; Python
            # resets its own handlers to SIG_DFL when it finalizes, and that SIGTERM then killed the rank (-15 in
            # torchrun's report instead of 143, 1 in 3-4 two-rank runs before and after c31521b). Its state is written.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(128 + (dist.stop_requested() or signal.SIGTERM))


if __name__ == '__main__':
    _PROCESS_ENDS_WITH_THE_RUN = True
    torch.multiprocessing.set_start_method('spawn')
    dnnlib.util.run_cli(main)
