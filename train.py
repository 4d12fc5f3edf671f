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
which compose with each other and with the edm, vp and ve losses (--aot also with spd, ddpm and gdd), --precision
fp32|bf16|fp16 (torch.autocast; fp16 adds a GradScaler), --compile 0|1|regional, --channels-last and --fused-adam
(GPU speed; not bit-identical to the defaults, which are EDM's), --device, --rng image|rank, --lr-rampup; hidden:
--blocks (num_blocks) and --attn (attn_resolutions) for tiny networks. --workers accepts 0 (load in the main
process). --resume takes EDM's training states (approximate resume through the safe pickle importer) and ours (exact
resume): a state file, a run directory (its newest valid state) or `auto` (the newest valid state under --outdir,
else a fresh start). A state written by this version remembers the run's options, so `--resume=STATE` alone
continues the run; options given with it override (the change is printed, with whether the continuation stays
exact), and options that would change the network are refused. --max-nonfinite stops a diverged run.
"""

import copy
import glob
import itertools
import json
import math
import os
import pickle
import re
import secrets
import shutil
import signal
import traceback
import warnings

import click
import torch

import dnnlib
import losses
from torch_utils import distributed as dist
from torch_utils import misc, persistence
from training import snapshots, training_loop
from training.dataset import DatasetError, unwrap_worker_error
from training.presets import ARCH_PRESETS, PRECOND_CLASSES, PRESET_SOURCES, TRAIN_PRESETS, preset_command


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


class FiniteFloat(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (FloatRange lets nan through: every comparison is False)."""

    name = 'finite float'

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f'{value} is not a finite number', param, ctx)
        return value


class CompileMode(click.ParamType):
    """--compile: a boolean (EDM's spelling: 0/1, true/false, ...) or 'regional' (each U-Net block compiled)."""

    name = 'compile mode'

    def convert(self, value, param, ctx):
        if isinstance(value, bool) or value == 'regional':
            return value
        try:
            return click.BOOL.convert(value, param, ctx)
        except click.BadParameter:
            self.fail(f"{value!r} is neither a boolean nor 'regional'", param, ctx)


def _channel_list(ctx, param, value):
    """--cres: a non-empty list of positive channel multipliers."""
    if value is None:
        return None
    values = parse_int_list(value)
    if not values or min(values) < 1:
        raise click.BadParameter(f'expected a non-empty comma-separated list of positive integers, got {value!r}')
    return values


def _resolution_list(ctx, param, value):
    """--attn: a (possibly empty) list of positive resolutions."""
    if value is None:
        return None
    values = parse_int_list(value)
    if any(v < 1 for v in values):
        raise click.BadParameter(f'expected positive resolutions, got {value!r}')
    return values


def _remove_stale_temp_files(outdir: str) -> None:
    """Half-written snapshots and states of killed runs (their writers are dead) in --outdir and its run folders."""
    if not os.path.isdir(outdir):
        return
    for directory in [outdir, *(os.path.join(outdir, name) for name in sorted(os.listdir(outdir)))]:
        if os.path.isdir(directory):
            for path in dnnlib.util.remove_stale_temp_files(directory):
                print(f'Removed {path}, left by a run that was killed while writing it')


def _width_list(ctx, param, value):
    """--phema: comma-separated relative EMA widths in (0, 1/sqrt(12))."""
    if value is None:
        return None
    try:
        widths = [float(v) for v in value.split(',') if v.strip()]
    except ValueError:
        raise click.BadParameter(f'expected comma-separated numbers, got {value!r}') from None
    if not widths or any(not 0 < w < 12 ** -0.5 for w in widths):
        raise click.BadParameter(f'expected relative widths between 0 and {12 ** -0.5:.4f} (EDM2 uses 0.05,0.10), '
                                 f'got {value!r}')
    names = [f'{w:.3f}' for w in widths]  # the phema-NNNNNN-W.pkl names keep three decimals
    if len(set(names)) != len(names) or '0.000' in names:
        raise click.BadParameter(f'the saved EMAs are named by their widths to three decimals: {value!r} gives '
                                 f'{", ".join(names)}; expected distinct widths of at least 0.001')
    return widths


def _run_dir(outdir: str, desc: str, nosubdir: bool, create: bool = False) -> str:
    """EDM's naming: {id:05d}-{desc}, id = 1 + the largest numeric prefix among the directories in outdir.

    create=True makes the directory, with a number no other run holds: two runs started at once into one --outdir
    both listed it before either created its folder, and shared one (EDM's makedirs(exist_ok=True))."""
    if nosubdir:
        return outdir
    floor = 0
    while True:
        prev_run_ids = []
        if os.path.isdir(outdir):
            for name in os.listdir(outdir):
                match = re.match(r'^\d+', name)
                if match and os.path.isdir(os.path.join(outdir, name)):
                    prev_run_ids.append(int(match.group()))
        run_id = max(max(prev_run_ids, default=-1) + 1, floor)
        path = os.path.join(outdir, f'{run_id:05d}-{desc}')
        if not create:
            return path
        os.makedirs(outdir, exist_ok=True)
        try:
            os.mkdir(path)
            return path
        except FileExistsError:  # taken since the listing (or a file of that name): the next number
            floor = run_id + 1


# What a run writes into its folder; with --nosubdir, a folder holding any of these holds another run (its log.txt
# and report.png too, but such generic names alone do not say so).
_RUN_FILES = re.compile(r'stats\.jsonl|training_options\.json|(training-state|network-snapshot)-\d+\.(pt|pkl)|'
                        r'phema-\d+-[0-9.]+\.pkl')


def _set_aside(parent: str, prefix: str, names: list[str]) -> str:
    """Move the files `names` of `parent` that exist into a new folder `parent/prefix-K` (the first free K); returns
    that folder."""
    for k in itertools.count(1):
        aside = os.path.join(parent, f'{prefix}-{k}')
        try:
            os.mkdir(aside)
            break
        except FileExistsError:
            continue
    for name in names:
        if os.path.exists(os.path.join(parent, name)):
            os.replace(os.path.join(parent, name), os.path.join(aside, name))
    return aside


_KIMG_FILES = re.compile(r'(?:network-snapshot-|training-state-|phema-)(\d+)(?:-\d+\.\d+)?\.(?:pkl|pt)')


def _set_aside_later_files(run_dir: str, kimg: int) -> tuple[str, list[str]] | None:
    """A --nosubdir resume in the run's own folder from a state at `kimg`: the snapshots, phema EMAs and states of
    later kimg are the interrupted trajectory's (another one when the resume changes options), and phema.py would
    mix them with the new ones. Moves them into a new folder of run_dir; returns it and the names (None: none)."""
    later = sorted(name for name in os.listdir(run_dir)
                   if (match := _KIMG_FILES.fullmatch(name)) and int(match.group(1)) > kimg)
    if not later:
        return None
    return _set_aside(run_dir, f'superseded-after-kimg-{kimg}', later), later


