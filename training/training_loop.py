"""The training loop: EDM's behaviour (seeding, batch accounting, DDP, LR ramp, EMA, ticks, snapshots, stats),
run as a list of phases, with exact resume from self-contained training states.

`training_loop` reads top to bottom as its steps: `_build` (seeding, data, networks, loss, phases, DDP, the batch
source), `_resume`, then per iteration `_train_step` (for each phase due: zero grads, accumulate gradients over
the rounds of the per-rank batch with DDP syncing on the last, set the phase's learning rate, scrub non-finite
gradients, step; then the EMA of `net`) and, once per tick, `_report_tick`, `_write_snapshot` and
`_write_training_state`. EDM is the one-phase case (see losses/__init__.py for the loss/phase contract). Nothing
method-specific lives here: the data of an iteration comes from the loss's batch source (training/batch_sources.py).

Randomness (rng='image', the default): the initial weights depend only on the seed, and each image's sigma and
noise only on the seed and the image's position in the global data stream (losses.PerImageRandom), so without
augmentation and dropout the trajectory is the same for any number of ranks, batch_gpu or accumulation rounds,
up to floating-point summation order. rng='rank' is EDM exactly: weights and sigma/noise from the per-rank
torch stream (which depends on the world size). Augmentation and dropout always use the per-rank torch stream,
seeded as EDM: numpy with (seed * world + rank) mod 2^31, torch with a draw from that numpy stream.

Training states (`training-state-NNNNNN.pt`, loadable with torch.load(weights_only=True)) hold everything an
exact resume needs; see `save_training_state`. RNG states of all ranks are gathered into the one file rank 0
writes, so a resume needs the same world size to be bit-exact (otherwise it warns and continues).
"""

import contextlib
import copy
import dataclasses
import functools
import json
import os
import pickle
import random
import re
import sys
import time
import warnings
import zipfile

import numpy as np
import psutil
import torch

import dnnlib
from losses import PerImageRandom, default_phases
from processes import EDMProcess
from torch_utils import distributed as dist
from torch_utils import misc, persistence, training_stats
from training import batch_sources, snapshots
from training.batch_sources import DataContext, StreamSource
from training.phema import PowerEMA, phema_file_name

STATE_FORMAT = 'diffusion-toolkit/training-state'
STATE_VERSION = 1

# Loop options that change the trajectory: compared on resume (a mismatch makes the continuation inexact).
_TRAJECTORY_OPTIONS = ('dataset_kwargs', 'network_kwargs', 'loss_kwargs', 'optimizer_kwargs', 'augment_kwargs',
                       'seed', 'batch_size', 'ema_halflife_kimg', 'ema_rampup_ratio', 'lr_rampup_kimg',
                       'loss_scaling', 'precision', 'rng', 'compile', 'channels_last')
# What a state written before an option was recorded ran with (compile and channels_last since 2026-12-04: a resume
# that turned either on was announced as exact, though both change the kernels, hence the numbers), where its
# train.py options (its 'train_options': --compile and --channels-last since 2026-11-30) do not say otherwise.
_TRAJECTORY_DEFAULTS = dict(compile=False, channels_last=False)

PRECISIONS = ('fp32', 'bf16', 'fp16')


class NonFiniteTrainingError(RuntimeError):
    """Training diverged: too many consecutive steps with non-finite losses or gradients, or non-finite weights
    where a snapshot or training state was to be written. Nothing non-finite is written under a final name."""


class ResumeMismatchError(ValueError):
    """A training state that this run's options cannot continue (another discriminator, freeze level, --phema):
    train.py reports it in one line."""


def all_finite(module: torch.nn.Module) -> bool:
    """Whether every parameter and floating-point buffer of `module` is finite (one host sync)."""
    return misc.count_nonfinite(module) == 0



# ---------------------------------------------------------------------------------------------------------------------
# Formulas (EDM), public for tests.

def learning_rate_ramp(cur_nimg, lr_rampup_kimg) -> float:
    """Multiplier of the base learning rate: min(cur_nimg / (lr_rampup_kimg * 1000), 1); cur_nimg before the step."""
    return min(cur_nimg / max(lr_rampup_kimg * 1000, 1e-8), 1)


def ema_beta(cur_nimg, batch_size, ema_halflife_kimg, ema_rampup_ratio) -> float:
    """EMA decay per step: 0.5 ** (batch / half-life), half-life capped at ema_rampup_ratio * cur_nimg."""
    ema_halflife_nimg = ema_halflife_kimg * 1000
    if ema_rampup_ratio is not None:
        ema_halflife_nimg = min(ema_halflife_nimg, cur_nimg * ema_rampup_ratio)
    return 0.5 ** (batch_size / max(ema_halflife_nimg, 1e-8))


def ema_tensors(ema: torch.nn.Module, net: torch.nn.Module) -> tuple[list, list, list, list]:
    """(EMA parameters, the net's detached parameters, EMA buffers, the net's buffers), paired in module order: what
    update_ema reads, listed once for a run (walking the module tree costs ~1 ms per step for DDPM++, on the host)."""
    buffers = list(zip(ema.buffers(), net.buffers()))
    return (list(ema.parameters()), [p.detach() for p in net.parameters()], [b for b, _ in buffers],
            [b for _, b in buffers])


@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, beta: float, tensors: tuple | None = None) -> None:
    """p_ema <- lerp(p_net, p_ema, beta) for parameters (fused on CUDA, per tensor on the CPU); buffers copied.
    tensors: the pairs of `ema_tensors(ema, net)` when the caller keeps them (the training loop: the modules'
    tensors are updated in place, never replaced), else listed here."""
    ema_params, net_params, ema_buffers, net_buffers = tensors if tensors is not None else ema_tensors(ema, net)
    if ema_params and ema_params[0].device.type == 'cpu':
        # On the CPU torch's _foreach_lerp is 2.5-2.8x slower than a lerp per tensor (DDPM++ at 0.75M and 12M
        # parameters, one thread: 1.04 vs 0.38 ms, 12.4 vs 5.0 ms); each lerp writes its EMA tensor in place
        # (an elementwise op may write over an input it reads at the same positions): the same bits, no temporary.
        for p_ema, p_net in zip(ema_params, net_params):
            torch.lerp(p_net, p_ema, beta, out=p_ema)
    elif ema_params:
        # EDM's p_net.lerp(p_ema, beta), bit for bit (lerp(ema, net, 1 - beta) is the same number but rounds
        # differently in the last bit); beta = 0 copies the net exactly.
        torch._foreach_copy_(ema_params, torch._foreach_lerp(net_params, ema_params, beta))
    if ema_buffers:
        torch._foreach_copy_(ema_buffers, net_buffers)


def split_batch(batch_size: int, world_size: int, batch_gpu: int | None) -> tuple[int, int, int]:
    """(batch_gpu_total, batch_gpu, num_accumulation_rounds) with EDM's exact-divisibility requirements."""
    if batch_size <= 0 or batch_size % world_size != 0:
        raise ValueError(f'batch size {batch_size} must be a positive multiple of the number of ranks ({world_size})')
    batch_gpu_total = batch_size // world_size
    if batch_gpu is None or batch_gpu > batch_gpu_total:
        batch_gpu = batch_gpu_total
    if batch_gpu <= 0 or batch_gpu_total % batch_gpu != 0:
        raise ValueError(f'per-rank batch {batch_gpu_total} (batch size {batch_size} / {world_size} ranks) is not a '
                         f'multiple of batch_gpu {batch_gpu}')
    return batch_gpu_total, batch_gpu, batch_gpu_total // batch_gpu


