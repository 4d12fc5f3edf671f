"""train.py's options: their click types and checks, the flags of the registered loss wrappers, the published
presets under the options given, and the training loop's configuration they build (EDM's train.py logic: dataset,
network, preconditioning, loss, batch layout, schedule, seed, transfer/resume; each refusal names its option before
any run folder exists). train.py parses the command line and runs the loop; the decisions live here."""

import inspect
import math
import os
import re
import secrets
import warnings

import click

import dnnlib
import losses
from samplers.generation import parse_int_list
from torch_utils import distributed as dist
from torch_utils import persistence
from training import networks, snapshots
from training.presets import ARCH_PRESETS, PRECOND_CLASSES, REMOVED_PRESETS, TRAIN_PRESETS, preset_command
from training.resume import merge_loss_options, resume_config


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


def _int_list(value: str, what: str) -> list[int]:
    """'1,2,5-10' (EDM's list syntax; empty parts skipped) -> ints, or click's error naming what was expected."""
    parts = [part for part in value.split(',') if part.strip()]
    try:
        return parse_int_list(','.join(parts)) if parts else []
    except ValueError:
        raise click.BadParameter(f'expected {what}, got {value!r}') from None


def channel_list(ctx, param, value):
    """--cres: a non-empty list of positive channel multipliers."""
    if value is None:
        return None
    what = 'a non-empty comma-separated list of positive integers'
    values = _int_list(value, what)
    if not values or min(values) < 1:
        raise click.BadParameter(f'expected {what}, got {value!r}')
    return values


def resolution_list(ctx, param, value):
    """--attn: a (possibly empty) list of positive resolutions."""
    if value is None:
        return None
    values = _int_list(value, 'a comma-separated list of positive resolutions')
    if any(v < 1 for v in values):
        raise click.BadParameter(f'expected positive resolutions, got {value!r}')
    return values


def width_list(ctx, param, value):
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


def _flag(flag) -> str:
    return '--' + flag.name.replace('_', '-')


def wrapper_options(func):
    """The train.py flags of the registered loss wrappers (losses.LOSS_WRAPPERS), e.g. --stf, --stf-refs, --aot."""
    for entry in reversed(list(losses.LOSS_WRAPPERS.values())):
        for flag in reversed(entry.all_flags()):
            param_type = click.IntRange(min=1) if flag.type is int else flag.type
            default = False if flag is entry.enable and flag.type is bool else None
            func = click.option(_flag(flag), flag.name, help=flag.help, metavar=flag.metavar, type=param_type,
                                default=default, show_default=default is not None)(func)
    return func


def option_error(err: Exception) -> click.ClickException:
    """A library's ValueError as a click error; '--option: message' becomes 'Invalid value for --option: message'."""
    match = re.match(r'(--[a-z0-9-]+): (.*)', str(err), re.S)
    if match:
        return click.BadParameter(match.group(2), param_hint=match.group(1))
    return click.UsageError(str(err))


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
            raise option_error(err) from None
        tags.append(entry.tag.format(**options))
    return loss_kwargs, tags


def _class_or_none(class_name: str):
    """The class a network config names, or None where it cannot be imported (a user's module elsewhere)."""
    try:
        return dnnlib.util.get_obj_by_name(class_name)
    except Exception:  # the name comes from a config or pickle: any import failure only skips the check it serves
        return None


def _trains(loss: str, precond: str) -> bool:
    """Whether --loss can train --precond (losses.preconditioning_for accepts the pair)."""
    try:
        losses.preconditioning_for(loss, precond)
        return True
    except (KeyError, ValueError):
        return False


