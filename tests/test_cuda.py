"""The CUDA path (issue 15): tests marked `cuda` run on a GPU and skip without one; the rest check on the CPU what
can be checked there: the speed options of train.py and of the sampler, the training step without tensor-to-Python
conversions, and benchmarks/gpu_suite.py itself (its --smoke mode), so that a GPU session runs it without debugging.

On a GPU:  python -m pytest -q -m cuda tests/test_cuda.py
"""

import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
import threading

import pytest
import torch
from click.testing import CliRunner
from launch import torchrun
from train_worker import ROOT, loop_kwargs, random_images, tiny_network_kwargs, write_zip_dataset

import generate
import train
from losses import EDMLoss
from samplers.accelerated import AcceleratedDenoiser, accelerate
from samplers.generation import SamplerConfig, generate_images, sample_seeds
from training import snapshots
from training import training_loop as tl
from training.networks import UNetBlock

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason='needs a CUDA GPU')
SUITE = os.path.join(ROOT, 'benchmarks', 'gpu_suite.py')


def tiny_denoiser(label_dim=10, seed=0, resolution=8):
    """A ~50k-parameter EDMPrecond DDPM++ with every weight redrawn at unit gain (EDM zero-initialises the output
    layers, which would make precision comparisons trivially pass)."""
    from training.preconditioning import EDMPrecond
    kwargs = {k: v for k, v in tiny_network_kwargs().items() if k != 'class_name'}
    torch.manual_seed(seed)
    net = EDMPrecond(img_resolution=resolution, img_channels=3, label_dim=label_dim, **kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in net.parameters():
            if param.ndim > 1:
                param.copy_(torch.randn(param.shape, generator=gen) / param[0].numel() ** 0.5)
    return net.eval().requires_grad_(False)


def denoiser_inputs(batch=6, resolution=8, device='cpu'):
    gen = torch.Generator().manual_seed(3)
    y = torch.rand([batch, 3, resolution, resolution], generator=gen) * 2 - 1
    sigma = torch.logspace(-2.7, 1.9, batch)
    x = y + sigma.reshape(-1, 1, 1, 1) * torch.randn(y.shape, generator=gen)
    labels = torch.eye(10)[torch.arange(batch) % 10]
    return x.to(device), sigma.to(device), labels.to(device)


def rel_l2(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope='module')
def tiny_zip(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    return write_zip_dataset(str(root / 'tiny.zip'), random_images(64), labels=[i % 3 for i in range(64)])


# ---------------------------------------------------------------------------------------------------------------------
# train.py's speed options (CPU).

def test_compile_modes_regional_compiles_every_unet_block_in_place():
    net = tiny_denoiser()
    keys = list(net.state_dict())
    ema = copy.deepcopy(net)
    assert tl.compile_network(net, False) is net
    assert tl.compile_network(net, 'regional') is net  # in place: the same module, the same state-dict keys
    blocks = [m for m in net.modules() if isinstance(m, UNetBlock)]
    assert blocks and all(getattr(b, '_compiled_call_impl', None) is not None for b in blocks)
    assert list(net.state_dict()) == keys
    assert all(getattr(m, '_compiled_call_impl', None) is None for m in ema.modules())  # the copy stays eager
    whole = tl.compile_network(copy.deepcopy(ema), True)
    assert isinstance(whole, torch._dynamo.eval_frame.OptimizedModule)
    with pytest.raises(ValueError, match=r"compile='blocks'; expected one of \(False, True, 'regional'\)"):
        tl.compile_network(ema, 'blocks')


def test_train_cli_speed_flags(tiny_zip, tmp_path):
    common = ['--outdir', str(tmp_path), '--data', tiny_zip, '--batch', 8, '--device', 'cpu', '-n']
    result = CliRunner().invoke(train.main, [str(a) for a in common + ['--compile', 'regional', '--channels-last', 1,
                                                                        '--fused-adam', 1]])
    assert result.exit_code == 0, result.output
    options = json.loads(result.output[result.output.index('{'):result.output.index('\n}') + 2])
    assert options['compile'] == 'regional' and options['channels_last'] is True
    assert options['optimizer_kwargs']['fused'] is True
    result = CliRunner().invoke(train.main, [str(a) for a in common + ['--compile', 1]])
    options = json.loads(result.output[result.output.index('{'):result.output.index('\n}') + 2])
    assert options['compile'] is True and 'channels_last' not in options and 'fused' not in options['optimizer_kwargs']
    result = CliRunner().invoke(train.main, [str(a) for a in common + ['--compile', 'blocks']])
    assert result.exit_code != 0
    assert "Invalid value for '--compile': 'blocks' is neither a boolean nor 'regional'" in result.output


def test_channels_last_and_fused_adam_train_close_to_the_defaults_and_resume_keeps_the_choice(tiny_zip, tmp_path):
    """Not bit-identical (other kernels, other summation orders), but the same training to float32 precision;
    snapshots hold contiguous weights (EDM's layout); a resume takes the optimizer kernel of the new run."""
    states = {}
    for name, options in [('default', {}), ('fast', dict(channels_last=True)), ('fused', {})]:
        run_dir = tmp_path / name
        run_dir.mkdir()
        kwargs = loop_kwargs(str(run_dir), tiny_zip, snapshot_ticks=1, total_kimg=0.016, **options)
        if name == 'fused':
            kwargs['optimizer_kwargs'] = dict(kwargs['optimizer_kwargs'], fused=True)
        tl.training_loop(**kwargs)
        states[name] = torch.load(run_dir / 'training-state-000000.pt', weights_only=True)
        snapshot = snapshots.load_snapshot(str(run_dir / 'network-snapshot-000000.pkl'))
        assert all(p.is_contiguous() for p in snapshot.net.parameters())
    for name in ('fast', 'fused'):
        for key, value in states['default']['networks']['net'].items():
            torch.testing.assert_close(states[name]['networks']['net'][key], value, rtol=1e-4, atol=1e-5)
    assert states['fused']['optimizers']['main']['param_groups'][0]['fused'] is True

    # Resume the foreach run's state with fused Adam: the group keeps this run's kernel choice.
    built = []
    original = tl._resume

    def recording_resume(run, **kwargs):
        original(run, **kwargs)
        built.append([group.get('fused') for group in run.phases[0].optimizer.param_groups])

    kwargs = loop_kwargs(str(tmp_path / 'resumed'), tiny_zip, total_kimg=0.024,
                         resume_state_dump=str(tmp_path / 'default' / 'training-state-000000.pt'))
    kwargs['optimizer_kwargs'] = dict(kwargs['optimizer_kwargs'], fused=True)
    (tmp_path / 'resumed').mkdir()
    tl._resume = recording_resume
    try:
        changed = r'optimizer_kwargs \(fused \(absent\) -> true\): the continuation will not be exact'
        with pytest.warns(UserWarning, match=changed):
            tl.training_loop(**kwargs)
    finally:
        tl._resume = original
    assert built == [[True]]


def test_training_step_converts_no_device_tensor_to_python(tiny_zip, tmp_path, monkeypatch):
    """The CPU stand-in for 'no host sync per step': after two warm-up steps, our loop's step (without augmentation)
    never turns a tensor into a Python value in our code (torch's own host-side counters, Adam's CPU step, are not
    device syncs). On a GPU, test_no_host_sync_in_training_step_cuda uses CUDA's sync debug mode."""
    calls, steps = [], []
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    thread = threading.get_ident()
    original_step = tl._train_step

    def counting_step(run):
        steps.append(1)
        if len(steps) <= 2:
            return original_step(run)
        originals = {name: getattr(torch.Tensor, name) for name in ('item', 'tolist', '__bool__', '__float__',
                                                                     '__int__', '__index__')}

        def wrap(name, method):
            def counted(self, *args, **kwargs):
                caller = sys._getframe(1).f_code
                if threading.get_ident() == thread and not os.path.abspath(caller.co_filename).startswith(torch_dir):
                    calls.append(f'{name} in {caller.co_filename}:{caller.co_name}')
                return method(self, *args, **kwargs)
            return counted

        for name, method in originals.items():
            monkeypatch.setattr(torch.Tensor, name, wrap(name, method))
        try:
            return original_step(run)
        finally:
            for name, method in originals.items():
                monkeypatch.setattr(torch.Tensor, name, method)

    monkeypatch.setattr(tl, '_train_step', counting_step)
    tl.training_loop(**loop_kwargs(str(tmp_path), tiny_zip, total_kimg=0.040, kimg_per_tick=1, state_dump_ticks=None,
                                   batch_gpu=4, dataset_kwargs=dict(loop_kwargs('', tiny_zip)['dataset_kwargs'],
                                                                    use_labels=True)))
    assert len(steps) == 5 and calls == []


# ---------------------------------------------------------------------------------------------------------------------
# The sampler's speed options (CPU).

def test_accelerate_defaults_are_the_network_and_bf16_stays_close():
    net = tiny_denoiser()
    assert accelerate(net) is net and accelerate(net, 'fp32', False, False) is net
    fast = accelerate(net, 'bf16')
    assert isinstance(fast, AcceleratedDenoiser) and accelerate(fast, 'bf16') is fast
    assert accelerate(fast, 'fp32') is net  # back to the plain call
    assert fast.label_dim == 10 and fast.sigma_max == net.sigma_max and fast.round_sigma is not None
    x, sigma, labels = denoiser_inputs()
    reference = net(x, sigma, labels)
    with torch.no_grad():
        out = fast(x, sigma, labels)
    assert out.dtype == torch.float32 and 0 < rel_l2(out, reference) < 2e-2  # bf16: 8 significant bits
    # With autograd on (LD3, guidance) the network is called directly, still under the autocast asked for.
    x.requires_grad_(True)
    with torch.enable_grad():
        out_grad = fast(x, sigma, labels)
    assert out_grad.requires_grad and rel_l2(out_grad.detach(), reference) < 2e-2
    with pytest.raises(ValueError, match="precision 'fp16'; expected one of fp32, bf16"):
        accelerate(net, 'fp16')
    with pytest.raises(ValueError, match='--cuda-graph .* needs a CUDA device, not cpu'):
        with torch.no_grad():
            accelerate(net, cuda_graph=True)(x.detach(), sigma, labels)


def test_generate_images_precision_option_moves_pixels_by_about_a_level():
    net = tiny_denoiser()
    seeds = list(range(6))
    fp32 = torch.cat([img for _, img in generate_images(net, seeds, batch_size=6, num_steps=4, device='cpu')])
    bf16 = torch.cat([img for _, img in generate_images(net, seeds, batch_size=6, num_steps=4, device='cpu',
                                                        precision='bf16')])
    diff = (fp32.int() - bf16.int()).abs()
    assert 0 < diff.max() <= 16 and diff.double().mean() < 2
    config = SamplerConfig(num_steps=4, precision='bf16')
    direct = sample_seeds(net, seeds, config, device='cpu')  # the per-batch path takes it from the config too
    from samplers.generation import to_uint8
    assert torch.equal(to_uint8(direct), bf16)


def test_generate_cli_precision_is_recorded_and_fid_images_refuses_it(tmp_path):
    from losses import loss_kwargs
    from processes import EDMProcess
    path = str(tmp_path / 'net.pkl')
    snapshots.save_snapshot(path, ema=tiny_denoiser(label_dim=0), loss_kwargs=loss_kwargs('edm', {}),
                            process=EDMProcess())
    out = tmp_path / 'out'
    result = CliRunner().invoke(generate.main, ['--network', path, '--outdir', str(out), '--seeds', '0-3', '--batch',
                                                '4', '--steps', '3', '--precision', 'bf16', '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    record = json.load(open(out / 'generation.json'))
    assert record['options']['precision'] == 'bf16' and record['options']['compile'] is False
    result = CliRunner().invoke(generate.main, ['--network', path, '--outdir', str(out), '--seeds', '0-3', '--batch',
                                                '4', '--steps', '3', '--device', 'cpu'])
    # fp32 images never mix with bf16 ones
    assert result.exit_code != 0 and 'made with other settings (these differ: precision;' in result.output
    import fid
    result = CliRunner().invoke(fid.main, ['calc', '--images', str(out), '--ref', str(tmp_path / 'x.npz'),
                                           '--precision', 'bf16'])
    assert result.exit_code != 0 and '--precision: sampling options apply to --network only' in result.output


# ---------------------------------------------------------------------------------------------------------------------
# The suite script itself (CPU).

@pytest.mark.slow
def test_gpu_suite_smoke_runs_every_section_on_cpu(tmp_path):
    """benchmarks/gpu_suite.py --device cpu --smoke: every section runs and writes its results; every correctness
    check passes or is skipped for a stated reason (the CUDA-only ones)."""
    out = tmp_path / 'suite'
    proc = subprocess.run([sys.executable, SUITE, '--out', str(out), '--device', 'cpu', '--smoke'], cwd=ROOT,
                          capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.load(open(out / 'gpu_suite.json'))
    assert results['errors'] == [] and results['mode'] == 'smoke'
    sections = results['sections']
    assert list(sections) == ['env', 'correctness', 'pytest_cuda', 'train', 'sample', 'features', 'fid_stats', 'aot',
                              'dataloader']  # in the order they ran
    # The CUDA tests ran (in the background, alongside the correctness checks) and skipped without a GPU.
    pytest_cuda = sections['pytest_cuda']
    assert pytest_cuda['returncode'] == 0 and re.fullmatch(r'8 skipped, \d+ deselected in .*', pytest_cuda['summary'])
    checks = {c['name']: c for c in sections['correctness']['checks']}
    assert all(c.get('passed') or c.get('skipped') for c in checks.values()), checks
    assert set(checks['one_step_of_every_loss']['results']) >= {'edm', 'vp', 've', 'edm+stf', 'edm+aot', 'edm bf16'}
    trained = {c['name'] for c in sections['train']['configs'] if c.get('images_per_s', 0) > 0}
    assert trained == {'ours_fp32', 'ours_bf16', 'ours_bf16_compile', 'ours_bf16_fused', 'ours_bf16_cl',
                       'ours_bf16_bench0', 'ours_bf16_noaug', 'ours_bf16_stf', 'ours_bf16_spd',
                       'ours_bf16_compile_cl_fused'}
    # A method's cost is its rate against ours_bf16 at the same batch (its loss is another quantity than EDM's).
    ratios = sections['train']['ratios']
    assert ratios['ours_bf16_spd/ours_bf16@8'] == pytest.approx(
        next(c['images_per_s'] for c in sections['train']['configs'] if c['name'] == 'ours_bf16_spd')
        / next(c['images_per_s'] for c in sections['train']['configs'] if (c['name'], c['batch']) == ('ours_bf16', 8)))
    assert 'ours_bf16_stf/ours_bf16@8' in ratios
    assert set(sections['train']['mfu']['mfu']) == {f'{name}@{batch}' for name in ('ours_bf16', 'ours_bf16_compile')
                                                    for batch in (8, 16)} | {
        'ours_bf16_fused@16', 'ours_bf16_cl@16', 'ours_bf16_bench0@8', 'ours_bf16_noaug@8', 'ours_bf16_stf@8',
        'ours_bf16_spd@8', 'ours_bf16_compile_cl_fused@16'}
    # No learning-rate ramp-up in the timed runs: the weights move from the second step, so the last step's loss shows
    # the precision (under EDM's 10,000 kimg ramp-up both stay at the initialisation, where the loss cannot).
    losses = {(c['name'], c['batch']): c['losses'] for c in sections['train']['configs'] if c.get('losses')}
    fp32, bf16 = losses['ours_fp32', 16], losses['ours_bf16', 16]
    assert abs(bf16[0] - fp32[0]) <= 1e-6 * fp32[0] and abs(bf16[-1] - fp32[-1]) >= 1e-6 * fp32[-1], (fp32, bf16)
    assert sections['sample']['deviation_uint8'] and sections['features']['runs']
    # Eager bf16 with the weights in channels_last: the same network, so the same images up to a level or so.
    sampled = {c['name'] for c in sections['sample']['configs'] if c.get('images_per_s', 0) > 0}
    assert {'ours_bf16', 'ours_bf16_cl'} <= sampled
    deviation = sections['sample']['deviation_uint8']
    layout, plain = deviation['ours_bf16_cl vs ours_fp32'], deviation['ours_bf16 vs ours_fp32']
    assert layout['mean_levels'] <= 1.5 * plain['mean_levels'] + 0.05, (layout, plain)
    assert layout['max_levels'] <= plain['max_levels'] + 4, (layout, plain)
    # Sampling timed under PyTorch's defaults (generate.py's), not the training sections' EDM flags.
    assert sections['sample']['backend_flags'] == dict(cudnn_benchmark=False, cudnn_allow_tf32=True,
                                                       matmul_allow_tf32=False)
    assert sections['fid_stats']['cpu_one_thread']['sigma_max_rel_diff'] < 1e-12
    assert len(sections['aot']['runs']) == 2 and sections['dataloader']['runs']
    assert (out / 'gpu_suite.txt').read_text().startswith('gpu_suite (smoke, cpu')


def test_gpu_suite_budget_order_keeps_the_headline_and_reserves_for_sampling(tmp_path, monkeypatch):
    """With no time left, the training plan records its skips in the order it would run: the largest batch first
    with EDM's column beside ours, bf16 eager before the compiled one (the goal's: a compile that takes the rest of
    the budget still leaves a measured ratio), our fp32 columns after every compiled one, extras last; the reserve
    for later sections counts against the budget, and bounds the subprocesses' time limits."""
    import importlib.util
    spec = importlib.util.spec_from_file_location('gpu_suite', SUITE)
    gpu_suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_suite)
    assert gpu_suite.SECTIONS[:3] == ('env', 'correctness', 'pytest_cuda')  # the checks before the timings
    args = gpu_suite.parse_args(['--out', str(tmp_path / 'o'), '--device', 'cpu', '--smoke', '--edm-repo', 'edm'])
    args.budget_s = 1000.0
    suite = gpu_suite.Suite(args)
    suite.reserved = 990.0
    assert suite.affordable(5) and not suite.affordable(15)
    assert suite.timeout(600) == 30  # at least 30 s; never past the reserve otherwise
    suite.reserved = 500.0
    assert 490 < suite.timeout(600) <= 500 and suite.timeout(90) == 90
    suite.reserved = 1000.0
    monkeypatch.setattr(suite, 'dataset', lambda: pytest.fail('a skipped plan needs no dataset'))
    record = {}
    suite.section_train(record)
    order = [(c['name'], c['batch']) for c in record['configs']]
    assert order == [('edm_fp32', 16), ('ours_bf16', 16), ('ours_bf16_compile', 16),
                     ('edm_fp32', 8), ('ours_bf16', 8), ('ours_bf16_compile', 8), ('ours_fp32', 16), ('ours_fp32', 8),
                     ('ours_bf16_fused', 16), ('ours_bf16_cl', 16), ('ours_bf16_bench0', 8), ('ours_bf16_noaug', 8),
                     ('ours_bf16_stf', 8), ('ours_bf16_spd', 8), ('ours_bf16_compile_cl_fused', 16)]
    assert all(c['skipped'].startswith('budget: needs ~') for c in record['configs'])
    assert 'mfu' not in record and record['ratios'] == {}
    # A lease's second call runs what the first did not reach, in the same order.
    suite.args.train_configs = {'ours_bf16_noaug@8', 'edm_fp32@8', 'ours_bf16_compile@8'}
    record = {}
    suite.section_train(record)
    assert [(c['name'], c['batch']) for c in record['configs']] == [('edm_fp32', 8), ('ours_bf16_compile', 8),
                                                                    ('ours_bf16_noaug', 8)]


def test_gpu_suite_train_configs_must_name_configurations_of_the_plan(tmp_path, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location('gpu_suite', SUITE)
    gpu_suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_suite)
    out = tmp_path / 'o'
    assert gpu_suite.main(['--out', str(out), '--device', 'cpu', '--smoke', '--train-configs',
                           'ours_bf16@8,edm_fp32@8,ours_bf16@512']) == 2
    err = capsys.readouterr().err
    assert "--train-configs: unknown ['edm_fp32@8', 'ours_bf16@512']; expected some of ['ours_bf16@16'" in err
    assert 'edm_fp32 needs --edm-repo' in err and not out.exists()  # refused before anything was written
    assert gpu_suite.main(['--out', str(out), '--device', 'cpu', '--smoke', '--sections', 'env,sample',
                           '--train-configs', 'ours_bf16@8']) == 2
    assert ("--train-configs: applies to the train section, which --sections 'env,sample' leaves out"
            in capsys.readouterr().err) and not out.exists()
    # A library caller's string (parse_args leaves it one) is read as the list main makes of it: as a string, 'in'
    # tested substrings, and 'ours_bf16_compile@16' there matched ours_bf16_compile@1 of a plan with batch 1.
    args = gpu_suite.parse_args(['--out', str(out), '--smoke', '--train-configs', 'ours_bf16_compile@16,ours_fp32@8'])
    sizes = dataclasses.replace(gpu_suite.smoke_sizes(), train_batches=(1, 8, 16))
    assert [(step[0], step[2]) for step in gpu_suite.train_plan(sizes, args)] == [
        ('ours_bf16_compile', 16), ('mfu', 16), ('ours_fp32', 8)]


# Seconds of each part of the suite on the H200: the training configurations with their timed steps' replay
# (benchmarks/results/2026-12-04c-h200, call 1: warm-ups, tuning pass and timed steps from the JSON, plus the ~14 s
# per configuration of building it that the section's elapsed time showed), EDM's sampling subprocess, a sampling
# batch's warm-up and run (benchmarks/results/2026-12-04-h200).
H200_TRAIN_S = {('edm_fp32', 512): 70, ('ours_bf16', 512): 48, ('ours_fp32', 512): 74, ('edm_fp32', 128): 30,
                ('ours_bf16', 128): 25, ('ours_fp32', 128): 29}


def _suite_on_h200_clock(tmp_path, monkeypatch, compile_s, budget_s, start_s):
    """The suite with its training and sampling parts replaced by a clock that advances by what each took on the
    H200 (a training compile of compile_s): (the suite module, the suite, the clock)."""
    import importlib.util

    import samplers.accelerated
    import samplers.generation
    spec = importlib.util.spec_from_file_location('gpu_suite', SUITE)
    gpu_suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_suite)
    clock = [start_s]
    args = gpu_suite.parse_args(['--out', str(tmp_path / 'o'), '--device', 'cpu', '--smoke', '--edm-repo', 'edm'])
    args.budget_s = gpu_suite.DEFAULT_BUDGET_S if budget_s is None else budget_s
    suite = gpu_suite.Suite(args)
    suite.smoke, suite.on_cuda = False, True  # the full run's plan and configurations, on a simulated clock
    suite.sizes = dataclasses.replace(suite.sizes, train_batches=(128, 512), sample_batch=4)
    monkeypatch.setattr(suite, 'elapsed', lambda: clock[0])
    monkeypatch.setattr(suite, 'dataset', lambda: 'dataset.zip')

    def key(args_list):
        args_list = [str(a) for a in args_list]
        name = 'ours_bf16' if 'bf16' in args_list else 'ours_fp32'
        name += '_compile' if '--compile' in args_list else ''
        name += '_fused' if '--fused-adam' in args_list else ''
        return name, int(args_list[args_list.index('--batch') + 1])

    class Runner:
        def __init__(self, config):
            self.key = key(config)

        def losses(self):
            return []

        def close(self):
            pass

    def time_loop(runner, warmup, steps, device):
        compiled = '_compile' in runner.key[0]
        clock[0] += compile_s + 18 if compiled else H200_TRAIN_S.get(runner.key, 30)
        return dict(warmup_s=[compile_s if compiled else 5, 0.5, 0.5], step_s=0.5)

    def edm_train(batch):
        clock[0] += H200_TRAIN_S['edm_fp32', batch]
        return dict(name='edm_fp32', batch=batch, images_per_s=1.0, step_s=1.0)

    def mfu_inputs():
        clock[0] += 8
        return 1e9, 1e12

    def edm_sample(cmd, timeout, env=None, cwd=None):
        clock[0] += 12
        return 1, '', 'EDM is not here'

    def generate(denoiser, seeds, batch_size, num_steps, device, **options):
        compiled = options.get('compile', False)
        clock[0] += (34 if compiled else 1.5) if num_steps == 2 else (2 if compiled else 5.5)
        yield seeds, torch.zeros([len(seeds), 3, 8, 8], dtype=torch.uint8)

    monkeypatch.setattr(gpu_suite, 'train_config', lambda args_list: args_list)
    monkeypatch.setattr(gpu_suite, 'LoopRunner', Runner)
    monkeypatch.setattr(gpu_suite, 'time_loop', time_loop)
    monkeypatch.setattr(gpu_suite, 'run_subprocess', edm_sample)
    monkeypatch.setattr(suite, '_edm_train', edm_train)
    monkeypatch.setattr(suite, '_mfu_inputs', mfu_inputs, raising=False)
    monkeypatch.setattr(samplers.accelerated, 'accelerate', lambda net, *options: net)
    monkeypatch.setattr(samplers.generation, 'generate_images', generate)
    return gpu_suite, suite, clock


@pytest.mark.parametrize('compile_s', [40, 100, 124, 142])
def test_gpu_suite_budget_with_the_h200_timings_keeps_compiled_training_mfu_and_compiled_sampling(
        tmp_path, monkeypatch, compile_s):
    """The train and sample sections under the default budget (560 s) on a clock that advances by what each part
    took on the H200 (correctness and the CUDA tests: 136 s), for a training compile of 40-140 s (124 s on the H200):
    the compiled bf16 training at batch 512, its MFU and the compiled sampling (the 2.91x of that run) are all
    measured, and the training leaves the sampling its reserve. With the sampling reserve cut to 100 s, the sampling
    compile's own 120 s estimate skipped it whatever the training did; ours fp32 at batch 512 (50 s, estimated 30 s)
    ran into the reserve, and took the MFU's 10 s at the section's end."""
    gpu_suite, suite, clock = _suite_on_h200_clock(tmp_path, monkeypatch, compile_s, None, 136.0)
    assert suite.budget == 560
    records = {}
    for index, name in enumerate(gpu_suite.SECTIONS):
        if name in ('train', 'sample'):  # as main() runs them
            suite.reserved = sum(gpu_suite.RESERVED_S.get(s, 0) for s in gpu_suite.SECTIONS[index + 1:])
            assert suite.affordable(gpu_suite.MINIMUM_S[name]), (name, clock)
            records[name] = {}
            if name == 'sample':
                reserve = gpu_suite.RESERVED_S['sample'] + gpu_suite.RESERVED_S['features']
                assert suite.budget - clock[0] >= reserve, clock
            getattr(suite, f'section_{name}')(records[name])
    trained = {(c['name'], c['batch']) for c in records['train']['configs'] if 'images_per_s' in c}
    assert {('edm_fp32', 512), ('ours_bf16', 512), ('ours_bf16_compile', 512)} <= trained
    assert 'ours_bf16_compile@512' in records['train'].get('mfu', {}).get('mfu', {}), records['train'].keys()
    sampled = [c['name'] for c in records['sample']['configs'] if 'images_per_s' in c]
    assert sampled[:2] == ['ours_fp32', 'ours_bf16_compile_graph'], records['sample']['configs']
    assert suite.budget - clock[0] >= 15  # the features' reserve is left


def test_gpu_suite_times_steps_whose_augmentation_sizes_were_just_tuned(tmp_path, monkeypatch):
    """The timed training steps replay the random draws of an untimed pass over the same number of steps: the
    augmentation pads every timed batch to a size the pass before saw, in the same order (with cuDNN benchmarking each
    new size is autotuned on first sight; on the H200 the timed window held that tuning, or not, depending on what
    ran before). Without the replay the timed steps draw new sizes."""
    import importlib.util
    import types

    import torch.nn.functional

    import training.augment
    spec = importlib.util.spec_from_file_location('gpu_suite', SUITE)
    gpu_suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_suite)
    args = gpu_suite.parse_args(['--out', str(tmp_path / 'o'), '--device', 'cpu', '--smoke'])
    suite = gpu_suite.Suite(args)
    suite.sizes = dataclasses.replace(suite.sizes, resolution=32)  # at 8x8 every padding is the largest, 7 pixels
    pads = []

    def pad(input, pad, **kwargs):
        pads.append(tuple(pad))
        return torch.nn.functional.pad(input, pad, **kwargs)

    functional = types.SimpleNamespace(**{name: getattr(torch.nn.functional, name)
                                          for name in dir(torch.nn.functional) if not name.startswith('_')})
    functional.pad = pad
    monkeypatch.setattr(training.augment, 'F', functional)
    runner = gpu_suite.LoopRunner(gpu_suite.train_config(suite.train_args(4, ['--augment', 0.5])))
    steps = 3
    timing = gpu_suite.time_loop(runner, 1, steps, torch.device('cpu'))
    losses = runner.losses()
    runner.close()
    assert len(pads) == 1 + 2 * steps and timing['step_s'] > 0 and timing['tuning_pass_step_s'] > 0
    tuning, timed = pads[1:1 + steps], pads[1 + steps:]
    assert timed == tuning, pads
    assert len(set(pads[:1 + steps])) > 1, pads  # the sizes do change from step to step: the test can fail
    assert len(losses) == 1 + 2 * steps and len(set(losses)) == len(losses)  # the weights move on


@pytest.mark.parametrize('compile_s', [95, 124, 142])
def test_gpu_suite_training_call_of_a_two_call_lease_measures_both_compiled_batches(tmp_path, monkeypatch,
                                                                                      compile_s):
    """gpu_session.sh's two-call plan, call 1 (--sections env,train --budget-s 560) on the H200's clock: EDM's
    column, bf16 and bf16 + compile at both batches, and the MFU of both compiled ones; our fp32 columns as the
    budget allows (at least one; a second call's --train-configs takes what was skipped). With our fp32 columns
    before the batch-128 compile (the order until the third lease), a 142 s compile left that compile out."""
    gpu_suite, suite, clock = _suite_on_h200_clock(tmp_path, monkeypatch, compile_s, 560.0, 1.0)
    suite.reserved = 0.0  # no later section
    record = {}
    suite.section_train(record)
    trained = {(c['name'], c['batch']) for c in record['configs'] if 'images_per_s' in c}
    assert {(name, batch) for name in ('edm_fp32', 'ours_bf16', 'ours_bf16_compile')
            for batch in (128, 512)} <= trained, record['configs']
    assert {('ours_fp32', 128), ('ours_fp32', 512)} & trained, record['configs']
    assert all(c['skipped'].startswith('budget: ') for c in record['configs'] if 'images_per_s' not in c)
    assert 'ours_bf16_compile@128' in record['mfu']['mfu'] and clock[0] <= 560 + 30
    session = open(os.path.join(ROOT, 'benchmarks', 'gpu_session.sh')).read()
    assert '--sections env,train --budget-s 560' in session


def test_gpu_suite_aot_section_times_without_cudnn_autotuning(tmp_path, monkeypatch):
    """The AOT section's pools are seeded by their index, not by the loop's random state: timed_steps' replay does
    not give its timed iterations sizes just tuned, and the background run draws the sizes the synchronous run
    tuned before it. Both runs go without cuDNN benchmarking, so neither window holds autotuning."""
    import importlib.util
    spec = importlib.util.spec_from_file_location('gpu_suite', SUITE)
    gpu_suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_suite)
    suite = gpu_suite.Suite(gpu_suite.parse_args(['--out', str(tmp_path / 'o'), '--device', 'cpu', '--smoke']))
    configs, train_config = [], gpu_suite.train_config
    monkeypatch.setattr(gpu_suite, 'train_config', lambda args_list: configs.append(train_config(args_list))
                        or configs[-1])
    record = {}
    suite.section_aot(record)
    assert [run['background'] for run in record['runs']] == [False, True]
    assert len(configs) == 2 and all(config['cudnn_benchmark'] is False for config in configs), configs


def test_gpu_suite_reports_which_cuda_test_failed_and_why(tmp_path):
    """The JSON is all that comes back from a GPU machine: a failing CUDA test is named with its assertion, and the
    pytest command runs without log capture (on the H200 a failure's report was torch's DEBUG tracing, 40 lines of
    it, and no assertion)."""
    import importlib.util
    import inspect
    spec = importlib.util.spec_from_file_location('gpu_suite', SUITE)
    gpu_suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_suite)
    output = '\n'.join(['F.', '    def test_x():', '>       assert 0.00017 <= 1e-05', 'E       AssertionError: True',
                         'E       assert 0.00017 <= 1e-05', 'tests/test_cuda.py:388: AssertionError',
                         'FAILED tests/test_cuda.py::test_x - AssertionError: True', '1 failed, 1 passed in 2.00s'])

    class FinishedTests:
        args = ['-m', 'pytest', '-p', 'no:logging']

        def wait(self, timeout):
            return 1, output, 3.0

    args = gpu_suite.parse_args(['--out', str(tmp_path / 'o'), '--device', 'cpu', '--smoke'])
    suite = gpu_suite.Suite(args)
    suite.pytest_cuda = FinishedTests()
    record = {}
    with pytest.raises(RuntimeError, match='CUDA tests failed: 1 failed, 1 passed'):
        gpu_suite._pytest_cuda_section(suite, record)
    assert record['failures'] == ['E       AssertionError: True', 'E       assert 0.00017 <= 1e-05',
                                  'FAILED tests/test_cuda.py::test_x - AssertionError: True']
    assert suite.rows[-1] == ('pytest_cuda', 'FAILED', 'tests/test_cuda.py::test_x - AssertionError: True')
    assert "'-p', 'no:logging'" in inspect.getsource(gpu_suite.PytestCuda.__init__)


