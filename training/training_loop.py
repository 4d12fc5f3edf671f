"""The training loop: EDM's behaviour (seeding, batch accounting, DDP, LR ramp, EMA, ticks, snapshots, stats),
run as a list of phases, with exact resume from self-contained training states.

One iteration = for each phase due at this iteration: zero grads, accumulate gradients over the rounds of the
per-rank batch (DDP syncs on the last round only), ramp the learning rate, scrub non-finite gradients, step.
Then the EMA of `net` is updated and cur_nimg advances by the global batch. EDM is the one-phase case (see
losses/__init__.py for the loss/phase contract); nothing method-specific lives here. What a loss asks of the data
(`data_requirements()`: a reference stream, pools prepared once and consumed in order) is provided generically.

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
import json
import os
import pickle
import random
import re
import sys
import time
import warnings

import numpy as np
import psutil
import torch

import dnnlib
from losses import Batch, PerImageRandom, default_phases
from torch_utils import distributed as dist
from torch_utils import misc, persistence, training_stats
from training.dataset import InfiniteSampler

STATE_FORMAT = 'diffusion-toolkit/training-state'
STATE_VERSION = 1

# Loop options that change the trajectory: compared on resume (a mismatch makes the continuation inexact).
_TRAJECTORY_OPTIONS = ('dataset_kwargs', 'network_kwargs', 'loss_kwargs', 'optimizer_kwargs', 'augment_kwargs',
                       'seed', 'batch_size', 'ema_halflife_kimg', 'ema_rampup_ratio', 'lr_rampup_kimg',
                       'loss_scaling', 'precision', 'rng')

PRECISIONS = ('fp32', 'bf16', 'fp16')

# What a loss may ask of the data through data_requirements() (see losses/__init__.py), and the Batch fields that
# hold one value per training image (a pool is handed out by slicing these).
DATA_REQUIREMENTS = ('references', 'pool')
_ROW_FIELDS = ('images', 'labels', 'noise', 'augment_labels')


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


@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, beta: float) -> None:
    """p_ema <- lerp(p_net, p_ema, beta) for parameters (one fused kernel); buffers copied."""
    ema_params = [p for p in ema.parameters()]
    net_params = [p.detach() for p in net.parameters()]
    if ema_params:
        # lerp(ema, net, 1 - beta) == lerp(net, ema, beta); beta = 0 copies the net exactly.
        torch._foreach_lerp_(ema_params, net_params, 1.0 - beta)
    for b_ema, b_net in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b_net)


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


def check_data_requirements(loss_fn, batch_gpu_total: int) -> dict:
    """The loss's data_requirements() ({} when it has none), validated: known names, positive integer sizes, and a
    pool that divides into per-rank iterations of batch_gpu_total images."""
    name = type(loss_fn).__name__
    requirements = dict(loss_fn.data_requirements()) if hasattr(loss_fn, 'data_requirements') else {}
    unsupported = sorted(set(requirements) - set(DATA_REQUIREMENTS))
    if unsupported:
        raise NotImplementedError(f'loss {name} requires {", ".join(unsupported)} from the data, which this training '
                                  f'loop does not provide (it provides: {", ".join(DATA_REQUIREMENTS)})')
    for key, value in requirements.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f'loss {name}: data requirement {key!r} must be a positive integer, got {value!r}')
        requirements[key] = int(value)
    pool_size = requirements.get('pool')
    if pool_size is not None:
        if pool_size % batch_gpu_total != 0:
            raise ValueError(f'loss {name}: its pool of {pool_size} images per rank is not a multiple of the per-rank '
                             f'batch per iteration, {batch_gpu_total} (batch size / number of ranks)')
        if not hasattr(loss_fn, 'prepare_pool'):
            raise TypeError(f'loss {name} asks for a pool but has no prepare_pool(batch, augment_pipe) method')
    return requirements


def _stream_seed(*keys) -> int:
    """A 63-bit seed that depends only on the integer keys (e.g. seed, rank, pool index)."""
    words = np.random.SeedSequence([int(k) % (1 << 64) for k in keys]).generate_state(2, np.uint32)
    return (int(words[0]) | (int(words[1]) << 32)) & ((1 << 63) - 1)


def _reference_stream_seed(seed: int) -> int:
    """Seed of the InfiniteSampler of the reference stream (RandomState takes 32 bits); distinct from `seed`."""
    return _stream_seed(seed, 0x5EF) & 0xFFFFFFFF


def _pool_seed(seed: int, rank: int, pool_idx: int) -> int:
    """Seed of the torch RNG while a pool is prepared: a resumed run rebuilds the same pool."""
    return _stream_seed(seed, 0xA07, rank, pool_idx)


def _batch_rows(batch: Batch, rows: slice) -> Batch:
    """The rows `rows` of every per-image field of `batch`."""
    return dataclasses.replace(batch, **{name: getattr(batch, name)[rows] for name in _ROW_FIELDS
                                         if getattr(batch, name) is not None})


def _load_pool(loss_fn, dataset_iterator, pool_size, batch_gpu, device, augment_pipe, seed) -> Batch:
    """Read `pool_size` images (the next pool_size / batch_gpu loader batches) and let the loss prepare them, with
    the torch RNG seeded by `seed` and the surrounding random streams left untouched."""
    parts = [next(dataset_iterator) for _ in range(pool_size // batch_gpu)]
    images = torch.cat([images for images, _ in parts]).to(device).to(torch.float32) / 127.5 - 1
    labels = torch.cat([labels for _, labels in parts]).to(device)
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []), torch.no_grad():
        torch.manual_seed(seed)
        pool = loss_fn.prepare_pool(Batch(images=images, labels=labels), augment_pipe)
    for name in _ROW_FIELDS:
        value = getattr(pool, name)
        if value is not None and value.shape[0] != pool_size:
            raise ValueError(f'loss {type(loss_fn).__name__}: prepare_pool returned {value.shape[0]} rows of '
                             f'{name!r}, expected {pool_size}')
    return pool


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

    format, version; cur_nimg, cur_tick (the next tick), cur_iter (iterations done); seed, world_size, batch_size;
    data_position (global draws consumed from the InfiniteSampler stream: rank r resumes at data_position / world);
    networks {name: state_dict} ('net' and any extra networks of the loss); ema (state_dict of the EMA of 'net');
    optimizers / grad_scalers {phase name: state_dict}; rng [per rank: torch, numpy, python (, cuda)];
    reference_position (global draws consumed from the reference stream, when the loss asks for references);
    options (JSON of the trajectory options, used to warn when a resume changes them).
    """
    with dnnlib.util.atomic_output(path, 'wb') as f:
        torch.save(_to_cpu(state), f)