def _apply_loss_wrappers(opts: dnnlib.EasyDict, loss_kwargs: dict) -> tuple[dict, list[str]]:
    """Wrap the loss config with every registered wrapper whose flag is on (losses.LOSS_WRAPPERS, inner first), with
    the options its other flags set; returns the config and the run-directory tags."""
    tags = []
    for name, entry in losses.LOSS_WRAPPERS.items():
        enable_value = opts[entry.enable.name]
        enabled = bool(enable_value) if entry.enable.type is bool else enable_value is not None
        given = {flag: opts[flag.name] for flag in entry.all_flags() if flag.option is not None
                 and opts[flag.name] is not None}
        if not enabled:
            if any(opts[flag.name] is not None for flag in entry.flags):
                needs = f'--{entry.enable.name}' + ('=1' if entry.enable.type is bool else ' N')
                names = [_flag(f) for f in entry.flags]
                raise click.UsageError(f"{' and '.join(names)} need{'s' if len(names) == 1 else ''} {needs}")
            continue
        # Every option explicit in the config (training_options.json), the flags' values over the defaults.
        options = {k: v for k, v in losses.loss_options(name).items() if k != 'base_kwargs'}
        options.update({flag.option: value for flag, value in given.items()})
        try:
            loss_kwargs = losses.wrap_loss_kwargs(name, loss_kwargs, options)
        except ValueError as err:
            raise _option_error(err) from None
        tags.append(entry.tag.format(**options))
    return loss_kwargs, tags


def _class_or_none(class_name: str):
    """The class a network config names, or None where it cannot be imported (a user's module elsewhere)."""
    try:
        return dnnlib.util.get_obj_by_name(class_name)
    except Exception:  # the name comes from a config or pickle: any import failure only skips the check it serves
        return None


def _option_error(err: Exception) -> click.ClickException:
    """A library's ValueError as a click error; '--option: message' becomes 'Invalid value for --option: message'."""
    match = re.match(r'(--[a-z0-9-]+): (.*)', str(err), re.S)
    if match:
        return click.BadParameter(match.group(2), param_hint=match.group(1))
    return click.UsageError(str(err))


def _flag(flag) -> str:
    return '--' + flag.name.replace('_', '-')


def _wrapper_options(func):
    """The train.py flags of the registered loss wrappers (losses.LOSS_WRAPPERS), e.g. --stf, --stf-refs, --aot."""
    for entry in reversed(list(losses.LOSS_WRAPPERS.values())):
        for flag in reversed(entry.all_flags()):
            param_type = click.IntRange(min=1) if flag.type is int else flag.type
            default = False if flag is entry.enable and flag.type is bool else None
            func = click.option(_flag(flag), flag.name, help=flag.help, metavar=flag.metavar, type=param_type,
                                default=default, show_default=default is not None)(func)
    return func


def _read_resume_state(path: str) -> dict | None:
    """Our training state at `path` (None: an EDM training state); one-line errors for anything else."""
    if not os.path.exists(path):
        raise click.BadParameter(f'{path}: no such file', param_hint='--resume')
    if training_loop.parse_state_kimg(path) is None or not os.path.isfile(path):
        raise click.BadParameter(f'{path!r} is not a training-state-NNNNNN.pt file from a previous run',
                                 param_hint='--resume')
    try:
        return training_loop.load_training_state(path)
    except (pickle.UnpicklingError, OSError, RuntimeError, ValueError, EOFError) as err:
        raise click.BadParameter(f'{path}: not a readable training state ({err})', param_hint='--resume') from None


def _state_is_readable(path: str) -> bool:
    """Ours, readable; or EDM's with the network snapshot of its kimg beside it (what --resume=FILE takes)."""
    try:
        if training_loop.load_training_state(path) is not None:
            return True
    except Exception:  # noqa: BLE001 -- any failure means: not a state to resume from.
        return False
    snapshot = f'network-snapshot-{training_loop.parse_state_kimg(path):06d}.pkl'
    try:
        persistence.load_edm_training_state(path)
    except Exception:  # noqa: BLE001
        return False
    return os.path.isfile(os.path.join(os.path.dirname(path), snapshot))


def find_resume_state(resume: str, outdir: str | None, conflicts=None) -> str | None:
    """--resume=FILE, a run directory (its newest readable training state) or 'auto' (the newest readable state in
    the run directories under --outdir, or --outdir itself; None when there is none). Unreadable states are skipped
    with a warning. With 'auto', `conflicts(state_path)` -> a reason or None: a run whose state conflicts with the
    options given is another experiment (a sweep sharing --outdir), and is passed over with a note."""
    if resume == 'auto':
        if outdir is None:
            raise click.UsageError('--resume=auto needs --outdir (the folder of the runs to continue)')
        candidates = glob.glob(os.path.join(outdir, 'training-state-*.pt'))
        candidates += glob.glob(os.path.join(outdir, '*', 'training-state-*.pt'))
    elif os.path.isdir(resume):
        candidates = glob.glob(os.path.join(resume, 'training-state-*.pt'))
        if not candidates:
            raise click.BadParameter(f'{resume} holds no training-state-*.pt', param_hint='--resume')
    else:
        return resume
    # The run written to last first (several runs under --outdir: a finished run does not hide a newer one that was
    # interrupted), and in it the state of the most images.
    latest = {}
    for path in candidates:
        folder = os.path.dirname(path)
        latest[folder] = max(latest.get(folder, 0.0), os.path.getmtime(path))
    candidates.sort(key=lambda p: (latest[os.path.dirname(p)], training_loop.parse_state_kimg(p) or -1,
                                   os.path.getmtime(p)), reverse=True)
    other_runs = set()
    for path in candidates:
        folder = os.path.dirname(path)
        if folder in other_runs:
            continue
        reason = conflicts(path) if conflicts is not None and resume == 'auto' else None
        if reason is not None:
            other_runs.add(folder)
            print(f'--resume=auto: passing over {folder}, another run ({reason})')
            continue
        if _state_is_readable(path):
            return path
        warnings.warn(f'--resume: skipping {path}, which is not a readable training state', stacklevel=1)
    if resume == 'auto':
        return None
    raise click.BadParameter(f'{resume} holds no readable training state', param_hint='--resume')


# Options that shape the network: a resume may not change them (the weights would not fit).
_NETWORK_OPTIONS = ('cond', 'arch', 'precond', 'cbase', 'cres', 'blocks', 'attn')
# Files a resume may find elsewhere (moved, or named from another folder): the state's weights must still fit.
_PATH_OPTIONS = ('data', 'init')
# Options that do not change the trajectory: changing them on resume keeps the continuation exact.
_EXACT_OPTIONS = ('outdir', 'desc', 'nosubdir', 'tick', 'snap', 'dump', 'duration', 'workers', 'bench', 'cache',
                  'dry_run', 'resume', 'max_nonfinite', 'transfer')