def test_gpu_suite_stops_a_hung_subprocess_with_what_it_started():
    """A worker that hangs (e.g. in a collective) is stopped at its time limit together with the processes it
    started, which must not keep the GPU busy during the later timings (subprocess.run's kill reached the launcher
    only)."""
    import importlib.util
    import time
    spec = importlib.util.spec_from_file_location('gpu_suite', SUITE)
    gpu_suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_suite)
    start = time.perf_counter()
    code, out, err = gpu_suite.run_subprocess(['bash', '-c', 'sleep 60 & echo $!; wait'], timeout=1)
    assert code is None and '(timed out after 1 s)' in err and time.perf_counter() - start < 20
    child = int(out.split()[0])
    for _ in range(100):  # the orphaned child is reaped by init once it is killed
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f'the hung worker\'s child {child} still runs')


def test_gpu_suite_refuses_bad_arguments(tmp_path):
    for args, message in [(['--sections', 'train,bogus'], "--sections: unknown ['bogus']"),
                          (['--edm-repo', str(tmp_path)], 'is not a checkout of NVlabs/edm'),
                          (['--network', str(tmp_path / 'none.pkl')], 'is not a file (a local network pickle'),
                          ([], None)]:
        cmd = [sys.executable, SUITE, '--device', 'cpu', *args] + (['--out', str(tmp_path / 'o')] if args else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2
        assert (message or '--out is required') in proc.stderr


# ---------------------------------------------------------------------------------------------------------------------
# On a GPU.

def _edm_loss_outputs(net, x, sigma, labels, precision='fp32'):
    with torch.no_grad(), tl.autocast_context(x.device, precision):
        return net(x, sigma, labels).float()


@pytest.fixture
def tf32_off():
    """EDM's fp32: no TF32 in matmuls or convolutions (conftest puts the flags back after the test). PyTorch's
    default lets cuDNN use TF32, whose 10-bit mantissa puts two convolution algorithms about 1e-4 apart: on an H200
    the whole-network compile was 1.7e-4 from eager so, 3e-7 with TF32 off (benchmarks/results/2026-12-04-h200)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def test_every_cuda_output_comparison_runs_with_tf32_off():
    """The CUDA tests that compare network outputs against an fp32 reference under a tolerance turn TF32 off (the
    tf32_off fixture), as EDM and the suite's correctness section do: conftest puts back PyTorch's defaults after each
    test, and cuDNN's default TF32 put eager and compiled 1.7e-4 apart on the H200. Checked on the CPU, from the
    source, since the tests themselves only run on a GPU."""
    import inspect
    module = sys.modules[__name__]
    comparing = [name for name, fn in vars(module).items() if name.startswith('test_') and callable(fn)
                 and name != 'test_every_cuda_output_comparison_runs_with_tf32_off'
                 and '_edm_loss_outputs(' in inspect.getsource(fn)]
    assert len(comparing) >= 3, comparing
    missing = [name for name in comparing if 'tf32_off' not in inspect.signature(getattr(module, name)).parameters]
    assert missing == []


@pytest.mark.cuda
@requires_cuda
def test_cpu_fp32_equals_cuda_fp32_within_float_noise(tf32_off):
    """TF32 off, as EDM: the CUDA denoiser equals the CPU one up to float32 summation order (cuDNN/cuBLAS kernels,
    the fused attention kernel vs EDM's einsum on the CPU)."""
    net = tiny_denoiser()
    x, sigma, labels = denoiser_inputs()
    cpu = _edm_loss_outputs(net, x, sigma, labels)
    cuda = _edm_loss_outputs(copy.deepcopy(net).cuda(), x.cuda(), sigma.cuda(), labels.cuda()).cpu()
    assert rel_l2(cuda, cpu) <= 1e-5 and float((cuda - cpu).abs().max()) <= 1e-4


@pytest.mark.cuda
@requires_cuda
def test_bf16_autocast_and_edm_fp16_close_to_fp32_cuda(tf32_off):
    """Against true fp32 (TF32 off, as the suite's check): under PyTorch's default cuDNN TF32 the reference itself
    is ~1e-4 off, which the tolerances hide but the comparison should not carry."""
    net = tiny_denoiser().cuda()
    half = tiny_denoiser().cuda()
    half.use_fp16 = True  # EDM's --fp16: the backbone in fp16 on CUDA
    x, sigma, labels = denoiser_inputs(device='cuda')
    reference = _edm_loss_outputs(net, x, sigma, labels)
    assert 0 < rel_l2(_edm_loss_outputs(net, x, sigma, labels, 'bf16'), reference) <= 2e-2
    assert 0 < rel_l2(_edm_loss_outputs(half, x, sigma, labels), reference) <= 1e-2


@pytest.mark.cuda
@requires_cuda
def test_compile_whole_and_regional_equal_eager_cuda(tf32_off):
    net = tiny_denoiser().cuda()
    x, sigma, labels = denoiser_inputs(device='cuda')
    reference = _edm_loss_outputs(net, x, sigma, labels)
    for mode in (True, 'regional'):
        torch._dynamo.reset()
        compiled = tl.compile_network(copy.deepcopy(net), mode)
        assert rel_l2(_edm_loss_outputs(compiled, x, sigma, labels), reference) <= 1e-5, mode
    torch._dynamo.reset()


@pytest.mark.cuda
@requires_cuda
def test_cuda_graph_replay_equals_the_eager_call():
    net = tiny_denoiser().cuda()
    x, sigma, labels = denoiser_inputs(device='cuda')
    for precision in ('fp32', 'bf16'):
        eager = AcceleratedDenoiser(net, precision=precision)
        graphed = AcceleratedDenoiser(net, precision=precision, cuda_graph=True)
        with torch.no_grad():
            reference = eager(x, sigma, labels)
            for shift in (0.0, 0.5):  # the second call replays the captured graph with new inputs
                torch.testing.assert_close(graphed(x + shift, sigma, labels), eager(x + shift, sigma, labels),
                                           rtol=1e-6, atol=1e-6)
        assert len(graphed._graphs) == 1 and reference.dtype == torch.float32
    images = {}
    for options in ({}, dict(cuda_graph=True), dict(precision='bf16', compile=True, cuda_graph=True)):
        images[json.dumps(options)] = torch.cat([img for _, img in generate_images(
            net, list(range(8)), batch_size=4, num_steps=6, device='cuda', **options)])
    fp32, graph, fast = images.values()
    assert int((fp32.int() - graph.int()).abs().max()) <= 1 and int((fp32.int() - fast.int()).abs().max()) <= 16
    torch._dynamo.reset()


@pytest.mark.cuda
@requires_cuda
def test_no_host_sync_in_training_step_cuda(tiny_zip, tmp_path):
    """After two warm-up steps, our loop's step (no augmentation: its reflect padding needs sizes on the host)
    under torch.cuda.set_sync_debug_mode('error')."""
    steps = []
    original_step = tl._train_step

    def checked_step(run):
        steps.append(1)
        if len(steps) <= 2:
            return original_step(run)
        torch.cuda.set_sync_debug_mode('error')
        try:
            return original_step(run)
        finally:
            torch.cuda.set_sync_debug_mode('default')

    tl._train_step = checked_step
    try:
        tl.training_loop(**loop_kwargs(str(tmp_path), tiny_zip, device='cuda', total_kimg=0.040,
                                       data_loader_kwargs=dict(num_workers=1, pin_memory=True, prefetch_factor=2),
                                       network_kwargs=tiny_network_kwargs(dropout=0.1), state_dump_ticks=None))
    finally:
        tl._train_step = original_step
    assert len(steps) == 5


@pytest.mark.cuda
@requires_cuda
def test_every_loss_trains_and_generate_fid_run_on_cuda_via_the_suite(tmp_path):
    """The suite's correctness section on this GPU, small sizes but the inductor backend: CPU vs CUDA, bf16, EDM's
    fp16, compile, no host sync, one train.py step of every registered loss and wrapper, generate.py and fid.py
    --network, NCCL in a single-process torchrun."""
    out = tmp_path / 'suite'
    proc = subprocess.run([sys.executable, SUITE, '--out', str(out), '--device', 'cuda', '--smoke', '--sections',
                           'env,correctness', '--compile-backend', 'inductor'], cwd=ROOT, capture_output=True,
                          text=True, timeout=1200)
    results = json.load(open(out / 'gpu_suite.json'))
    checks = {c['name']: c for c in results['sections']['correctness']['checks']}
    assert proc.returncode == 0, (proc.stdout[-3000:], json.dumps(checks, indent=1)[-4000:])
    assert all(c.get('passed') for c in checks.values()), checks
    assert checks['torchrun_single_process_collective']['backend'] == 'nccl'


@pytest.mark.cuda
@requires_cuda
def test_nccl_in_a_single_process_torchrun():
    worker = ['--worker', 'collective', '--worker-args', json.dumps(dict(device='cuda'))]
    proc = subprocess.run(torchrun(1, SUITE, *worker), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == dict(backend='nccl', world_size=1, sum=[1.0, 2.0])


@pytest.mark.cuda
@requires_cuda
def test_aot_assignment_from_cuda_tensors_equals_the_cpu_one():
    """The pinned non-blocking copy + event path (CUDA) gives assign_noise's CPU permutation, in a worker thread."""
    import concurrent.futures

    from losses.aot import assign_noise, start_assignment
    gen = torch.Generator().manual_seed(0)
    images, noise = torch.rand([64, 3, 8, 8], generator=gen) * 2 - 1, torch.randn([64, 3, 8, 8], generator=gen)
    labels = torch.eye(4)[torch.arange(64) % 4]
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        for given in (None, labels):
            future = start_assignment(images.cuda(), noise.cuda(), None if given is None else given.cuda(), executor)
            assert torch.equal(torch.from_numpy(future.result()), assign_noise(images, noise, given))


@pytest.mark.cuda
@requires_cuda
def test_one_training_step_of_edm_loss_in_bf16_on_cuda(tiny_zip, tmp_path):
    for precision in ('fp32', 'bf16', 'fp16'):
        run_dir = tmp_path / precision
        run_dir.mkdir()
        tl.training_loop(**loop_kwargs(str(run_dir), tiny_zip, device='cuda', precision=precision,
                                       total_kimg=0.016))  # two ticks: a training state is written after the first
        state = torch.load(run_dir / 'training-state-000000.pt', weights_only=True)
        assert all(torch.isfinite(v).all() for v in state['networks']['net'].values())
    assert EDMLoss is not None


def test_gpu_suite_env_section_without_git(tmp_path, monkeypatch):
    """The GPU machine gets the working tree without .git, perhaps without git: the env section still records the
    machine (a missing program is returncode -1, not an exception that ended the section), and the commit comes from
    GPU_SUITE_COMMIT."""
    import importlib.util
    spec = importlib.util.spec_from_file_location('gpu_suite', SUITE)
    gpu_suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_suite)
    code, out, err = gpu_suite.run_subprocess([str(tmp_path / 'no-such-program'), 'x'], timeout=5)
    assert code == -1 and out == '' and err.startswith(f"cannot run {tmp_path / 'no-such-program'}: ")
    monkeypatch.setattr(gpu_suite, 'ROOT', str(tmp_path))  # no repository there
    monkeypatch.setenv('GPU_SUITE_COMMIT', 'abc123')
    monkeypatch.setenv('PATH', str(tmp_path))  # and no git at all
    suite = gpu_suite.Suite(gpu_suite.parse_args(['--out', str(tmp_path / 'o'), '--device', 'cpu', '--smoke']))
    record = {}
    suite.section_env(record)
    assert record['commit'] == 'abc123' and record['dirty'] is None and record['torch'] == torch.__version__


def test_gpu_suite_env_section_prefers_the_commit_passed_over_an_older_git_there(tmp_path, monkeypatch):
    """The device machine's copy of the working tree may carry an older .git (on the H200 it named the last lease's
    commit, "dirty"): GPU_SUITE_COMMIT, what the caller checked out, is recorded, the .git's HEAD beside it, and
    nothing is said about a dirty tree that .git cannot judge. Without the variable the .git's HEAD is the commit."""
    import importlib.util
    import subprocess
    spec = importlib.util.spec_from_file_location('gpu_suite', SUITE)
    gpu_suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_suite)
    repo = tmp_path / 'repo'
    repo.mkdir()
    (repo / 'a.txt').write_text('a\n')
    git = ['git', '-C', str(repo), '-c', 'user.name=t', '-c', 'user.email=t@t', '-c', 'commit.gpgsign=false']
    subprocess.run(['git', 'init', '-q', str(repo)], check=True)
    subprocess.run([*git, 'add', 'a.txt'], check=True)
    subprocess.run([*git, 'commit', '-q', '-m', 'old'], check=True)
    head = subprocess.run([*git, 'rev-parse', 'HEAD'], check=True, capture_output=True, text=True).stdout.strip()
    (repo / 'a.txt').write_text('b\n')  # the newer working tree: "dirty" to the old .git
    monkeypatch.setattr(gpu_suite, 'ROOT', str(repo))
    passed = 'f' * 40
    monkeypatch.setenv('GPU_SUITE_COMMIT', passed)
    suite = gpu_suite.Suite(gpu_suite.parse_args(['--out', str(tmp_path / 'o'), '--device', 'cpu', '--smoke']))
    record = {}
    suite.section_env(record)
    assert record['commit'] == passed and record['git_head_there'] == head and record['dirty'] is None, record
    monkeypatch.delenv('GPU_SUITE_COMMIT')
    record = {}
    suite.section_env(record)
    assert record['commit'] == head and 'git_head_there' not in record and record['dirty'] is True, record


def test_gpu_suite_method_configurations_get_a_rate_ratio_and_no_loss_comparison(tmp_path):
    """A method plug-in's loss (SPD's, STF's targets) is another quantity than EDM's: its row compares rates against
    bf16 EDM loss at its batch, and never losses, also when that bf16 row is missing (a --train-configs call)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location('gpu_suite', SUITE)
    gpu_suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_suite)
    suite = gpu_suite.Suite(gpu_suite.parse_args(['--out', str(tmp_path / 'o'), '--device', 'cpu', '--smoke']))
    edm = dict(name='edm_fp32', batch=8, images_per_s=100.0, losses=[1.0, 0.9, 1.1])
    spd = dict(name='ours_bf16_spd', batch=8, images_per_s=150.0, losses=[0.2, 0.3, 0.1])
    record = dict(configs=[edm, spd])
    suite._train_ratios(record)
    assert record['ratios'] == {'ours_bf16_spd/edm_fp32@8': 1.5} and 'loss_vs_edm' not in spd
    bf16 = dict(name='ours_bf16', batch=8, images_per_s=200.0, losses=[1.0, 0.9, 1.2])
    record = dict(configs=[edm, bf16, spd])
    suite._train_ratios(record)
    assert record['ratios']['ours_bf16_spd/ours_bf16@8'] == 0.75 and 'loss_vs_edm' not in spd
    assert bf16['loss_vs_edm']['steps'] == 3
