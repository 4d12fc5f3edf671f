"""--resume: finding the training state to continue (a file, a run folder's newest readable one, or `auto`: the
newest under --outdir of a run these options continue), carrying the run's saved options over (the command line's
overrides named, with whether the continuation stays exact; network changes refused), and checking that the state's
weights fit the network of these options before any run folder exists. train.py's helpers: errors are click's, so
that they name the option."""

import copy
import glob
import json
import os
import pickle
import warnings

import click
import torch

import dnnlib
import losses
from torch_utils import distributed as dist
from torch_utils import misc, persistence
from training import snapshots, training_loop
from training.presets import EARLIER_PRESET_VALUES, REMOVED_PRESETS, TRAIN_PRESETS


def read_resume_state(path: str) -> dict | None:
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


def _state_files(pattern: str) -> list[str]:
    """The training-state-NNNNNN.pt files in the folders matching `pattern` (a glob pattern: escape a path's own
    [, * and ?). A file the glob also matches under another name (a copy kept as training-state-best.pt) has no
    kimg, so no snapshot beside it to resume an EDM state from, and read_resume_state refuses its name."""
    return [path for path in glob.glob(os.path.join(pattern, 'training-state-*.pt'))
            if training_loop.parse_state_kimg(path) is not None]


def find_resume_state(resume: str, outdir: str | None, conflicts=None) -> str | None:
    """--resume=FILE, a run directory (its newest readable training state) or 'auto' (the newest readable state in
    the run directories under --outdir, or --outdir itself; None when there is none). Unreadable states are skipped
    with a warning. With 'auto', `conflicts(state_path)` -> a reason or None: a run whose state conflicts with the
    options given is another experiment (a sweep sharing --outdir), and is passed over with a note."""
    if resume == 'auto':
        if outdir is None:
            raise click.UsageError('--resume=auto needs --outdir (the folder of the runs to continue)')
        # Escaped: an --outdir named like a sweep's (runs[lr=2e-4]) is a folder, not a glob pattern.
        candidates = _state_files(glob.escape(outdir)) + _state_files(os.path.join(glob.escape(outdir), '*'))
    elif os.path.isdir(resume):
        candidates = _state_files(glob.escape(resume))
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
            dist.print0(f'--resume=auto: passing over {folder}, another run ({reason})')
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


# Options that do not change the trajectory: changing them on resume keeps the continuation exact. A preset's name
# is one where the two presets set the same (_same_preset_settings): a preset renamed, or another with its settings.
_EXACT_OPTIONS = ('outdir', 'desc', 'nosubdir', 'tick', 'snap', 'dump', 'duration', 'workers', 'bench', 'cache',
                  'dry_run', 'resume', 'max_nonfinite', 'transfer')


def _same_preset_settings(old: str | None, new: str | None) -> bool:
    """Whether presets `old` (the run's) and `new` set the same options to the same values (a removed name counts as
    its successor's). Not merely whether `new`'s values match the run: an option the run's preset set and `new` does
    not is carried over from the run, not given, so --preset=edm-cifar10-uncond-ve --resume=auto resumed an
    aot-cifar10-uncond run (AOT, batch 256) in a shared --outdir as 'the continuation stays exact'."""
    settings = [TRAIN_PRESETS.get(REMOVED_PRESETS.get(name, name)) if name is not None else None for name in (old, new)]
    return settings[0] is not None and settings[0] == settings[1]


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
    differing = [change for kind, change, _ in changes if kind not in ('exact', 'kept')]
    return ', '.join(differing) if differing else None


def _saved_option_changes(opts: dnnlib.EasyDict, saved: dict, explicit: set, state_path: str) \
        -> list[tuple[str, str, str]]:
    """apply_saved_options' work: (kind, change, why) per option given that differs from the saved one, kind
    'exact', 'not exact', 'path' or 'kept' (the run's own value, which its --preset set otherwise then); change is
    '--flag: old -> new'."""
    notes = []
    for key, old in saved.items():
        if key not in opts:
            continue
        if key not in explicit:
            replaced_by = _replaced_by(key, old, opts, explicit)
            if replaced_by is not None:  # the run's own value would contradict the one given: it goes
                notes.append(('not exact', f'--{key.replace("_", "-")}: {old!r} -> {opts[key]!r}',
                              f'replaced by {replaced_by}: the continuation is not exact'))
            elif not _dropped_with_its_method(key, opts, explicit, saved):
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
        if _set_by_an_earlier_preset(key, opts, saved):
            # Not given: the run's own --preset set it, to another value in the version that made the run (presets
            # are corrected: edm-cifar10-uncond-vp set --precond=vp before 2026-12-03, edm since). The run keeps its
            # value, as any option not given (--resume=auto passed over the run and started another network anew).
            opts[key] = old
            notes.append(('kept', f'{flag}: {new!r} -> {old!r}', f'--preset={opts.preset} sets {new!r} in this '
                          f'version; the run keeps the {old!r} it was made with'))
            continue
        if key in _NETWORK_OPTIONS or (key == 'augment' and (new > 0) != (old > 0)):
            trained = old if old is not None else _default_resolution(key, saved)
            trained = f'{trained!r}' if trained is not None else f'no {flag} (its default)'
            raise click.BadParameter(f'{new!r} contradicts the training state {state_path}, which was trained with '
                                     f'{trained}: the network would not match (use --transfer to start a new run '
                                     f'from its weights)', param_hint=flag)
        if key in _PATH_OPTIONS:
            if dnnlib.util.same_file(new, old):
                # One file by another name (a symlink, a bind mount): the same data. --resume=auto passed over such
                # a run as another one and started anew.
                continue
            notes.append(('path', f'{flag}: {old!r} -> {new!r}', 'another path: exact if it holds the same content'))
            continue
        exact = key in _EXACT_OPTIONS or (key == 'preset' and _same_preset_settings(old, new))
        if old is None:  # saved without the option: what it resolved to (--loss: None -> 'vp' said nothing)
            old = _default_resolution(key, saved)
        notes.append(('exact' if exact else 'not exact', f'{flag}: {old!r} -> {new!r}',
                      f'the continuation {"stays" if exact else "is not"} exact'))
    return notes