def apply_saved_options(opts: dnnlib.EasyDict, saved: dict, explicit: set, state_path: str) -> list[str]:
    """Fill the options not given on the command line from a training state's saved ones; refuse changes to the
    network in one line; return notes on the overrides (what changed and whether the continuation stays exact)."""
    return [f'{change} ({why})' for _, change, why in _saved_option_changes(opts, saved, explicit, state_path)]


def resume_conflicts(state_path: str, opts: dnnlib.EasyDict, explicit: set) -> str | None:
    """For --resume=auto: why the run of `state_path` is not the one the given options continue (an option given
    that changes its trajectory, its network or its data), or None. States without recorded options: None."""
    saved = training_loop.read_state_options(state_path)
    if saved is None:
        return None
    saved = {k: v for k, v in saved.items() if k not in ('resume', 'dry_run', 'device', 'transfer')}
    try:
        changes = _saved_option_changes(copy.deepcopy(opts), saved, explicit, state_path)
    except click.BadParameter as err:  # a network option it was not trained with
        return f'{err.param_hint}: another network'
    differing = [change for kind, change, _ in changes if kind != 'exact']
    return ', '.join(differing) if differing else None


def _saved_option_changes(opts: dnnlib.EasyDict, saved: dict, explicit: set, state_path: str) \
        -> list[tuple[str, str, str]]:
    """apply_saved_options' work: (kind, change, why) per option given that differs from the saved one, kind
    'exact', 'not exact' or 'path'; change is '--flag: old -> new'."""
    notes = []
    for key, old in saved.items():
        if key not in opts:
            continue
        if key not in explicit:
            if not _dropped_with_its_method(key, opts, explicit, saved):
                opts[key] = old
            continue
        new = opts[key]
        if key == 'loss_opt' and old and _same_loss(opts, saved, explicit):
            # KEY=VALUE items update the run's own (a resume that sets freeze=1 keeps its discriminator=...); an
            # option is returned to its default by naming it with that value.
            new = opts[key] = merge_loss_options(old, new)
        if _options_equal(new, old) or (old is None and new == _default_resolution(key, saved)):
            continue
        flag = '--' + key.replace('_', '-')
        if key in _NETWORK_OPTIONS or (key == 'augment' and (new > 0) != (old > 0)):
            trained = old if old is not None else _default_resolution(key, saved)
            trained = f'{trained!r}' if trained is not None else f'no {flag} (its default)'
            raise click.BadParameter(f'{new!r} contradicts the training state {state_path}, which was trained with '
                                     f'{trained}: the network would not match (use --transfer to start a new run '
                                     f'from its weights)', param_hint=flag)
        if key in _PATH_OPTIONS:
            notes.append(('path', f'{flag}: {old!r} -> {new!r}', 'another path: exact if it holds the same content'))
            continue
        exact = key in _EXACT_OPTIONS
        if old is None:  # saved without the option: what it resolved to (--loss: None -> 'vp' said nothing)
            old = _default_resolution(key, saved)
        notes.append(('exact' if exact else 'not exact', f'{flag}: {old!r} -> {new!r}',
                      f'the continuation {"stays" if exact else "is not"} exact'))
    return notes


def _dropped_with_its_method(key: str, opts: dnnlib.EasyDict, explicit: set, saved: dict) -> bool:
    """Whether a saved option belongs to a method the resume turns off or replaces, so is not carried over: the run's
    --loss-opt items under another --loss (GDD's discriminator=... under --loss=edm was refused as unknown), a
    wrapper's options with the wrapper off (--stf-refs under --stf=0 was refused as given without --stf=1)."""
    if key == 'loss_opt':
        return not _same_loss(opts, saved, explicit)
    for entry in losses.LOSS_WRAPPERS.values():
        if key in [flag.name for flag in entry.flags] and entry.enable.name in explicit:
            value = opts[entry.enable.name]
            return not (bool(value) if entry.enable.type is bool else value is not None)
    return False


def _same_loss(opts: dnnlib.EasyDict, saved: dict, explicit: set) -> bool:
    """Whether the resumed run keeps the saved run's loss (its saved --loss-opt items then still apply)."""
    if 'loss' not in explicit:
        return True
    return opts.loss in (saved.get('loss'), _default_resolution('loss', saved))


def _trains(loss: str, precond: str) -> bool:
    """Whether --loss can train --precond (losses.preconditioning_for accepts the pair)."""
    try:
        losses.preconditioning_for(loss, precond)
        return True
    except (KeyError, ValueError):
        return False


def _preset_text(value) -> str:
    return ','.join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def merge_loss_options(saved_items, given_items) -> list[str]:
    """The saved KEY=VALUE items, each replaced by a given item of the same key, then the given items with new keys."""
    given = {str(item).partition('=')[0].strip(): item for item in given_items}
    kept = [item for item in saved_items if str(item).partition('=')[0].strip() not in given]
    return kept + list(given.values())


def _default_resolution(key: str, saved: dict):
    """What a run saved without --loss / --precond trained with (as build_config resolves them), so that naming that
    value on resume is no change; None for other options, or with --init (its pickle's class then)."""
    if key not in ('loss', 'precond') or saved.get('init') is not None:
        return None
    try:
        loss = saved.get('loss') or losses.DEFAULT_LOSS_FOR_PRECOND[saved.get('precond') or 'edm']
        return loss if key == 'loss' else losses.preconditioning_for(loss, saved.get('precond'))
    except (KeyError, ValueError):
        return None


def _options_equal(a, b) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


# Wrappers that compute the same D(x; sigma) from the same backbone weights (GDDPrecond is EDMPrecond with its
# scalings shifted by epsilon, 5e-5 relative at sigma 80): rewrapping one as the other keeps the pretrained model.
_SAME_FUNCTION_WRAPPERS = ({'edm', 'gdd'},)


def init_network_kwargs(path: str, interface: dict, precond: str | None) -> dnnlib.EasyDict:
    """--init: the class and constructor options of a pickle's EMA network (EDM's, ours, forks'; imported without
    running its code), checked against the dataset. `precond` swaps the preconditioning wrapper (PRECOND_CLASSES)
    around the same backbone options; None keeps the pickle's class."""
    try:
        net = snapshots.read_snapshot(path).net
    except (persistence.NetworkPickleError, OSError, ValueError) as err:
        raise click.BadParameter(str(err), param_hint='--init') from None
    if getattr(net, 'init_args', ()):
        raise click.BadParameter(f'{path}: its network was built with positional arguments', param_hint='--init')
    kwargs = dict(net.init_kwargs)
    for key, value in interface.items():
        theirs = kwargs.pop(key, getattr(net, key, None))
        if int(theirs or 0) != value:
            raise click.BadParameter(f'{path} has {key}={theirs}, but the dataset (--data, --cond) needs {value}',
                                     param_hint='--init')
    own_class = f'{type(net).__module__}.{type(net).__qualname__}'
    own = next((key for key, name in PRECOND_CLASSES.items() if name == own_class), None)
    if precond and own is not None and own != precond and {own, precond} not in _SAME_FUNCTION_WRAPPERS:
        warnings.warn(f'--init: {path} holds a --precond={own} network ({type(net).__name__}); --precond={precond} '
                      f'rewraps its backbone, whose weights then compute another function: training starts from '
                      f'them, not from the pretrained model', stacklevel=1)
    return dnnlib.EasyDict(class_name=PRECOND_CLASSES[precond] if precond else own_class, **kwargs)