def _preset_text(value) -> str:
    return ','.join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def apply_preset(opts: dnnlib.EasyDict, explicit: set) -> list[str]:
    """--preset: a published configuration's options under the ones given explicitly (`explicit`, which gains the
    preset's keys). What an explicit option replaces goes with it. Returns notes on the explicit options that win."""
    if opts.preset is None:
        return []
    notes = []
    if opts.preset in REMOVED_PRESETS:
        raise click.BadParameter(f'preset {opts.preset!r} was removed on 2026-12-03: its settings are '
                                 f'{REMOVED_PRESETS[opts.preset]!r} (the run that an earlier version made with it '
                                 f'resumes with that name)', param_hint='--preset')
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
                notes.append(f'{replaced_by} drops the preset\'s {flag}={_preset_text(value)}')
                continue
            opts[key] = list(value) if isinstance(value, list) else value
        elif key != 'loss_opt':
            notes.append(f'{flag}={opts[key]} (preset: {value})')
    if 'loss_opt' in preset and 'loss_opt' in explicit and opts.loss == preset.get('loss'):
        # Key by key, as a resume merges them: `--loss-opt disc_weights=...` on a gdd-i preset replaced all of
        # the preset's options (freeze=1, d_lr, backbones) without a word.
        given = tuple(opts.loss_opt)
        opts.loss_opt = merge_loss_options(preset['loss_opt'], given)
        notes.append(f'--loss-opt={",".join(given)} merged key by key into the preset\'s '
                     f'({",".join(preset["loss_opt"])}): {",".join(opts.loss_opt)}')
    elif 'loss_opt' in preset and 'loss_opt' in explicit:  # another loss: its own options only
        notes.append(f'--loss-opt={",".join(opts.loss_opt)} (preset, for --loss={preset.get("loss")}: '
                     f'{",".join(preset["loss_opt"])})')
    explicit |= set(preset)
    return notes


def keep_warnings(ctx: click.Context):
    """Warnings are shown as usual and also kept, so that those given before log.txt exists (the options' and the
    data's: STF over AOT, --fp16 on the CPU, ...) can be written into it too: a run's log is read long after the
    terminal is gone. Returns (the kept texts, a function that stops keeping); the command's end stops it too.
    Under torchrun only each node's local rank 0 shows them: every rank builds the same options from the same command
    line and data, so 8 GPUs printed each of these warnings 8 times (what the loop warns about later is its own)."""
    kept, show = [], warnings.showwarning
    shown = os.environ.get('LOCAL_RANK', '0') in ('', '0')

    def show_and_keep(message, category, filename, lineno, file=None, line=None):
        kept.append(f'{category.__name__}: {message}')
        if shown:
            show(message, category, filename, lineno, file, line)

    def stop():
        if warnings.showwarning is show_and_keep:
            warnings.showwarning = show

    warnings.showwarning = show_and_keep
    ctx.call_on_close(stop)
    return kept, stop


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


def _arch_name(network_kwargs: dict) -> str:
    """ddpmpp / ncsnpp / adm for the run directory's name, from backbone options."""
    if network_kwargs.get('model_type') == 'DhariwalUNet':
        return 'adm'
    return 'ncsnpp' if network_kwargs.get('embedding_type') == 'fourier' else 'ddpmpp'


def build_config(opts: dnnlib.EasyDict, world_size: int) -> tuple[dnnlib.EasyDict, str]:
    """Loop kwargs from the CLI options (EDM's train.py logic) and the run-dir description. The steps run in this
    order, so that of several mistakes the same one is reported first; the dataset is opened once (c.dataset)."""
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
    dataset_name, interface = _dataset_config(c, opts)
    loss_name, arch_name, wrapper_tags = _network_and_loss_config(c, opts, interface)
    loss_fn = _check_batch_layout(c, opts, world_size, interface)
    _schedule_config(c, opts, loss_name, loss_fn)
    _start_config(c, opts, interface)
    return c, _description(c, opts, world_size, dataset_name, arch_name, loss_name, wrapper_tags)