COMPILE_MODES = (False, True, 'regional')


def compile_mode(mode):
    """--compile's value as the loop uses and records it: False, True or 'regional' (a library caller's 0 / 1 are
    False / True: compile=1 passed the check below but ran eager, and was recorded as 1, not as True)."""
    if isinstance(mode, str) and mode == 'regional':
        return mode
    if isinstance(mode, str) or mode not in COMPILE_MODES:
        raise ValueError(f'compile={mode!r}; expected one of {COMPILE_MODES}')
    return bool(mode)


def compile_network(module: torch.nn.Module, mode) -> torch.nn.Module:
    """--compile: False = eager; True = torch.compile of the whole (DDP-wrapped) network, returned as a new module;
    'regional' = each U-Net block compiled in place (`UNetBlock.compile()`, static shapes), which compiles a few
    block graphs instead of one for the whole network: much less compile time, most of the fusion. State-dict keys
    and pickles are unchanged either way (the EMA copy is never compiled)."""
    mode = compile_mode(mode)
    if mode is True:
        return torch.compile(module)
    if mode == 'regional':
        from training.networks import UNetBlock
        # One code object for all blocks: every distinct block graph is a cache entry (DDPM++ CIFAR-10: 33 blocks, 14).
        for name in ('cache_size_limit', 'recompile_limit'):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
        for block in module.modules():
            if isinstance(block, UNetBlock):
                block.compile(dynamic=False)
    return module


def autocast_context(device: torch.device, precision: str):
    """torch.autocast for bf16/fp16; a true no-op for fp32 so fp32 results equal code without it."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision == 'fp32':
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == 'bf16' else torch.float16)


# ---------------------------------------------------------------------------------------------------------------------
# RNG states and training states.

def _get_rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = dict(
        torch=torch.get_rng_state(),
        numpy=dict(name=str(np_state[0]), keys=torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
                   pos=int(np_state[2]), has_gauss=int(np_state[3]), cached_gaussian=float(np_state[4])),
        python=dict(version=int(py_state[0]), state=torch.tensor(py_state[1], dtype=torch.int64),
                    gauss_next=py_state[2]),
    )
    if device.type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state['torch'])
    np_state = state['numpy']
    np.random.set_state((np_state['name'], np_state['keys'].numpy().astype(np.uint32), np_state['pos'],
                         np_state['has_gauss'], np_state['cached_gaussian']))
    py_state = state['python']
    random.setstate((py_state['version'], tuple(int(v) for v in py_state['state'].tolist()), py_state['gauss_next']))
    if device.type == 'cuda' and state.get('cuda') is not None:
        torch.cuda.set_rng_state(state['cuda'], device)


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _options_json(options: dict) -> str:
    return json.dumps(options, sort_keys=True, default=str)


def save_training_state(path: str, state: dict) -> None:
    """Write a training state atomically. Contents (all torch.load(weights_only=True)-safe):

    format, version; cur_nimg, cur_tick (the next tick, or the unfinished one), cur_iter (iterations done);
    tick_start_nimg (only when a stop request ended a tick early: where that tick began); seed, world_size, batch_size;
    data_position (global draws consumed from the InfiniteSampler stream: rank r resumes at data_position / world);
    networks {name: state_dict} ('net' and any extra networks of the loss); ema (state_dict of the EMA of 'net');
    optimizers / grad_scalers {phase name: state_dict}; rng [per rank: torch, numpy, python (, cuda)];
    whatever else the batch source's state_dict() gives (its keys ending in _position: data_position above, a
    plug-in source's own streams' positions; in _resume_point: InfiniteSampler.resume_point, so that a resume
    replays the data order from there, not from the run's start);
    options (JSON of the trajectory options, used to warn when a resume changes them).
    """
    with dnnlib.util.atomic_output(path, 'wb') as f:
        torch.save(_to_cpu(state), f)


def load_training_state(path: str) -> dict | None:
    """Our training state as a dict, or None when `path` is an EDM training state (a pickled network)."""
    with open(path, 'rb') as f:
        persistence.check_torch_file(f, path)  # Refuses TorchScript archives before torch.load sees them.
        f.seek(0)
        if zipfile.is_zipfile(f):
            # torch.load does not check the records' CRC-32: damage inside a tensor (not a truncation) loaded as
            # other numbers and resumed silently. One extra read of the file, on resume only.
            f.seek(0)
            with zipfile.ZipFile(f) as archive:
                damaged = archive.testzip()
            if damaged is not None:
                raise ValueError(f'{path}: damaged (the CRC-32 of its record {damaged} does not match its content)')
        f.seek(0)
        try:
            state = torch.load(f, map_location='cpu', weights_only=True)
        except pickle.UnpicklingError:
            return None
    if not isinstance(state, dict) or state.get('format') != STATE_FORMAT:
        return None
    if state.get('version') != STATE_VERSION:
        raise ValueError(f'{path}: training state version {state.get("version")}, expected {STATE_VERSION}')
    return state


def read_state_options(path: str) -> dict | None:
    """The train.py options recorded in our training state at `path` (its 'train_options'), read without loading
    its tensors (memory-mapped, no CRC pass): cheap enough to look at every run under an --outdir. None when the
    file is not our state, records none, or cannot be read (load_training_state then says why)."""
    try:
        with open(path, 'rb') as f:
            persistence.check_torch_file(f, path)
        state = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        text = state.get('train_options') if isinstance(state, dict) and state.get('format') == STATE_FORMAT else None
        return json.loads(text) if isinstance(text, str) else None
    except Exception:  # noqa: BLE001 -- any failure: not a state whose options can be read cheaply
        return None


# ---------------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _weight_init_rng(seed):
    """Seed the CPU RNG for weight initialisation without disturbing the global stream; no-op when seed is None.
    The CPU generator alone: torch.manual_seed would also reseed the CUDA generators, which fork_rng(devices=[]) does
    not restore, and every rank would then draw the same dropout masks and augmentations."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def _print_module_summary(networks: dict) -> None:
    for name, module in networks.items():
        num_params = sum(p.numel() for p in module.parameters())
        num_trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        num_buffers = sum(b.numel() for b in module.buffers())
        dist.print0(f'{name}: {type(module).__name__}, {num_params:,} parameters ({num_trainable:,} trainable), '
                    f'{num_buffers:,} buffer elements')
        for child_name, child in module.named_children():
            dist.print0(f'  {child_name:<20s} {type(child).__name__:<24s} '
                        f'{sum(p.numel() for p in child.parameters()):>12,} parameters')


def _progress_bar(total: int, initial: int, enabled: bool):
    """tqdm on the terminal's stderr (not into log.txt); None when disabled or not a terminal."""
    if not enabled or dist.get_rank() != 0:
        return None
    stream = sys.stderr.stderr if isinstance(sys.stderr, dnnlib.util.Logger) else sys.stderr
    if not (hasattr(stream, 'isatty') and stream.isatty()):
        return None
    import tqdm
    return tqdm.tqdm(total=total, initial=initial, unit='img', unit_scale=True, dynamic_ncols=True, file=stream,
                     leave=False)




# ---------------------------------------------------------------------------------------------------------------------
# The loop's steps.