def load_training_state(path: str) -> dict | None:
    """Our training state as a dict, or None when `path` is an EDM training state (a pickled network)."""
    with open(path, 'rb') as f:
        persistence.check_torch_file(f, path)  # Refuses TorchScript archives before torch.load sees them.
        try:
            state = torch.load(f, map_location='cpu', weights_only=True)
        except pickle.UnpicklingError:
            return None
    if not isinstance(state, dict) or state.get('format') != STATE_FORMAT:
        return None
    if state.get('version') != STATE_VERSION:
        raise ValueError(f'{path}: training state version {state.get("version")}, expected {STATE_VERSION}')
    return state


# ---------------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _weight_init_rng(seed):
    """Seed the CPU RNG for weight initialisation without disturbing the global stream; no-op when seed is None."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
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


def _save_snapshot(path: str, ema, loss_fn, augment_pipe, dataset_kwargs) -> None:
    """EDM's snapshot dict; save_network_pickle copies modules to the CPU in eval mode and writes atomically."""
    persistence.save_network_pickle(path, dict(ema=ema, loss_fn=loss_fn, augment_pipe=augment_pipe,
                                               dataset_kwargs=dict(dataset_kwargs)))


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
    lr_rampup_kimg=10000,       # Learning-rate ramp-up duration.
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
    compile=False,              # torch.compile the networks' forward.
    allow_tf32=False,           # TF32 matmul/convolutions on Ampere+ (EDM: off).
    rng='image',                # 'image': per-image sigma/noise keyed by data position; 'rank': EDM's per-rank stream.
    progress=True,              # tqdm progress bar on rank 0 when stderr is a terminal.
):
    start_time = time.time()
    dataset_kwargs, data_loader_kwargs = dict(dataset_kwargs or {}), dict(data_loader_kwargs or {})
    network_kwargs, loss_kwargs = dict(network_kwargs or {}), dict(loss_kwargs or {})
    optimizer_kwargs = dict(optimizer_kwargs or {})
    device = torch.device(device) if device is not None else dist.device()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if rng not in ('image', 'rank'):
        raise ValueError(f"rng={rng!r}; expected 'image' or 'rank'")
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; expected one of {', '.join(PRECISIONS)}")
    training_stats.reset()

    # Seeding and backend flags, as EDM.
    np.random.seed((seed * world_size + rank) % (1 << 31))
    torch.manual_seed(np.random.randint(1 << 31))
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cudnn.allow_tf32 = allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False

    batch_gpu_total, batch_gpu, num_accumulation_rounds = split_batch(batch_size, world_size, batch_gpu)
    options = dict(dataset_kwargs=dataset_kwargs, network_kwargs=network_kwargs, loss_kwargs=loss_kwargs,
                   optimizer_kwargs=optimizer_kwargs, augment_kwargs=augment_kwargs, seed=seed, batch_size=batch_size,
                   ema_halflife_kimg=ema_halflife_kimg, ema_rampup_ratio=ema_rampup_ratio,
                   lr_rampup_kimg=lr_rampup_kimg, loss_scaling=loss_scaling, precision=precision, rng=rng)

    # Our training state (exact resume) or EDM's (approximate)?
    state = None
    if resume_state_dump is not None:
        state = load_training_state(resume_state_dump)
        if state is not None:
            saved = json.loads(state['options'])
            changed = [k for k in _TRAJECTORY_OPTIONS
                       if _options_json(saved.get(k)) != _options_json(options.get(k))]
            if changed:
                warnings.warn(f'resuming from {resume_state_dump} with different {", ".join(changed)}: the '
                              f'continuation will not be exact', stacklevel=2)
    data_position = int(state['data_position']) if state is not None else 0
    if data_position % world_size != 0:
        warnings.warn(f'data position {data_position} is not a multiple of {world_size} ranks; rounding down',
                      stacklevel=2)
    start_idx = data_position // world_size
    reference_start = int(state.get('reference_position', 0)) // world_size if state is not None else 0

    # Data.
    dist.print0('Loading dataset...')
    dataset_obj = dnnlib.util.construct_class_by_name(**dataset_kwargs)
    dataset_sampler = InfiniteSampler(dataset=dataset_obj, rank=rank, num_replicas=world_size, seed=seed,
                                      start_idx=start_idx)
    dataset_iterator = iter(torch.utils.data.DataLoader(dataset=dataset_obj, sampler=dataset_sampler,
                                                        batch_size=batch_gpu, **data_loader_kwargs))

    # Networks, loss, phases.
    dist.print0('Constructing network...')
    interface_kwargs = dict(img_resolution=dataset_obj.resolution, img_channels=dataset_obj.num_channels,
                            label_dim=dataset_obj.label_dim)
    # rng='image': initial weights from the seed alone, identical for every world size (EDM: from the per-rank
    # stream, seeded with seed * world + rank, and DDP then copies rank 0's weights everywhere).
    with _weight_init_rng(seed if rng == 'image' else None):
        net = dnnlib.util.construct_class_by_name(**network_kwargs, **interface_kwargs)
        net.train().requires_grad_(True).to(device)

        dist.print0('Setting up optimizer...')
        loss_fn = dnnlib.util.construct_class_by_name(**loss_kwargs)
        requirements = check_data_requirements(loss_fn, batch_gpu_total)
        augment_pipe = dnnlib.util.construct_class_by_name(**augment_kwargs) if augment_kwargs is not None else None
        networks = dict(net=net)
        if hasattr(loss_fn, 'extra_networks'):
            for name, module in loss_fn.extra_networks(net).items():
                if name in networks:
                    raise ValueError(f'loss {type(loss_fn).__name__}: extra network name {name!r} is taken')
                networks[name] = module.train().to(device)
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

    ddp_modules = {}    # DDP wrapper (or the module itself) per network: gradient sync control
    train_modules = {}  # what a phase calls for its own network: DDP wrapper, maybe compiled
    for name, module in networks.items():
        wrapped = module
        if dist.is_distributed() and any(p.requires_grad for p in module.parameters()):
            wrapped = torch.nn.parallel.DistributedDataParallel(
                module, device_ids=[device] if device.type == 'cuda' else None)
        ddp_modules[name] = wrapped
        train_modules[name] = torch.compile(wrapped) if compile else wrapped
    phase_networks = {phase.name: {name: (train_modules[name] if name == phase.network else module)
                                   for name, module in networks.items()} for phase in phases}
    multi_phase = len(phases) > 1
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    scalers = {phase.name: torch.amp.GradScaler(device.type) for phase in phases} if precision == 'fp16' else {}

    # What the loss asks of the data (built before the resume, which restores the RNG states last).
    num_references = requirements.get('references', 0)
    pool_size = requirements.get('pool')
    reference_iterator = None
    if num_references:
        # An independent shuffled stream over the training set, so that pools and resumes never interleave with it.
        reference_sampler = InfiniteSampler(dataset=dataset_obj, rank=rank, num_replicas=world_size,
                                            seed=_reference_stream_seed(seed), start_idx=reference_start)
        reference_iterator = iter(torch.utils.data.DataLoader(dataset=dataset_obj, sampler=reference_sampler,
                                                              batch_size=num_references, **data_loader_kwargs))
    pool, pool_offset, pool_skip = None, 0, 0
    if pool_size is not None and start_idx % pool_size != 0:
        # Resuming inside a pool: read that pool again from its first image and skip the rows already trained on.
        pool_skip = start_idx % pool_size
        dataset_sampler = InfiniteSampler(dataset=dataset_obj, rank=rank, num_replicas=world_size, seed=seed,
                                          start_idx=start_idx - pool_skip)
        dataset_iterator = iter(torch.utils.data.DataLoader(dataset=dataset_obj, sampler=dataset_sampler,
                                                            batch_size=batch_gpu, **data_loader_kwargs))

    # Resume.
    cur_nimg = int(resume_kimg * 1000)
    cur_tick = 0
    cur_iter = 0
    if resume_pkl is not None:
        dist.print0(f'Loading network weights from "{resume_pkl}"...')
        if rank != 0:
            dist.barrier()  # rank 0 downloads first
        data = persistence.load_network_pickle(resume_pkl)
        if rank == 0:
            dist.barrier()
        misc.copy_params_and_buffers(src_module=data['ema'], dst_module=net, require_all=False)
        misc.copy_params_and_buffers(src_module=data['ema'], dst_module=ema, require_all=False)
        del data
    if resume_state_dump is not None and state is None:
        dist.print0(f'Loading EDM training state from "{resume_state_dump}"...')
        warnings.warn(f'{resume_state_dump} is an EDM training state: it has no EMA, RNG state or data position, '
                      f'so the data order and random streams restart (not an exact resume)', stacklevel=2)
        data = persistence.load_edm_training_state(resume_state_dump)
        misc.copy_params_and_buffers(src_module=data['net'], dst_module=net, require_all=True)
        phases[0].optimizer.load_state_dict(data['optimizer_state'])
        for group in phases[0].optimizer.param_groups:
            group.setdefault('base_lr', optimizer_kwargs.get('lr', group['lr']))
        del data
    if state is not None:
        dist.print0(f'Resuming exactly from "{resume_state_dump}"...')
        for name, module in networks.items():
            if name not in state['networks']:
                raise ValueError(f'{resume_state_dump}: no weights for network {name!r}')
            module.load_state_dict(state['networks'][name])
        ema.load_state_dict(state['ema'])
        for phase in phases:
            if phase.name not in state['optimizers']:
                raise ValueError(f'{resume_state_dump}: no optimizer state for phase {phase.name!r}')
            phase.optimizer.load_state_dict(state['optimizers'][phase.name])
            if phase.name in scalers and phase.name in state.get('grad_scalers', {}):
                scalers[phase.name].load_state_dict(state['grad_scalers'][phase.name])
        cur_nimg, cur_tick, cur_iter = int(state['cur_nimg']), int(state['cur_tick']), int(state['cur_iter'])
        # Last, after everything that draws random numbers while being built (networks, data loader).
        if int(state['world_size']) == world_size:
            _set_rng_state(state['rng'][rank], device)
        else:
            warnings.warn(f'{resume_state_dump} was written by {state["world_size"]} ranks, this run has '
                          f'{world_size}: augmentation/dropout random streams restart', stacklevel=2)
        del state

    # Train.
    total_nimg = round(total_kimg * 1000)  # fractional kimg (short test runs) without float surprises
    dist.print0(f'Training for {total_kimg} kimg...')
    dist.print0()
    tick_start_nimg = cur_nimg
    tick_start_time = time.time()
    maintenance_time = tick_start_time - start_time
    dist.update_progress(cur_nimg // 1000, total_kimg)
    stats_jsonl = None
    progress_bar = _progress_bar(total=int(total_nimg), initial=min(cur_nimg, int(total_nimg)), enabled=progress)
    data_consumed = start_idx  # per rank
    references_consumed = reference_start  # per rank
    while True:
        if pool_size is None:
            rounds = []
            for _ in range(num_accumulation_rounds):
                images, labels = next(dataset_iterator)
                rounds.append(Batch(images=images.to(device).to(torch.float32) / 127.5 - 1, labels=labels.to(device)))
        else:
            if pool is None or pool_offset == pool_size:
                pool = _load_pool(loss_fn, dataset_iterator, pool_size, batch_gpu, device, augment_pipe,
                                  _pool_seed(seed, rank, data_consumed // pool_size))
                pool_offset, pool_skip = pool_skip, 0
            rounds = [_batch_rows(pool, slice(pool_offset + k * batch_gpu, pool_offset + (k + 1) * batch_gpu))
                      for k in range(num_accumulation_rounds)]
            pool_offset += batch_gpu_total
        if reference_iterator is not None:
            reference_images, reference_labels = next(reference_iterator)
            reference_images = reference_images.to(device).to(torch.float32) / 127.5 - 1
            reference_labels = reference_labels.to(device)
            rounds = [dataclasses.replace(b, references=reference_images, reference_labels=reference_labels)
                      for b in rounds]
            references_consumed += num_references
        data_consumed += batch_gpu_total

        for phase_idx, phase in enumerate(phases):
            if not phase.runs_at(cur_iter):
                continue
            if multi_phase:
                params = {id(p) for p in phase_params[phase.name]}
                for module in networks.values():
                    for p in module.parameters():
                        p.requires_grad_(id(p) in params)
            phase.optimizer.zero_grad(set_to_none=True)
            scaler = scalers.get(phase.name)
            for round_idx, round_batch in enumerate(rounds):
                batch_random = None
                if rng == 'image':
                    batch_random = PerImageRandom.for_round(seed, cur_nimg, batch_size, world_size, rank, batch_gpu,
                                                            round_idx, device, stream=phase_idx)
                batch = dataclasses.replace(round_batch, random=batch_random)
                with misc.ddp_sync(ddp_modules[phase.network], sync=(round_idx == num_accumulation_rounds - 1)):
                    with autocast_context(device, precision):
                        loss = phase.loss_fn(phase_networks[phase.name], batch, augment_pipe)
                    training_stats.report(phase.stat_name, loss)
                    loss = loss.sum().mul(loss_scaling / batch_gpu_total)
                    (scaler.scale(loss) if scaler is not None else loss).backward()

            lr_scale = learning_rate_ramp(cur_nimg, lr_rampup_kimg)
            for group in phase.optimizer.param_groups:
                group['lr'] = group['base_lr'] * lr_scale
            if scaler is not None:
                scaler.unscale_(phase.optimizer)
            misc.nan_to_num_grads_(phase_params[phase.name])
            if scaler is not None:
                scaler.step(phase.optimizer)
                scaler.update()
            else:
                phase.optimizer.step()

        update_ema(ema, net, ema_beta(cur_nimg, batch_size, ema_halflife_kimg, ema_rampup_ratio))

        cur_nimg += batch_size
        cur_iter += 1
        if progress_bar is not None:
            progress_bar.update(batch_size)
        done = (cur_nimg >= total_nimg)
        if (not done) and (cur_tick != 0) and (cur_nimg < tick_start_nimg + kimg_per_tick * 1000):
            continue

        # Status line, also reported to training_stats (EDM's names).
        tick_end_time = time.time()
        on_cuda = device.type == 'cuda'
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if on_cuda else 0.0
        peak_reserved = torch.cuda.max_memory_reserved(device) / 2**30 if on_cuda else 0.0
        fields = []
        fields += [f"tick {training_stats.report0('Progress/tick', cur_tick):<5d}"]
        fields += [f"kimg {training_stats.report0('Progress/kimg', cur_nimg / 1e3):<9.1f}"]
        fields += [f"time {dnnlib.util.format_time(training_stats.report0('Timing/total_sec', tick_end_time - start_time)):<12s}"]  # noqa: E501
        fields += [f"sec/tick {training_stats.report0('Timing/sec_per_tick', tick_end_time - tick_start_time):<7.1f}"]
        sec_per_kimg = (tick_end_time - tick_start_time) / max(cur_nimg - tick_start_nimg, 1) * 1e3
        fields += [f"sec/kimg {training_stats.report0('Timing/sec_per_kimg', sec_per_kimg):<7.2f}"]
        fields += [f"maintenance {training_stats.report0('Timing/maintenance_sec', maintenance_time):<6.1f}"]
        cpu_mem = psutil.Process(os.getpid()).memory_info().rss / 2**30
        fields += [f"cpumem {training_stats.report0('Resources/cpu_mem_gb', cpu_mem):<6.2f}"]
        fields += [f"gpumem {training_stats.report0('Resources/peak_gpu_mem_gb', peak_mem):<6.2f}"]
        fields += [f"reserved {training_stats.report0('Resources/peak_gpu_mem_reserved_gb', peak_reserved):<6.2f}"]
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(device)
        if progress_bar is not None:
            with progress_bar.external_write_mode():
                dist.print0(' '.join(fields))
        else:
            dist.print0(' '.join(fields))

        if (not done) and dist.should_stop():
            done = True
            dist.print0()
            dist.print0('Aborting...')

        # Network snapshot (rank 0).
        if (snapshot_ticks is not None) and (done or cur_tick % snapshot_ticks == 0) and rank == 0:
            _save_snapshot(os.path.join(run_dir, f'network-snapshot-{cur_nimg // 1000:06d}.pkl'), ema=ema,
                           loss_fn=loss_fn, augment_pipe=augment_pipe, dataset_kwargs=dataset_kwargs)

        # Training state (RNG states gathered from every rank, written by rank 0).
        if (state_dump_ticks is not None) and (done or cur_tick % state_dump_ticks == 0) and cur_tick != 0:
            rng_states = [_get_rng_state(device)]
            if dist.is_distributed():
                rng_states = [None] * world_size
                torch.distributed.all_gather_object(rng_states, _get_rng_state(device))
            if rank == 0:
                save_training_state(os.path.join(run_dir, f'training-state-{cur_nimg // 1000:06d}.pt'), dict(
                    format=STATE_FORMAT, version=STATE_VERSION,
                    cur_nimg=cur_nimg, cur_tick=cur_tick + 1, cur_iter=cur_iter,
                    seed=seed, world_size=world_size, batch_size=batch_size,
                    data_position=data_consumed * world_size,
                    reference_position=references_consumed * world_size,
                    networks={name: module.state_dict() for name, module in networks.items()},
                    ema=ema.state_dict(),
                    optimizers={phase.name: phase.optimizer.state_dict() for phase in phases},
                    grad_scalers={name: scaler.state_dict() for name, scaler in scalers.items()},
                    rng=rng_states,
                    options=_options_json(options),
                ))

        # Logs.
        training_stats.default_collector.update()
        if rank == 0:
            if stats_jsonl is None:
                stats_jsonl = open(os.path.join(run_dir, 'stats.jsonl'), 'a')
            training_stats.write_jsonl_line(stats_jsonl, training_stats.default_collector)
        dist.update_progress(cur_nimg // 1000, total_kimg)

        cur_tick += 1
        tick_start_nimg = cur_nimg
        tick_start_time = time.time()
        maintenance_time = tick_start_time - tick_end_time
        if done:
            break

    if progress_bar is not None:
        progress_bar.close()
    if stats_jsonl is not None:
        stats_jsonl.close()
    dist.print0()
    dist.print0('Exiting...')


def parse_state_kimg(path: str) -> int | None:
    """The NNNNNN of training-state-NNNNNN.pt, or None when the name does not match."""
    match = re.fullmatch(r'training-state-(\d+)\.pt', os.path.basename(path))
    return int(match.group(1)) if match else None