def _dataset_config(c: dnnlib.EasyDict, opts: dnnlib.EasyDict) -> tuple[str, dict]:
    """The dataset opened and checked (c.dataset: the object, handed on to the loop); its name and the network
    interface it sets (resolution, channels, label dimension)."""
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
    c.dataset = dataset_obj  # handed on to training_loop (train.py pops it): the directory is listed once per rank
    if interface['img_channels'] in (2, 4):  # PNGs with alpha (dataset_tool.py refuses them; a folder is read as is)
        kind = {2: 'grey + alpha', 4: 'RGBA'}[interface['img_channels']]
        warnings.warn(f'--data holds {kind} images ({interface["img_channels"]} channels): the network learns the '
                      f'alpha channel as one more colour, and fid.py cannot evaluate its images (the detectors read '
                      f'RGB or greyscale); convert the images first (e.g. drop the alpha channel) unless you mean '
                      f'to generate alpha', stacklevel=1)
    # A preset's network, batch and schedule were published for its dataset's resolution (named in its data path).
    preset_data = TRAIN_PRESETS.get(opts.preset, {}).get('data') or ''
    published = re.search(r'-(\d+)x(\d+)\.zip$', preset_data)
    if published and int(published.group(1)) != interface['img_resolution']:
        res = interface['img_resolution']
        warnings.warn(f'--preset={opts.preset} was published for {published.group(1)}x{published.group(2)} images '
                      f'({os.path.basename(preset_data)}); --data holds {res}x{res}: its architecture and schedule '
                      f'are not the paper\'s setting there', stacklevel=1)
    return dataset_name, interface


def _check_levels(network_kwargs: dict, resolution: int, opts: dnnlib.EasyDict) -> None:
    """The U-Net's levels at `resolution`: refuses a side that its downsampling cannot halve at every level (the
    decoder's skip connections then differ by a pixel: a traceback at the first step, after the run folder exists), and
    warns where self-attention is asked for but absent (a level the network lacks, or, in ADM, fewer channels than one
    64-channel head): EDM builds those networks without it, silently."""
    channel_mult = list(network_kwargs.get('channel_mult') or [])
    cres = f'--cres={",".join(map(str, channel_mult))}' + ('' if opts.cres is not None else f' (--arch={opts.arch})')
    halvings = len(channel_mult) - 1
    if halvings > 0 and resolution % (1 << halvings):
        fitting = next(n for n in range(halvings, -1, -1) if resolution % (1 << n) == 0) + 1
        raise click.BadParameter(
            f'{cres} has {len(channel_mult)} levels, which halve the image {halvings} times, but --data holds '
            f'{resolution}x{resolution} images, whose side is not divisible by {1 << halvings}: give --cres at most '
            f'{fitting} entries, or a dataset of another resolution (dataset_tool.py --resolution; MNIST is padded to '
            f'32x32 there)', param_hint='--cres')
    backbone = getattr(networks, str(network_kwargs.get('model_type')), None)
    if backbone is None:
        return
    defaults = inspect.signature(backbone).parameters
    attn = list(network_kwargs.get('attn_resolutions', defaults['attn_resolutions'].default))
    model_channels = network_kwargs.get('model_channels', defaults['model_channels'].default)
    levels = [resolution >> i for i in range(len(channel_mult))]
    given = f'--attn={",".join(map(str, attn))}'
    missing = [r for r in attn if r not in levels]
    if opts.attn is not None and missing:
        warnings.warn(f'{given}: the network has no {missing[0]}x{missing[0]} level (its levels: '
                      f'{", ".join(map(str, levels))}), so no attention there', stacklevel=1)
    elif opts.attn is None and attn and len(missing) == len(attn):
        warnings.warn(f'--arch={opts.arch} puts self-attention at {", ".join(map(str, attn))} pixels, but at '
                      f'{resolution}x{resolution} its levels are {", ".join(map(str, levels))}: the network has no '
                      f'attention there (only in its lowest-resolution middle block); choose levels with --attn',
                      stacklevel=1)
    if backbone is networks.DhariwalUNet:
        # DhariwalUNet gives a block out_channels // 64 heads: none below 64 channels (its middle block's too).
        headless = [(r, model_channels * mult) for r, mult in zip(levels, channel_mult)
                    if r in attn and model_channels * mult < 64]
        if headless:
            names = ', '.join(f'{r}x{r}' for r, _ in headless)
            widths = ', '.join(str(channels) for _, channels in headless)
            smallest = min(channel_mult[levels.index(r)] for r, _ in headless)
            warnings.warn(f'--cbase={model_channels}: ADM splits attention into heads of 64 channels; its {names} '
                          f'level{"s" if len(headless) > 1 else ""} ({widths} channels) get none, so no attention '
                          f'there; --cbase={-(-64 // smallest)} or more gives every attention level a head',
                          stacklevel=1)