@dataclasses.dataclass
class _Run:
    """Everything the loop builds once and then steps."""

    device: torch.device
    rank: int
    world_size: int
    seed: int
    rng: str
    precision: str
    batch_size: int
    batch_gpu: int
    batch_gpu_total: int
    num_rounds: int
    loss_scaling: float
    lr_rampup_kimg: float
    ema_halflife_kimg: float
    ema_rampup_ratio: float | None
    loss_kwargs: dict
    dataset_kwargs: dict
    net: torch.nn.Module
    ema: torch.nn.Module
    networks: dict           # name -> module ('net' is the denoiser; losses may add more)
    loss_fn: object
    augment_pipe: object
    phases: list
    phase_params: dict       # phase name -> the parameters its optimizer steps
    phase_networks: dict     # phase name -> networks as its loss_fn sees them (its own DDP-wrapped, maybe compiled)
    ddp_modules: dict        # network name -> DDP wrapper (gradient sync control) or the module itself
    scalers: dict            # phase name -> GradScaler (fp16 only)
    source: object           # the batch source (training/batch_sources.py)
    max_nonfinite_steps: int = 100  # consecutive non-finite steps that stop the run
    phema: object = None     # training.phema.PowerEMA (--phema), None when not tracked
    cur_nimg: int = 0
    cur_tick: int = 0
    cur_iter: int = 0
    tick_start_nimg: int | None = None  # a resumed state's unfinished tick began here (a stop in mid-tick)
    # Device-side counters (read on the host once per tick or per max_nonfinite_steps iterations, never per step).
    tick_loss_sum: torch.Tensor | None = None      # sum of the first phase's per-element losses in this tick
    tick_loss_num: int = 0                         # their number
    tick_nonfinite: torch.Tensor | None = None     # steps of this tick with a non-finite loss or gradient
    tick_overflow: torch.Tensor | None = None      # fp16: steps of this tick the GradScaler skipped (not counted above)
    consecutive_nonfinite: torch.Tensor | None = None
    max_consecutive_nonfinite: torch.Tensor | None = None
    ema_tensors: tuple | None = None  # update_ema's tensor lists, made at the first step (after any resume)

    def reset_tick_counters(self) -> None:
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        self.tick_loss_sum, self.tick_loss_num, self.tick_nonfinite = zero.clone(), 0, zero.clone()
        self.tick_overflow = zero.clone()
        if self.consecutive_nonfinite is None:
            self.consecutive_nonfinite = zero.clone()
            self.max_consecutive_nonfinite = zero.clone()


def _build(*, dataset_kwargs, data_loader_kwargs, network_kwargs, loss_kwargs, optimizer_kwargs, augment_kwargs,
           seed, batch_size, batch_gpu, ema_halflife_kimg, ema_rampup_ratio, lr_rampup_kimg, loss_scaling,
           cudnn_benchmark, device, precision, compile, allow_tf32, rng, resume_positions,
           channels_last=False, dataset=None) -> _Run:
    """Seeding, data, networks, loss, phases, DDP and the batch source, in EDM's order of random draws."""
    rank, world_size = dist.get_rank(), dist.get_world_size()

    # Seeding and backend flags, as EDM.
    np.random.seed((seed * world_size + rank) % (1 << 31))
    torch.manual_seed(np.random.randint(1 << 31))
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cudnn.allow_tf32 = allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    batch_gpu_total, batch_gpu, num_rounds = split_batch(batch_size, world_size, batch_gpu)

    # Data: EDM's stream of training images (its DataLoader iterator is created here, before the networks, as EDM).
    dist.print0('Loading dataset...')
    dataset_obj = dataset if dataset is not None else dnnlib.util.construct_class_by_name(**dataset_kwargs)
    data = DataContext(dataset=dataset_obj, rank=rank, world_size=world_size, seed=seed, batch_gpu=batch_gpu,
                       num_rounds=num_rounds, device=device, loader_kwargs=data_loader_kwargs,
                       resume=dict(resume_positions))
    stream = StreamSource(data)

    # Networks, loss, phases.
    dist.print0('Constructing network...')
    interface_kwargs = dict(img_resolution=dataset_obj.resolution, img_channels=dataset_obj.num_channels,
                            label_dim=dataset_obj.label_dim)
    # rng='image': initial weights from the seed alone, identical for every world size (EDM: from the per-rank
    # stream, seeded with seed * world + rank, and DDP then copies rank 0's weights everywhere).
    with _weight_init_rng(seed if rng == 'image' else None):
        net = dnnlib.util.construct_class_by_name(**network_kwargs, **interface_kwargs)
        net.train().requires_grad_(True).to(device)
        if channels_last:  # the weights only: inputs and random draws keep their layout (randn_like follows it)
            net.to(memory_format=torch.channels_last)
        if rng == 'rank' and rank == 0:
            # EDM's rank 0 runs the network once here (its module summary), in training mode: with dropout that
            # draws from the stream every later sigma, noise and augmentation comes from. EDM's stream, exactly.
            with torch.no_grad():
                net(torch.zeros([batch_gpu, net.img_channels, net.img_resolution, net.img_resolution], device=device),
                    torch.ones([batch_gpu], device=device), torch.zeros([batch_gpu, net.label_dim], device=device))
        dist.print0('Setting up optimizer...')
        loss_fn = dnnlib.util.construct_class_by_name(**loss_kwargs)
        if hasattr(loss_fn, 'check_data'):
            for message in loss_fn.check_data(batch_gpu_total=batch_gpu_total, batch_gpu=batch_gpu,
                                              dataset_size=len(dataset_obj)):
                dist.warn0(message, stacklevel=2)
        if hasattr(loss_fn, 'check_network'):
            for message in loss_fn.check_network(img_resolution=net.img_resolution, img_channels=net.img_channels,
                                                 label_dim=net.label_dim):
                dist.warn0(message, stacklevel=2)
        augment_pipe = dnnlib.util.construct_class_by_name(**augment_kwargs) if augment_kwargs is not None else None
        networks = dict(net=net)
        if hasattr(loss_fn, 'extra_networks'):
            for name, module in loss_fn.extra_networks(net).items():
                if name in networks:
                    raise ValueError(f'loss {type(loss_fn).__name__}: extra network name {name!r} is taken')
                # The mode the loss gave it (a module is in training mode unless the loss set eval: a frozen
                # teacher or an EMA target keeps dropout off; GDD's D keeps its feature networks in eval itself).
                networks[name] = module.to(device)
    phases = (loss_fn.phases(networks, optimizer_kwargs) if hasattr(loss_fn, 'phases')
              else default_phases(loss_fn, networks, optimizer_kwargs))
    phase_names = [phase.name for phase in phases]
    if len(set(phase_names)) != len(phase_names):
        raise ValueError(f'phase names must be unique, got {phase_names}')
    for phase in phases:
        if phase.network not in networks:
            raise ValueError(f'phase {phase.name!r} trains unknown network {phase.network!r}')
        for group in phase.optimizer.param_groups:
            group.setdefault('base_lr', group['lr'])
    phase_params = {phase.name: [p for g in phase.optimizer.param_groups for p in g['params']] for phase in phases}

    # Only parameters some optimizer steps get gradients (frozen subsets stay frozen, also under DDP).
    trained = {id(p) for params in phase_params.values() for p in params}
    for module in networks.values():
        for p in module.parameters():
            p.requires_grad_(id(p) in trained)
    if rank == 0:
        _print_module_summary(networks)

    # Gradient synchronisation per network (Phase.grad_sync): DDP, or one all-reduce after the phase's backward.
    for phase in phases:
        if phase.grad_sync not in ('ddp', 'allreduce'):
            raise ValueError(f"phase {phase.name!r}: grad_sync must be 'ddp' or 'allreduce', not {phase.grad_sync!r}")
    allreduce_networks = {phase.network for phase in phases if phase.grad_sync == 'allreduce'}
    ddp_modules = {}
    for name, module in networks.items():
        wrapped = module
        if dist.is_distributed() and any(p.requires_grad for p in module.parameters()):
            if name in allreduce_networks:
                _broadcast_module_(module)
            else:
                wrapped = torch.nn.parallel.DistributedDataParallel(
                    module, device_ids=[device] if device.type == 'cuda' else None)
        ddp_modules[name] = wrapped
    ema = copy.deepcopy(net).eval().requires_grad_(False)  # after DDP's broadcast (EDM), before a regional compile
    eager = {phase.network for phase in phases if not phase.compilable}
    train_modules = {name: compile_network(wrapped, compile if name not in eager else False)
                     for name, wrapped in ddp_modules.items()}
    if compile:
        dist.print0('torch.compile: the first steps compile the networks (a minute or more); the status line follows')
    phase_networks = {phase.name: {name: (train_modules[name] if name == phase.network else module)
                                   for name, module in networks.items()} for phase in phases}
    scalers = {phase.name: torch.amp.GradScaler(device.type) for phase in phases} if precision == 'fp16' else {}

    # The loss's batch source, around EDM's stream (built before the resume, which restores the RNG states last).
    data.augment_pipe = augment_pipe
    source = loss_fn.batch_source(data, stream) if hasattr(loss_fn, 'batch_source') else stream

    return _Run(device=device, rank=rank, world_size=world_size, seed=seed, rng=rng, precision=precision,
                batch_size=batch_size, batch_gpu=batch_gpu, batch_gpu_total=batch_gpu_total, num_rounds=num_rounds,
                loss_scaling=loss_scaling, lr_rampup_kimg=lr_rampup_kimg, ema_halflife_kimg=ema_halflife_kimg,
                ema_rampup_ratio=ema_rampup_ratio, loss_kwargs=loss_kwargs, dataset_kwargs=dataset_kwargs, net=net,
                ema=ema, networks=networks, loss_fn=loss_fn, augment_pipe=augment_pipe, phases=phases,
                phase_params=phase_params, phase_networks=phase_networks, ddp_modules=ddp_modules, scalers=scalers,
                source=source)


