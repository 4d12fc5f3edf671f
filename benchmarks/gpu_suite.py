"""GPU suite (issue 15): the CUDA path checked and timed in one call, side by side with EDM's own code.

    python benchmarks/gpu_suite.py --out benchmarks/results/DATE-h200 [--edm-repo DIR] [--network PKL]
    python benchmarks/gpu_suite.py --out /tmp/suite --device cpu --smoke         # the script itself, on a CPU

Writes OUT/gpu_suite.json (rewritten after every section, so an interrupted run keeps what it measured) and
OUT/gpu_suite.txt (the printed table); scratch files (dataset, snapshots, images) go to --work (default OUT/work).
Needs only this repository and its pip requirements: no downloads (random-weight networks, stand-in detectors, a
generated dataset). --edm-repo: a checkout of NVlabs/edm (never committed here) whose network, loss, augmentation,
dataset and sampler are timed in subprocesses for the EDM columns.

Sections (--sections; all by default):
  env          torch, CUDA, cuDNN, GPU, driver, commit.
  correctness  CPU fp32 vs device fp32 (TF32 off, as EDM), bf16 autocast vs fp32, EDM's use_fp16 vs fp32,
               torch.compile vs eager, one training step of every registered loss and wrapper through train.py,
               generate.py and fid.py --network, NCCL (gloo on CPU) in a single-process torchrun, no host sync in
               the training step (CUDA sync debug mode; on CPU: no tensor-to-Python conversion).
  pytest_cuda  the CUDA tests (python -m pytest -m cuda tests/test_cuda.py; all skip without a GPU), their summary
               line; started with the suite, they run alongside the correctness checks, before any timing.
  train        images/s of the training step (our loop's `_train_step`: data loading, loss, backward, Adam, EMA) at
               CIFAR-10 DDPM++ cond, batch 512 then 128: EDM fp32 (its code), ours bf16, bf16 + regional compile,
               then ours fp32 at both, then extras (+ fused Adam, + channels_last, --bench 0, --augment 0, STF, SPD,
               compile + channels_last + fused Adam); compile time, peak memory, loss of every step (EDM's RNG
               order: --rng rank), MFU (FLOPs by torch.utils.flop_counter against a measured bf16 matmul rate).
  sample       images/s of Heun 18 steps at batch 512: EDM's edm_sampler (its code) vs ours fp32, + CUDA graph,
               bf16, bf16 + compile, bf16 + compile + CUDA graph; deviation from fp32 in uint8 levels.
  features     images/s of an Inception-sized stand-in detector at batch 256-1024: features (fid); fid,is in two
               passes (before) and in one (FeaturePass: the probabilities from the features).
  fid_stats    FID statistics of 50k x 2048 features: ours vs EDM's per-batch GEMM vs torch-fidelity's np.cov,
               and the distance (EDM's sqrtm vs torch-fidelity's eigvals), one CPU thread (a subprocess).
  aot          AOT pairing hidden behind training: our loop with --aot, synchronous vs background assignment.
  dataloader   images/s of train.py's DataLoader settings on the generated dataset, against the training rate.

--budget-s: sections and optional parts are skipped (recorded as such) when less time is left than they need; the
training section leaves time for sampling and feature extraction (RESERVED_S).
--smoke: tiny network and sizes, torch.compile through the 'eager' backend (Dynamo traces, no code generation): the
whole script in a few minutes on a CPU (tests/test_cuda.py runs it). Exit status 1 when a check or section failed.
"""

import argparse
import contextlib
import copy
import dataclasses
import datetime
import gc
import inspect
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import traceback
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE_VERSION = 1
# In the order they run: the checks first (a GPU run is rare; whatever else it skips, it must say whether the CUDA path
# is right), then the headline timings, then the rest.
SECTIONS = ('env', 'correctness', 'pytest_cuda', 'train', 'sample', 'features', 'fid_stats', 'aot', 'dataloader')
# Seconds each section needs to be worth starting (pytest_cuda: none, it is already running and must be waited for
# before any timing), and what the sections before it leave for it (their optional parts are skipped first): the
# headline sampling timings must not be starved by the training ones.
MINIMUM_S = dict(env=0, correctness=60, pytest_cuda=0, train=120, sample=60, features=20, fid_stats=20, aot=40,
                 dataloader=15)
# sample: 78 s on an H200 (2026-12-04, the compile's warm-up 33 s of it), 94 s on the second lease (warm-up 37 s);
# 150 starved the compiled training timings.
RESERVED_S = dict(sample=100, features=15)
# What the sampling section's compiled configuration needs to be started (H200: warm-up 33 s, the timed batch 2 s). It
# runs right after its reference (ours fp32), from the reserve above; at 120 s, more than the reserve left once EDM's
# and our fp32 batch had run, it was skipped whenever the training section used the time up to its reserve.
SAMPLE_COMPILE_NEEDS_S = 60
# The FLOP count and the bf16 matmul timing of the MFU: seconds. Measured right after the headline compiled training
# configuration (before the configurations that may overrun their estimate into the reserve), not at the section's end.
MFU_NEEDS_S = 10
# Training configurations whose run takes longer than the section's estimates (compile: the last compile + 20 s, EDM's
# 60 s, the others 30 s): ours fp32 at batch 512 took 50 s on the H200 (a first step of 34 s, cuDNN's autotuning), and
# at 30 s it ran into the sampling reserve whenever it started with 30-50 s to spare. Both fp32 columns at 512 also
# run their 8 timed steps twice (timed_steps' tuning pass, 11 s): EDM's took 65 s before.
TRAIN_NEEDS_S = {('ours_fp32', 512): 65, ('edm_fp32', 512): 80}
# The timed training runs' learning-rate ramp-up, ours and EDM's alike: none (the full rate from the second step), so
# that the per-step losses compare the precisions. Under EDM's 10,000 kimg ramp-up the first steps' rate is ~5e-8 and
# the weights stay at their initialisation, where EDM's zero output layer makes the loss independent of the network
# (and of its precision): on the H200, bf16 and fp32 losses both equalled EDM's to 1e-7. The speed is the same.
TRAIN_LR_RAMPUP_KIMG = 0
# The default --budget-s: a device call's 600 s less what the last configuration may overrun its estimate. 510 left
# the compiled training at batch 512 out once the replayed steps (timed_steps) and the H200's 124 s compile counted.
DEFAULT_BUDGET_S = 560
# What a method plug-in costs per training step on the GPU: its configuration (bf16, the smallest batch) against
# ours_bf16 at that batch. STF's reference batch (1024 per GPU) and SPD's Fourier corruption; SPD's GPU step ratio
# had never been measured (bench_spd.py measures it on CPU). Their losses are other quantities than EDM's: no loss
# comparison.
METHOD_CONFIGS = {'ours_bf16_stf': ['--stf', 1], 'ours_bf16_spd': ['--loss', 'spd']}
# A training compile's seconds until the run has measured one (H200, 2026-12-04: regional compile of DDPM++ 124 s at
# batch 512 on the second lease, 142 s on the third; the process's second compile, at 128, took 95 s in a new one).
COMPILE_ESTIMATE_S = 145


# ---------------------------------------------------------------------------------------------------------------------
# Sizes.

@dataclasses.dataclass
class Sizes:
    resolution: int
    arch: dict                 # network options over ARCH_PRESETS['ddpmpp'] (EDM's CIFAR-10 DDPM++)
    dataset_images: int
    train_batches: tuple
    train_warmup: int          # untimed steps (compilation, cuDNN autotuning), each timed on its own
    train_steps: int           # timed steps
    check_batch: int           # batch of the output comparisons
    sample_batch: int
    sample_steps: int
    feature_batches: tuple
    feature_images: int
    feature_net: dict          # metrics.detectors.StandinInception options
    fid_num: int
    fid_dim: int
    aot_pool: int
    aot_batch: int
    aot_pools: int             # timed pools (after one untimed)
    loader_images: int


def full_sizes():
    from metrics.detectors import INCEPTION_SIZED
    return Sizes(resolution=32, arch={}, dataset_images=4096, train_batches=(128, 512), train_warmup=3,
                 train_steps=8, check_batch=16, sample_batch=512, sample_steps=18, feature_batches=(256, 512, 1024),
                 feature_images=2048, feature_net=dict(INCEPTION_SIZED), fid_num=50000, fid_dim=2048, aot_pool=512,
                 aot_batch=128, aot_pools=3, loader_images=4096)


def smoke_sizes():
    return Sizes(resolution=8, arch=dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]),
                 dataset_images=64, train_batches=(8, 16), train_warmup=1, train_steps=2, check_batch=4,
                 sample_batch=8, sample_steps=4, feature_batches=(8,), feature_images=16,
                 feature_net=dict(feature_dim=32, num_classes=10, resolution=16, channels=(8,), strides=(2,)),
                 fid_num=2000, fid_dim=64, aot_pool=16, aot_batch=8, aot_pools=2, loader_images=64)


# ---------------------------------------------------------------------------------------------------------------------
# Small helpers.

def sync(device):
    import torch
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


def backend_flags() -> dict:
    import torch
    return dict(cudnn_benchmark=torch.backends.cudnn.benchmark, cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)


def set_backend_flags(flags: dict):
    import torch
    torch.backends.cudnn.benchmark = flags['cudnn_benchmark']
    torch.backends.cudnn.allow_tf32 = flags['cudnn_allow_tf32']
    torch.backends.cuda.matmul.allow_tf32 = flags['matmul_allow_tf32']


def peak_memory_gb(device):
    import torch
    return torch.cuda.max_memory_allocated(device) / 2**30 if torch.device(device).type == 'cuda' else None


def reset_peak_memory(device):
    import torch
    if torch.device(device).type == 'cuda':
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def free_memory(device):
    import torch
    gc.collect()
    if torch.device(device).type == 'cuda':
        torch.cuda.empty_cache()


def rel_error(a, b) -> dict:
    """max |a - b|, mean |a - b| and ||a - b|| / ||b|| (float64)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    diff = (a - b).abs()
    return dict(max_abs=float(diff.max()), mean_abs=float(diff.mean()),
                rel_l2=float(diff.norm() / b.norm().clamp(min=1e-30)))


def uint8_deviation(a, b) -> dict:
    """How far two uint8 image batches are apart, in levels."""
    import torch
    diff = (a.to(torch.int16) - b.to(torch.int16)).abs()
    return dict(max_levels=int(diff.max()), mean_levels=float(diff.double().mean()),
                fraction_changed=float((diff > 0).double().mean()))


def tail(text: str, lines: int = 15) -> str:
    return '\n'.join(str(text).strip().splitlines()[-lines:])


def stop_process_tree(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop a subprocess started with start_new_session=True and what it started: SIGTERM to its process group first
    (torchrun stops its workers on SIGTERM; they run in sessions of their own, which a group kill does not reach),
    then SIGKILL to the group. A hung worker must not keep the GPU busy during the later timings."""
    import signal
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_subprocess(cmd, timeout, env=None, cwd=None):
    """(returncode, stdout, stderr); a timeout gives returncode None (the process tree stopped), a program that
    cannot be started (no git on the GPU machine) returncode -1 with the reason as stderr."""
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                                start_new_session=True)
    except OSError as exc:
        return -1, '', f'cannot run {cmd[0]}: {exc}'
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        stop_process_tree(proc)
        out, err = proc.communicate()
        return None, out or '', (err or '') + f'\n(timed out after {timeout} s)'