def _network_and_loss_config(c: dnnlib.EasyDict, opts: dnnlib.EasyDict, interface: dict) -> tuple[str, str, list[str]]:
    """c.network_kwargs (--arch or --init's pickle, in --precond's or the loss's preconditioning), c.loss_kwargs
    (with the loss wrappers) and c.augment_kwargs; returns the loss's name, the architecture's and the wrappers'
    run-directory tags."""
    # Network architecture, preconditioning and loss. --init: the pickle's network, with --precond's wrapper (or the
    # loss's first declared one) when given.
    try:
        loss_name = opts.loss if opts.loss is not None else losses.default_loss_for(opts.precond)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint='--precond') from None
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
            raise option_error(err) from None
        arch_name = _arch_name(c.network_kwargs)
    else:
        c.network_kwargs.update(ARCH_PRESETS[opts.arch])
        try:  # --precond, else the loss's own (EDM's losses: edm; SPD: eps); one line for a mismatch
            precond = losses.preconditioning_for(loss_name, opts.precond)
            if precond not in PRECOND_CLASSES:  # an added loss declaring a wrapper not registered as a --precond
                raise ValueError(f'--loss={loss_name} trains --precond={precond}, which training/presets.py '
                                 f'PRECOND_CLASSES does not register (add {precond!r}: its class path; '
                                 f'docs/design.md §6, A persistent class)')
            c.network_kwargs.class_name = PRECOND_CLASSES[precond]
        except ValueError as err:
            raise option_error(err) from None
        arch_name = opts.arch
    try:
        c.loss_kwargs = losses.loss_kwargs(loss_name, losses.parse_loss_options(loss_name, opts.loss_opt))
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint='--loss-opt') from err
    c.loss_kwargs, wrapper_tags = _apply_loss_wrappers(opts, c.loss_kwargs)
    try:  # What the loss settles from the data once (SPD: Sigma0 fitted with fit=...): printed, kept in the config.
        c.loss_kwargs, notes = losses.prepare_loss_kwargs(c.loss_kwargs, c.dataset_kwargs)
    except ValueError as err:
        raise option_error(err) from None
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
    if opts.init is None:  # a pickle's network was built for its resolution (checked against --data)
        _check_levels(c.network_kwargs, c.dataset_kwargs.resolution, opts)
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
    return loss_name, arch_name, wrapper_tags


def _check_batch_layout(c: dnnlib.EasyDict, opts: dnnlib.EasyDict, world_size: int, interface: dict):
    """--batch and --batch-gpu against the processes, and the loss's own checks of the layout, the dataset and the
    images' shape; returns the loss object built for them."""
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
        messages = loss_fn.check_data(batch_gpu_total=batch_per_gpu, batch_gpu=micro_batch,
                                      dataset_size=c.dataset_kwargs.max_size)
        if hasattr(loss_fn, 'check_network'):
            messages = [*messages, *loss_fn.check_network(**interface)]
        for message in messages:
            if opts.dry_run:  # else the loop says it when it checks the same (it said it twice)
                warnings.warn(message, stacklevel=1)
    except (ValueError, TypeError) as err:  # TypeError: a wrapper around a loss it cannot wrap (STF over SPD)
        raise option_error(err) from None
    return loss_fn