def _set_by_an_earlier_preset(key: str, opts: dnnlib.EasyDict, saved: dict) -> bool:
    """Whether the saved run has the value its --preset set for `key` in an earlier version (EARLIER_PRESET_VALUES),
    and these options the one it sets now. Only those: a run of the same preset with an option typed otherwise
    (a sweep sharing --outdir) is still another run."""
    name, earlier = opts.get('preset'), EARLIER_PRESET_VALUES.get(opts.get('preset'), {})
    return (saved.get('preset') == name and key in earlier and _options_equal(saved.get(key), earlier[key])
            and _options_equal(opts[key], TRAIN_PRESETS[name][key]))


def _replaced_by(key: str, old, opts: dnnlib.EasyDict, explicit: set) -> str | None:
    """The option given that replaces the run's own `key`, or None: EDM's fp16 network and autocast exclude each
    other, so --precision=bf16 on a --fp16=1 run (GDD's presets) drops its --fp16, and --fp16=1 a run's --precision,
    as a preset's are dropped (a resume refused them as 'given together', naming an option not given)."""
    if key == 'fp16' and old and 'precision' in explicit and opts.precision != 'fp32':
        return f'--precision={opts.precision}'
    if key == 'precision' and old != 'fp32' and 'fp16' in explicit and opts.fp16:
        return '--fp16=1'
    return None


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
        loss = saved.get('loss') or losses.default_loss_for(saved.get('precond'))
        return loss if key == 'loss' else losses.preconditioning_for(loss, saved.get('precond'))
    except (KeyError, ValueError):
        return None


def _options_equal(a, b) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


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


def resume_config(c: dnnlib.EasyDict, opts: dnnlib.EasyDict, interface: dict) -> None:
    """What the loop needs to continue from the state --resume names (opts.resume), checked before any run folder
    exists: ours resumes exactly (its seed unless --seed is given; the weights must fit this network and dataset, the
    post-hoc EMAs must be the run's); EDM's resumes from the network snapshot of its kimg beside it. Sets c's
    resume_* entries (resume_nimg: popped by train.py, which stops when nothing is left to train)."""
    state = read_resume_state(opts.resume)
    if state is not None:  # ours: exact resume
        c.resume_nimg = int(state['cur_nimg'])
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
        c.resume_kimg = kimg
        c.resume_nimg = kimg * 1000
    c.resume_state_dump = opts.resume


def resolve_resume(opts: dnnlib.EasyDict, explicit: set) -> tuple[list[str], list[str]]:
    """--resume: the state to continue (opts.resume becomes its path; None when `auto` finds none), then the options
    it records under the explicit ones (`explicit`: the names given on the command line or by a preset). Without
    --outdir the run continues beside the state. Returns notes on the overrides and the states passed over as other
    runs' (--resume=auto under an --outdir shared by a sweep)."""
    passed_over = []

    def conflicts(path):
        reason = resume_conflicts(path, opts, explicit)
        if reason is not None:
            passed_over.append(path)
        return reason

    if opts.resume is None:
        return [], passed_over
    opts.resume = find_resume_state(opts.resume, opts.outdir, conflicts=conflicts)
    if opts.resume is None:
        dist.print0(f'--resume=auto: no training state under {opts.outdir}'
              f'{" of a run with these options" if passed_over else ""}; starting a new run')
        return [], passed_over
    state = read_resume_state(opts.resume)
    saved = json.loads(state['train_options']) if state is not None and 'train_options' in state else None
    del state
    if saved is None:  # EDM's state, or ours from before options were recorded: the command line says it all
        return [], passed_over
    # Resume from the state alone: its options, then the explicit overrides. --transfer only seeded the first run's
    # weights; the state holds them now.
    saved = {k: v for k, v in saved.items() if k not in ('resume', 'dry_run', 'device', 'transfer')}
    notes = apply_saved_options(opts, saved, explicit, opts.resume)
    if 'outdir' not in explicit:
        # Beside the state, where it lies (its run folder's parent; with --nosubdir its own folder), not where it
        # says: a moved run continues where it now is, and a state from elsewhere (a download) does not choose the
        # folder this run writes into.
        here = os.path.dirname(os.path.abspath(opts.resume))
        opts.outdir = here if opts.nosubdir else os.path.dirname(here)
        recorded = saved.get('outdir')
        if recorded and os.path.abspath(os.path.expanduser(recorded)) != opts.outdir:
            dist.print0(f'--resume: the state records --outdir={recorded}; it lies in {here}, so the run continues in '
                  f'{opts.outdir} (give --outdir to choose)')
    return notes, passed_over