def last_json_line(text: str):
    for line in reversed(str(text).strip().splitlines()):
        line = line.strip()
        if line.startswith('{'):
            return json.loads(line)
    raise ValueError(f'no JSON line in the output:\n{tail(text)}')


def torchrun_cmd(script_args, nproc=1):
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', *script_args]


def worker_cmd(name, args: dict, torchrun=False):
    script = [os.path.abspath(__file__), '--worker', name, '--worker-args', json.dumps(args)]
    return torchrun_cmd(script) if torchrun else [sys.executable, *script]


def install_compile_backend(backend: str):
    """Make every torch.compile of this process (ours: compile_network, AcceleratedDenoiser) use `backend`; the
    smoke mode's 'eager' traces the graphs (guards, graph breaks, recompiles) without compiling them."""
    import torch
    if backend == 'inductor':
        return
    original = torch.compile

    def compile_with_backend(*args, **kwargs):
        kwargs['backend'] = backend
        kwargs.pop('mode', None)
        return original(*args, **kwargs)

    torch.compile = compile_with_backend


# ---------------------------------------------------------------------------------------------------------------------
# Inputs: a dataset zip, networks.

def write_dataset(path: str, num: int, resolution: int, num_classes: int = 10, seed: int = 0) -> str:
    """EDM's dataset format (PNGs + dataset.json labels) with smooth random RGB images, PNG-compressed as
    dataset_tool writes them (so decoding costs what it costs on CIFAR-10)."""
    import numpy as np
    import PIL.Image

    from dnnlib import util
    rng = np.random.default_rng(seed)
    names = []
    with util.atomic_output(path, 'wb') as f, zipfile.ZipFile(f, 'w', compression=zipfile.ZIP_STORED) as zf:
        for idx in range(num):
            base = rng.integers(0, 256, (1, 1, 3))
            ramp = np.linspace(-50, 50, resolution)[None, :, None] * rng.choice([-1, 1], (1, 1, 3))
            image = np.clip(base + ramp + rng.normal(0, 20, (resolution, resolution, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            PIL.Image.fromarray(image).save(buf, format='png')
            name = f'{idx // 1000:05d}/img{idx:08d}.png'
            zf.writestr(name, buf.getvalue())
            names.append(name)
        zf.writestr('dataset.json', json.dumps({'labels': [[n, i % num_classes] for i, n in enumerate(names)]}))
    return path


def network_kwargs(sizes, label_dim=10, augment_dim=9, dropout=0.13, use_fp16=False) -> dict:
    from training.presets import ARCH_PRESETS
    return dict(ARCH_PRESETS['ddpmpp'], **sizes.arch, augment_dim=augment_dim, dropout=dropout, use_fp16=use_fp16,
                label_dim=label_dim)


def build_net(sizes, seed=0, randomize=True, **overrides):
    """Our EDMPrecond DDPM++ (CIFAR-10 cond by default). randomize: every weight redrawn at unit-gain scale, so the
    output layers (EDM initialises them near zero) carry signal and output comparisons mean something."""
    import torch

    from training.preconditioning import EDMPrecond
    kwargs = network_kwargs(sizes, **overrides)
    torch.manual_seed(seed)
    net = EDMPrecond(img_resolution=sizes.resolution, img_channels=3, **kwargs)
    if randomize:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for param in net.parameters():
                if param.ndim > 1:
                    fan_in = param[0].numel()
                    param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(fan_in))
                else:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.1 + (1 if param.abs().mean() > 0.5
                                                                                else 0))
    return net.eval().requires_grad_(False)


def check_inputs(sizes, batch, device, seed=3):
    """(x, sigma, labels): noisy images at log-spaced sigma 0.002 .. 80, one-hot labels."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    y = torch.rand([batch, 3, sizes.resolution, sizes.resolution], generator=gen) * 2 - 1
    sigma = torch.logspace(math.log10(0.002), math.log10(80), batch)
    x = y + sigma.reshape(-1, 1, 1, 1) * torch.randn(y.shape, generator=gen)
    labels = torch.eye(10)[torch.randint(0, 10, [batch], generator=gen)]
    return x.to(device), sigma.to(device), labels.to(device)


def train_config(args_list) -> dict:
    """train.py's loop options for a command line (its own parser and build_config: what train.py would run)."""
    import dnnlib
    import train
    from training import train_options
    with contextlib.redirect_stdout(io.StringIO()):
        ctx = train.main.make_context('train.py', [str(a) for a in args_list])
        opts = dnnlib.EasyDict(ctx.params)
        config, _desc = train_options.build_config(opts, world_size=1)
    return dict(config)


def train_plan(sizes, args) -> list:
    """(name, train.py options, batch) of every training configuration in the order they run; ('mfu', None, batch)
    is where the MFU's FLOP count and matmul timing go."""
    bf16, compiled = ['--precision', 'bf16'], ['--precision', 'bf16', '--compile', 'regional']
    # The headline configurations at every batch size, the largest (EDM's CIFAR-10 batch) first, each batch's
    # EDM column beside ours: bf16 eager (30 s) before the compiled one (the goal's, ~2 min of compiling), so that
    # a compile that takes the rest of the budget still leaves a measured ratio; our fp32 columns after every
    # batch's compiled one (on the H200 they equal EDM's, and at 512 fp32 takes ~75 s: before the batch-128
    # compile it left that compile out of a 560 s call); then extras (budget allowing: what is skipped is the least
    # needed).
    batches = sorted(sizes.train_batches, reverse=True)
    plan = [(name, extra, batch) for batch in batches
            for name, extra in (('edm_fp32', None), ('ours_bf16', bf16), ('ours_bf16_compile', compiled))]
    plan += [('ours_fp32', [], batch) for batch in batches]
    # bench0 / noaug at the smallest batch: cuDNN's heuristics against its autotuned choices, and the step without
    # the augmentation (its host sync, and a new image size on most early steps: timed_steps' replay).
    plan += [('ours_bf16_fused', [*bf16, '--fused-adam', 1], batches[0]),
             ('ours_bf16_cl', [*bf16, '--channels-last', 1], batches[0]),
             ('ours_bf16_bench0', [*bf16, '--bench', 0], batches[-1]),
             ('ours_bf16_noaug', [*bf16, '--augment', 0], batches[-1]),
             *[(name, [*bf16, *options], batches[-1]) for name, options in METHOD_CONFIGS.items()],
             ('ours_bf16_compile_cl_fused', [*compiled, '--channels-last', 1, '--fused-adam', 1], batches[0])]
    # The MFU's FLOP count and matmul timing right after the headline compiled configuration (the ratios of every
    # bf16 configuration are computed at the end): a later configuration that takes longer than its estimate
    # must not leave it out.
    plan.insert(plan.index(next(step for step in plan if step[0] == 'ours_bf16_compile')) + 1,
                ('mfu', None, batches[0]))
    if not args.edm_repo:
        plan = [step for step in plan if step[0] != 'edm_fp32']
    if args.train_configs:  # a lease's second call: what the first did not reach
        wanted = train_config_names(args.train_configs)
        plan = [step for step in plan if step[0] == 'mfu' or f'{step[0]}@{step[2]}' in wanted]
    return plan


def train_config_names(value) -> set:
    """--train-configs as a set of NAME@BATCH (a comma-separated string, or already a collection)."""
    items = value.split(',') if isinstance(value, str) else value
    return {item.strip() for item in items if item.strip()}


class LoopRunner:
    """Our training loop built from train.py's options and stepped one iteration at a time (training_loop's own
    `_build`, `_resume` and `_train_step`); per-step losses kept on the device until asked for."""

    def __init__(self, config: dict):
        from training import training_loop as tl
        self.tl = tl
        defaults = {name: p.default for name, p in inspect.signature(tl.training_loop).parameters.items()}
        names = [name for name in inspect.signature(tl._build).parameters if name != 'resume_positions']
        kwargs = {name: config.get(name, defaults.get(name)) for name in names}
        import torch
        kwargs['device'] = torch.device(kwargs['device'] or ('cuda' if torch.cuda.is_available() else 'cpu'))
        with contextlib.redirect_stdout(io.StringIO()):
            self.run = tl._build(**kwargs, resume_positions={})
            tl._resume(self.run, state=None, resume_pkl=None, resume_state_dump=None, resume_kimg=0,
                       optimizer_kwargs=kwargs['optimizer_kwargs'])
        self.run.reset_tick_counters()
        self.loss_sums = []

    def step(self):
        self.tl._train_step(self.run)
        self.loss_sums.append(self.run.tick_loss_sum.clone())

    def losses(self) -> list:
        """Mean loss per element of every step so far."""
        import torch
        if not self.loss_sums:
            return []
        sums = torch.stack(self.loss_sums).double().cpu()
        per_step = torch.diff(sums, prepend=torch.zeros(1, dtype=sums.dtype))
        elements = self.run.tick_loss_num / len(self.loss_sums)
        return [float(v) / elements for v in per_step]

    def close(self):
        source = self.run.source
        while source is not None:  # stop the AOT worker threads of this run
            executor = getattr(source, '_executor', None)
            if executor is not None:
                executor.shutdown(wait=True)
            source = getattr(source, 'inner', None)
        self.run = None


def timed_steps(step, warmup: int, steps: int, device, get_rng_state, set_rng_state) -> dict:
    """Warm-up steps timed one by one (the first holds compilation), then `steps` steps run twice from the same random
    state: untimed (the tuning pass), then timed. With cuDNN benchmarking on (EDM's --bench 1) every new input size is
    autotuned on first sight, and the augmentation's reflect padding gives a new size on most early steps: the replay
    gives the timed steps the sizes just tuned, the steady state of a long run. Without it a configuration's timed steps
    held its own tuning, or none when an earlier configuration in the process had tuned the same sizes (the same seed
    draws the same sizes): on the H200 that made bf16 with fused Adam look 1.42x faster than bf16 (its first warm-up
    step 0.38 s against 15.8 s). The augmentation's parameters (hence the sizes) come from the torch generators
    alone, whose state is replayed; the data loader goes on to the next images."""
    def window(count):  # seconds per step of `count` steps, synchronised at both ends
        sync(device)
        start = time.perf_counter()
        for _ in range(count):
            step()
        sync(device)
        return (time.perf_counter() - start) / max(count, 1)

    warmup_s = [round(window(1), 4) for _ in range(warmup)]
    state = get_rng_state()
    tuning_pass_step_s = window(steps)
    set_rng_state(state)
    return dict(warmup_s=warmup_s, tuning_pass_step_s=tuning_pass_step_s, step_s=window(steps))


def time_loop(runner: LoopRunner, warmup: int, steps: int, device) -> dict:
    """Our loop's step timed as `timed_steps` says; the random state replayed is the loop's own (as a resume restores
    it)."""
    get_state, set_state = runner.tl._get_rng_state, runner.tl._set_rng_state
    return timed_steps(runner.step, warmup, steps, device, lambda: get_state(runner.run.device),
                       lambda state: set_state(state, runner.run.device))


# ---------------------------------------------------------------------------------------------------------------------
# The suite.

class Suite:
    def __init__(self, args):
        import torch
        self.args = args
        self.smoke = args.smoke
        self.device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
        self.on_cuda = self.device.type == 'cuda'
        self.sizes = smoke_sizes() if args.smoke else full_sizes()
        if args.aot_pool:
            self.sizes = dataclasses.replace(self.sizes, aot_pool=args.aot_pool, aot_batch=max(args.aot_pool // 4, 1))
        self.out = os.path.abspath(args.out)
        self.work = os.path.abspath(args.work or os.path.join(self.out, 'work'))
        os.makedirs(self.work, exist_ok=True)
        self.start = time.perf_counter()
        self.budget = args.budget_s
        self.reserved = 0.0  # seconds kept for the sections after the running one (main sets it)
        self.pytest_cuda = None  # the CUDA tests running in the background (main starts them)
        # PyTorch's backend flags as generate.py and fid.py run with them (they set none; EDM's generate.py neither):
        # the training sections set EDM's training flags (TF32 off, cuDNN benchmark on), the sampling and feature
        # sections put these back so that ours and EDM's sampler are timed under the same flags.
        self.default_backend_flags = backend_flags()
        self.results = dict(suite_version=SUITE_VERSION, command=' '.join([sys.argv[0], *sys.argv[1:]]),
                            mode='smoke' if args.smoke else 'full', device=str(self.device),
                            started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                            compile_backend=args.compile_backend, sections={}, errors=[])
        self.rows = []  # (section, name, value text)
        self._dataset = None
        self._snapshot = None

    # Time and output.
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return math.inf if not self.budget else self.budget - self.elapsed()

    def affordable(self, seconds: float) -> bool:
        """Whether `seconds` of work fit in what is left once the later sections' reserves are set aside."""
        return self.left() - self.reserved >= seconds

    def timeout(self, seconds: float) -> float:
        """A subprocess's time limit: `seconds`, but never past what is left before the later sections' reserves
        (a hang, e.g. in a collective, must not take the rest of the run with it); at least 30 s."""
        return max(30.0, min(float(seconds), self.left() - self.reserved))

    def row(self, section, name, text):
        self.rows.append((section, name, text))
        print(f'  {name:<44s} {text}', flush=True)

    def save(self):
        from dnnlib import util
        self.results['wall_s'] = round(self.elapsed(), 1)
        with util.atomic_output(os.path.join(self.out, 'gpu_suite.json'), 'wt') as f:
            json.dump(self.results, f, indent=2, default=str)
        with util.atomic_output(os.path.join(self.out, 'gpu_suite.txt'), 'wt') as f:
            f.write(self.table())

    def table(self) -> str:
        gpu = self.results.get('sections', {}).get('env', {}).get('gpu', {}).get('name')
        lines = [f"gpu_suite ({', '.join([self.results['mode'], self.results['device']] + ([gpu] if gpu else []))})"]
        section = None
        for sec, name, text in self.rows:
            if sec != section:
                lines.append(f'[{sec}]')
                section = sec
            lines.append(f'  {name:<44s} {text}')
        return '\n'.join(lines) + '\n'

    def run_section(self, name, fn, min_seconds=0):
        print(f'== {name} (elapsed {self.elapsed():.0f} s)', flush=True)
        if not self.affordable(min_seconds):
            self.results['sections'][name] = dict(skipped=f'budget: {self.left():.0f} s left, needs ~{min_seconds} s')
            self.row(name, 'skipped', self.results['sections'][name]['skipped'])
            self.save()
            return
        start = time.perf_counter()
        record = {}
        self.results['sections'][name] = record
        try:
            fn(record)
        except Exception as err:  # noqa: BLE001 -- one broken section must not lose the others
            record['error'] = f'{type(err).__name__}: {err}'
            self.results['errors'].append(dict(section=name, error=record['error'],
                                               traceback=tail(traceback.format_exc(), 25)))
            self.row(name, 'ERROR', record['error'][:200])
        record['section_s'] = round(time.perf_counter() - start, 1)
        self.save()

    # Shared inputs.
    def dataset(self) -> str:
        if self._dataset is None:
            self._dataset = write_dataset(os.path.join(self.work, 'dataset.zip'), self.sizes.dataset_images,
                                          self.sizes.resolution)
        return self._dataset

    def train_args(self, batch, extra=(), small=False):
        """train.py options of EDM's CIFAR-10 cond DDPM++ (EDM's defaults: lr 1e-3, dropout 0.13, augment 0.12);
        small: a ~0.2M-parameter network instead (checks of the loop rather than of the network)."""
        args = ['--outdir', os.path.join(self.work, 'runs'), '--data', self.dataset(), '--cond', 1, '--arch',
                'ddpmpp', '--batch', batch, '--device', self.device.type, '--seed', 1, '--rng', 'rank']
        if self.smoke or small:
            args += ['--cbase', 16, '--cres', '1,2', '--blocks', 1, '--attn', self.sizes.resolution // 2]
        return args + list(extra)

    # -----------------------------------------------------------------------------------------------------------------
    def section_env(self, record):
        import numpy as np
        import scipy
        import torch
        record.update(python=platform.python_version(), torch=torch.__version__, numpy=np.__version__,
                      scipy=scipy.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                      cpu_count=os.cpu_count(), platform=platform.platform())
        try:
            import triton
            record['triton'] = triton.__version__
        except ImportError:
            record['triton'] = None
        code, out, _ = run_subprocess(['git', '-C', ROOT, 'rev-parse', 'HEAD'], timeout=10)
        # The device tool copies the working tree, and a .git there may be an older one (on the H200 it named the
        # last lease's commit, "dirty"): the commit gpu_session.sh's caller passes comes first.
        git_head = out.strip() if code == 0 else None
        record['commit'] = os.environ.get('GPU_SUITE_COMMIT') or git_head
        if git_head and git_head != record['commit']:
            record['git_head_there'] = git_head
        record['dirty'] = None  # unknown against a commit the .git there does not hold
        if git_head and git_head == record['commit']:
            code, out, _ = run_subprocess(['git', '-C', ROOT, 'status', '--porcelain', '--untracked-files=no'],
                                          timeout=10)
            record['dirty'] = bool(out.strip()) if code == 0 else None
        if self.on_cuda:
            props = torch.cuda.get_device_properties(self.device)
            record['gpu'] = dict(name=props.name, capability=f'{props.major}.{props.minor}',
                                 memory_gb=round(props.total_memory / 2**30, 1),
                                 multiprocessors=props.multi_processor_count)
            code, out, _ = run_subprocess(['nvidia-smi', '--query-gpu=driver_version,clocks.max.sm,power.limit',
                                           '--format=csv,noheader'], timeout=20)
            record['gpu']['nvidia_smi'] = out.strip() if code == 0 else None
        self.row('env', 'torch / CUDA / cuDNN', f"{record['torch']} / {record['cuda']} / {record['cudnn']}")
        if 'gpu' in record:
            self.row('env', 'GPU', f"{record['gpu']['name']} ({record['gpu']['memory_gb']} GB), "
                                   f"{record['gpu']['nvidia_smi']}")
        self.row('env', 'commit', f"{record['commit']}{' (dirty)' if record['dirty'] else ''}")

    # -----------------------------------------------------------------------------------------------------------------
    def section_correctness(self, record):
        # The output comparisons against true fp32: TF32 off (EDM's training setting; PyTorch's default lets cuDNN
        # convolutions use it), the defaults back afterwards.
        set_backend_flags(dict(self.default_backend_flags, cudnn_allow_tf32=False, matmul_allow_tf32=False))
        try:
            self._correctness_checks(record)
        finally:
            set_backend_flags(self.default_backend_flags)

    def _correctness_checks(self, record):
        checks = record.setdefault('checks', [])
        for name, fn, seconds in [
            ('cpu_fp32_vs_device_fp32', self.check_cpu_vs_device, 10),
            ('bf16_autocast_vs_fp32', self.check_bf16, 5),
            ('edm_use_fp16_vs_fp32', self.check_fp16, 5),
            ('host_syncs_in_training_step', self.check_host_syncs, 20),
            ('one_step_of_every_loss', self.check_losses, 40),
            ('generate_and_fid_network', self.check_generate_fid, 30),
            ('torchrun_single_process_collective', self.check_torchrun, 20),
            ('compile_vs_eager_fp32', self.check_compile, 40),
        ]:
            check = dict(name=name)
            checks.append(check)
            if not self.affordable(seconds):
                check['skipped'] = f'budget ({self.left():.0f} s left)'
            else:
                start = time.perf_counter()
                try:
                    fn(check)
                except Exception as err:  # noqa: BLE001 -- a crash is a failed check, the others still run
                    check.update(passed=False, error=f'{type(err).__name__}: {err}',
                                 traceback=tail(traceback.format_exc(), 20))
                check['seconds'] = round(time.perf_counter() - start, 1)
            status = ('SKIP ' + check['skipped']) if 'skipped' in check else ('ok' if check.get('passed') else 'FAIL')
            detail = check.get('summary', check.get('error', ''))
            self.row('correctness', name, f'{status}  {detail}'[:160])
            self.save()
        record['all_passed'] = all(c.get('passed', True) for c in checks if 'skipped' not in c)

    def _outputs(self, net, x, sigma, labels, precision='fp32'):
        import torch

        from training.training_loop import autocast_context
        with torch.no_grad(), autocast_context(x.device, precision):
            return net(x, sigma, labels).float()

    def check_cpu_vs_device(self, check):
        if not self.on_cuda:
            check['skipped'] = 'the device is the CPU'
            return
        net = build_net(self.sizes)
        x, sigma, labels = check_inputs(self.sizes, self.sizes.check_batch, 'cpu')
        cpu = self._outputs(net, x, sigma, labels)
        dev = self._outputs(copy.deepcopy(net).to(self.device), x.to(self.device), sigma.to(self.device),
                            labels.to(self.device))
        err = rel_error(dev, cpu)
        # fp32 sums in another order (cuDNN/cuBLAS vs CPU, fused attention vs EDM's einsum) through ~60 layers.
        check.update(err, tolerance='rel_l2 <= 1e-4 and max_abs <= 1e-3 (D in data units, |D| ~ 1)',
                     passed=err['rel_l2'] <= 1e-4 and err['max_abs'] <= 1e-3,
                     summary=f"rel_l2 {err['rel_l2']:.2e} max_abs {err['max_abs']:.2e}")

    def check_bf16(self, check):
        net = build_net(self.sizes).to(self.device)
        x, sigma, labels = check_inputs(self.sizes, self.sizes.check_batch, self.device)
        ref = self._outputs(net, x, sigma, labels)
        err = rel_error(self._outputs(net, x, sigma, labels, precision='bf16'), ref)
        # bf16 keeps 8 significant bits (2^-8 = 3.9e-3 relative per rounding); errors partly average out.
        check.update(err, tolerance='rel_l2 <= 2e-2', passed=err['rel_l2'] <= 2e-2,
                     summary=f"rel_l2 {err['rel_l2']:.2e} max_abs {err['max_abs']:.2e}")

    def check_fp16(self, check):
        if not self.on_cuda:
            check['skipped'] = "EDM's use_fp16 runs the backbone in fp16 on CUDA only"
            return
        net = build_net(self.sizes).to(self.device)
        half = build_net(self.sizes, use_fp16=True).to(self.device)
        half.load_state_dict(net.state_dict())
        x, sigma, labels = check_inputs(self.sizes, self.sizes.check_batch, self.device)
        err = rel_error(self._outputs(half, x, sigma, labels), self._outputs(net, x, sigma, labels))
        check.update(err, tolerance='rel_l2 <= 1e-2 (fp16: 11 significant bits)', passed=err['rel_l2'] <= 1e-2,
                     summary=f"rel_l2 {err['rel_l2']:.2e} max_abs {err['max_abs']:.2e}")

    def check_compile(self, check):
        """Whole-network compile of a small DDPM++ (compile time stays small) and the regional compile of the
        training net's blocks, in fp32, against eager."""
        import torch

        from training.training_loop import compile_network
        small = smoke_sizes() if self.smoke else dataclasses.replace(
            self.sizes, arch=dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[16]))
        net = build_net(small).to(self.device)
        x, sigma, labels = check_inputs(small, small.check_batch, self.device)
        ref = self._outputs(net, x, sigma, labels)
        results = {}
        for mode in (True, 'regional'):
            torch._dynamo.reset()
            compiled = compile_network(copy.deepcopy(net), mode)
            start = time.perf_counter()
            out = self._outputs(compiled, x, sigma, labels)
            results['whole' if mode is True else 'regional'] = dict(rel_error(out, ref),
                                                                    first_call_s=round(time.perf_counter() - start, 1))
        torch._dynamo.reset()
        worst = max(r['rel_l2'] for r in results.values())
        check.update(results, tolerance='rel_l2 <= 1e-5 (inductor may reorder fp32 sums)', passed=worst <= 1e-5,
                     summary=f"rel_l2 whole {results['whole']['rel_l2']:.1e}, regional "
                             f"{results['regional']['rel_l2']:.1e}")

    def check_host_syncs(self, check):
        """Our training step after warm-up. CUDA: without augmentation under torch.cuda.set_sync_debug_mode('error')
        (any synchronising call raises), then with EDM's augmentation under 'warn', counting the synchronising calls.
        CPU: tensor-to-Python conversions (item, tolist, bool, float, int) made by our code, counted per file; torch's
        own host-side counters (Adam's step on the CPU) are not device syncs and are left out."""
        import torch
        batch = self.sizes.train_batches[0]
        per_config = {}
        for label, extra in (('no augmentation', ['--augment', 0]), ('augment 0.12 (EDM)', [])):
            runner = LoopRunner(train_config(self.train_args(batch, extra, small=True)))
            try:
                for _ in range(2):
                    runner.step()
                sync(self.device)
                if self.on_cuda:
                    mode = 'error' if label == 'no augmentation' else 'warn'
                    import warnings
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter('always')
                        torch.cuda.set_sync_debug_mode(mode)
                        try:
                            for _ in range(3):
                                runner.step()
                        finally:
                            torch.cuda.set_sync_debug_mode('default')
                    # Torch's once-per-process notice that the mode is a prototype is no sync (it counted as one).
                    syncs = [str(w.message)[:120] for w in caught if 'called a synchronizing' in str(w.message)]
                    per_config[label] = dict(mode=mode, syncs_in_3_steps=len(syncs), examples=syncs[:3])
                else:
                    per_config[label] = dict(conversions_in_3_steps=count_host_conversions(
                        lambda: [runner.step() for _ in range(3)]))  # noqa: B023 -- called right here
            finally:
                runner.close()
        check['configs'] = per_config
        if self.on_cuda:
            augment = per_config['augment 0.12 (EDM)']['syncs_in_3_steps']
            check.update(passed=True, summary=f'no sync without augmentation (debug mode "error", 3 steps); with '
                                               f'augmentation {augment} in 3 steps (AugmentPipe\'s reflect padding)')
        else:
            plain = per_config['no augmentation']['conversions_in_3_steps']
            augmented = per_config['augment 0.12 (EDM)']['conversions_in_3_steps']
            outside = {k: v for k, v in augmented.items() if not k.startswith('training/augment.py')}
            check.update(passed=not plain and not outside,
                         summary=f'conversions in 3 steps: {plain or "none"} without augmentation, '
                                 f'{augmented or "none"} with it')

    def check_losses(self, check):
        """One training step (duration 1 kimg is the minimum: with batch 512 two steps) of every registered loss and
        loss wrapper through train.py on the device, tiny network; several train.py processes at once."""
        import losses
        results = {}
        cases = []
        precond_for = {loss: precond for precond, loss in losses.DEFAULT_LOSS_FOR_PRECOND.items()}
        extra_options = {'gdd': ['--loss-opt', 'discriminator=sn_cnn', '--loss-opt', 'disc_channels=8']}
        for name, cls in losses.LOSSES.items():
            precond = getattr(cls, 'preconditionings', (precond_for.get(name, 'edm'),))[0]
            cases.append((name, ['--loss', name, '--precond', precond, *extra_options.get(name, [])]))
        for name, entry in losses.LOSS_WRAPPERS.items():
            flag = '--' + entry.enable.name.replace('_', '-')
            value = 1 if entry.enable.type is bool else 512  # AOT's pool: a multiple of the batch
            cases.append((f'edm+{name}', ['--loss', 'edm', flag, value]))
        cases.append(('edm bf16', ['--loss', 'edm', '--precision', 'bf16']))
        def run_case(name, extra):
            outdir = os.path.join(self.work, 'losses', name.replace(' ', '_').replace('+', '_'))
            args = ['--outdir', outdir, '--data', self.dataset(), '--cond', 1, '--batch', 512, '--duration', 0.001,
                    '--tick', 1, '--snap', 1, '--dump', 1, '--seed', 1, '--device', self.device.type, '--cbase',
                    8 if self.smoke else 16, '--cres', '1,2', '--blocks', 1, '--attn', 4 if self.smoke else 8,
                    '--lr-rampup', 1, '--workers', 0, *extra]
            code, out, err = run_subprocess([sys.executable, os.path.join(ROOT, 'train.py'), *map(str, args)],
                                            timeout=self.timeout(300))
            snapshots = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(outdir) for f in fs if f.endswith('.pkl'))
            ok = code == 0 and bool(snapshots)
            return dict(passed=ok, **({} if ok else dict(output=tail(out + err, 12)))), snapshots

        import concurrent.futures
        parallel = 6 if self.on_cuda else 2  # small processes: several at once on a GPU
        with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
            futures = {name: pool.submit(run_case, name, extra) for name, extra in cases}
            for name, future in futures.items():
                results[name], snapshots = future.result()
                if name == 'edm' and results[name]['passed']:
                    self._snapshot = snapshots[-1]
        failed = [n for n, r in results.items() if not r['passed']]
        summary = f'{len(results) - len(failed)}/{len(results)} ok' + (f'; failed: {failed}' if failed else '')
        check.update(results=results, passed=not failed, summary=summary)

    def check_generate_fid(self, check):
        """generate.py (PNGs) and fid.py ref + calc --network (fid, is) on the device with the edm run's snapshot and
        stand-in detectors (no download)."""
        from metrics import detectors
        if self._snapshot is None:
            raise RuntimeError('no snapshot: the edm training step failed or did not run')
        inception = detectors.save_standin(detectors.StandinInception(feature_dim=32, num_classes=10),
                                           os.path.join(self.work, 'standin-inception.pt'))
        out = os.path.join(self.work, 'generated')
        steps = []
        for name, cmd in [
            ('generate', [os.path.join(ROOT, 'generate.py'), '--network', self._snapshot, '--outdir', out,
                          '--seeds', '0-15', '--batch', 8, '--device', self.device.type, '--overwrite']),
            ('fid ref', [os.path.join(ROOT, 'fid.py'), 'ref', '--data', out, '--dest',
                         os.path.join(self.work, 'ref.npz'), '--detector', f'inception={inception}', '--workers', 0,
                         '--device', self.device.type, '--batch', 8]),
            ('fid calc --network', [os.path.join(ROOT, 'fid.py'), 'calc', '--network', self._snapshot, '--seeds',
                                    '0-15', '--ref', os.path.join(self.work, 'ref.npz'), '--metrics', 'fid,is',
                                    '--detector', f'inception={inception}', '--batch', 8, '--device',
                                    self.device.type, '--out', os.path.join(self.work, 'fid.json')]),
        ]:
            code, stdout, stderr = run_subprocess([sys.executable, *map(str, cmd)], timeout=self.timeout(300))
            steps.append(dict(step=name, returncode=code, **({} if code == 0 else dict(output=tail(stdout + stderr)))))
            if code != 0:
                break
        pngs = sum(f.endswith('.png') for _, _, fs in os.walk(out) for f in fs)
        fid = None
        if os.path.isfile(os.path.join(self.work, 'fid.json')):
            with open(os.path.join(self.work, 'fid.json')) as f:
                fid = json.load(f).get('results', {})
        # The images are those of the written PNGs (fid calc --network samples exactly them): FID ~ 0.
        passed = all(s['returncode'] == 0 for s in steps) and len(steps) == 3 and pngs == 16
        check.update(steps=steps, pngs=pngs, fid_results=fid, passed=passed,
                     summary=f'{pngs} PNGs; fid.json {json.dumps(fid)[:80] if fid else None}')

    def check_torchrun(self, check):
        # A single-process NCCL init and all_reduce takes seconds; a hang must not take the run's time with it.
        code, out, err = run_subprocess(worker_cmd('collective', dict(device=self.device.type), torchrun=True),
                                        timeout=self.timeout(90))
        if code != 0:
            check.update(passed=False, output=tail(out + err))
            return
        result = last_json_line(out)
        expected = 'nccl' if self.on_cuda else 'gloo'
        check.update(result, passed=result['backend'] == expected and result['sum'] == [1.0, 2.0],
                     summary=f"backend {result['backend']}, world {result['world_size']}, all_reduce ok")

    # -----------------------------------------------------------------------------------------------------------------
    def train_plan(self) -> list:
        return train_plan(self.sizes, self.args)

    def section_train(self, record):
        import torch
        sizes = self.sizes
        ramp = ['--lr-rampup', TRAIN_LR_RAMPUP_KIMG]
        plan = self.train_plan()
        mfu_inputs = None
        compile_estimate = COMPILE_ESTIMATE_S
        record['configs'] = []
        record['notes'] = ('images/s of steps after warm-up, replayed after an untimed pass over the same random '
                           "draws (the augmentation's image sizes autotuned: a long run's steady state); data from a "
                           "generated CIFAR-sized zip through train.py's DataLoader settings (1 worker, pinned); "
                           "--rng rank (EDM's draws); EDM: its network, loss, augmentation, dataset and step (DDP "
                           'over 1 rank, as its loop), timed the same way')
        for name, extra, batch in plan:
            if name == 'mfu':
                if self.affordable(MFU_NEEDS_S) and self._bf16_timed(record):
                    mfu_inputs = self._mfu_inputs()
                continue
            needs = compile_estimate + 20 if 'compile' in name else TRAIN_NEEDS_S.get(
                (name, batch), 60 if name == 'edm_fp32' else 30)
            if not self.affordable(needs):
                record['configs'].append(dict(name=name, batch=batch, skipped=f'budget: needs ~{needs:.0f} s, '
                                                                               f'{self.left():.0f} s left'))
                self._train_row(record['configs'][-1])
                continue
            if name == 'edm_fp32':
                record['configs'].append(self._edm_train(batch))
                self._train_row(record['configs'][-1])
                self.save()
                continue
            entry = dict(name=name, batch=batch)
            try:
                reset_peak_memory(self.device)
                runner = LoopRunner(train_config(self.train_args(batch, [*extra, *ramp])))
                entry.update(time_loop(runner, sizes.train_warmup, sizes.train_steps, self.device))
                entry['images_per_s'] = batch / entry['step_s']
                entry['compile_s'] = entry['warmup_s'][0] if 'compile' in name else None
                if entry['compile_s'] is not None:
                    compile_estimate = max(entry['compile_s'], 10)
                entry['peak_mem_gb'] = peak_memory_gb(self.device)
                entry['losses'] = runner.losses()
                runner.close()
            except Exception as err:  # noqa: BLE001 -- e.g. out of memory at batch 512: the others still run
                entry['error'] = f'{type(err).__name__}: {err}'
                entry['traceback'] = tail(traceback.format_exc())
            runner = None
            free_memory(self.device)
            if 'compile' in name:
                torch._dynamo.reset()
            record['configs'].append(entry)
            self._train_row(entry)
            self.save()
        self._train_ratios(record)
        if mfu_inputs is None and self.affordable(MFU_NEEDS_S) and self._bf16_timed(record):
            mfu_inputs = self._mfu_inputs()
        if mfu_inputs is not None:
            record['mfu'] = self._mfu(record, *mfu_inputs)

    @staticmethod
    def _bf16_timed(record) -> bool:
        return any(e['name'].startswith('ours_bf16') and 'images_per_s' in e for e in record['configs'])

    def _edm_train(self, batch) -> dict:
        """EDM's own training step (its code, in a torchrun subprocess) at this batch size."""
        sizes = self.sizes
        args = dict(edm_repo=self.args.edm_repo, dataset=self.dataset(), resolution=sizes.resolution,
                    arch=network_kwargs(sizes), batch=batch, warmup=sizes.train_warmup, steps=sizes.train_steps,
                    seed=1, device=self.device.type, lr_rampup_kimg=TRAIN_LR_RAMPUP_KIMG)
        # 180 s: a few steps of EDM's fp32 step after its start-up; a hang must not take the rest of the run.
        code, out, err = run_subprocess(worker_cmd('edm-train', args, torchrun=True), timeout=self.timeout(180))
        entry = dict(name='edm_fp32', batch=batch)
        if code == 0:
            entry.update(last_json_line(out))
        else:
            entry['error'] = tail(out + err)
        return entry

    def _train_row(self, entry):
        if 'images_per_s' in entry:
            extra = f", compile {entry['compile_s']:.0f} s" if entry.get('compile_s') else ''
            mem = f", peak {entry['peak_mem_gb']:.1f} GB" if entry.get('peak_mem_gb') else ''
            # The same steps while cuDNN tunes their sizes: the difference is what a timed window without the
            # replay would have held.
            tuning = (f", {entry['batch'] / entry['tuning_pass_step_s']:.1f} img/s tuning"
                      if entry.get('tuning_pass_step_s') else '')
            self.row('train', f"{entry['name']} batch {entry['batch']}",
                     f"{entry['images_per_s']:9.1f} img/s{mem}{extra}{tuning}")
        else:
            self.row('train', f"{entry['name']} batch {entry['batch']}",
                     entry.get('skipped') or entry.get('error', '')[-150:])

    def _train_ratios(self, record):
        by = {(e['name'], e['batch']): e for e in record['configs'] if 'images_per_s' in e}
        ratios = {}
        for (name, batch), entry in by.items():
            edm = by.get(('edm_fp32', batch))
            if edm and name != 'edm_fp32':
                ratios[f'{name}/edm_fp32@{batch}'] = entry['images_per_s'] / edm['images_per_s']
            if name in METHOD_CONFIGS:  # another loss: a rate against bf16 EDM loss, no loss comparison
                eager = by.get(('ours_bf16', batch))
                if eager:
                    ratios[f'{name}/ours_bf16@{batch}'] = entry['images_per_s'] / eager['images_per_s']
                continue
            if edm and name.startswith('ours') and entry.get('losses') and edm.get('losses'):
                ours_losses, edm_losses = entry['losses'], edm['losses']
                count = min(len(ours_losses), len(edm_losses))
                diffs = [abs(a - b) for a, b in zip(ours_losses[:count], edm_losses[:count])]
                spread = statistics.pstdev(edm_losses[:count]) if count > 1 else float('nan')
                entry['loss_vs_edm'] = dict(steps=count, mean_abs_diff=statistics.fmean(diffs),
                                            first_step_rel_diff=diffs[0] / max(abs(edm_losses[0]), 1e-30),
                                            last_step_rel_diff=diffs[-1] / max(abs(edm_losses[count - 1]), 1e-30),
                                            edm_step_to_step_std=spread)
        record['ratios'] = ratios
        for key, value in ratios.items():
            self.row('train', key, f'{value:.2f}x')
        for entry in record['configs']:
            if 'loss_vs_edm' in entry:
                lv = entry['loss_vs_edm']
                self.row('train', f"loss {entry['name']} vs edm @{entry['batch']}",
                         f"rel diff first step {lv['first_step_rel_diff']:.1e}, last {lv['last_step_rel_diff']:.1e}, "
                         f"mean |diff| {lv['mean_abs_diff']:.3g} "
                         f"(EDM's step-to-step std {lv['edm_step_to_step_std']:.3g})")

    def _mfu_inputs(self) -> tuple:
        """FLOPs of the network's forward + backward per image (torch.utils.flop_counter on the device, eager) and
        the measured bf16 matmul rate."""
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from losses import Batch, EDMLoss
        sizes = self.sizes
        net = build_net(sizes, randomize=False).train().requires_grad_(True).to(self.device)
        batch = 8
        images = torch.rand([batch, 3, sizes.resolution, sizes.resolution], device=self.device) * 2 - 1
        labels = torch.eye(10, device=self.device)[torch.arange(batch, device=self.device) % 10]
        with FlopCounterMode(display=False) as counter:
            EDMLoss()(net, Batch(images=images, labels=labels)).sum().backward()
        flops_per_image = counter.get_total_flops() / batch
        del net
        free_memory(self.device)
        peak = measure_matmul_rate(self.device, torch.bfloat16, 256 if self.smoke else 8192)
        return flops_per_image, peak

    def _mfu(self, record, flops_per_image, peak) -> dict:
        """The model FLOPs utilisation of every timed bf16 configuration."""
        mfu = {}
        for entry in record['configs']:
            if 'images_per_s' in entry and entry['name'].startswith('ours_bf16'):
                mfu[f"{entry['name']}@{entry['batch']}"] = flops_per_image * entry['images_per_s'] / peak
        result = dict(flops_per_image=flops_per_image, bf16_matmul_flops_per_s=peak, mfu=mfu,
                      notes='forward + backward of the network (convolutions, matmuls, attention), per image')
        self.row('train', 'FLOPs per image (fwd+bwd)', f'{flops_per_image / 1e9:.2f} GFLOP')
        self.row('train', 'measured bf16 matmul rate', f'{peak / 1e12:.1f} TFLOP/s')
        for key, value in mfu.items():
            self.row('train', f'MFU {key}', f'{100 * value:.1f} %')
        return result

    # -----------------------------------------------------------------------------------------------------------------
    def section_sample(self, record):
        import numpy as np
        import torch

        from samplers.accelerated import accelerate
        from samplers.generation import generate_images
        from training import snapshots
        sizes = self.sizes
        batch = sizes.sample_batch
        set_backend_flags(self.default_backend_flags)  # generate.py's (and EDM's generate.py's) flags
        record['backend_flags'] = self.default_backend_flags
        if self.args.network:
            network = self.args.network
            net = snapshots.load_snapshot(network, self.device).net
            record['network'] = network
        else:
            net = build_net(sizes).to(self.device)
            network = os.path.join(self.work, 'sample-net.pkl')
            from losses import loss_kwargs
            from processes import EDMProcess
            snapshots.save_snapshot(network, ema=copy.deepcopy(net).cpu(), loss_kwargs=loss_kwargs('edm', {}),
                                    process=EDMProcess())
            record['network'] = 'random weights (unit-gain redraw of DDPM++ CIFAR-10 cond); pass --network PKL for ' \
                                'a trained one'
        seeds = list(range(batch, 2 * batch))  # timed batch; a batch of other seeds warms up
        # ours fp32 (every deviation's reference), then the headline (bf16 + compile + CUDA graph, the goal's 2x),
        # then the rest: what the budget skips is the least needed.
        if self.on_cuda:
            configs = [('ours_fp32', {}),
                       ('ours_bf16_compile_graph', dict(precision='bf16', compile=True, cuda_graph=True)),
                       ('ours_bf16', dict(precision='bf16')),
                       ('ours_bf16_graph', dict(precision='bf16', cuda_graph=True)),
                       ('ours_bf16_cl', dict(precision='bf16')),
                       ('ours_fp32_graph', dict(cuda_graph=True))]
        else:  # no CUDA graphs on the CPU
            configs = [('ours_fp32', {}), ('ours_bf16_compile', dict(precision='bf16', compile=True)),
                       ('ours_bf16', dict(precision='bf16')), ('ours_bf16_cl', dict(precision='bf16'))]
        record['configs'] = []
        images = {}
        # EDM's generate.py first: the reference every ratio needs, before the compiled configuration
        # (33 s of compiling on the H200) can take what is left.
        if self.args.edm_repo and self.affordable(60):
            weights = os.path.join(self.work, 'sample-net-state.pt')
            torch.save({k: v.cpu() for k, v in net.state_dict().items()}, weights)
            args = dict(edm_repo=self.args.edm_repo, weights=weights, resolution=sizes.resolution,
                        arch=network_kwargs(sizes), batch=batch, steps=sizes.sample_steps, seeds=seeds,
                        device=self.device.type, images=os.path.join(self.work, 'edm-images.npy'))
            code, out, err = run_subprocess(worker_cmd('edm-sample', args), timeout=self.timeout(120))
            entry = dict(name='edm_fp32', batch=batch, steps=sizes.sample_steps)
            if code == 0:
                entry.update(last_json_line(out))
                images['edm_fp32'] = torch.from_numpy(np.load(args['images'])).permute(0, 3, 1, 2)
            else:
                entry['error'] = tail(out + err)
            record['configs'].append(entry)
            self._sample_row(entry)
        for name, options in configs:
            if not self.affordable(SAMPLE_COMPILE_NEEDS_S if options.get('compile') else 30):
                record['configs'].append(dict(name=name, skipped='budget'))
                continue
            entry = dict(name=name, batch=batch, steps=sizes.sample_steps, options=options)
            try:
                reset_peak_memory(self.device)
                # One accelerated denoiser for the warm-up and the timed run, as generate.py keeps one for a whole
                # run: the timed window must not compile or capture again.
                # _cl: the network's weights in channels_last, which the convolutions follow (no sampler option
                # yet): does eager bf16 gain what inductor's own layout choice gives the compiled run?
                layout_net = (copy.deepcopy(net).to(memory_format=torch.channels_last) if name.endswith('_cl')
                              else net)
                denoiser = accelerate(layout_net, options.get('precision', 'fp32'), options.get('compile', False),
                                      options.get('cuda_graph', False))
                warm_start = time.perf_counter()
                for _ in generate_images(denoiser, list(range(batch)), batch_size=batch, num_steps=2,
                                         device=self.device, **options):
                    pass
                sync(self.device)
                entry['warmup_s'] = time.perf_counter() - warm_start
                start = time.perf_counter()
                out = [img.cpu() for _, img in generate_images(denoiser, seeds, batch_size=batch,
                                                               num_steps=sizes.sample_steps, device=self.device,
                                                               **options)]
                entry['seconds'] = time.perf_counter() - start
                entry['images_per_s'] = batch / entry['seconds']
                entry['peak_mem_gb'] = peak_memory_gb(self.device)
                images[name] = torch.cat(out)
            except Exception as err:  # noqa: BLE001
                entry['error'] = f'{type(err).__name__}: {err}'
                entry['traceback'] = tail(traceback.format_exc())
            if options.get('compile'):
                torch._dynamo.reset()
            free_memory(self.device)
            record['configs'].append(entry)
            self._sample_row(entry)
            self.save()
        reference = images.get('ours_fp32')
        deviations = {}
        if reference is not None:
            for name, batch_images in images.items():
                if name != 'ours_fp32':
                    deviations[f'{name} vs ours_fp32'] = uint8_deviation(batch_images, reference)
        record['deviation_uint8'] = deviations
        for key, dev in deviations.items():
            self.row('sample', f'deviation {key}', f"max {dev['max_levels']} levels, mean {dev['mean_levels']:.4f}, "
                                                   f"{100 * dev['fraction_changed']:.2f} % of values changed")
        by = {e['name']: e for e in record['configs'] if 'images_per_s' in e}
        if 'edm_fp32' in by:
            record['ratios'] = {f'{name}/edm_fp32': e['images_per_s'] / by['edm_fp32']['images_per_s']
                                for name, e in by.items() if name != 'edm_fp32'}
            for key, value in record['ratios'].items():
                self.row('sample', key, f'{value:.2f}x')

    def _sample_row(self, entry):
        if 'images_per_s' in entry:
            self.row('sample', f"{entry['name']} batch {entry['batch']}",
                     f"{entry['images_per_s']:9.1f} img/s (Heun {entry['steps']} steps; warm-up "
                     f"{entry.get('warmup_s', 0):.0f} s)")
        else:
            self.row('sample', entry['name'], entry.get('skipped') or entry.get('error', '')[-150:])

    # -----------------------------------------------------------------------------------------------------------------
    def section_features(self, record):
        import torch

        from metrics import detectors
        sizes = self.sizes
        set_backend_flags(self.default_backend_flags)  # fid.py's flags
        net = detectors.StandinInception(**sizes.feature_net).eval().to(self.device)
        detector = detectors.Detector('inception', net, 'stand-in', '', detectors.DETECTORS['inception'])
        detectors._probe(detector, self.device)
        images = torch.randint(0, 256, [sizes.feature_images, 3, 32, 32], dtype=torch.uint8, device=self.device)
        record['detector'] = dict(sizes.feature_net, parameters=sum(p.numel() for p in net.parameters()),
                                  probabilities=detector.describe()['probabilities'])
        record['runs'] = []
        modes = {'features (fid)': detector.features,  # what fid.py computes per batch for fid
                 'fid,is two passes (before)': lambda chunk: (detector.features(chunk), detector.probabilities(chunk)),
                 'fid,is one pass (FeaturePass)': detector.features_and_probabilities}
        with torch.no_grad():
            for batch in sizes.feature_batches:
                for mode, call in modes.items():
                    reset_peak_memory(self.device)
                    call(images[:batch])  # warm-up (cuDNN autotuning for this shape)
                    sync(self.device)
                    start = time.perf_counter()
                    for lo in range(0, sizes.feature_images, batch):
                        call(images[lo:lo + batch])
                    sync(self.device)
                    seconds = time.perf_counter() - start
                    entry = dict(batch=batch, mode=mode, images=sizes.feature_images,
                                 images_per_s=sizes.feature_images / seconds, peak_mem_gb=peak_memory_gb(self.device))
                    record['runs'].append(entry)
                    self.row('features', f'{mode[:30]} batch {batch}', f"{entry['images_per_s']:9.1f} img/s")
        self.save()

    # -----------------------------------------------------------------------------------------------------------------
    def section_fid_stats(self, record):
        """The CPU comparison (one thread, a subprocess) and, on CUDA, the device accumulation."""
        import torch

        from metrics.frechet import FeatureMoments
        sizes = self.sizes
        env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', OPENBLAS_NUM_THREADS='1')
        if self.args.fid_cpu:
            args = dict(num=sizes.fid_num, dim=sizes.fid_dim, batch=64)
            code, out, err = run_subprocess(worker_cmd('fid-stats', args), timeout=self.timeout(900), env=env)
            if code != 0:
                raise RuntimeError(tail(out + err))
            record['cpu_one_thread'] = last_json_line(out)
            cpu = record['cpu_one_thread']
            for key in ('edm_per_batch_gemm_s', 'ours_s', 'torch_fidelity_np_cov_s', 'distance_sqrtm_s',
                        'distance_eigvals_s'):
                self.row('fid_stats', f'cpu 1 thread: {key}', f'{cpu[key]:.2f} s')
            self.row('fid_stats', 'cpu: sigma ours vs EDM (max rel)', f"{cpu['sigma_max_rel_diff']:.1e}")
            self.row('fid_stats', 'cpu: FID eigvals vs sqrtm (rel)', f"{cpu['fid_eigvals_rel_diff']:.1e}")
        else:
            record['cpu_one_thread'] = 'skipped (--fid-cpu 0); see benchmarks/results/ for the CPU measurement'
        if self.on_cuda:
            gen = torch.Generator(self.device).manual_seed(0)
            features = torch.randn([sizes.fid_num, sizes.fid_dim], generator=gen, device=self.device).abs()
            moments = FeatureMoments()
            sync(self.device)
            start = time.perf_counter()
            for lo in range(0, sizes.fid_num, 256):
                moments.update(features[lo:lo + 256])
            moments.reduce_(sizes.fid_dim, self.device)
            moments.mean_cov()
            seconds = time.perf_counter() - start
            record['device_accumulation_s'] = seconds
            self.row('fid_stats', f'device accumulation {sizes.fid_num} x {sizes.fid_dim}', f'{seconds:.2f} s')

    # -----------------------------------------------------------------------------------------------------------------
    def section_aot(self, record):
        """Our loop with --aot (unconditional, so one assignment per pool): time per iteration with the assignment
        solved synchronously vs in the background, and the assignment's own time."""
        import torch

        from losses import aot
        sizes = self.sizes
        iterations = sizes.aot_pools * sizes.aot_pool // sizes.aot_batch
        warmup = sizes.aot_pool // sizes.aot_batch  # one pool
        # --bench 0: a pool's augmentation is seeded by the pool's index (PoolSource), not by the loop's random state,
        # so timed_steps' replay does not repeat its sizes, and the background run after the synchronous one draws the
        # same pools' sizes. With cuDNN autotuning the synchronous run's timed window holds the tuning of sizes that
        # the background run then finds tuned (on both H200 leases the background run was 35-48 ms per iteration
        # faster, the assignment costing 8-14 ms). The section compares where the assignment runs, not convolutions.
        extra = ['--cond', 0, '--aot', sizes.aot_pool, '--precision', 'bf16' if self.on_cuda else 'fp32', '--bench', 0]
        record['runs'] = []
        for background in (False, True):
            aot.BACKGROUND_ASSIGNMENT = background
            try:
                runner = LoopRunner(train_config(self.train_args(sizes.aot_batch, extra)))
                timing = time_loop(runner, warmup, iterations, self.device)
                runner.close()
            finally:
                aot.BACKGROUND_ASSIGNMENT = True
            runner = None
            free_memory(self.device)
            record['runs'].append(dict(background=background, iteration_s=timing['step_s'], iterations=iterations))
            self.row('aot', f"pool {sizes.aot_pool}, batch {sizes.aot_batch}, "
                            f"{'background' if background else 'synchronous'}",
                     f"{1000 * timing['step_s']:.1f} ms/iteration")
        gen = torch.Generator(self.device).manual_seed(0)
        shape = [sizes.aot_pool, 3, sizes.resolution, sizes.resolution]
        pool_images = torch.rand(shape, generator=gen, device=self.device) * 2 - 1
        noise = torch.randn(shape, generator=gen, device=self.device)
        aot.assign_noise(pool_images, noise)
        sync(self.device)
        start = time.perf_counter()
        aot.assign_noise(pool_images, noise)
        solve_s = time.perf_counter() - start
        sync_s, background_s = (r['iteration_s'] for r in record['runs'])
        per_iteration = solve_s / (sizes.aot_pool // sizes.aot_batch)
        # Resolvable only when the assignment is a visible share of an iteration (else timing noise dominates).
        resolvable = per_iteration > 0.05 * sync_s
        record.update(assignment_s=solve_s, assignment_per_iteration_s=per_iteration,
                      saved_per_iteration_s=sync_s - background_s,
                      hidden_fraction=(sync_s - background_s) / per_iteration if resolvable else None)
        hidden = (f"{100 * record['hidden_fraction']:.0f} % of it hidden" if resolvable else
                  'below the timing noise of an iteration')
        self.row('aot', 'assignment (cost + solve) per pool', f'{1000 * solve_s:.1f} ms '
                 f'({1000 * per_iteration:.1f} ms per iteration); {hidden}')

    # -----------------------------------------------------------------------------------------------------------------
    def section_pytest_cuda(self, record):
        _pytest_cuda_section(self, record)

    # -----------------------------------------------------------------------------------------------------------------
    def section_dataloader(self, record):
        """train.py's DataLoader settings (prefetch 2, pinned on CUDA, cache) over the generated zip: images/s of
        the first pass (PNG decoding) with 1 (train.py's default) and 2 workers."""
        import torch

        from training.dataset import InfiniteSampler
        config = train_config(self.train_args(self.sizes.train_batches[0]))
        dataset_kwargs = dict(config['dataset_kwargs'])
        record['runs'] = []
        for workers in (1, 2):
            import dnnlib
            dataset = dnnlib.util.construct_class_by_name(**dataset_kwargs)
            loader_kwargs = dict(config['data_loader_kwargs'], num_workers=workers, prefetch_factor=2)
            batch = self.sizes.train_batches[0]
            loader = torch.utils.data.DataLoader(dataset, sampler=InfiniteSampler(dataset, seed=0), batch_size=batch,
                                                 **loader_kwargs)
            iterator = iter(loader)
            next(iterator)  # worker start-up
            count, start = 0, time.perf_counter()
            while count < self.sizes.loader_images:
                images, _labels = next(iterator)
                images.to(self.device, non_blocking=True)
                count += images.shape[0]
            sync(self.device)
            rate = count / (time.perf_counter() - start)
            del iterator, loader
            record['runs'].append(dict(workers=workers, images_per_s=rate, images=count))
            self.row('dataloader', f'{workers} worker(s), batch {batch}', f'{rate:9.1f} img/s (PNG decoding)')
        train = self.results['sections'].get('train', {}).get('configs', [])
        fastest = max((e['images_per_s'] for e in train if 'images_per_s' in e), default=None)
        if fastest is not None:
            record['fastest_training_images_per_s'] = fastest
            record['keeps_up_with_default_workers'] = record['runs'][0]['images_per_s'] >= fastest
            self.row('dataloader', 'keeps up with the fastest training config',
                     f"{record['keeps_up_with_default_workers']} ({fastest:.0f} img/s needed; after the first epoch "
                     f'the cached dataset only collates)')


class PytestCuda:
    """The CUDA tests (python -m pytest -m cuda tests/test_cuda.py, less the one that runs this suite's correctness
    section again), started in the background when the suite starts: they run alongside the correctness checks (both
    untimed, small networks) and are waited for before the timings begin. Without a GPU every test skips."""

    def __init__(self, work: str):
        # no:logging: a failure's report would hold every DEBUG record of torch's compile tracing, not the assertion.
        self.args = ['-m', 'pytest', '-q', '-m', 'cuda', '-p', 'no:cacheprovider', '-p', 'no:logging',
                     '-k', 'not via_the_suite',
                     os.path.join('tests', 'test_cuda.py')]
        self.log_path = os.path.join(work, 'pytest_cuda.log')
        self.log = open(self.log_path, 'w')
        self.start = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, *self.args], stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=ROOT, text=True, start_new_session=True)

    def wait(self, timeout: float):
        """(returncode or None when it was stopped at the timeout, its output, seconds since its start)."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process_tree(self.proc)  # with pytest's own torchrun and subprocess children
            code = None
        self.log.close()
        with open(self.log_path) as f:
            return code, f.read(), time.perf_counter() - self.start


def _pytest_cuda_section(suite, record):
    tests = suite.pytest_cuda or PytestCuda(suite.work)  # started by main; here when run on its own
    code, out, seconds = tests.wait(timeout=max(60, min(300, suite.left() - suite.reserved - 10)))
    lines = [line for line in out.strip().splitlines() if line.strip()]
    record.update(command='python ' + ' '.join(tests.args), returncode=code, seconds=round(seconds, 1),
                  summary=lines[-1] if lines else '', output_tail=tail(out, 40))
    # What failed and why, the first lines of each: the JSON is all that comes back from the GPU machine.
    record['failures'] = [line for line in lines if line.startswith(('FAILED ', 'ERROR ', 'E   '))][:40]
    if code is None:
        record['summary'] = f'stopped after {seconds:.0f} s: {record["summary"]}'
    suite.row('pytest_cuda', 'python -m pytest -m cuda tests/test_cuda.py', record['summary'])
    for line in record['failures']:
        if line.startswith(('FAILED ', 'ERROR ')):
            suite.row('pytest_cuda', line.split()[0], line.split(maxsplit=1)[1][:110])
    if code != 0:
        raise RuntimeError(f'CUDA tests failed: {record["summary"]}')


def measure_matmul_rate(device, dtype, size: int) -> float:
    """FLOP/s of a square matmul (the best of a few timed repetitions)."""
    import torch
    a = torch.randn([size, size], device=device, dtype=dtype)
    b = torch.randn([size, size], device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = math.inf
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - start) / 10)
    return 2 * size**3 / best


def count_host_conversions(fn) -> dict:
    """{'file.py:function': calls} of tensor -> Python conversions (item, tolist, __bool__, __float__, __int__,
    __index__) made by code outside the torch package while fn() runs in this thread."""
    import torch
    calls = {}
    thread = threading.get_ident()
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    originals = {name: getattr(torch.Tensor, name) for name in
                 ('item', 'tolist', '__bool__', '__float__', '__int__', '__index__')}

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            caller = sys._getframe(1)
            filename = os.path.abspath(caller.f_code.co_filename)
            if threading.get_ident() == thread and not filename.startswith(torch_dir):
                key = f'{os.path.relpath(filename, ROOT)}:{caller.f_code.co_name}'
                calls[key] = calls.get(key, 0) + 1
            return original(self, *args, **kwargs)
        return counted

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        fn()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return calls


# ---------------------------------------------------------------------------------------------------------------------
# Workers (subprocesses).

def worker_collective(a):
    import torch
    sys.path.insert(0, ROOT)
    from torch_utils import distributed as dist
    dist.init(device=a['device'])
    if not dist.is_distributed():
        # dist.init leaves a one-process run without a process group (nothing to synchronise); this check exists to
        # exercise the backend itself, so it makes the group the way dist.init does for more processes.
        kwargs = dict(backend='nccl' if dist.device().type == 'cuda' else 'gloo')
        if kwargs['backend'] == 'nccl':
            kwargs['device_id'] = dist.device()
        torch.distributed.init_process_group(**kwargs)
    try:
        value = torch.tensor([1.0, 2.0], device=dist.device()) * (dist.get_rank() + 1)
        dist.all_reduce_sum_(value)
        print(json.dumps(dict(backend=torch.distributed.get_backend(), world_size=dist.get_world_size(),
                              sum=value.cpu().tolist())))
    finally:
        dist.shutdown()


def _edm_compatibility_shims():
    """What EDM's code (2022, torch 1.12, Python 3.8) needs from a newer torch and Python, and nothing else: its
    InfiniteSampler calls Sampler.__init__(dataset), an argument torch >= 2.2 no longer takes; its dnnlib imports
    distutils.util.strtobool, and distutils left the standard library in Python 3.12 (setuptools' shim may or may not
    provide it)."""
    try:
        from distutils.util import strtobool  # noqa: F401
    except ImportError:
        import types
        module = types.ModuleType('distutils.util')
        module.strtobool = lambda value: {'y': 1, 'yes': 1, 't': 1, 'true': 1, 'on': 1, '1': 1, 'n': 0, 'no': 0,
                                          'f': 0, 'false': 0, 'off': 0, '0': 0}[str(value).lower()]
        package = sys.modules.setdefault('distutils', types.ModuleType('distutils'))
        package.util = module
        sys.modules['distutils.util'] = module
    import torch.utils.data
    try:
        torch.utils.data.Sampler.__init__(object.__new__(torch.utils.data.Sampler), [])
    except TypeError:
        torch.utils.data.Sampler.__init__ = lambda self, data_source=None: None


def worker_edm_train(a):
    """EDM's training step (NVlabs/edm training/training_loop.py's inner loop, rebuilt around its own network, loss,
    augmentation, dataset, sampler and DDP wrapper), timed after warm-up. Seeding and order as EDM's loop, including
    its rank-0 module-summary forward pass in train mode (dropout draws from the stream there; our loop makes the same
    pass with --rng=rank), so that the first steps' losses compare draw for draw."""
    sys.path.insert(0, os.path.abspath(a['edm_repo']))
    import copy as copy_module

    import numpy as np
    import torch

    _edm_compatibility_shims()
    import dnnlib
    from torch_utils import misc, training_stats
    device = torch.device('cuda', 0) if a['device'] == 'cuda' else torch.device('cpu')
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo', init_method='env://')
    seed, batch = a['seed'], a['batch']
    np.random.seed(seed % (1 << 31))
    torch.manual_seed(np.random.randint(1 << 31))
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    dataset = dnnlib.util.construct_class_by_name(class_name='training.dataset.ImageFolderDataset', path=a['dataset'],
                                                  use_labels=True, xflip=False, cache=True)
    sampler = misc.InfiniteSampler(dataset=dataset, rank=0, num_replicas=1, seed=seed)
    loader_kwargs = dict(pin_memory=device.type == 'cuda', num_workers=1, prefetch_factor=2)
    iterator = iter(torch.utils.data.DataLoader(dataset=dataset, sampler=sampler, batch_size=batch, **loader_kwargs))
    net = dnnlib.util.construct_class_by_name(class_name='training.networks.EDMPrecond', **a['arch'],
                                              img_resolution=dataset.resolution, img_channels=dataset.num_channels)
    net.train().requires_grad_(True).to(device)
    with torch.no_grad():  # EDM's print_module_summary(net, [images, sigma, labels]): a forward pass, its output unused
        net(torch.zeros([batch, net.img_channels, net.img_resolution, net.img_resolution], device=device),
            torch.ones([batch], device=device), torch.zeros([batch, net.label_dim], device=device))
    loss_fn = dnnlib.util.construct_class_by_name(class_name='training.loss.EDMLoss')
    lr, lr_rampup_kimg, ema_halflife_kimg, ema_rampup_ratio = 10e-4, a['lr_rampup_kimg'], 500, 0.05
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, betas=[0.9, 0.999], eps=1e-8)
    augment_pipe = dnnlib.util.construct_class_by_name(class_name='training.augment.AugmentPipe', p=0.12, xflip=1e8,
                                                       yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
    ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == 'cuda' else None)
    ema = copy_module.deepcopy(net).eval().requires_grad_(False)
    cur_nimg = 0
    losses = []

    def step():
        nonlocal cur_nimg
        optimizer.zero_grad(set_to_none=True)
        images, labels = next(iterator)
        images = images.to(device).to(torch.float32) / 127.5 - 1
        labels = labels.to(device)
        loss = loss_fn(net=ddp, images=images, labels=labels, augment_pipe=augment_pipe)
        training_stats.report('Loss/loss', loss)
        loss.sum().mul(1 / batch).backward()
        losses.append(loss.detach().mean())
        for g in optimizer.param_groups:
            g['lr'] = lr * min(cur_nimg / max(lr_rampup_kimg * 1000, 1e-8), 1)
        for param in net.parameters():
            if param.grad is not None:
                torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
        optimizer.step()
        ema_halflife_nimg = min(ema_halflife_kimg * 1000, cur_nimg * ema_rampup_ratio)
        ema_beta = 0.5 ** (batch / max(ema_halflife_nimg, 1e-8))
        for p_ema, p_net in zip(ema.parameters(), net.parameters()):
            p_ema.copy_(p_net.detach().lerp(p_ema, ema_beta))
        cur_nimg += batch

    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)

    def get_rng_state():  # EDM's loop draws from the global generators only
        return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == 'cuda' else None)

    def set_rng_state(state):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)

    timing = timed_steps(step, a['warmup'], a['steps'], device, get_rng_state, set_rng_state)
    print(json.dumps(dict(timing, images_per_s=batch / timing['step_s'], peak_mem_gb=peak_memory_gb(device),
                          losses=[float(v) for v in torch.stack(losses).cpu()])))
    torch.distributed.destroy_process_group()