def _schedule_config(c: dnnlib.EasyDict, opts: dnnlib.EasyDict, loss_name: str, loss_fn) -> None:
    """Duration, learning-rate and EMA schedules, batch, precision and I/O intervals."""
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
    c.max_nonfinite_steps = opts.max_nonfinite
    if opts.phema:
        c.phema_stds = list(opts.phema)


def _start_config(c: dnnlib.EasyDict, opts: dnnlib.EasyDict, interface: dict) -> None:
    """The seed and where the weights start: --init, --transfer or --resume (files checked here, before a run
    directory exists)."""
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
            net = snapshots.load_snapshot(opts.transfer).net
        except (persistence.NetworkPickleError, OSError, ValueError) as err:
            raise click.BadParameter(str(err), param_hint='--transfer') from None
        # The weights are copied by name: another resolution names the U-Net's blocks otherwise (only the noise
        # mapping was copied, silently), another channel count or number of classes gives same-named tensors of
        # other shapes (torch's copy_ broadcast a greyscale network's [C, 1, 3, 3] input kernels into an RGB
        # network's, or failed with a traceback at the start of training). A class embedding added or left out
        # (conditional <-> unconditional) is only a tensor more or less: that transfer stays.
        for key, value in interface.items():
            theirs = getattr(net, key, None)
            if key == 'label_dim' and not (theirs and value):
                continue
            if theirs is not None and int(theirs) != value:
                raise click.BadParameter(f'{opts.transfer} has {key}={theirs}, but the dataset (--data, --cond) '
                                         f'needs {value}: its weights do not fit this network', param_hint='--transfer')
        c.resume_pkl = opts.transfer
        c.ema_rampup_ratio = None
    elif opts.resume is not None:
        resume_config(c, opts, interface)


def _description(c: dnnlib.EasyDict, opts: dnnlib.EasyDict, world_size: int, dataset_name: str, arch_name: str,
                 loss_name: str, wrapper_tags: list[str]) -> str:
    """The run directory's name after its number: EDM's, plus the loss where it is not the preconditioning's default
    (two losses over one network kind, e.g. --loss=ddpm and spd over eps, got the same name), the wrappers' tags and
    --desc."""
    cond_str = 'cond' if c.dataset_kwargs.use_labels else 'uncond'
    dtype_str = 'fp16' if (opts.fp16 or opts.precision == 'fp16') else opts.precision
    precond_name = next((k for k, v in PRECOND_CLASSES.items() if v == c.network_kwargs.class_name), 'init')
    if precond_name != 'init' and loss_name != losses.default_loss_for(precond_name):
        precond_name += f'-{loss_name}'
    desc = (f'{dataset_name:s}-{cond_str:s}-{arch_name:s}-{precond_name:s}-gpus{world_size:d}-'
            f'batch{c.batch_size:d}-{dtype_str:s}')
    for tag in wrapper_tags:
        desc += f'-{tag}'
    if opts.desc is not None:
        desc += f'-{opts.desc}'
    # The folder's name, '{id:05d}-{desc}' (ids up to 7 digits), must fit the file system's limit: a dataset file
    # named near it (a legal name) made mkdir fail with 'File name too long' in a traceback. Its name is cut.
    # --nosubdir makes no such folder: nothing to fit.
    room = dnnlib.util.NAME_MAX - len('0000000-') - len((desc[len(dataset_name):]).encode())
    if not opts.nosubdir and len(dataset_name.encode()) > room:
        if opts.desc is not None and room < 16:
            raise click.BadParameter(f'the run folder\'s name would be {len(desc.encode()) + 6} bytes long; file '
                                     f'systems take at most {dnnlib.util.NAME_MAX}: give a shorter one',
                                     param_hint='--desc')
        desc = dnnlib.util.cut_name(dataset_name, room) + desc[len(dataset_name):]
    return desc


def presets_epilog() -> str:
    lines = ['Published configurations (training.presets.TRAIN_PRESETS; give --data the dataset\'s path):']
    for name in TRAIN_PRESETS:
        lines += ['', f'\b\n  # {name}', f'  {preset_command(name)}']
    return '\n'.join(lines)
