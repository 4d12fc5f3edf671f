"""Loss registry and the contract between a loss and the training loop.

A loss is a class registered by name in `LOSSES`. The loop builds it from `loss_kwargs` (`class_name` +
constructor kwargs, as in EDM's training_options.json) and, per accumulation round, calls

    loss(net, batch, augment_pipe=None) -> per-element (image-shaped) or per-sample loss tensor

The loop reduces it as EDM does: loss.sum() * loss_scaling / batch_gpu_total, then DDP averages over ranks.
What a loss exchanges with the loop (Batch, PerImageRandom, Phase) lives in losses/base.py.

What a loss provides (DenoisingLoss and LossWrapper do; for a loss without them the loop uses EDM's process,
the plain stream and no checks):
- `process`: its forward process (processes/), recorded in snapshots so that they are sampled correctly.
- `batch_source(data, inner) -> source`: where its batches come from. `inner` is the loop's default (EDM's stream
  of training images, training/batch_sources.py); a loss that needs more (STF: a reference set; AOT: prepared
  pools) wraps it. The source keeps its own resumable position in training states.
- `check_data(batch_gpu_total=, batch_gpu=, dataset_size=) -> warnings`: refuses (ValueError naming the option) a
  batch layout, dataset or setting it cannot train with (GDD: a backbone whose package is missing), before training
  starts and before --dry-run says the options are fine.
Optional:
- `check_network(img_resolution=, img_channels=, label_dim=) -> warnings`: refuses (ValueError naming the option)
  images its own networks cannot read (GDD's projected discriminator: RGB or grey only), before the run folder.
- `extra_networks(net) -> dict[str, Module]`: networks the loss trains besides the denoiser (GDD: a
  discriminator). The loop moves them to the device, wraps them in DDP and saves them in training states.
- `uses_loop_lr_ramp = False`: its phases bring their own learning-rate schedules (train.py then does not warn
  about --lr-rampup).
- `phases(networks, optimizer_kwargs) -> list[Phase]`: the optimisation steps of one iteration. The default is one
  phase training `networks['net']` with the configured optimizer (EDM). GDD: generator, discriminator, lazy R1.

Wrappers (`LOSS_WRAPPERS`, built on losses/wrapper.py) modify another loss and compose (AOT over STF over any base
loss). Each entry names the train.py flags that turn it on and set its options, so train.py has no per-method code.

Snapshots do not pickle the loss; they record `loss_record(loss_kwargs)`, registered names and options only.
"""

import dataclasses
import inspect
import math

import dnnlib
from dnnlib.util import parse_bool

from .aot import AOTLoss
from .base import Batch, PerImageRandom, Phase, constant_lr, default_phases
from .denoising import DenoisingLoss, EDMLoss, VELoss, VPLoss
from .gdd import GDDLoss
from .spd import DDPMLoss, SPDLoss
from .stf import STFLoss
from .wrapper import LossWrapper

__all__ = ['Batch', 'PerImageRandom', 'Phase', 'constant_lr', 'default_phases', 'LOSSES', 'LOSS_WRAPPERS',
           'DEFAULT_LOSS_FOR_PRECOND', 'default_loss_for', 'DenoisingLoss', 'LossWrapper', 'EDMLoss', 'VPLoss',
           'VELoss', 'STFLoss',
           'AOTLoss', 'GDDLoss', 'WrapperFlag', 'LossWrapperEntry', 'loss_options', 'parse_loss_options',
           'loss_kwargs', 'wrap_loss_kwargs', 'loss_record', 'loss_kwargs_from_record', 'describe_losses',
           'SPDLoss', 'DDPMLoss', 'preconditioning_for', 'prepare_loss_kwargs', 'stochastic_sampling_notes']


# ---------------------------------------------------------------------------------------------------------------------
# Registry: name -> class. --precond picks the default loss (EDM's train.py pairs them); --loss overrides.

LOSSES = {
    'edm': EDMLoss,
    'vp': VPLoss,
    've': VELoss,
    'gdd': GDDLoss,
    'spd': SPDLoss,    # Shortest Path Diffusion (per-frequency VP process, epsilon prediction; losses/spd.py)
    'ddpm': DDPMLoss,  # SPD's DDPM control: the same objects with one linear-beta schedule
}