def _resume(run: _Run, *, state, resume_pkl, resume_state_dump, resume_kimg, optimizer_kwargs, exact=True) -> None:
    """Weights from a snapshot (--transfer), an EDM training state (approximate) or ours (exact: networks, EMA,
    optimizers, scalers, counters and, last, the RNG states; `exact=False` where trajectory options changed)."""
    run.cur_nimg = int(resume_kimg * 1000)
    if resume_pkl is not None:
        dist.print0(f'Loading network weights from "{resume_pkl}"...')
        net = snapshots.load_snapshot(resume_pkl).net
        misc.copy_params_and_buffers(src_module=net, dst_module=run.net, require_all=False)
        misc.copy_params_and_buffers(src_module=net, dst_module=run.ema, require_all=False)
        del net
    if resume_state_dump is not None and state is None:
        dist.print0(f'Loading EDM training state from "{resume_state_dump}"...')
        dist.warn0(f'{resume_state_dump} is an EDM training state: it has no EMA, RNG state or data position, '
                      f'so the data order and random streams restart (not an exact resume)', stacklevel=2)
        data = persistence.load_edm_training_state(resume_state_dump)
        misc.copy_params_and_buffers(src_module=data['net'], dst_module=run.net, require_all=True)
        optimizer = run.phases[0].optimizer
        optimizer.load_state_dict(data['optimizer_state'])
        for group in optimizer.param_groups:
            group.setdefault('base_lr', optimizer_kwargs.get('lr', group['lr']))
        del data
    if state is not None:
        dist.print0(f'Resuming {"exactly " if exact else ""}from "{resume_state_dump}"...')
        for name, module in run.networks.items():
            if name not in state['networks']:
                raise ResumeMismatchError(f'{resume_state_dump}: no weights for network {name!r}')
            try:
                module.load_state_dict(state['networks'][name])
            except RuntimeError as err:  # torch: missing, unexpected or other-shaped tensors
                first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
                raise ResumeMismatchError(
                    f'{resume_state_dump}: the saved network {name!r} does not fit the one these options build '
                    f'({first}); e.g. a changed --loss-opt discriminator or disc_channels: resume with the options '
                    f'the run was made with') from None
        run.ema.load_state_dict(state['ema'])
        if run.phema is not None:
            if 'phema' not in state:
                raise ResumeMismatchError(f'{resume_state_dump} holds no post-hoc EMAs; resume without --phema')
            run.phema.load_state_dict(state['phema'])
        for phase in run.phases:
            if phase.name not in state['optimizers']:
                raise ResumeMismatchError(f'{resume_state_dump}: no optimizer state for phase {phase.name!r}')
            configured = [{key: value for key, value in group.items() if key not in ('params', 'lr')}
                          for group in phase.optimizer.param_groups]
            try:
                phase.optimizer.load_state_dict(state['optimizers'][phase.name])
            except ValueError:  # torch: another number or size of parameter groups
                raise ResumeMismatchError(f'{resume_state_dump}: the optimizer of phase {phase.name!r} trains other '
                                          f'parameters than the state\'s (e.g. a changed --loss-opt freeze or '
                                          f'discriminator); resume with the options the run was made with') from None
            # The hyperparameters (base learning rate, betas, eps, the kernel choice --fused-adam) are this run's, as
            # its options set them (torch's load_state_dict takes the state's: GDD's D kept the beta2 of lazy R1
            # after a resume with r1_gamma=0); the moments are the state's. Unchanged options: the same values.
            for group, settings in zip(phase.optimizer.param_groups, configured):
                group.update(settings)
            if phase.name in run.scalers and phase.name in state.get('grad_scalers', {}):
                run.scalers[phase.name].load_state_dict(state['grad_scalers'][phase.name])
        run.cur_nimg, run.cur_tick = int(state['cur_nimg']), int(state['cur_tick'])
        run.cur_iter = int(state['cur_iter'])
        if 'tick_start_nimg' in state:  # a stop in mid-tick: the unfinished tick began here
            run.tick_start_nimg = int(state['tick_start_nimg'])
        # Last, after everything that draws random numbers while being built (networks, data loaders).
        if int(state['world_size']) == run.world_size:
            _set_rng_state(state['rng'][run.rank], run.device)
        else:
            dist.warn0(f'{resume_state_dump} was written by {state["world_size"]} ranks, this run has '
                          f'{run.world_size}: augmentation/dropout random streams restart', stacklevel=2)