def _remove_unstarted_run_dir(run_dir: str) -> None:
    """A state the options cannot continue is found only when the loop loads it (its optimizer's parameters, e.g.
    another GDD freeze level), after the new run's folder was made: remove that folder while it holds only what was
    written before the loop, so that it does not stand beside the real run as an empty one."""
    if set(os.listdir(run_dir)) <= {'log.txt', 'training_options.json'}:
        shutil.rmtree(run_dir, ignore_errors=True)


def check_network_class(trained: str | None, resumed: str, path: str) -> None:
    """Refuses a resume whose --loss resolves to another preconditioning than the state's network has (the loss
    picks it when --precond is not given: SPD's eps, EDM's edm): the same backbone weights fit either wrapper, so the
    weight check passes and the run went on with an epsilon predictor read as a denoiser."""
    if trained is None or trained == resumed:
        return
    raise click.BadParameter(f'{path} holds a network of class {trained.rsplit(".", 1)[-1]}; these options train '
                             f'one of class {resumed.rsplit(".", 1)[-1]} (the preconditioning --loss picks): the '
                             f'network would not match; resume with the run\'s own --loss, or start a new run from '
                             f'its weights (--transfer)', param_hint='--loss')


def check_weights_fit(weights: dict, network_kwargs: dict, interface: dict, path: str, strict: bool) -> None:
    """Refuses, in one line, weights that the network of these options and this dataset cannot load (e.g. a resume
    whose --data now names a dataset of another resolution or channel count): the loop would stop with a traceback
    after the run directory exists. `weights`: name -> tensor; strict: as load_state_dict (our states), else as
    misc.copy_params_and_buffers(require_all=True) (EDM's: parameters and buffers, extra ones ignored). The network
    is built on the meta device (no memory, no initialisation); one that cannot be built there is left to the loop."""
    try:  # fork_rng: a constructor that draws numbers (Fourier embeddings) leaves the stream as it was
        with torch.random.fork_rng(devices=[]), torch.device('meta'):
            net = dnnlib.util.construct_class_by_name(**network_kwargs, **interface)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return
    expected = net.state_dict() if strict else dict(misc.named_params_and_buffers(net))
    expected = {name: tuple(value.shape) for name, value in expected.items()}
    saved = {name: tuple(value.shape) for name, value in weights.items()}
    problems = [f'{name} is {saved[name]} there, {shape} here' for name, shape in expected.items()
                if name in saved and saved[name] != shape]
    problems += [f'{name} is missing there' for name in expected if name not in saved]
    problems += [f'{name} is not expected' for name in saved if strict and name not in expected]
    if problems:
        dataset = ', '.join(f'{key}={value}' for key, value in interface.items())
        more = f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''
        raise click.BadParameter(f'{path}: its weights do not fit the network for this dataset ({dataset}): '
                                 f'{problems[0]}{more}. Is --data the dataset it was trained on?',
                                 param_hint='--resume')


def _keep_warnings(ctx: click.Context):
    """Warnings are shown as usual and also kept, so that those given before log.txt exists (the options' and the
    data's: STF over AOT, --fp16 on the CPU, ...) can be written into it too: a run's log is read long after the
    terminal is gone. Returns (the kept texts, a function that stops keeping); the command's end stops it too."""
    kept, show = [], warnings.showwarning

    def show_and_keep(message, category, filename, lineno, file=None, line=None):
        kept.append(f'{category.__name__}: {message}')
        show(message, category, filename, lineno, file, line)

    def stop():
        if warnings.showwarning is show_and_keep:
            warnings.showwarning = show

    warnings.showwarning = show_and_keep
    ctx.call_on_close(stop)
    return kept, stop