@dataclasses.dataclass(frozen=True)
class WrapperFlag:
    """A train.py flag of a wrapper: `--{name}` sets constructor option `option` (None: the flag only enables)."""

    name: str            # click parameter name, e.g. 'stf_refs' for --stf-refs
    option: str | None   # the wrapper's constructor keyword it sets
    type: object         # click type
    help: str
    metavar: str | None = None


@dataclasses.dataclass(frozen=True)
class LossWrapperEntry:
    """A registered wrapper: its class, the flag that turns it on (a true bool or any given value), its other flags,
    and the run-directory tag (format string over its constructor options)."""

    cls: type
    enable: WrapperFlag
    flags: tuple = ()
    tag: str = ''

    def all_flags(self) -> tuple:
        return (self.enable, *self.flags)


# Applied in this order (inner first): --stf --aot gives AOT(STF(base)). STF calls its base's `noisy_batch` and AOT
# the innermost loss's `noise` and `batch_source`, so a wrapper that changes the draws goes before 'stf' and provides
# `noisy_batch` (docs/design.md §6).
LOSS_WRAPPERS = {
    'stf': LossWrapperEntry(
        cls=STFLoss,
        enable=WrapperFlag('stf', None, bool, 'Stable Target Field targets (Xu et al. 2023)', 'BOOL'),
        flags=(WrapperFlag('stf_refs', 'num_refs', int, 'STF reference set per GPU, incl. its micro-batch  '
                           '[default: 1024]', 'INT'),
               WrapperFlag('stf_mask_classes', 'mask_classes', bool, "STF with --cond: only references of the "
                           "sample's class; 0 = mix classes like the reference code (Newbeeer/stf)  [default: 1]",
                           'BOOL')),
        tag='stf{num_refs}'),
    'aot': LossWrapperEntry(
        cls=AOTLoss,
        enable=WrapperFlag('aot', 'pool_size', int, 'AOT noise-image pairing (Kim et al. 2024) over pools of this '
                           'many images per GPU', 'INT'),
        tag='aot{pool_size}'),
}

DEFAULT_LOSS_FOR_PRECOND = {'vp': 'vp', 've': 've', 'edm': 'edm', 'gdd': 'gdd', 'eps': 'spd'}


def default_loss_for(precond: str | None) -> str:
    """The loss train.py trains --precond with when --loss is not given: DEFAULT_LOSS_FOR_PRECOND's entry, else the
    one registered loss whose `preconditionings` start with it (an added loss and its network wrapper need no line
    here). ValueError naming --loss when no loss, or several, declare it."""
    precond = precond or 'edm'
    if precond in DEFAULT_LOSS_FOR_PRECOND:
        return DEFAULT_LOSS_FOR_PRECOND[precond]
    owners = [name for name, cls in LOSSES.items() if tuple(getattr(cls, 'preconditionings', ()))[:1] == (precond,)]
    if len(owners) != 1:
        which = f"losses {', '.join(owners)} declare it" if owners else 'no registered loss declares it first'
        raise ValueError(f"--precond={precond} has no default loss ({which}): give --loss")
    return owners[0]


def _loss_class(name: str, wrappers: bool = False):
    if wrappers and name in LOSS_WRAPPERS:
        return LOSS_WRAPPERS[name].cls
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(LOSSES)}")
    return LOSSES[name]


def _class_path(cls) -> str:
    return f'{cls.__module__}.{cls.__qualname__}'