def _broadcast_module_(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (what DDP does when it wraps a module)."""
    for tensor in [*module.parameters(), *module.buffers()]:
        torch.distributed.broadcast(tensor.data, src=0)


def _average_gradients_(params: list, world_size: int) -> None:
    """Average the gradients of `params` over the ranks in one flat all-reduce. A parameter without a gradient has none
    on every rank (the ranks run the same graph) and keeps none, so the optimizer skips it as with one process."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce_sum_(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _train_step(run: _Run) -> None:
    """One iteration: the source's rounds through every phase due, then the EMA; cur_nimg advances by the batch."""
    rounds = run.source.next_rounds()
    nonfinite = torch.zeros((), dtype=torch.bool, device=run.device)
    overflow = torch.zeros((), dtype=torch.bool, device=run.device)
    for phase_idx, phase in enumerate(run.phases):
        if not phase.runs_at(run.cur_iter):
            continue
        if len(run.phases) > 1:
            params = {id(p) for p in run.phase_params[phase.name]}
            for module in run.networks.values():
                for p in module.parameters():
                    p.requires_grad_(id(p) in params)
        phase.optimizer.zero_grad(set_to_none=True)
        scaler = run.scalers.get(phase.name)
        # The scale as a device tensor (scaling a one: no host sync), for losses with an inner backward (Batch).
        grad_scale = scaler.scale(torch.ones((), device=run.device)) if scaler is not None else None
        loss_nonfinite = torch.zeros((), dtype=torch.bool, device=run.device)
        for round_idx, round_batch in enumerate(rounds):
            batch_random = None
            if run.rng == 'image':
                batch_random = PerImageRandom.for_round(run.seed, run.cur_nimg, run.batch_size, run.world_size,
                                                        run.rank, run.batch_gpu, round_idx, run.device,
                                                        stream=phase_idx)
            batch = dataclasses.replace(round_batch, random=batch_random, grad_scale=grad_scale)
            with misc.ddp_sync(run.ddp_modules[phase.network], sync=(round_idx == run.num_rounds - 1)):
                with autocast_context(run.device, run.precision):
                    loss = phase.loss_fn(run.phase_networks[phase.name], batch, run.augment_pipe)
                training_stats.report(phase.stat_name, loss)
                num_elements = loss.numel()
                loss = loss.sum()
                loss_nonfinite |= ~torch.isfinite(loss)
                if phase_idx == 0:
                    run.tick_loss_sum += loss.detach()
                    run.tick_loss_num += num_elements
                loss = loss.mul(run.loss_scaling / run.batch_gpu_total)
                (scaler.scale(loss) if scaler is not None else loss).backward()
        if phase.grad_sync == 'allreduce' and run.world_size > 1:
            _average_gradients_(run.phase_params[phase.name], run.world_size)

        lr_scale = (phase.lr_schedule(run.cur_nimg) if phase.lr_schedule is not None
                    else learning_rate_ramp(run.cur_nimg, run.lr_rampup_kimg))
        for group in phase.optimizer.param_groups:
            group['lr'] = group['base_lr'] * lr_scale
        if scaler is not None:
            scaler.unscale_(phase.optimizer)
        grads_nonfinite = misc.nan_to_num_grads_(run.phase_params[phase.name])
        nonfinite |= loss_nonfinite
        if grads_nonfinite is not None and scaler is None:
            nonfinite |= grads_nonfinite
        elif grads_nonfinite is not None:
            # A finite loss whose scaled fp16 gradients overflowed: dynamic loss scaling at work (the GradScaler skips
            # the step and halves its scale; it starts at 2**16 and tries a doubling every 2000 steps), not a
            # divergence. A rank sees its own loss: another rank's NaN reaches it as an overflow.
            overflow |= grads_nonfinite & ~loss_nonfinite
        if scaler is not None:
            scaler.step(phase.optimizer)
            scaler.update()
        else:
            phase.optimizer.step()
        if phase.after_step is not None:
            with torch.no_grad():
                phase.after_step(run.networks, run.cur_nimg)

    # Non-finite steps: counted on the device (EDM only scrubs them), reported to stats.jsonl as Loss/nonfinite, from
    # rank 0 (num = steps, as its status line): the all-reduced gradients carry any rank's NaN to every rank.
    training_stats.report0('Loss/nonfinite', nonfinite.to(torch.float32))
    run.tick_nonfinite += nonfinite
    if run.scalers:
        training_stats.report0('Loss/fp16_overflow', overflow.to(torch.float32))
        run.tick_overflow += overflow
    # Overflows count towards the stop too: 100 in a row have lowered the scale by 2**100, a divergence all the same.
    run.consecutive_nonfinite = (run.consecutive_nonfinite + 1) * (nonfinite | overflow)
    torch.maximum(run.max_consecutive_nonfinite, run.consecutive_nonfinite, out=run.max_consecutive_nonfinite)

    if run.ema_tensors is None:
        run.ema_tensors = ema_tensors(run.ema, run.net)
    update_ema(run.ema, run.net, ema_beta(run.cur_nimg, run.batch_size, run.ema_halflife_kimg, run.ema_rampup_ratio),
               run.ema_tensors)
    if run.phema is not None:
        run.phema.update(run.net, run.cur_iter + 1)
    run.cur_nimg += run.batch_size
    run.cur_iter += 1


def _report_tick(run: _Run, *, start_time, tick_start_time, tick_start_nimg, maintenance_time, progress_bar,
                 total_nimg) -> None:
    """EDM's status line, also reported to training_stats under EDM's names."""
    tick_end_time = time.time()
    on_cuda = run.device.type == 'cuda'
    peak_mem = torch.cuda.max_memory_allocated(run.device) / 2**30 if on_cuda else 0.0
    peak_reserved = torch.cuda.max_memory_reserved(run.device) / 2**30 if on_cuda else 0.0
    report0 = training_stats.report0
    fields = []
    fields += [f"tick {report0('Progress/tick', run.cur_tick):<5d}"]
    fields += [f"kimg {report0('Progress/kimg', run.cur_nimg / 1e3):<9.1f}"]
    report0('Progress/lr', run.phases[0].optimizer.param_groups[0]['lr'])  # the first phase's, as last stepped
    fields += [f"time {dnnlib.util.format_time(report0('Timing/total_sec', tick_end_time - start_time)):<12s}"]
    fields += [f"sec/tick {report0('Timing/sec_per_tick', tick_end_time - tick_start_time):<7.1f}"]
    sec_per_kimg = (tick_end_time - tick_start_time) / max(run.cur_nimg - tick_start_nimg, 1) * 1e3
    fields += [f"sec/kimg {report0('Timing/sec_per_kimg', sec_per_kimg):<7.2f}"]
    if run.cur_nimg < total_nimg and run.cur_tick > 0:  # tick 0 is one step, too short to extrapolate from
        fields += [f"eta {dnnlib.util.format_time((total_nimg - run.cur_nimg) / 1000 * sec_per_kimg):<12s}"]
    loss_mean = float(run.tick_loss_sum) / max(run.tick_loss_num, 1)  # this rank's; stats.jsonl has all ranks'
    num_nonfinite, num_overflow = int(run.tick_nonfinite), int(run.tick_overflow)
    fields += [f"loss {loss_mean:<8.4g}"]
    if num_nonfinite:
        fields += [f"nonfinite {num_nonfinite}"]
    if num_overflow:  # no warning: the GradScaler's normal working
        fields += [f"fp16-overflow {num_overflow}"]
    fields += [f"maintenance {report0('Timing/maintenance_sec', maintenance_time):<6.1f}"]
    cpu_mem = psutil.Process(os.getpid()).memory_info().rss / 2**30
    fields += [f"cpumem {report0('Resources/cpu_mem_gb', cpu_mem):<6.2f}"]
    report0('Resources/peak_gpu_mem_gb', peak_mem)
    report0('Resources/peak_gpu_mem_reserved_gb', peak_reserved)
    if on_cuda:  # EDM's columns, shown where they mean something (stats.jsonl always has them)
        fields += [f"gpumem {peak_mem:<6.2f}", f"reserved {peak_reserved:<6.2f}"]
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(run.device)
    if progress_bar is not None:
        with progress_bar.external_write_mode():
            dist.print0(' '.join(fields))
    else:
        dist.print0(' '.join(fields))
    if num_nonfinite:
        where = f'rank {run.rank}: ' if run.world_size > 1 else ''  # each rank counts its own losses
        warnings.warn(f'{where}{num_nonfinite} training step(s) of this tick had non-finite losses or gradients '
                      f'(scrubbed as EDM does; the run stops after {run.max_nonfinite_steps} in a row)', stacklevel=2)


def _check_nonfinite(run: _Run) -> None:
    """Stop a diverged run: `max_nonfinite_steps` consecutive steps with non-finite losses or gradients."""
    longest = int(run.max_consecutive_nonfinite)
    if longest >= run.max_nonfinite_steps:
        overflows = ' or fp16 overflows the GradScaler skipped' if run.scalers else ''
        raise NonFiniteTrainingError(
            f'training diverged: {longest} consecutive steps with non-finite losses or gradients{overflows} (before '
            f'kimg {run.cur_nimg / 1000:g}); stopping without writing non-finite snapshots. The last training state '
            f'written is the last good one; lower --lr or check the loss options before resuming from it')


def _write_snapshot(run: _Run, run_dir: str) -> None:
    """network-snapshot-NNNNNN.pkl (rank 0): the EMA network with the records of its process and loss; refused
    when the EMA holds non-finite weights."""
    if not all_finite(run.ema):
        raise NonFiniteTrainingError(f'training diverged: the EMA weights are not finite at kimg '
                                     f'{run.cur_nimg / 1000:g}; no snapshot written. The last training state written '
                                     f'is the last good one; lower --lr or check the loss options before resuming')
    if run.phema is not None:  # post-hoc EMA: each tracked profile beside the snapshot (phema.py combines them)
        for std, module in run.phema.emas.items():
            snapshots.save_snapshot(
                os.path.join(run_dir, phema_file_name(run.cur_nimg // 1000, std)),
                ema=copy.deepcopy(module).to(memory_format=torch.contiguous_format), loss_kwargs=run.loss_kwargs,
                process=getattr(run.loss_fn, 'process', EDMProcess()), dataset_kwargs=run.dataset_kwargs,
                extra=dict(phema=dict(std=std, gamma=run.phema.gammas[std], step=run.cur_iter,
                                      kimg=run.cur_nimg / 1000)))
    ema = run.ema
    if any(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in ema.parameters()):
        ema = copy.deepcopy(ema).to(memory_format=torch.contiguous_format)  # --channels-last: pickles as EDM's
    snapshots.save_snapshot(os.path.join(run_dir, f'network-snapshot-{run.cur_nimg // 1000:06d}.pkl'), ema=ema,
                            loss_kwargs=run.loss_kwargs, process=getattr(run.loss_fn, 'process', EDMProcess()),
                            augment_pipe=run.augment_pipe,
                            dataset_kwargs=run.dataset_kwargs)


def _write_training_state(run: _Run, run_dir: str, options: dict, extras: dict | None = None,
                          tick_start_nimg: int | None = None) -> None:
    """training-state-NNNNNN.pt: RNG states gathered from every rank, written by rank 0. With `tick_start_nimg` (a
    stop in the middle of a tick): the tick is unfinished, and a resume completes it, ending where it would have."""
    bad = [name for name, module in run.networks.items() if not all_finite(module)]
    if bad or not all_finite(run.ema):
        raise NonFiniteTrainingError(f'training diverged: non-finite weights in {", ".join(bad) or "the EMA"} at kimg '
                                     f'{run.cur_nimg / 1000:g}; no training state written. The last one written is the '
                                     f'last good one; lower --lr or check the loss options before resuming from it')
    rng_states = [_get_rng_state(run.device)]
    if dist.is_distributed():
        rng_states = [None] * run.world_size
        torch.distributed.all_gather_object(rng_states, _get_rng_state(run.device))
    if run.rank != 0:
        return
    save_training_state(os.path.join(run_dir, f'training-state-{run.cur_nimg // 1000:06d}.pt'), dict(
        format=STATE_FORMAT, version=STATE_VERSION,
        cur_nimg=run.cur_nimg, cur_tick=run.cur_tick + (tick_start_nimg is None), cur_iter=run.cur_iter,
        **({'tick_start_nimg': int(tick_start_nimg)} if tick_start_nimg is not None else {}),
        seed=run.seed, world_size=run.world_size, batch_size=run.batch_size, batch_gpu=run.batch_gpu,
        num_rounds=run.num_rounds,
        **run.source.state_dict(),
        networks={name: module.state_dict() for name, module in run.networks.items()},
        ema=run.ema.state_dict(),
        optimizers={phase.name: phase.optimizer.state_dict() for phase in run.phases},
        grad_scalers={name: scaler.state_dict() for name, scaler in run.scalers.items()},
        **({'phema': run.phema.state_dict()} if run.phema is not None else {}),
        rng=rng_states,
        options=_options_json(options),
        **(extras or {}),
    ))


def _trim_stats(path: str, next_tick: int) -> None:
    """A resume in the run's own folder (--nosubdir) continues its stats.jsonl: the lines of ticks from `next_tick`
    on, written after the state by the interrupted run (and a torn last line), go, so that no tick appears twice."""
    def before_next_tick(record, number, is_last):
        tick = (record or {}).get('Progress/tick')
        return isinstance(tick, dict) and isinstance(tick.get('mean'), (int, float)) and tick['mean'] < next_tick

    if training_stats.filter_jsonl(path, before_next_tick):
        dist.print0(f'{path}: kept the lines of ticks before {next_tick}, where this run resumes')


_SOURCE_POSITIONS = ('data_position', 'reference_position')  # What training states of the first version stored.


# The backend flags the loop sets (EDM's), as it found them once it ends (_leaves_the_process_as_found).
_BACKEND_FLAGS = ((torch.backends.cudnn, 'benchmark'), (torch.backends.cudnn, 'allow_tf32'),
                  (torch.backends.cuda.matmul, 'allow_tf32'),
                  (torch.backends.cuda.matmul, 'allow_fp16_reduced_precision_reduction'))


def _leaves_the_process_as_found(loop):
    """The loop in a process that goes on after it (a notebook, a sweep script calling train.main): its loader
    workers end with it, also when it raises (see batch_sources.shut_down_workers), and the backend flags it set for
    itself are put back. Left on, cuDNN autotuning and TF32 off changed the images and FID of a generate.py or fid.py
    run later in the same process on an Ampere or newer GPU (not those of the command-line tools, nor EDM's)."""
    @functools.wraps(loop)
    def run_loop(*args, **kwargs):
        flags = [(module, name, getattr(module, name)) for module, name in _BACKEND_FLAGS]
        iterators = batch_sources.worker_iterators()
        try:
            return loop(*args, **kwargs)
        finally:
            batch_sources.shut_down_workers(keep=iterators)
            for module, name, value in flags:
                setattr(module, name, value)
    return run_loop


@_leaves_the_process_as_found
def training_loop(
    run_dir='.',                # Output directory.
    dataset_kwargs=None,          # Options of the training set.
    data_loader_kwargs=None,      # Options of torch.utils.data.DataLoader.
    network_kwargs=None,          # Options of the network (the preconditioned denoiser).
    loss_kwargs=None,             # Options of the loss (class_name from losses/).
    optimizer_kwargs=None,        # Options of the optimizer.
    augment_kwargs=None,        # Options of the augmentation pipe, None = no augmentation.
    seed=0,                     # Global random seed.
    batch_size=512,             # Total batch size of one iteration, all ranks together.
    batch_gpu=None,             # Limit of the batch per rank and accumulation round, None = no limit.
    total_kimg=200000,          # Training duration in thousands of images (may be fractional).
    ema_halflife_kimg=500,      # Half-life of the EMA of the weights.
    ema_rampup_ratio=0.05,      # EMA ramp-up: half-life at most this fraction of cur_nimg; None = no ramp-up.
    lr_rampup_kimg=10000,       # Learning-rate ramp-up duration (phases without their own lr_schedule).
    loss_scaling=1,             # Loss scaling factor (EDM's --ls; never divided out).
    kimg_per_tick=50,           # Interval of progress prints.
    snapshot_ticks=50,          # How often to save network snapshots, None = never.
    state_dump_ticks=500,       # How often to dump training states, None = never.
    resume_pkl=None,            # Snapshot whose 'ema' initialises net and EMA (--transfer, EDM --resume).
    resume_state_dump=None,     # Training state to resume from: ours (exact) or EDM's (approximate).
    resume_kimg=0,              # cur_nimg / 1000 at the start (EDM resume; ours restores its own counter).
    cudnn_benchmark=True,       # torch.backends.cudnn.benchmark.
    device=None,                # Device; None = torch_utils.distributed.device().
    precision='fp32',           # 'fp32', 'bf16' or 'fp16' through torch.autocast (fp32 master weights).
    compile=False,              # torch.compile the networks: False, True (whole network) or 'regional' (per block).
    channels_last=False,        # Weights in channels_last memory format (convolution speed on GPUs; not bit-exact).
    allow_tf32=False,           # TF32 matmul/convolutions on Ampere+ (EDM: off).
    rng='image',                # 'image': per-image sigma/noise keyed by data position; 'rank': EDM's per-rank stream.
    progress=True,              # tqdm progress bar on rank 0 when stderr is a terminal.
    max_nonfinite_steps=100,    # Stop after this many consecutive steps with non-finite losses or gradients.
    state_extras=None,          # {name: str}: stored verbatim in every training state (train.py: its options).
    phema_stds=(),              # Widths (sigma_rel) of EMAs kept for post-hoc EMA (EDM2), e.g. (0.05, 0.1).
    dataset=None,               # The training set already opened from dataset_kwargs (train.py validates --data with
                                # it: listing a ZIP of 1.28M images takes ~13 s), None = open it here.
):
    start_time = time.time()
    dataset_kwargs, data_loader_kwargs = dict(dataset_kwargs or {}), dict(data_loader_kwargs or {})
    network_kwargs, loss_kwargs = dict(network_kwargs or {}), dict(loss_kwargs or {})
    optimizer_kwargs = dict(optimizer_kwargs or {})
    device = torch.device(device) if device is not None else dist.device()
    if rng not in ('image', 'rank'):
        raise ValueError(f"rng={rng!r}; expected 'image' or 'rank'")
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; expected one of {', '.join(PRECISIONS)}")
    compile, channels_last = compile_mode(compile), bool(channels_last)
    training_stats.reset()
    options = dict(dataset_kwargs=dataset_kwargs, network_kwargs=network_kwargs, loss_kwargs=loss_kwargs,
                   optimizer_kwargs=optimizer_kwargs, augment_kwargs=augment_kwargs, seed=seed, batch_size=batch_size,
                   ema_halflife_kimg=ema_halflife_kimg, ema_rampup_ratio=ema_rampup_ratio,
                   lr_rampup_kimg=lr_rampup_kimg, loss_scaling=loss_scaling, precision=precision, rng=rng,
                   compile=compile, channels_last=channels_last)

    # Our training state (exact resume) or EDM's (approximate)?
    state = load_training_state(resume_state_dump) if resume_state_dump is not None else None
    exact = state is None or _resumes_exactly(state, resume_state_dump, options, batch_size, batch_gpu)
    resume_positions = {k: v for k, v in (state or {}).items()
                        if k in _SOURCE_POSITIONS or k.endswith(('_position', '_resume_point'))}

    run = _build(dataset_kwargs=dataset_kwargs, data_loader_kwargs=data_loader_kwargs, network_kwargs=network_kwargs,
                 loss_kwargs=loss_kwargs, optimizer_kwargs=optimizer_kwargs, augment_kwargs=augment_kwargs, seed=seed,
                 batch_size=batch_size, batch_gpu=batch_gpu, ema_halflife_kimg=ema_halflife_kimg,
                 ema_rampup_ratio=ema_rampup_ratio, lr_rampup_kimg=lr_rampup_kimg, loss_scaling=loss_scaling,
                 cudnn_benchmark=cudnn_benchmark, device=device, precision=precision, compile=compile,
                 allow_tf32=allow_tf32, rng=rng, resume_positions=resume_positions, channels_last=channels_last,
                 dataset=dataset)
    if phema_stds:
        run.phema = PowerEMA(run.net, phema_stds)
    _resume(run, state=state, resume_pkl=resume_pkl, resume_state_dump=resume_state_dump, resume_kimg=resume_kimg,
            optimizer_kwargs=optimizer_kwargs, exact=exact)
    if state is not None and run.rank == 0 and (os.path.realpath(os.path.dirname(os.path.abspath(resume_state_dump)))
                                                == os.path.realpath(run_dir)):
        _trim_stats(os.path.join(run_dir, 'stats.jsonl'), run.cur_tick)
    del state
    if max_nonfinite_steps < 1:
        raise ValueError(f'max_nonfinite_steps must be >= 1, got {max_nonfinite_steps}')
    run.max_nonfinite_steps = int(max_nonfinite_steps)
    run.reset_tick_counters()

    # Train.
    total_nimg = round(total_kimg * 1000)  # fractional kimg (short test runs) without float surprises
    if snapshot_ticks is not None and kimg_per_tick * snapshot_ticks < 1:
        # EDM's file names count whole kimg (train.py's --tick is an integer, so only a library call gets here).
        dist.warn0(f'snapshots every {kimg_per_tick * snapshot_ticks:g} kimg: network-snapshot-NNNNNN.pkl (and '
                      f'phema-NNNNNN-*.pkl) name whole kimg, so each snapshot replaces any earlier one of the same '
                      f'kimg; use kimg_per_tick * snapshot_ticks >= 1 to keep them all', stacklevel=2)
    if run.cur_nimg >= total_nimg:  # a finished run resumed: another step would rewrite its last tick differently
        dist.print0(f'The training state is at {run.cur_nimg / 1000:g} kimg, the end of the run ({total_kimg} kimg): '
                    f'nothing to train.')
        return
    dist.print0(f'Training for {total_kimg} kimg...')
    dist.print0()
    # A tick interrupted by a stop request is completed: it ends at the same kimg as without the stop, so snapshots
    # and stats lines keep the uninterrupted run's cadence (the timing counts from here).
    tick_start_nimg = run.cur_nimg if run.tick_start_nimg is None else run.tick_start_nimg
    timing_start_nimg = run.cur_nimg
    tick_start_time = time.time()
    maintenance_time = tick_start_time - start_time
    dist.update_progress(run.cur_nimg // 1000, total_kimg)
    stats_jsonl = None
    progress_bar = _progress_bar(total=int(total_nimg), initial=min(run.cur_nimg, int(total_nimg)), enabled=progress)
    while True:
        _train_step(run)
        if progress_bar is not None:
            progress_bar.update(run.batch_size)
        done = (run.cur_nimg >= total_nimg)
        if (not done) and (run.cur_tick != 0) and (run.cur_nimg < tick_start_nimg + kimg_per_tick * 1000):
            # Every max_nonfinite_steps steps the ranks sync anyway: there a stop request (SIGTERM, see
            # dist.stop_on_signals) is seen, so a pre-empted run saves within seconds, not a tick. Only the training
            # state is written: the tick's snapshot, phema files and stats line belong to its end (a snapshot named
            # after this kimg would replace the last tick's), which the resumed run reaches.
            if run.cur_iter % run.max_nonfinite_steps != 0:
                continue
            _check_nonfinite(run)
            if not dist.should_stop():
                continue
            dist.print0()
            dist.print0(f'Aborting in tick {run.cur_tick} at kimg {run.cur_nimg / 1000:g}: writing a training state; '
                        f'a resume completes the tick')
            if state_dump_ticks is not None:
                _write_training_state(run, run_dir, options, state_extras, tick_start_nimg=tick_start_nimg)
            break
        _check_nonfinite(run)

        tick_end_time = time.time()
        _report_tick(run, start_time=start_time, tick_start_time=tick_start_time,
                     tick_start_nimg=timing_start_nimg, maintenance_time=maintenance_time,
                     progress_bar=progress_bar, total_nimg=total_nimg)
        stopped = (not done) and dist.should_stop()
        if stopped:
            done = True
            dist.print0()
            dist.print0('Aborting...')
        # The tick's stats line before its snapshot and state: a kill between them then repeats a line on resume
        # (trimmed, _trim_stats) rather than losing one.
        training_stats.default_collector.update()
        if run.rank == 0:
            if stats_jsonl is None:
                stats_jsonl = open(os.path.join(run_dir, 'stats.jsonl'), 'a')
            training_stats.write_jsonl_line(stats_jsonl, training_stats.default_collector)
        if (snapshot_ticks is not None) and (done or run.cur_tick % snapshot_ticks == 0) and run.rank == 0:
            _write_snapshot(run, run_dir)
        # Not at tick 0 (EDM), unless a stop request came before it ended: the one state to resume from.
        if (state_dump_ticks is not None) and (done or run.cur_tick % state_dump_ticks == 0) and \
                (run.cur_tick != 0 or stopped):
            _write_training_state(run, run_dir, options, state_extras)
        dist.update_progress(run.cur_nimg // 1000, total_kimg)

        run.cur_tick += 1
        run.reset_tick_counters()
        tick_start_nimg = timing_start_nimg = run.cur_nimg
        tick_start_time = time.time()
        maintenance_time = tick_start_time - tick_end_time
        if done:
            break

    if progress_bar is not None:
        progress_bar.close()
    if stats_jsonl is not None:
        stats_jsonl.close()
    # Every rank waits for rank 0's last writes: after a stop request a rank that left first exits with 143, and
    # torchrun then stops rank 0, SIGKILL 30 s later, in the middle of writing a large state.
    dist.barrier()
    dist.print0()
    dist.print0('Exiting...')



def _option_change(name: str, saved, current) -> str:
    """'loss_kwargs (c1 0.182 -> 0.011, fit_source "fitted to a.zip..." -> ...)': what differs in an option, by key
    for a dict (the first four), each value as JSON cut at 60 characters."""
    def text(value):
        value = _options_json(value)
        return value if len(value) <= 60 else value[:57] + '...'
    if not (isinstance(saved, dict) and isinstance(current, dict)):
        return f'{name} ({text(saved)} -> {text(current)})'
    absent = object()  # a key one side lacks is named so (null is a value: {'a': None} differs from {})

    def value(options, key):
        return '(absent)' if options.get(key, absent) is absent else text(options[key])
    keys = sorted((k for k in set(saved) | set(current)
                   if (k in saved) != (k in current) or _options_json(saved.get(k)) != _options_json(current.get(k))),
                  key=str)
    more = f', {len(keys) - 4} more' if len(keys) > 4 else ''
    return f'{name} ({", ".join(f"{k} {value(saved, k)} -> {value(current, k)}" for k in keys[:4])}{more})'


def _resumes_exactly(state: dict, path: str, options: dict, batch_size: int, batch_gpu: int | None) -> bool:
    """Whether our training state at `path` continues bit-exactly under these loop options; each difference is warned
    about (the trajectory options, the world size, the per-rank batch layout)."""
    # A state from before compile / channels_last joined the loop options: what train.py recorded of its --compile /
    # --channels-last (an older --compile=regional run resumed as it was made was called not exact), else neither.
    recorded = json.loads(state.get('train_options') or '{}')
    defaults = {k: recorded.get(k, v) for k, v in _TRAJECTORY_DEFAULTS.items()}
    try:
        defaults.update(compile=compile_mode(defaults['compile']), channels_last=bool(defaults['channels_last']))
    except ValueError:
        defaults = dict(_TRAJECTORY_DEFAULTS)
    saved = {**defaults, **json.loads(state['options'])}
    options = {**_TRAJECTORY_DEFAULTS, **options}
    changed = [k for k in _TRAJECTORY_OPTIONS if _options_json(saved.get(k)) != _options_json(options.get(k))]
    if changed:
        details = '; '.join(_option_change(k, saved.get(k), options.get(k)) for k in changed)
        dist.warn0(f'resuming from {path} with different {details}: the continuation will not be exact',
                   stacklevel=3)
    # The batch's layout changes the summation order (and another world size the random streams): close, not
    # bit-exact. States before batch_gpu was recorded are compared by world size alone.
    world_size = dist.get_world_size()
    layout = split_batch(batch_size, world_size, batch_gpu)[1:]
    if int(state['world_size']) != world_size:
        changed.append(f'world size ({state["world_size"]} -> {world_size} ranks)')
    elif 'batch_gpu' in state and (int(state['batch_gpu']), int(state['num_rounds'])) != layout:
        changed.append(f'per-rank batch layout (batch_gpu {state["batch_gpu"]} x {state["num_rounds"]} rounds -> '
                       f'{layout[0]} x {layout[1]})')
        dist.warn0(f'resuming from {path} with another {changed[-1]}: the continuation is close, not bit-exact '
                   f'(floating-point summation order)', stacklevel=3)
    # train.py's states from before 2026-12-01 15:00 (their options lack --ema-rampup, added then) updated the EMA as
    # lerp(ema, net, 1 - beta), which rounds otherwise than EDM's lerp(net, ema, beta) used since an hour later: the
    # EMA, which the snapshots are, goes on by other float32 roundings (1e-7 after a kimg), and was called exact.
    if recorded and 'ema_rampup' not in recorded:
        changed.append('EMA rounding')
        dist.warn0(f'{path} was written by a version before 2026-12-01 (its options lack --ema-rampup), whose EMA '
                   f'update rounded otherwise than EDM\'s used since: the EMA continues close, not bit-exact',
                   stacklevel=3)
    return not changed


def parse_state_kimg(path: str) -> int | None:
    """The NNNNNN of training-state-NNNNNN.pt, or None when the name does not match."""
    match = re.fullmatch(r'training-state-(\d+)\.pt', os.path.basename(path))
    return int(match.group(1)) if match else None