def _arch_name(network_kwargs: dict) -> str:
    """ddpmpp / ncsnpp / adm for the run directory's name, from backbone options."""
    if network_kwargs.get('model_type') == 'DhariwalUNet':
        return 'adm'
    return 'ncsnpp' if network_kwargs.get('embedding_type') == 'fourier' else 'ddpmpp'


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
    if opts.fused_adam:
        c.optimizer_kwargs.fused = True

    # Validate the dataset and fill in its resolution and size, as EDM.
    try:
        dataset_obj = dnnlib.util.construct_class_by_name(**c.dataset_kwargs)
        dataset_name = dataset_obj.name
        c.dataset_kwargs.resolution = dataset_obj.resolution
        c.dataset_kwargs.max_size = len(dataset_obj)
        has_labels = dataset_obj.has_labels
        interface = dict(img_resolution=dataset_obj.resolution, img_channels=dataset_obj.num_channels,
                         label_dim=dataset_obj.label_dim)
    except (OSError, ValueError) as err:
        raise click.BadParameter(str(err), param_hint='--data') from err
    if opts.cond and not has_labels:
        raise click.BadParameter('--cond=True requires labels specified in dataset.json', param_hint='--cond')
    c.dataset = dataset_obj  # handed on to training_loop (_main pops it): the directory is listed once per rank
    # A preset's network, batch and schedule were published for its dataset's resolution (named in its data path).
    preset_data = TRAIN_PRESETS.get(opts.preset, {}).get('data') or ''
    published = re.search(r'-(\d+)x(\d+)\.zip$', preset_data)
    if published and int(published.group(1)) != interface['img_resolution']:
        res = interface['img_resolution']
        warnings.warn(f'--preset={opts.preset} was published for {published.group(1)}x{published.group(2)} images '
                      f'({os.path.basename(preset_data)}); --data holds {res}x{res}: its architecture and schedule '
                      f'are not the paper\'s setting there', stacklevel=1)

    # Network architecture, preconditioning and loss. --init: the pickle's network, with --precond's wrapper (or the
    # loss's first declared one) when given.
    loss_name = opts.loss if opts.loss is not None else losses.DEFAULT_LOSS_FOR_PRECOND[opts.precond or 'edm']
    if opts.init is not None:
        architecture = [f'--{k}' for k in ('cbase', 'cres', 'blocks', 'attn') if opts[k] is not None]
        if architecture:
            raise click.UsageError(f"{', '.join(architecture)}: --init takes the architecture from the pickle")
        declared = getattr(losses.LOSSES.get(loss_name), 'preconditionings', (None,))
        try:  # --precond: refused before the pickle is read, as a fresh run refuses it
            if opts.precond is not None:
                losses.preconditioning_for(loss_name, opts.precond)
            c.network_kwargs = init_network_kwargs(opts.init, interface, opts.precond)
            keys = [key for key, name in PRECOND_CLASSES.items() if name == c.network_kwargs.class_name]
            if opts.precond is None and declared[0] is not None:
                # The loss's own wrapper around the pickle's backbone (GDD: GDDPrecond around EDM's network, the
                # same D(x; sigma)) only over a network whose preconditioning the loss trains: a VP or iDDPM
                # network rewrapped so would start from another function, its pretraining lost without a word.
                if not keys or keys[0] not in declared:
                    kind = c.network_kwargs.class_name.rsplit('.', 1)[-1]
                    raise ValueError(f'--init: the network of {opts.init} is {kind}'
                                     f'{f" (--precond={keys[0]})" if keys else ""}; --loss={loss_name} trains '
                                     f'{" or ".join(declared)} networks: give such a pickle, or --precond='
                                     f'{declared[0]} to rewrap its backbone anyway (its outputs change)')
                c.network_kwargs.class_name = PRECOND_CLASSES[declared[0]]
                keys = [declared[0]]
            # Without --precond the wrapper is the pickle's own (or the loss's declared one): the loss must train
            # it too, else an SPD epsilon predictor would be fitted to EDM's loss (or the reverse). A class that is
            # no --precond preset (EDM's iDDPMPrecond, a user's) is a denoiser as far as we know: no check.
            if opts.precond is None and keys:
                try:
                    losses.preconditioning_for(loss_name, keys[0])
                except ValueError as err:
                    kind = c.network_kwargs.class_name.rsplit('.', 1)[-1]
                    raise ValueError(f'--init: the network of {opts.init} is {kind} (--precond={keys[0]}); '
                                     f'{err}') from None
        except ValueError as err:
            raise _option_error(err) from None
        arch_name = _arch_name(c.network_kwargs)
    else:
        c.network_kwargs.update(ARCH_PRESETS[opts.arch])
        try:  # --precond, else the loss's own (EDM's losses: edm; SPD: eps); one line for a mismatch
            c.network_kwargs.class_name = PRECOND_CLASSES[losses.preconditioning_for(loss_name, opts.precond)]
        except ValueError as err:
            raise _option_error(err) from None
        arch_name = opts.arch
    try:
        c.loss_kwargs = losses.loss_kwargs(loss_name, losses.parse_loss_options(loss_name, opts.loss_opt))
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint='--loss-opt') from err
    c.loss_kwargs, wrapper_tags = _apply_loss_wrappers(opts, c.loss_kwargs)
    try:  # What the loss settles from the data once (SPD: Sigma0 fitted with fit=...): printed, kept in the config.
        c.loss_kwargs, notes = losses.prepare_loss_kwargs(c.loss_kwargs, c.dataset_kwargs)
    except ValueError as err:
        raise _option_error(err) from None
    for note in notes:
        dist.print0(note)
    if opts.cbase is not None:
        c.network_kwargs.model_channels = opts.cbase
    if opts.cres is not None:
        c.network_kwargs.channel_mult = opts.cres
    if opts.blocks is not None:
        c.network_kwargs.num_blocks = opts.blocks
    if opts.attn is not None:
        c.network_kwargs.attn_resolutions = opts.attn
        levels = [c.dataset_kwargs.resolution >> i for i in range(len(c.network_kwargs.get('channel_mult') or []))]
        missing = [r for r in opts.attn if levels and r not in levels]
        if missing:  # the network would silently have no attention there
            warnings.warn(f'--attn={",".join(map(str, opts.attn))}: the network has no {missing[0]}x{missing[0]} '
                          f'level (its levels: {", ".join(map(str, levels))}), so no attention there', stacklevel=1)
    # Whether the network is told how its input was augmented: EDM's losses pass the augmentation labels; a loss that
    # augments only what its discriminator sees (GDD) declares `feeds_augment_labels = False`.
    feeds_labels = bool(opts.augment) and getattr(losses.LOSSES.get(loss_name), 'feeds_augment_labels', True)
    if opts.augment:
        c.augment_kwargs = dnnlib.EasyDict(class_name='training.augment.AugmentPipe', p=opts.augment)
        c.augment_kwargs.update(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
        if opts.init is None and feeds_labels:  # --init keeps the pickle's augment_dim (its architecture)
            c.network_kwargs.augment_dim = 9
        elif feeds_labels and not c.network_kwargs.get('augment_dim'):
            warnings.warn(f'--init: {opts.init} has no augmentation input (augment_dim=0): --augment={opts.augment:g} '
                          f'augments the images, but the network cannot be told how (EDM\'s augmentation labels '
                          f'are dropped)', stacklevel=1)
    if opts.init is not None and c.network_kwargs.get('augment_dim') and not feeds_labels:
        # EDM's released networks take augmentation labels (augment_dim=9). When nothing feeds that layer (no
        # augmentation, or a loss that does not pass the labels) its weight gets no gradient, which DDP refuses on
        # more than one GPU ("parameters that were not used in producing loss"). EDM builds such a network without it
        # (augment_dim=0, as GDD's reference does); the other weights load by name, and without labels the outputs
        # are the same.
        c.network_kwargs.augment_dim = 0
    c.network_kwargs.update(dropout=opts.dropout, use_fp16=opts.fp16)
    precond_class = c.network_kwargs.class_name.rsplit('.', 1)[-1]
    if c.network_kwargs.get('embedding_type') == 'fourier' and getattr(
            _class_or_none(c.network_kwargs.class_name), 'time_index_noise_labels', False):
        warnings.warn(f'NCSN++\'s random Fourier noise embedding (scale 16) is made for log-sigma noise labels (VE, '
                      f'EDM preconditioning); {precond_class} labels the noise level with a time index up to ~1000, '
                      f'which it maps to unrelated embeddings for neighbouring steps (as EDM\'s --precond=vp '
                      f'--arch=ncsnpp): use --arch=ddpmpp or adm (positional embeddings)', stacklevel=1)

    # Batch accounting, checked here so the error names the options.
    if opts.batch % world_size != 0:
        raise click.BadParameter(f'{opts.batch} is not divisible by the number of processes ({world_size})',
                                 param_hint='--batch')
    if opts.batch_gpu is not None and (opts.batch // world_size) % min(opts.batch_gpu, opts.batch // world_size):
        raise click.BadParameter(f'the per-process batch {opts.batch // world_size} (--batch {opts.batch} / '
                                 f'{world_size} processes) is not a multiple of {opts.batch_gpu}',
                                 param_hint='--batch-gpu')
    batch_per_gpu = opts.batch // world_size
    micro_batch = min(opts.batch_gpu or batch_per_gpu, batch_per_gpu)
    try:  # What the loss needs of the batch layout and the dataset (e.g. AOT's pool, STF's reference set).
        loss_fn = dnnlib.util.construct_class_by_name(**c.loss_kwargs)
        for message in loss_fn.check_data(batch_gpu_total=batch_per_gpu, batch_gpu=micro_batch,
                                          dataset_size=c.dataset_kwargs.max_size):
            if opts.dry_run:  # else the loop says it when it checks the same (it said it twice)
                warnings.warn(message, stacklevel=1)
    except (ValueError, TypeError) as err:  # TypeError: a wrapper around a loss it cannot wrap (STF over SPD)
        raise _option_error(err) from None

    # Training options.
    # Whole kimg, as EDM (snapshots and states are named by kimg: a run ending at 1.5 kimg would overwrite those of
    # 1 kimg), but not EDM's int(duration * 1000), which made --duration=1.001 a 1000 kimg run (1.001 * 1000 is
    # 1000.9999999999999 in floats): rounded when within float error, else up, with a warning.
    duration_kimg = opts.duration * 1000
    whole_kimg = round(duration_kimg)
    if abs(duration_kimg - whole_kimg) > 1e-6 * max(duration_kimg, 1):
        whole_kimg = math.ceil(duration_kimg)
        warnings.warn(f'--duration={opts.duration:g} Mimg is not a whole number of kimg (snapshots and training states '
                      f'are named by kimg): training for {max(whole_kimg, 1)} kimg', stacklevel=1)
    c.total_kimg = max(whole_kimg, 1)
    if opts.lr_rampup > c.total_kimg and opts.resume is None and getattr(loss_fn, 'uses_loop_lr_ramp', True):
        # EDM's ramp is sized for 200 Mimg runs; a short run under it trains at a fraction of --lr throughout.
        warnings.warn(f'the learning-rate ramp-up (--lr-rampup={opts.lr_rampup:g} kimg) is longer than the run '
                      f'({c.total_kimg} kimg): the learning rate never reaches --lr (at the end it is '
                      f'{c.total_kimg / opts.lr_rampup:.2%} of it); for a short run use e.g. '
                      f'--lr-rampup={max(c.total_kimg // 10, 1)}', stacklevel=1)
    if (getattr(losses.LOSSES.get(loss_name), 'distils_pretrained', False) and opts.init is None
            and opts.transfer is None and opts.resume is None):
        warnings.warn(f'--loss={loss_name} distils a pretrained network and normally takes --init=PKL (e.g. an EDM '
                      f'pickle); without --init it distils a randomly initialised network', stacklevel=1)
    c.ema_halflife_kimg = int(opts.ema * 1000)
    c.ema_rampup_ratio = opts.ema_rampup or None
    c.lr_rampup_kimg = opts.lr_rampup
    c.update(batch_size=opts.batch, batch_gpu=opts.batch_gpu)
    c.update(loss_scaling=opts.ls, cudnn_benchmark=opts.bench)
    c.update(kimg_per_tick=opts.tick, snapshot_ticks=opts.snap, state_dump_ticks=opts.dump)
    c.update(precision=opts.precision, compile=opts.compile, rng=opts.rng, device=opts.device)
    if opts.channels_last:
        c.channels_last = True

    # Random seed.
    if opts.seed is not None:
        c.seed = opts.seed
    else:
        c.seed = dist.broadcast_object(secrets.randbelow(1 << 31) if dist.get_rank() == 0 else None)

    # Transfer learning and resume (files checked here, before a run directory exists).
    if opts.init is not None and opts.transfer is not None:
        raise click.UsageError('--init and --transfer cannot be specified at the same time')
    if opts.init is not None and opts.resume is None:
        c.resume_pkl = opts.init  # weights into the network and its EMA; the EMA ramp stays (unlike --transfer)
    if opts.transfer is not None:
        if opts.resume is not None:
            raise click.UsageError('--transfer and --resume cannot be specified at the same time')
        try:
            snapshots.load_snapshot(opts.transfer)
        except (persistence.NetworkPickleError, OSError, ValueError) as err:
            raise click.BadParameter(str(err), param_hint='--transfer') from None
        c.resume_pkl = opts.transfer
        c.ema_rampup_ratio = None
    elif opts.resume is not None:
        state = _read_resume_state(opts.resume)
        if state is not None:  # ours: exact resume
            c.resume_nimg = int(state['cur_nimg'])  # popped by main(): is there anything left to train?
            if opts.seed is None:
                c.seed = int(state['seed'])
            saved_network = json.loads(state.get('options') or '{}').get('network_kwargs') or {}
            if opts.init is not None and 'augment_dim' in saved_network:  # its weights are what the state holds
                c.network_kwargs.augment_dim = saved_network['augment_dim']
            check_network_class(saved_network.get('class_name'), c.network_kwargs.class_name, opts.resume)
            check_weights_fit(state['networks']['net'], c.network_kwargs, interface, opts.resume, strict=True)
            saved_widths = sorted(float(w) for w in state.get('phema', {}))
            if opts.phema and not saved_widths:
                raise click.BadParameter(f'{opts.resume} keeps no post-hoc EMAs: they are tracked from the first '
                                         f'step, so cannot be added on resume; resume without --phema, or start a '
                                         f'new run with it', param_hint='--phema')
            if opts.phema and saved_widths != sorted(opts.phema):
                raise click.BadParameter(f'{opts.resume} keeps post-hoc EMAs of widths {saved_widths}; resume with '
                                         f'the same --phema (or without it)', param_hint='--phema')
            del state
        else:  # EDM's: weights from the matching snapshot, then the pickled net and optimizer state
            kimg = training_loop.parse_state_kimg(opts.resume)
            c.resume_pkl = os.path.join(os.path.dirname(opts.resume), f'network-snapshot-{kimg:06d}.pkl')
            if not os.path.isfile(c.resume_pkl):
                raise click.BadParameter(f'{opts.resume} is not one of our training states, and an EDM training '
                                         f'state needs {c.resume_pkl} beside it', param_hint='--resume')
            try:  # Both files are read again by the loop; checked here so that a bad one stops us in one line.
                edm_state = persistence.load_edm_training_state(opts.resume)
                snapshots.read_snapshot(c.resume_pkl)
            except (persistence.NetworkPickleError, OSError, ValueError) as err:
                raise click.BadParameter(str(err), param_hint='--resume') from None
            check_weights_fit(dict(misc.named_params_and_buffers(edm_state['net'])), c.network_kwargs, interface,
                              opts.resume, strict=False)
            del edm_state
            c.resume_kimg = kimg
            c.resume_nimg = kimg * 1000
        c.resume_state_dump = opts.resume
    c.max_nonfinite_steps = opts.max_nonfinite
    if opts.phema:
        c.phema_stds = list(opts.phema)

    # Description string.
    cond_str = 'cond' if c.dataset_kwargs.use_labels else 'uncond'
    dtype_str = 'fp16' if (opts.fp16 or opts.precision == 'fp16') else opts.precision
    precond_name = next((k for k, v in PRECOND_CLASSES.items() if v == c.network_kwargs.class_name), 'init')
    desc = (f'{dataset_name:s}-{cond_str:s}-{arch_name:s}-{precond_name:s}-gpus{world_size:d}-'
            f'batch{c.batch_size:d}-{dtype_str:s}')
    for tag in wrapper_tags:
        desc += f'-{tag}'
    if opts.desc is not None:
        desc += f'-{opts.desc}'
    return c, desc


def _presets_epilog() -> str:
    lines = ['Published configurations (training.presets.TRAIN_PRESETS; give --data the dataset\'s path):']
    for name in TRAIN_PRESETS:
        lines += ['', f'\b\n  # {name}', f'  {preset_command(name)}']
    return '\n'.join(lines)


@click.command(help=__doc__, epilog=_presets_epilog())
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
# Plug-ins (losses.LOSS_WRAPPERS; compose with each other and with --loss edm|vp|ve).
@_wrapper_options
# Hyperparameters.
@click.option('--duration', help='Training duration (whole kimg; a fraction rounds up)', metavar='MIMG',
              type=FiniteFloat(min=0, min_open=True), default=200, show_default=True)
@click.option('--batch', help='Total batch size', metavar='INT', type=click.IntRange(min=1), default=512,
              show_default=True)
@click.option('--batch-gpu', help='Limit batch size per GPU', metavar='INT', type=click.IntRange(min=1))
@click.option('--cbase', help='Channel multiplier  [default: varies]', metavar='INT', type=click.IntRange(min=1))
@click.option('--cres', help='Channels per resolution  [default: varies]', metavar='LIST', type=str,
              callback=_channel_list)
@click.option('--blocks', help='Residual blocks per resolution (tiny nets)', metavar='INT', type=click.IntRange(min=1),
              hidden=True)
@click.option('--attn', help='Resolutions with attention (tiny nets)', metavar='LIST', type=str,
              callback=_resolution_list, hidden=True)
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
@click.option('--channels-last', 'channels_last', help='Weights in channels_last memory format (faster convolutions on '
              'GPUs; not bit-identical)', metavar='BOOL', type=bool, default=False, show_default=True)
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
              callback=_width_list, default=None)
@click.option('--max-nonfinite', help='Stop after this many consecutive steps with non-finite losses or gradients',
              metavar='STEPS', type=click.IntRange(min=1), default=100, show_default=True)
@click.option('-n', '--dry-run', help='Print training options and exit', is_flag=True)
def main(**kwargs):
    try:
        _main(**kwargs)
    except click.UsageError as err:  # an error about an option the preset set: say so (the user never typed it)
        preset = TRAIN_PRESETS.get(kwargs.get('preset'), {})
        named = [f'--{key.replace("_", "-")}' for key in preset
                 if re.search(rf'--{key.replace("_", "-")}(?![-\w])', err.format_message())]
        if named:
            err.message = f'{err.message} ({", ".join(named)}: from --preset={kwargs["preset"]})'
        raise


def _main(**kwargs):
    opts = dnnlib.EasyDict(kwargs)
    ctx = click.get_current_context()
    early_warnings, stop_keeping_warnings = _keep_warnings(ctx)
    explicit = {name for name in kwargs if ctx.get_parameter_source(name) in (
        click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)}
    if opts.preset == 'list':
        for name in TRAIN_PRESETS:
            print(f'{name}  ({PRESET_SOURCES.get(name, "")})\n  {preset_command(name)}')
        return
    preset_notes = []
    arch_given = 'arch' in explicit  # on the command line itself (a preset's architecture yields to --init)
    if opts.preset is not None:  # a published configuration: its options, under the ones given explicitly
        if opts.preset not in TRAIN_PRESETS:
            raise click.BadParameter(f'unknown preset {opts.preset!r}: expected one of {", ".join(TRAIN_PRESETS)} '
                                     '(--preset=list shows their sources and commands)', param_hint='--preset')
        preset = TRAIN_PRESETS[opts.preset]
        preset_loss = preset.get('loss') or losses.DEFAULT_LOSS_FOR_PRECOND.get(preset.get('precond') or 'edm')
        other_loss = 'loss' in explicit and opts.loss != preset_loss
        for key, value in preset.items():
            flag = f'--{key.replace("_", "-")}'
            if key not in explicit:
                # What the explicit options replace goes with them: EDM's fp16 network under --precision (and the
                # reverse; they were refused as given together), the preset loss's options and a preconditioning
                # it cannot train under another --loss (GDD's d_lr under --loss=edm, VP under --loss=spd).
                replaced_by = ('--precision' if key == 'fp16' and 'precision' in explicit else
                               '--fp16' if key == 'precision' and 'fp16' in explicit else
                               '--loss' if key == 'loss_opt' and other_loss else
                               '--loss' if key == 'precond' and other_loss and not _trains(opts.loss, value) else None)
                if replaced_by is not None:
                    preset_notes.append(f'{replaced_by} drops the preset\'s {flag}={_preset_text(value)}')
                    continue
                opts[key] = list(value) if isinstance(value, list) else value
            elif key != 'loss_opt':
                preset_notes.append(f'{flag}={opts[key]} (preset: {value})')
        if 'loss_opt' in preset and 'loss_opt' in explicit and opts.loss == preset.get('loss'):
            # Key by key, as a resume merges them: `--loss-opt disc_weights=...` on a gdd-i preset replaced all of
            # the preset's options (freeze=1, d_lr, backbones) without a word.
            given = tuple(opts.loss_opt)
            opts.loss_opt = merge_loss_options(preset['loss_opt'], given)
            preset_notes.append(f'--loss-opt={",".join(given)} merged key by key into the preset\'s '
                                f'({",".join(preset["loss_opt"])}): {",".join(opts.loss_opt)}')
        elif 'loss_opt' in preset and 'loss_opt' in explicit:  # another loss: its own options only
            preset_notes.append(f'--loss-opt={",".join(opts.loss_opt)} (preset, for --loss={preset.get("loss")}: '
                                f'{",".join(preset["loss_opt"])})')
        explicit |= set(preset)
    resume_notes = []
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
    passed_over = []  # --resume=auto: states of other runs (other options) under --outdir

    def conflicts(path):
        reason = resume_conflicts(path, opts, explicit)
        if reason is not None:
            passed_over.append(path)
        return reason

    if opts.resume is not None:
        opts.resume = find_resume_state(opts.resume, opts.outdir, conflicts=conflicts)
        if opts.resume is None:
            print(f'--resume=auto: no training state under {opts.outdir}'
                  f'{" of a run with these options" if passed_over else ""}; starting a new run')
        else:
            state = _read_resume_state(opts.resume)
            saved = json.loads(state['train_options']) if state is not None and 'train_options' in state else None
            del state
            if saved is not None:  # Resume from the state alone: its options, then the explicit overrides.
                # --transfer only seeded the first run's weights; the state holds them now.
                saved = {k: v for k, v in saved.items() if k not in ('resume', 'dry_run', 'device', 'transfer')}
                resume_notes = apply_saved_options(opts, saved, explicit, opts.resume)
                if 'outdir' not in explicit:
                    # Beside the state, where it lies (its run folder's parent; with --nosubdir its own folder), not
                    # where it says: a moved run continues where it now is, and a state from elsewhere (a download)
                    # does not choose the folder this run writes into.
                    here = os.path.dirname(os.path.abspath(opts.resume))
                    opts.outdir = here if opts.nosubdir else os.path.dirname(here)
                    recorded = saved.get('outdir')
                    if recorded and os.path.abspath(os.path.expanduser(recorded)) != opts.outdir:
                        print(f'--resume: the state records --outdir={recorded}; it lies in {here}, so the run '
                              f'continues in {opts.outdir} (give --outdir to choose)')
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
    set_aside = []
    resumes_here = opts.resume is not None and os.path.dirname(opts.resume) == opts.outdir
    if opts.nosubdir and not resumes_here and os.path.isdir(opts.outdir):
        used = sorted(name for name in os.listdir(opts.outdir) if _RUN_FILES.fullmatch(name))
        if used and resume_arg == 'auto' and opts.resume is None and not passed_over:
            # A job killed before its first training state, restarted by its script: nothing to resume, and what
            # it wrote is set aside (not deleted) for the fresh start.
            set_aside = used
        elif used:
            shown = ', '.join(used[:3]) + (', ...' if len(used) > 3 else '')
            mix = ('would mix the two' if opts.resume is None else
                   f'would mix it with the run resumed from {opts.resume}')
            raise click.BadParameter(f'{opts.outdir} holds another run ({shown}): --nosubdir {mix}; use another '
                                     f'--outdir, or --resume from a state in that folder', param_hint='--outdir')
    if opts.device is None:
        opts.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    elif opts.device == 'cuda' and not torch.cuda.is_available():
        raise click.BadParameter('CUDA is not available on this machine', param_hint='--device')
    if opts.fp16 and opts.precision != 'fp32':
        raise click.UsageError('use either --fp16 (EDM: the network in fp16) or --precision (autocast), not both')
    if opts.device == 'cpu' and opts.fp16:
        warnings.warn('--fp16 has no effect on the CPU (the network runs in fp32)', stacklevel=1)
    try:
        dnnlib.util.check_output_path(opts.outdir, '--outdir', is_dir=True)
    except dnnlib.util.OutputPathError as err:
        raise click.UsageError(str(err)) from None
    dist.init(device=opts.device)
    dist.excepthook_abort_all_ranks()
    dist.stop_on_signals()
    world_size = dist.get_world_size()
    if dist.get_rank() == 0:
        _remove_stale_temp_files(opts.outdir)
        if opts.nosubdir and resumes_here and not opts.dry_run:
            moved = _set_aside_later_files(opts.outdir, training_loop.parse_state_kimg(opts.resume))
            if moved is not None:
                print(f'--resume in the run\'s own folder: moved {len(moved[1])} file(s) of later kimg than the state '
                      f'(the interrupted continuation: {", ".join(moved[1][:3])}{", ..." if len(moved[1]) > 3 else ""})'
                      f' to {moved[0]}')
        if set_aside and not opts.dry_run:
            aside = _set_aside(opts.outdir, 'interrupted-before-first-state', [*set_aside, 'log.txt', 'report.png'])
            print(f'--resume=auto: {opts.outdir} holds no training state, only the files of a run interrupted before '
                  f'its first one; moved them to {aside} and starting over')

    # Where a loss's reference trains with other values than train.py's defaults (EDM's), a run that leaves the
    # option out is told (GDD: no augmentation, dropout 0; EDM's 0.12 and 0.13 otherwise apply, unannounced).
    if opts.resume is None:
        for option, value in getattr(losses.LOSSES.get(opts.loss), 'reference_options', {}).items():
            if option not in explicit and opts[option] != value:
                warnings.warn(f'--loss={opts.loss}: its reference trains with --{option}={value}; this run has '
                              f'train.py\'s default --{option}={opts[option]:g} (EDM\'s): pass --{option}={value} '
                              f'for the reference\'s setting', stacklevel=1)

    c, desc = build_config(opts, world_size)
    dataset = c.pop('dataset')
    resume_nimg = c.pop('resume_nimg', None)
    if resume_nimg is not None and resume_nimg >= round(c.total_kimg * 1000):
        # A finished run (e.g. killed after its last state was written, then --resume=auto): EDM's loop would train
        # one more step and write the last tick again, so the result would depend on whether the kill came first.
        dist.print0(f'{opts.resume} is at {resume_nimg / 1000:g} kimg, the end of the run '
                    f'(--duration={opts.duration:g} Mimg): nothing to train; a larger --duration continues it')
        return
    c.state_extras = dict(train_options=json.dumps({k: v for k, v in opts.items() if k != 'dry_run'}))
    c.run_dir = dist.broadcast_object(_run_dir(opts.outdir, desc, opts.nosubdir, create=not opts.dry_run)
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
    run_dir_is_new = not opts.nosubdir  # a numbered run folder, made for this run by _run_dir(create=True)
    if dist.get_rank() == 0:
        os.makedirs(c.run_dir, exist_ok=True)
        with dnnlib.util.atomic_output(os.path.join(c.run_dir, 'training_options.json'), 'wt') as f:
            json.dump({k: v for k, v in c.items() if k != 'state_extras'}, f, indent=2)
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
            logger.file.write(f'Error: {err}\n')  # Into log.txt only: click prints it on the terminal.
            logger.close()
        if isinstance(err, training_loop.ResumeMismatchError) and run_dir_is_new and dist.get_rank() == 0:
            _remove_unstarted_run_dir(c.run_dir)
        raise click.ClickException(str(err)) from None
    except BaseException as err:
        if logger is not None and logger.file is not None:
            # The fatal error belongs in log.txt too (only there: the terminal gets it from the excepthook). When a
            # collective failed because another rank ended, that rank's error is the cause: say so in one line.
            logger.file.write(f'Error: another rank ended ({str(err).splitlines()[0][:200]}); its own error, printed '
                              f'by that rank, is the cause\n' if dist.is_peer_failure(err) else
                              traceback.format_exc())
        raise
    finally:
        if logger is not None:
            logger.close()
    if dist.stop_agreed():
        # Stopped early by SIGTERM or Ctrl-C, its state written: not a finished run (a job script that requeues on a
        # non-zero exit should). The shell's code for the signal (143, 130; 143 on a rank that was only told by
        # another). Outside the try: an exit, not an error with a traceback in log.txt.
        raise SystemExit(128 + (dist.stop_requested() or signal.SIGTERM))


if __name__ == '__main__':
    dnnlib.util.concise_warnings()
    torch.multiprocessing.set_start_method('spawn')
    main()