def loss_options(name: str) -> dict:
    """The constructor options of loss (or wrapper) `name` with their defaults, e.g. {'P_mean': -1.2, ...}."""
    signature = inspect.signature(_loss_class(name, wrappers=True).__init__)
    options = {}
    for param in list(signature.parameters.values())[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        options[param.name] = None if param.default is param.empty else param.default
    return options


def user_options(name: str) -> dict:
    """loss_options without those the loss records itself (a class's `recorded_options`, e.g. SPD's fit_source,
    written by its fit): what --loss-opt accepts and --help lists."""
    recorded = getattr(_loss_class(name, wrappers=True), 'recorded_options', ())
    return {k: v for k, v in loss_options(name).items() if k not in recorded}


def _convert(text: str, default, what: str):
    try:
        if isinstance(default, bool):
            return parse_bool(text)
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            value = float(text)
            if not math.isfinite(value):
                raise ValueError
            return value
        if isinstance(default, (list, tuple)):
            return [float(v) if any(c in v for c in '.eE') else int(v) for v in text.split(',') if v.strip()]
        if isinstance(default, str):
            return text
        try:
            return float(text) if any(c in text for c in '.eE') else int(text)
        except ValueError:
            return text
    except ValueError:
        finite = ', a finite number' if isinstance(default, float) else ''
        raise ValueError(f"{what}: cannot read {text!r} as {type(default).__name__} (default {default!r}"
                         f"{finite})") from None


def parse_loss_options(name: str, items) -> dict:
    """Parse ['KEY=VALUE', ...] into constructor kwargs of loss `name`, typed like the defaults."""
    cls = _loss_class(name)  # A base loss (wrappers take their options from their own flags).
    options = user_options(name)
    kwargs = {}
    for item in items or ():
        key, sep, value = str(item).partition('=')
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        if key in getattr(cls, 'recorded_options', ()):
            raise ValueError(f"option {key!r} of loss {name!r} is recorded by the loss itself, not given: "
                             f"{cls.recorded_options[key]}")
        if key not in options:
            valid = ', '.join(options) or 'none'
            raise ValueError(f"loss {name!r} has no option {key!r}; its options are: {valid}")
        kwargs[key] = _convert(value.strip(), options[key], f"option {key!r} of loss {name!r}")
    return kwargs


def loss_kwargs(name: str, options: dict | None = None) -> dnnlib.EasyDict:
    """EDM-style config entry: EasyDict(class_name='losses.denoising.EDMLoss', **options)."""
    cls = _loss_class(name, wrappers=True)
    unknown = set(options or {}) - set(loss_options(name))
    if unknown:
        raise ValueError(f"loss {name!r} has no option(s) {', '.join(sorted(unknown))}; "
                         f"its options are: {', '.join(loss_options(name))}")
    return dnnlib.EasyDict(class_name=_class_path(cls), **(options or {}))


def wrap_loss_kwargs(name: str, base_kwargs: dict, options: dict | None = None) -> dnnlib.EasyDict:
    """The config of wrapper `name` around the loss config `base_kwargs` (e.g. STF around EDM)."""
    if name not in LOSS_WRAPPERS:
        raise ValueError(f"unknown loss wrapper {name!r}; expected one of {', '.join(LOSS_WRAPPERS)}")
    cls = LOSS_WRAPPERS[name].cls
    kwargs = dict(base_kwargs)
    while kwargs:
        if kwargs.get('class_name') == _class_path(cls):
            raise ValueError(f'{name.upper()} is already applied to this loss')
        kwargs = kwargs.get('base_kwargs') or {}
    return loss_kwargs(name, dict(options or {}, base_kwargs=dict(base_kwargs)))


def _name_of(class_name: str) -> str:
    for name in (*LOSSES, *LOSS_WRAPPERS):
        if _class_path(_loss_class(name, wrappers=True)) == class_name:
            return name
    raise ValueError(f"loss class {class_name!r} is not registered in losses.LOSSES or losses.LOSS_WRAPPERS")


def loss_record(kwargs: dict) -> dict:
    """What a snapshot records of its loss config: {'name': registered name, 'options': {...}} with a wrapper's
    base as option 'base' (a record too). Plain data only: names, numbers, strings, lists."""
    kwargs = dict(kwargs)
    class_name = kwargs.pop('class_name')
    base = kwargs.pop('base_kwargs', None)
    try:
        record = {'name': _name_of(class_name), 'options': dict(kwargs)}
    except ValueError:  # An unregistered loss (a user's class): described, never rebuilt from the record.
        record = {'name': None, 'class_name': class_name, 'options': dict(kwargs)}
    if base is not None:
        record['options']['base'] = loss_record(base)
    return record


def stochastic_sampling_notes(record: dict | None) -> list[str]:
    """What the losses a snapshot was trained with (its `loss` record, wrappers' bases included) say against sampling
    it with steps that draw fresh noise: each registered class's `stochastic_sampling_note` (AOT's), outermost first."""
    notes = []
    while record:
        name = record.get('name')
        cls = LOSS_WRAPPERS[name].cls if name in LOSS_WRAPPERS else LOSSES.get(name)
        if getattr(cls, 'stochastic_sampling_note', None):
            notes.append(cls.stochastic_sampling_note)
        record = (record.get('options') or {}).get('base')
    return notes


def loss_kwargs_from_record(record: dict) -> dnnlib.EasyDict:
    """The loss config a `loss_record` describes; only registered names are accepted (a record from a file never
    names a class to import)."""
    if record.get('name') is None:
        raise ValueError(f"loss record of the unregistered class {record.get('class_name')!r} cannot be rebuilt")
    options = dict(record.get('options') or {})
    base = options.pop('base', None)
    if base is not None:
        options['base_kwargs'] = loss_kwargs_from_record(base)
    return loss_kwargs(record['name'], options)


def preconditioning_for(name: str, precond: str | None) -> str:
    """The --precond to train base loss `name` with. A loss class may declare the ones it trains
    (`preconditionings`; SPD: ('eps',), GDD: ('gdd', 'edm')); one that does not trains any denoiser D(x; sigma).
    None (not given): 'edm' where the loss trains it, else its first declared one. ValueError (naming --precond) for a
    preconditioning the loss cannot train, including another loss's network that is not a denoiser (a declaration
    without 'edm', such as SPD's epsilon predictor)."""
    declared = getattr(_loss_class(name), 'preconditionings', None)
    if declared is None:
        foreign = {p for cls in LOSSES.values() for p in getattr(cls, 'preconditionings', ('edm',))
                   if 'edm' not in getattr(cls, 'preconditionings', ('edm',))}
        if precond in foreign:
            users = [n for n, cls in LOSSES.items() if precond in getattr(cls, 'preconditionings', ())]
            raise ValueError(f"--precond={precond} is not a denoiser; --loss={name} trains edm, vp or ve "
                             f"(--precond={precond} is for --loss {' or '.join(users)})")
        return precond or 'edm'
    default = 'edm' if 'edm' in declared else declared[0]
    if precond is None:
        return default
    if precond not in declared:
        # train.py --init without --precond wraps the pickle's network in the first declared one (GDD: gdd)
        with_init = f', {declared[0]} with --init' if declared[0] != default else ''
        raise ValueError(f"--precond={precond} cannot train --loss={name}, which trains {' or '.join(declared)} "
                         f"(leave --precond out to get {default}{with_init})")
    return precond


def prepare_loss_kwargs(kwargs: dict, dataset_kwargs: dict) -> tuple[dnnlib.EasyDict, list[str]]:
    """Settle the options a loss takes from the training data, once, before training (SPD's fitted spectrum): a
    registered loss class with `resolve_options(options, dataset_kwargs) -> (options, notes)` rewrites its options;
    wrappers' bases are visited too. Returns the config and lines to print; ValueError names the option."""
    kwargs = dnnlib.EasyDict(kwargs)
    notes = []
    if kwargs.get('base_kwargs') is not None:
        kwargs.base_kwargs, notes = prepare_loss_kwargs(kwargs.base_kwargs, dataset_kwargs)
    try:
        cls = _loss_class(_name_of(kwargs.class_name), wrappers=True)
    except ValueError:  # An unregistered class (a user's): nothing to settle.
        return kwargs, notes
    if hasattr(cls, 'resolve_options'):
        options = {k: v for k, v in kwargs.items() if k not in ('class_name', 'base_kwargs')}
        options, more = cls.resolve_options(options, dataset_kwargs)
        rest = {'base_kwargs': kwargs.base_kwargs} if 'base_kwargs' in kwargs else {}
        kwargs = dnnlib.EasyDict(class_name=kwargs.class_name, **options, **rest)
        notes += more
    return kwargs, notes


def describe_losses() -> str:
    """One line per registered loss with its options and defaults (for --help)."""
    return '; '.join(f"{name}: " + ', '.join(f"{k}={v}" for k, v in user_options(name).items())
                     for name in LOSSES)