def worker_edm_sample(a):
    """EDM's generate.py batch (its StackedRandomGenerator, class labels and edm_sampler) on EDM's EDMPrecond with
    the weights given, timed after a 2-step warm-up batch; the timed batch's uint8 images are saved (NHWC)."""
    sys.path.insert(0, os.path.abspath(a['edm_repo']))
    _edm_compatibility_shims()  # EDM's dnnlib imports distutils (gone in Python 3.12)
    import numpy as np
    import torch

    import dnnlib
    from generate import StackedRandomGenerator, edm_sampler
    device = torch.device('cuda', 0) if a['device'] == 'cuda' else torch.device('cpu')
    net = dnnlib.util.construct_class_by_name(class_name='training.networks.EDMPrecond', **a['arch'],
                                              img_resolution=a['resolution'], img_channels=3)
    net.load_state_dict(torch.load(a['weights'], map_location='cpu', weights_only=True))
    net.eval().requires_grad_(False).to(device)
    batch = a['batch']

    def one_batch(seeds, num_steps):
        rnd = StackedRandomGenerator(device, seeds)
        latents = rnd.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution], device=device)
        class_labels = torch.eye(net.label_dim, device=device)[rnd.randint(net.label_dim, size=[len(seeds)],
                                                                           device=device)]
        images = edm_sampler(net, latents, class_labels, randn_like=rnd.randn_like, num_steps=num_steps)
        return (images * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    start = time.perf_counter()
    one_batch(list(range(batch)), 2)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    images = one_batch(a['seeds'], a['steps'])
    seconds = time.perf_counter() - start
    np.save(a['images'], images)
    print(json.dumps(dict(images_per_s=batch / seconds, seconds=seconds, warmup_s=warmup_s,
                          peak_mem_gb=peak_memory_gb(device))))


def worker_fid_stats(a):
    """50k x 2048 (or smaller) features, one thread: EDM's per-batch float64 GEMM, ours (FeatureMoments), torch-
    fidelity's np.mean + np.cov; the distance by EDM's sqrtm route (ours) and torch-fidelity's eigvals route."""
    sys.path.insert(0, ROOT)
    import numpy as np
    import torch

    from metrics import frechet
    torch.set_num_threads(1)
    num, dim, batch = a['num'], a['dim'], a['batch']
    rng = np.random.default_rng(0)

    def features(shift):  # correlated, non-negative (ReLU-like) features: a low-rank part plus noise
        low = rng.standard_normal((num, 64), dtype=np.float32) @ rng.standard_normal((64, dim), dtype=np.float32)
        return np.abs(low * 0.3 + rng.standard_normal((num, dim), dtype=np.float32) + shift).astype(np.float32)

    first, second = features(0.0), features(0.2)
    result = dict(num=num, dim=dim, batch=batch, threads=torch.get_num_threads())
    start = time.perf_counter()
    feature_sum = torch.zeros(dim, dtype=torch.float64)
    outer_sum = torch.zeros(dim, dim, dtype=torch.float64)
    for lo in range(0, num, batch):  # EDM's fid.py calculate_inception_stats
        rows = torch.from_numpy(first[lo:lo + batch]).to(torch.float64)
        feature_sum += rows.sum(0)
        outer_sum += rows.T @ rows
    mu_edm = feature_sum / num
    sigma_edm = (outer_sum - mu_edm.ger(mu_edm) * num) / (num - 1)
    result['edm_per_batch_gemm_s'] = time.perf_counter() - start
    start = time.perf_counter()
    moments = frechet.FeatureMoments()
    for lo in range(0, num, batch):
        moments.update(torch.from_numpy(first[lo:lo + batch]))
    moments.reduce_(dim, torch.device('cpu'))
    mu, sigma = moments.mean_cov()
    result['ours_s'] = time.perf_counter() - start
    start = time.perf_counter()
    np.mean(first, axis=0)  # torch-fidelity's statistics: mean and np.cov
    sigma_tf = np.cov(first, rowvar=False)
    result['torch_fidelity_np_cov_s'] = time.perf_counter() - start
    result['mu_equal_to_edm'] = bool(np.array_equal(mu, mu_edm.numpy()))
    result['sigma_max_rel_diff'] = float(np.abs(sigma - sigma_edm.numpy()).max() / np.abs(sigma_edm.numpy()).max())
    result['sigma_torch_fidelity_max_rel_diff'] = float(np.abs(sigma_tf - sigma).max() / np.abs(sigma).max())
    mu2, sigma2 = np.mean(second, axis=0, dtype=np.float64), np.cov(second, rowvar=False)
    start = time.perf_counter()
    fid = frechet.frechet_distance(mu, sigma, mu2, sigma2)
    result['distance_sqrtm_s'] = time.perf_counter() - start
    start = time.perf_counter()
    fid_eig = frechet.frechet_distance_eigvals(mu, sigma, mu2, sigma2)
    result['distance_eigvals_s'] = time.perf_counter() - start
    fid_edm_stats = frechet.frechet_distance(mu_edm.numpy(), sigma_edm.numpy(), mu2, sigma2)
    result.update(fid=fid, fid_from_edm_statistics=fid_edm_stats, fid_eigvals=fid_eig,
                  fid_rel_diff_vs_edm_statistics=abs(fid - fid_edm_stats) / abs(fid_edm_stats),
                  fid_eigvals_rel_diff=abs(fid_eig - fid) / abs(fid))
    print(json.dumps(result))


WORKERS = {'collective': worker_collective, 'edm-train': worker_edm_train, 'edm-sample': worker_edm_sample,
           'fid-stats': worker_fid_stats}


# ---------------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', help='Output directory (gpu_suite.json, gpu_suite.txt, work/)')
    parser.add_argument('--work', help='Scratch folder (dataset, snapshots, images) [default: OUT/work]')
    parser.add_argument('--edm-repo', help='A checkout of NVlabs/edm for the EDM columns (never committed here)')
    parser.add_argument('--network', help='A local network pickle for the sampling section (default: random weights)')
    parser.add_argument('--device', choices=['cuda', 'cpu'], help='[default: cuda if available]')
    parser.add_argument('--smoke', action='store_true', help='Tiny sizes: check the script itself (CPU)')
    parser.add_argument('--sections', default=','.join(SECTIONS), help=f'Comma-separated subset of {SECTIONS}')
    parser.add_argument('--budget-s', type=float, default=None,
                        help='Skip what does not fit in this many seconds [default: 560 (full), none (smoke)]')
    parser.add_argument('--compile-backend', default=None,
                        help="torch.compile backend [default: inductor; 'eager' with --smoke]")
    parser.add_argument('--aot-pool', type=int, default=None,
                        help='AOT section: pool size (the batch is a quarter of it) [default: 512; 16 with --smoke]')
    parser.add_argument('--fid-cpu', type=int, default=None,
                        help='Run the one-thread CPU FID statistics comparison [default: 1 with --smoke or '
                             '--device cpu, else 0: ~2 min of CPU that a GPU run need not spend]')
    parser.add_argument('--train-configs', default=None,
                        help="train section: only these configurations, NAME@BATCH comma-separated (e.g. "
                             "'edm_fp32@128,ours_bf16_compile@128') [default: all]")
    parser.add_argument('--worker', choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument('--worker-args', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is None and not args.out:
        parser.error('--out is required')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        WORKERS[args.worker](json.loads(args.worker_args))
        return 0
    sections = [s.strip() for s in args.sections.split(',') if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        print(f'gpu_suite: --sections: unknown {unknown}; expected a subset of {SECTIONS}', file=sys.stderr)
        return 2
    if args.edm_repo and not os.path.isfile(os.path.join(args.edm_repo, 'training', 'networks.py')):
        print(f'gpu_suite: --edm-repo: {args.edm_repo} is not a checkout of NVlabs/edm (no training/networks.py)',
              file=sys.stderr)
        return 2
    if args.network and not os.path.isfile(args.network):
        print(f'gpu_suite: --network: {args.network} is not a file (a local network pickle; no downloads)',
              file=sys.stderr)
        return 2
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import torch
    if args.device == 'cuda' and not torch.cuda.is_available():
        print('gpu_suite: --device cuda: CUDA is not available on this machine', file=sys.stderr)
        return 2
    if args.budget_s is None:
        args.budget_s = None if args.smoke else DEFAULT_BUDGET_S
    if args.compile_backend is None:
        args.compile_backend = 'eager' if args.smoke else 'inductor'
    on_cpu = (args.device or ('cuda' if torch.cuda.is_available() else 'cpu')) == 'cpu'
    if args.fid_cpu is None:
        args.fid_cpu = int(args.smoke or on_cpu)
    if args.train_configs is not None:
        if 'train' not in sections:
            print(f'gpu_suite: --train-configs: applies to the train section, which --sections {args.sections!r} '
                  f'leaves out', file=sys.stderr)
            return 2
        wanted = train_config_names(args.train_configs)
        args.train_configs = None
        known = [f'{name}@{batch}' for name, _, batch in train_plan(smoke_sizes() if args.smoke else full_sizes(), args)
                 if name != 'mfu']
        if not wanted or wanted - set(known):
            print(f'gpu_suite: --train-configs: unknown {sorted(wanted - set(known))}; expected some of {known}'
                  f"{'' if args.edm_repo else ' (edm_fp32 needs --edm-repo)'}", file=sys.stderr)
            return 2
        args.train_configs = wanted
    install_compile_backend(args.compile_backend)
    suite = Suite(args)
    if 'pytest_cuda' in sections:
        suite.pytest_cuda = PytestCuda(suite.work)
    for index, name in enumerate(SECTIONS):
        if name in sections:
            later = [s for s in SECTIONS[index + 1:] if s in sections]
            suite.reserved = 0.0 if args.smoke else sum(RESERVED_S.get(s, 0) for s in later)
            suite.run_section(name, getattr(suite, f'section_{name}'), 0 if args.smoke else MINIMUM_S[name])
    suite.save()
    print()
    print(suite.table())
    print(f'Wrote {os.path.join(suite.out, "gpu_suite.json")} ({suite.elapsed():.0f} s)')
    failed = [c['name'] for c in suite.results['sections'].get('correctness', {}).get('checks', [])
              if c.get('passed') is False]
    if failed or suite.results['errors']:
        print(f'gpu_suite: failed checks {failed}, section errors {[e["section"] for e in suite.results["errors"]]}',
              file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
