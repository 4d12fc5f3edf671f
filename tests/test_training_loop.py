"""Training loop: EDM formulas, equality with an independent EDM step, phases, exact resume, rank invariance,
snapshots and stats, and learning on digits."""

import copy
import glob
import json
import os
import subprocess
import warnings

import numpy as np
import pytest
import torch
from launch import torchrun
from train_worker import ROOT, assert_tree_equal, digits_images, loop_kwargs, random_images, write_zip_dataset

import dnnlib
from losses import Batch
from losses.denoising import SIGMA_BIN_EDGES
from torch_utils import persistence, training_stats
from training import training_loop as tl
from training.dataset import ImageFolderDataset, InfiniteSampler

SIGMA_BINS = set(training_stats.bin_names('Loss/sigma', SIGMA_BIN_EDGES))
EDM_STAT_NAMES = {'Loss/loss', 'Progress/tick', 'Progress/kimg', 'Timing/total_sec', 'Timing/sec_per_tick',
                  'Timing/sec_per_kimg', 'Timing/maintenance_sec', 'Resources/cpu_mem_gb',
                  'Resources/peak_gpu_mem_gb', 'Resources/peak_gpu_mem_reserved_gb'}


@pytest.fixture(scope='module')
def tiny_zip(tmp_path_factory):
    return write_zip_dataset(str(tmp_path_factory.mktemp('data') / 'tiny.zip'), random_images(64))


def _final_state(run_dir):
    paths = sorted(glob.glob(os.path.join(run_dir, 'training-state-*.pt')))
    assert paths, f'no training state in {run_dir}'
    return torch.load(paths[-1], map_location='cpu', weights_only=True)


# ---------------------------------------------------------------------------------------------------------------------
# Formulas.

def test_learning_rate_ramp():
    assert tl.learning_rate_ramp(0, 10000) == 0  # the first step trains at lr 0
    assert tl.learning_rate_ramp(5_000_000, 10000) == 0.5
    assert tl.learning_rate_ramp(30_000_000, 10000) == 1
    assert tl.learning_rate_ramp(8, 0) == 1 and tl.learning_rate_ramp(0, 0) == 0


def test_ema_beta():
    assert tl.ema_beta(0, 512, 500, 0.05) == 0  # the first step copies the net
    assert tl.ema_beta(1_000_000, 512, 500, 0.05) == pytest.approx(0.5 ** (512 / 50_000), rel=1e-15)
    assert tl.ema_beta(100_000_000, 512, 500, 0.05) == pytest.approx(0.5 ** (512 / 500_000), rel=1e-15)
    assert tl.ema_beta(0, 512, 500, None) == pytest.approx(0.5 ** (512 / 500_000), rel=1e-15)  # --transfer


def test_update_ema_lerps_parameters_and_copies_buffers():
    torch.manual_seed(0)
    net, ema = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    for module in (net, ema):
        torch.nn.init.normal_(module.weight)
        torch.nn.init.normal_(module.bias)
    net.running_mean.fill_(2.0)
    old = [p.clone() for p in ema.parameters()]
    tl.update_ema(ema, net, 0.75)
    for p_ema, p_old, p_net in zip(ema.parameters(), old, net.parameters()):
        torch.testing.assert_close(p_ema, p_net + 0.75 * (p_old - p_net), rtol=0, atol=1e-6)
    assert torch.equal(ema.running_mean, net.running_mean)
    tl.update_ema(ema, net, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), net.parameters()))


@pytest.mark.parametrize('beta', [0.3, 0.5, 0.9, 0.9993])
def test_ema_update_is_edms_lerp_bit_for_bit(beta):
    gen = torch.Generator().manual_seed(1)
    net, ema = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
    with torch.no_grad():
        for module in (net, ema):
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
    expected = [p_net.detach().lerp(p_ema, beta) for p_ema, p_net in zip(ema.parameters(), net.parameters())]  # EDM
    tl.update_ema(ema, net, beta)
    for p_ema, want in zip(ema.parameters(), expected):
        assert torch.equal(p_ema, want)


def test_ema_update_with_the_runs_cached_tensor_lists_is_the_same():
    # The loop lists the EMA's and the net's tensors once per run (ema_tensors); updates through those lists equal
    # updates that list them anew, parameters and buffers, over several steps.
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    ema_a, ema_b = copy.deepcopy(net), copy.deepcopy(net)
    tensors = tl.ema_tensors(ema_b, net)
    for beta in (0.9, 0.5, 0.99):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
            net[1].running_mean.add_(1.0)
        tl.update_ema(ema_a, net, beta)
        tl.update_ema(ema_b, net, beta, tensors)
    for a, b in zip(list(ema_a.parameters()) + list(ema_a.buffers()), list(ema_b.parameters()) + list(ema_b.buffers())):
        assert torch.equal(a, b)
    assert torch.equal(ema_b[1].running_mean, net[1].running_mean)


def test_split_batch():
    assert tl.split_batch(512, 8, None) == (64, 64, 1)
    assert tl.split_batch(512, 8, 16) == (64, 16, 4)
    assert tl.split_batch(512, 8, 100) == (64, 64, 1)
    with pytest.raises(ValueError, match='batch size 10 must be a positive multiple of the number of ranks'):
        tl.split_batch(10, 4, None)
    with pytest.raises(ValueError, match='per-rank batch 8 .* is not a multiple of batch_gpu 3'):
        tl.split_batch(8, 1, 3)


def test_autocast_context_is_a_no_op_for_fp32():
    import contextlib
    assert isinstance(tl.autocast_context(torch.device('cpu'), 'fp32'), contextlib.nullcontext)
    assert isinstance(tl.autocast_context(torch.device('cpu'), 'bf16'), torch.autocast)
    with pytest.raises(ValueError, match="precision 'fp8'"):
        tl.autocast_context(torch.device('cpu'), 'fp8')


# ---------------------------------------------------------------------------------------------------------------------
# The loop against an independent EDM step.

def _edm_reference_run(kwargs, num_steps):
    """EDM's training_loop, written out for one process: same seeding and construction order, EDM's step and EMA."""
    seed, batch_size = kwargs['seed'], kwargs['batch_size']
    np.random.seed(seed % (1 << 31))
    torch.manual_seed(np.random.randint(1 << 31))
    dataset = dnnlib.util.construct_class_by_name(**kwargs['dataset_kwargs'])
    sampler = InfiniteSampler(dataset=dataset, rank=0, num_replicas=1, seed=seed)
    batch_gpu = kwargs['batch_gpu']
    iterator = iter(torch.utils.data.DataLoader(dataset=dataset, sampler=sampler, batch_size=batch_gpu))
    net = dnnlib.util.construct_class_by_name(**kwargs['network_kwargs'], img_resolution=dataset.resolution,
                                              img_channels=dataset.num_channels, label_dim=dataset.label_dim)
    net.train().requires_grad_(True)
    with torch.no_grad():  # EDM's module summary: one forward pass in training mode (dropout draws)
        net(torch.zeros([batch_gpu, net.img_channels, net.img_resolution, net.img_resolution]),
            torch.ones([batch_gpu]), torch.zeros([batch_gpu, net.label_dim]))
    loss_fn = dnnlib.util.construct_class_by_name(**kwargs['loss_kwargs'])
    augment_pipe = dnnlib.util.construct_class_by_name(**kwargs['augment_kwargs'])
    optimizer = dnnlib.util.construct_class_by_name(params=net.parameters(), **kwargs['optimizer_kwargs'])
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    cur_nimg = 0
    for _ in range(num_steps):
        optimizer.zero_grad(set_to_none=True)
        for _ in range(batch_size // batch_gpu):
            images, labels = next(iterator)
            images = images.to(torch.float32) / 127.5 - 1
            loss = loss_fn(net, Batch(images, labels), augment_pipe=augment_pipe)
            loss.sum().mul(kwargs['loss_scaling'] / batch_size).backward()
        for g in optimizer.param_groups:
            g['lr'] = kwargs['optimizer_kwargs']['lr'] * min(cur_nimg / max(kwargs['lr_rampup_kimg'] * 1000, 1e-8), 1)
        for param in net.parameters():
            if param.grad is not None:
                torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
        optimizer.step()
        halflife = min(kwargs['ema_halflife_kimg'] * 1000, cur_nimg * 0.05)
        beta = 0.5 ** (batch_size / max(halflife, 1e-8))
        for p_ema, p_net in zip(ema.parameters(), net.parameters()):
            p_ema.copy_(p_net.detach().lerp(p_ema, beta))
        cur_nimg += batch_size
    return net, ema, optimizer


def _augmented_kwargs(run_dir, data, **overrides):
    """Augmentation, dropout, 2 accumulation rounds, loss scaling and an lr ramp: every random stream in use."""
    kwargs = dict(
        rng='rank', batch_gpu=4, loss_scaling=2.0, lr_rampup_kimg=0.016,
        network_kwargs=dict(loop_kwargs('', '')['network_kwargs'], dropout=0.2, augment_dim=9),
        augment_kwargs=dict(class_name='training.augment.AugmentPipe', p=0.5, xflip=1e8, yflip=1, scale=1,
                            rotate_frac=1, aniso=1, translate_frac=1))
    kwargs.update(overrides)
    return loop_kwargs(run_dir, data, **kwargs)


def test_loop_equals_independent_edm_step_in_fp32(tiny_zip, tmp_path):
    """precision='fp32' without compile, rng='rank': bit-identical to EDM's step logic (augmentation, dropout,
    2 accumulation rounds, loss scaling, lr ramp, EMA), so the fp32 autocast path is a true no-op. The reference step
    is rebuilt from this project's network, loss and augmentation: it checks the loop, not those modules (whose
    gradients and augmented pixels are about one ulp from NVlabs/edm's, see training/networks.py and augment.py)."""
    kwargs = _augmented_kwargs(str(tmp_path), tiny_zip, precision='fp32', compile=False, snapshot_ticks=1)
    tl.training_loop(**kwargs)
    state = _final_state(str(tmp_path))
    net, ema, optimizer = _edm_reference_run(kwargs, num_steps=3)
    assert state['cur_nimg'] == 24 and state['cur_iter'] == 3
    assert_tree_equal(state['networks']['net'], net.state_dict())
    assert_tree_equal(state['ema'], ema.state_dict())
    key = 'model.enc.8x8_conv.weight'
    assert not torch.equal(state['ema'][key], state['networks']['net'][key])  # EMA is not a copy of the net
    ours = state['optimizers']['main']
    for idx, moments in optimizer.state_dict()['state'].items():
        assert_tree_equal(ours['state'][idx], moments, f'adam[{idx}]')

    # Snapshots: EDM's dict; the last one holds the final EMA; stats.jsonl has EDM's names.
    snapshots = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / 'network-snapshot-*.pkl')))
    assert snapshots == ['network-snapshot-000000.pkl']  # ticks 0 and 1 both at kimg 0: the last write wins
    data = persistence.load_network_pickle(str(tmp_path / snapshots[-1]))
    assert set(data) == {'ema', 'loss', 'process', 'augment_pipe', 'dataset_kwargs'}
    assert data['process'] == {'name': 'edm', 'options': {}} and data['loss'] == {'name': 'edm', 'options': {}}
    assert_tree_equal(data['ema'].state_dict(), state['ema'])
    assert data['dataset_kwargs']['path'] == tiny_zip and data['augment_pipe'].p == 0.5
    lines = [json.loads(line) for line in open(tmp_path / 'stats.jsonl')]
    assert len(lines) == 2
    assert EDM_STAT_NAMES | {'Loss/nonfinite', 'Progress/lr', 'timestamp'} | SIGMA_BINS == set(lines[0])
    assert lines[0]['Loss/loss']['num'] == 8 * 64  # tick 0 = the first step, per-element
    assert lines[1]['Loss/loss']['num'] == 2 * 8 * 64 and lines[1]['Progress/kimg']['mean'] == 0.024


@pytest.mark.parametrize('precision', ['bf16', 'fp16'])
def test_mixed_precision_runs_and_stays_close_to_fp32(tiny_zip, tmp_path, precision):
    results = {}
    for p in ('fp32', precision):
        run_dir = str(tmp_path / p)
        os.makedirs(run_dir)
        tl.training_loop(**loop_kwargs(run_dir, tiny_zip, precision=p))
        state = _final_state(run_dir)
        results[p] = torch.cat([v.flatten() for v in state['networks']['net'].values() if v.is_floating_point()])
        if p == 'fp16':
            assert set(state['grad_scalers']) == {'main'} and state['grad_scalers']['main']['scale'] > 0
    assert bool(torch.isfinite(results[precision]).all())
    assert not torch.equal(results[precision], results['fp32'])  # autocast did run in lower precision
    assert (results[precision] - results['fp32']).abs().max() < 0.01


# ---------------------------------------------------------------------------------------------------------------------
# Phases, resume, rank layout.

def test_phases_with_extra_network_and_interval(tiny_zip, tmp_path):
    import train_worker
    train_worker.TwoPhaseLoss.after_steps.clear()
    tl.training_loop(**loop_kwargs(str(tmp_path), tiny_zip, loss_kwargs=dict(class_name='train_worker.TwoPhaseLoss')))
    state = _final_state(str(tmp_path))
    assert set(state['networks']) == {'net', 'aux'} and set(state['optimizers']) == {'main', 'aux'}
    # 3 iterations: the lazy phase (interval 2, offset 1) ran once, at iteration 1: w = 0 + 0.25 * 2.
    assert state['networks']['aux']['weight'].item() == 0.5
    # Its after_step hook ran once, after that step (it sees w = 0.5), without autograd, 8 images into the run.
    assert train_worker.TwoPhaseLoss.after_steps == [(0.5, 8, False)]
    assert int(state['optimizers']['main']['state'][0]['step']) == 3
    lines = [json.loads(line) for line in open(tmp_path / 'stats.jsonl')]
    assert 'Loss/aux' not in lines[0] and lines[1]['Loss/aux']['num'] == 8  # reported at iteration 1 only


def test_an_extra_network_keeps_the_mode_the_loss_gave_it(tiny_zip, tmp_path):
    # A frozen teacher put in eval mode by the loss stays there: the loop forced every extra network into training
    # mode, so a teacher with dropout ran with dropout unless the loss reset it at each step (consistency-distillation
    # trial). The trained aux network keeps its default training mode.
    import train_worker
    train_worker.TwoPhaseLoss.teacher_modes.clear()
    tl.training_loop(**loop_kwargs(str(tmp_path), tiny_zip, loss_kwargs=dict(class_name='train_worker.TwoPhaseLoss',
                                                                         teacher=True)))
    assert train_worker.TwoPhaseLoss.teacher_modes == [False]
    state = _final_state(str(tmp_path))
    assert set(state['networks']) == {'net', 'aux', 'teacher'} and set(state['optimizers']) == {'main', 'aux'}


def test_phase_with_its_own_learning_rate_schedule(tiny_zip, tmp_path):
    # The lazy aux phase with lr_schedule = 0.5: one SGD step at iteration 1 gives w = 0 + 0.25 * 0.5 * 2.
    tl.training_loop(**loop_kwargs(str(tmp_path), tiny_zip, loss_kwargs=dict(class_name='train_worker.TwoPhaseLoss',
                                                                         aux_lr_scale=0.5)))
    state = _final_state(str(tmp_path))
    assert state['networks']['aux']['weight'].item() == 0.25


def test_loss_brings_its_own_batch_source_and_its_state_resumes(tiny_zip, tmp_path):
    import train_worker
    train_worker.OwnSourceLoss.built.clear()
    first = str(tmp_path / 'first')
    os.makedirs(first)
    tl.training_loop(**loop_kwargs(first, tiny_zip, loss_kwargs=dict(class_name='train_worker.OwnSourceLoss'),
                                   state_dump_ticks=1))
    state = _final_state(first)
    assert state['toy_position'] == 3 and state['data_position'] == 24  # 3 iterations of 8 images
    assert train_worker.OwnSourceLoss.built[-1].seen == [0, 1, 2]
    resumed = str(tmp_path / 'resumed')
    os.makedirs(resumed)
    tl.training_loop(**loop_kwargs(resumed, tiny_zip, loss_kwargs=dict(class_name='train_worker.OwnSourceLoss'),
                                   total_kimg=0.048,
                                   resume_state_dump=sorted(glob.glob(os.path.join(first, 'training-state-*.pt')))[-1]))
    assert train_worker.OwnSourceLoss.built[-1].seen == [3, 4, 5]


@pytest.mark.slow
def test_exact_resume_matches_a_straight_run(tiny_zip, tmp_path):
    """2 kimg straight == 1 kimg, then resume to 2 kimg: weights, EMA, Adam state, RNG and data position."""
    common = dict(batch_size=64, batch_gpu=32, kimg_per_tick=1, state_dump_ticks=1, rng='image')
    straight, first, resumed = (str(tmp_path / name) for name in ('straight', 'first', 'resumed'))
    for d in (straight, first, resumed):
        os.makedirs(d)
    kwargs = _augmented_kwargs(straight, tiny_zip, **common)
    tl.training_loop(**dict(kwargs, run_dir=straight, total_kimg=2))
    tl.training_loop(**dict(kwargs, run_dir=first, total_kimg=1))
    first_state_path = os.path.join(first, 'training-state-000001.pt')
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # same options: no 'not exact' warning
        tl.training_loop(**dict(kwargs, run_dir=resumed, total_kimg=2, resume_state_dump=first_state_path))

    a = torch.load(os.path.join(straight, 'training-state-000002.pt'), weights_only=True)
    b = torch.load(os.path.join(resumed, 'training-state-000002.pt'), weights_only=True)
    assert a['cur_nimg'] == b['cur_nimg'] == 2048 and a['data_position'] == b['data_position'] == 2048
    for key in ('networks', 'ema', 'optimizers', 'rng', 'cur_iter'):
        assert_tree_equal(a[key], b[key], key)
    assert not torch.equal(a['networks']['net']['model.enc.8x8_conv.weight'],
                           torch.load(first_state_path, weights_only=True)['networks']['net']
                           ['model.enc.8x8_conv.weight'])

    # The finished 2-kimg state resumed with the same duration: nothing trained, nothing written.
    finished = str(tmp_path / 'finished')
    os.makedirs(finished)
    tl.training_loop(**dict(kwargs, run_dir=finished, total_kimg=2, snapshot_ticks=1,
                            resume_state_dump=os.path.join(straight, 'training-state-000002.pt')))
    assert os.listdir(finished) == []


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_equal_one_rank(tiny_zip, tmp_path):
    """2 ranks x batch 4 == 1 rank x batch 8 == 1 rank x 2 rounds of 4 after 3 steps (rng='image')."""
    runs = {'ranks2': dict(batch_gpu=None), 'rank1': dict(batch_gpu=None), 'rank1_rounds2': dict(batch_gpu=4)}
    for name, overrides in runs.items():
        os.makedirs(tmp_path / name)
        config = loop_kwargs(str(tmp_path / name), tiny_zip, **overrides)
        if name == 'ranks2':
            config_path = tmp_path / 'config.json'
            config_path.write_text(json.dumps(config))
            cmd = torchrun(2, os.path.join(ROOT, 'tests', 'train_worker.py'), config_path)
            env = dict(os.environ, OMP_NUM_THREADS='1')
            result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        else:
            tl.training_loop(**config)
    states = {name: _final_state(str(tmp_path / name)) for name in runs}
    assert states['ranks2']['world_size'] == 2 and len(states['ranks2']['rng']) == 2
    # stats.jsonl counts steps, not rank-steps (report.py's non-finite panel reads it as steps).
    steps = {name: [json.loads(line)['Loss/nonfinite']['num'] for line in open(tmp_path / name / 'stats.jsonl')]
             for name in ('ranks2', 'rank1')}
    assert steps['ranks2'] == steps['rank1'] and sum(steps['rank1']) == 3
    assert states['ranks2']['data_position'] == states['rank1']['data_position'] == 24
    reference = states['rank1']
    for name in ('ranks2', 'rank1_rounds2'):
        for key in ('networks', 'ema'):
            tensors = states[name][key]['net'] if key == 'networks' else states[name][key]
            ref = reference[key]['net'] if key == 'networks' else reference[key]
            for k, v in tensors.items():
                torch.testing.assert_close(v, ref[k], rtol=0, atol=1e-5, msg=f'{name} {key} {k}')
    # Not vacuous: training moved the weights far more than the tolerance from their initialisation, which with
    # rng='image' comes from the seed alone (so the runs above also started from the same weights).
    torch.manual_seed(123)
    initial = dnnlib.util.construct_class_by_name(**loop_kwargs('', '')['network_kwargs'], img_resolution=8,
                                                  img_channels=1, label_dim=0).state_dict()
    assert max((reference['networks']['net'][k] - v).abs().max() for k, v in initial.items()) > 1e-3



def test_the_loop_gives_back_the_backend_flags_it_set_and_its_loader_workers(tiny_zip, tmp_path, monkeypatch):
    # train.main in a notebook, then generate.py or fid.py in the same process: cuDNN autotuning on and TF32 off
    # stayed, so on an Ampere or newer GPU their images and FID differed from the command line's (and EDM's), which
    # run with torch's defaults. Set during the run, as EDM's loop sets them.
    import multiprocessing
    defaults = [(torch.backends.cudnn, 'benchmark', False), (torch.backends.cudnn, 'allow_tf32', True),
                (torch.backends.cuda.matmul, 'allow_tf32', True),
                (torch.backends.cuda.matmul, 'allow_fp16_reduced_precision_reduction', True)]
    for module, name, value in defaults:  # conftest puts back the process's own after the test
        setattr(module, name, value)
    during = []
    step = tl._train_step
    monkeypatch.setattr(tl, '_train_step', lambda run: (during.append([getattr(m, n) for m, n, _ in defaults]),
                                                        step(run)))
    workers = set(multiprocessing.active_children())
    tl.training_loop(**loop_kwargs(str(tmp_path), tiny_zip, cudnn_benchmark=True,
                                   data_loader_kwargs=dict(num_workers=1)))
    assert during[0] == [True, False, False, False]
    assert [getattr(module, name) for module, name, _ in defaults] == [value for _, _, value in defaults]
    assert set(multiprocessing.active_children()) == workers


def test_weight_init_seed_leaves_the_cuda_generators_alone(monkeypatch):
    """rng='image' seeds the weights from the seed alone on the CPU generator; reseeding CUDA's too (what
    torch.manual_seed does) gave every rank the same CUDA stream: the same dropout masks and augmentations."""
    reseeded = []
    monkeypatch.setattr(torch.cuda, 'manual_seed_all', lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, 'manual_seed', lambda seed: reseeded.append(seed))
    before = torch.get_rng_state()
    with tl._weight_init_rng(123):
        drawn = torch.randn(3)
    assert torch.equal(drawn, torch.randn(3, generator=torch.Generator().manual_seed(123)))
    assert torch.equal(torch.get_rng_state(), before) and reseeded == []

def test_rng_rank_mode_depends_on_layout(tiny_zip, tmp_path):
    """Control for the test above: with EDM's per-rank stream, batch_gpu changes which noise an image gets."""
    results = []
    for batch_gpu in (None, 4):
        run_dir = tmp_path / f'bg{batch_gpu}'
        os.makedirs(run_dir)
        tl.training_loop(**loop_kwargs(str(run_dir), tiny_zip, rng='rank', batch_gpu=batch_gpu))
        results.append(_final_state(str(run_dir))['networks']['net']['model.enc.8x8_conv.weight'])
    assert (results[0] - results[1]).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# Transfer and EDM-format resume.

def test_transfer_and_edm_training_state(tiny_zip, tmp_path):
    base = str(tmp_path / 'base')
    os.makedirs(base)
    tl.training_loop(**loop_kwargs(base, tiny_zip, snapshot_ticks=1))
    snapshot = os.path.join(base, 'network-snapshot-000000.pkl')
    ema = persistence.load_network_pickle(snapshot)['ema']

    # --transfer: net and EMA start from the snapshot's EMA (2 steps at lr 0, so they stay there; EDM writes no
    # training state at tick 0).
    frozen = dict(total_kimg=0.016, optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=0.0))
    transfer = str(tmp_path / 'transfer')
    os.makedirs(transfer)
    tl.training_loop(**loop_kwargs(transfer, tiny_zip, resume_pkl=snapshot, ema_rampup_ratio=None, **frozen))
    state = _final_state(transfer)
    assert_tree_equal(state['networks']['net'], ema.state_dict())
    assert_tree_equal(state['ema'], ema.state_dict())

    # EDM's training-state: a torch.save of the pickled net + optimizer state, which weights_only refuses.
    net = copy.deepcopy(ema).train().requires_grad_(True)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.zeros(2, 1, 8, 8), torch.ones(2)).square().sum().backward()
    optimizer.step()
    edm_state = str(tmp_path / 'edm' / 'training-state-000000.pt')
    os.makedirs(os.path.dirname(edm_state))
    torch.save(dict(net=net, optimizer_state=optimizer.state_dict()), edm_state)
    assert tl.load_training_state(edm_state) is None
    resumed = str(tmp_path / 'resumed')
    os.makedirs(resumed)
    with pytest.warns(UserWarning, match='is an EDM training state'):
        tl.training_loop(**loop_kwargs(resumed, tiny_zip, resume_pkl=snapshot, resume_state_dump=edm_state,
                                       resume_kimg=0, **frozen))
    state = _final_state(resumed)
    assert_tree_equal(state['networks']['net'], {k: v.detach() for k, v in net.state_dict().items()})
    assert int(state['optimizers']['main']['state'][0]['step']) == 3  # EDM's Adam state was loaded, then stepped


# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_tiny_net_learns_digits(tmp_path):
    images, labels = digits_images()
    data = write_zip_dataset(str(tmp_path / 'digits.zip'), images, labels)
    run_dir = str(tmp_path / 'run')
    os.makedirs(run_dir)
    adam = dict(class_name='torch.optim.Adam', lr=1e-2, betas=[0.9, 0.999], eps=1e-8)
    tl.training_loop(**loop_kwargs(run_dir, data, batch_size=64, total_kimg=4, kimg_per_tick=0.5, lr_rampup_kimg=0.5,
                                   optimizer_kwargs=adam, seed=0, state_dump_ticks=None))
    lines = [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl'))]
    # Tick 0 is the first step alone (untrained net); tick 1 is the first full tick (500 images).
    untrained, first, last = (lines[i]['Loss/loss']['mean'] for i in (0, 1, -1))
    print(f'digits: mean Loss/loss tick 0 {untrained:.4f}, tick 1 {first:.4f}, last tick {last:.4f} '
          f'({len(lines)} ticks)')
    assert len(lines) == 9 and last < 0.75 * first and last < 0.75 * untrained


def test_loop_dataset_has_expected_layout(tiny_zip):
    # Guards the assumptions above: 64 grayscale 8x8 images, unlabelled.
    dataset = ImageFolderDataset(tiny_zip)
    assert (len(dataset), dataset.num_channels, dataset.resolution, dataset.label_dim) == (64, 1, 8, 0)


def test_snapshots_under_one_kimg_apart_warn_that_they_share_names(tiny_zip, tmp_path):
    """A library call with snapshots every 0.008 kimg: EDM's names count whole kimg, so the three ticks' snapshots are
    one file (the last tick's); the loop says so. Every whole kimg or more: no such warning."""
    run_dir = str(tmp_path / 'sub-kimg')
    os.makedirs(run_dir)
    with pytest.warns(UserWarning, match=r'snapshots every 0\.008 kimg: .* replaces any earlier one of the same kimg'):
        tl.training_loop(**loop_kwargs(run_dir, tiny_zip, kimg_per_tick=0.008, snapshot_ticks=1, state_dump_ticks=None))
    assert [name for name in sorted(os.listdir(run_dir)) if name.endswith('.pkl')] == ['network-snapshot-000000.pkl']
    with open(os.path.join(run_dir, 'stats.jsonl')) as f:
        assert len(f.readlines()) == 3  # three ticks (at 8, 16 and 24 images), three snapshots written, one file
    whole = str(tmp_path / 'whole-kimg')
    os.makedirs(whole)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        tl.training_loop(**loop_kwargs(whole, tiny_zip, snapshot_ticks=1, state_dump_ticks=None))
    assert not [w for w in caught if 'replaces any earlier one' in str(w.message)]


def test_resume_with_another_batch_layout_is_not_called_exact(tiny_zip, tmp_path, capsys):
    # batch_gpu 8 -> 4 (two accumulation rounds): another summation order, so close but not bit-exact; the loop said
    # "Resuming exactly" (an audit measured 0.12 in the weights after 3 kimg).
    first, second, third = (str(tmp_path / name) for name in ('first', 'second', 'third'))
    for d in (first, second, third):
        os.makedirs(d)
    kwargs = loop_kwargs(first, tiny_zip, batch_size=8, total_kimg=0.016, kimg_per_tick=0.008)
    tl.training_loop(**kwargs)
    state_path = os.path.join(first, 'training-state-000000.pt')
    saved = torch.load(state_path, weights_only=True)
    assert (saved['batch_gpu'], saved['num_rounds'], saved['world_size']) == (8, 1, 1)
    capsys.readouterr()
    with pytest.warns(UserWarning, match=r'another per-rank batch layout \(batch_gpu 8 x 1 rounds -> 4 x 2\): the '
                                         r'continuation is close, not bit-exact'):
        tl.training_loop(**dict(kwargs, run_dir=second, total_kimg=0.024, batch_gpu=4, resume_state_dump=state_path))
    out = capsys.readouterr().out
    assert f'Resuming from "{state_path}"' in out and 'Resuming exactly' not in out
    # The same layout: exact, as before (states written before batch_gpu was recorded compare the world size only).
    del saved['batch_gpu'], saved['num_rounds']
    old_state = os.path.join(third, 'training-state-000000.pt')
    torch.save(saved, old_state)
    tl.training_loop(**dict(kwargs, run_dir=third, total_kimg=0.024, resume_state_dump=old_state))
    assert f'Resuming exactly from "{old_state}"' in capsys.readouterr().out


def test_stats_line_is_written_before_the_state_and_a_resume_in_place_trims_later_ticks(tiny_zip, tmp_path,
                                                                                         monkeypatch):
    # A kill between the state's rename and the tick's stats line lost that tick's line; now the line comes first,
    # and a resume in the run's own folder (--nosubdir) drops the lines of ticks it trains again (and a torn one).
    import shutil

    run_dir = str(tmp_path / 'run')
    os.makedirs(run_dir)
    stats = os.path.join(run_dir, 'stats.jsonl')

    def ticks():
        with open(stats) as f:
            return [json.loads(line)['Progress/tick']['mean'] for line in f]

    saved = []
    save = tl.save_training_state

    def recording_save(path, state):
        saved.append((state['cur_tick'], ticks()))
        save(path, state)
        if state['cur_tick'] == 2:
            shutil.copy(path, tmp_path / 'tick1-state.pt')

    monkeypatch.setattr(tl, 'save_training_state', recording_save)
    kwargs = loop_kwargs(run_dir, tiny_zip, batch_size=8, kimg_per_tick=0.008, total_kimg=0.032)
    tl.training_loop(**kwargs)
    # One step per tick, ticks 0..3; states after ticks 1, 2, 3, each once its tick's line is in the file.
    assert saved == [(2, [0, 1]), (3, [0, 1, 2]), (4, [0, 1, 2, 3])]
    monkeypatch.setattr(tl, 'save_training_state', save)
    state_path = os.path.join(run_dir, 'training-state-000000.pt')
    shutil.copy(tmp_path / 'tick1-state.pt', state_path)
    with open(stats, 'a') as f:
        f.write('{"Loss/loss": {"num"')  # killed mid-line
    tl.training_loop(**dict(kwargs, resume_state_dump=state_path))
    assert ticks() == [0, 1, 2, 3]
    # Resumed in another folder: the interrupted run's file is left as it is.
    elsewhere = str(tmp_path / 'elsewhere')
    os.makedirs(elsewhere)
    shutil.copy(tmp_path / 'tick1-state.pt', state_path)
    tl.training_loop(**dict(kwargs, run_dir=elsewhere, resume_state_dump=state_path))
    assert ticks() == [0, 1, 2, 3]
    with open(os.path.join(elsewhere, 'stats.jsonl')) as f:
        assert [json.loads(line)['Progress/tick']['mean'] for line in f] == [2, 3]


def test_state_damaged_inside_a_tensor_is_refused(tmp_path):
    # torch.load does not check the records' CRC-32: 64 bytes flipped inside a tensor loaded as other numbers (an
    # audit resumed Adam moments 6.3e3 off without a word). The archive's checksums are checked.
    import zipfile

    path = str(tmp_path / 'training-state-000001.pt')
    tl.save_training_state(path, dict(format=tl.STATE_FORMAT, version=tl.STATE_VERSION,
                                      weights=torch.arange(10000, dtype=torch.float32)))
    assert torch.equal(tl.load_training_state(path)['weights'], torch.arange(10000, dtype=torch.float32))
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)
    with open(path, 'r+b') as f:
        f.seek(record.header_offset + 26)
        name_len, extra_len = np.frombuffer(f.read(4), dtype='<u2')
        f.seek(record.header_offset + 30 + int(name_len) + int(extra_len) + 20000)
        f.write(b'\xff' * 64)
    with pytest.raises(ValueError, match=rf"training-state-000001.pt: damaged \(the CRC-32 of its record "
                                         rf"{record.filename} does not match its content\)"):
        tl.load_training_state(path)


def test_a_state_from_before_edms_ema_lerp_is_not_called_exact():
    """States of train.py before 2026-12-01 15:00 (no --ema-rampup among their options) updated the EMA with another
    lerp, which rounds otherwise: resumed with EDM's, their EMA (the snapshots) differed by 1e-7 after a kimg from the
    run the old version continued, under "Resuming exactly"."""
    options = dict(seed=1, batch_size=64)
    recorded = dict(lr=0.001, ema=0.5, ema_rampup=0.05)
    state = dict(options=json.dumps(options), world_size=1, train_options=json.dumps(recorded))
    assert tl._resumes_exactly(state, 'S.pt', options, 64, None)
    assert tl._resumes_exactly(dict(state, train_options=None), 'S.pt', options, 64, None)  # a library call's state
    del recorded['ema_rampup']
    with pytest.warns(UserWarning) as record:
        assert not tl._resumes_exactly(dict(state, train_options=json.dumps(recorded)), 'S.pt', options, 64, None)
    assert str(record[0].message) == ("S.pt was written by a version before 2026-12-01 (its options lack "
                                      "--ema-rampup), whose EMA update rounded otherwise than EDM's used since: the "
                                      "EMA continues close, not bit-exact")


def test_a_resume_that_turns_on_channels_last_or_compile_is_not_called_exact(tiny_zip, tmp_path, capsys):
    """Both change the kernels, hence the numbers (docs/performance.md); the loop printed "Resuming exactly" under
    train.py's 'changed --channels-last: False -> True (the continuation is not exact)'. A state written before they
    were recorded ran without them: resumed as it was made, it is still exact."""
    first = tmp_path / 'first'
    first.mkdir()
    tl.training_loop(**loop_kwargs(str(first), tiny_zip, total_kimg=0.016))
    state_path = sorted(glob.glob(str(first / 'training-state-*.pt')))[-1]
    state = torch.load(state_path, weights_only=True)
    saved = json.loads(state['options'])
    assert saved['channels_last'] is False and saved['compile'] is False
    with pytest.warns(UserWarning, match=r'with different channels_last \(false -> true\): the continuation will not '
                                         r'be exact'):
        assert not tl._resumes_exactly(state, state_path, dict(saved, channels_last=True), 8, None)
    with pytest.warns(UserWarning, match=r'with different compile \(false -> "regional"\)'):
        assert not tl._resumes_exactly(state, state_path, dict(saved, compile='regional'), 8, None)
    older = dict(state, options=json.dumps({k: v for k, v in saved.items() if k not in ('compile', 'channels_last')}))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert tl._resumes_exactly(older, state_path, saved, 8, None)
    # Through the loop: the resumed run's warning and its line say so.
    resumed = tmp_path / 'resumed'
    resumed.mkdir()
    with pytest.warns(UserWarning, match=r'channels_last \(false -> true\)'):
        tl.training_loop(**loop_kwargs(str(resumed), tiny_zip, total_kimg=0.024, channels_last=True,
                                       resume_state_dump=state_path))
    printed = capsys.readouterr().out
    assert 'Resuming from' in printed and 'Resuming exactly' not in printed


def test_an_older_state_of_a_compiled_channels_last_run_resumed_as_it_was_made_is_still_exact(tiny_zip, tmp_path):
    """States written before compile / channels_last joined the loop's options: train.py recorded its --compile and
    --channels-last (its 'train_options'), so one of a --compile=regional --channels-last run, resumed with them, is
    exact (it was called 'not exact': compile false -> "regional"). Library values: compile=0 / 1 are False / True
    (compile=1 passed the check but ran eager, and was recorded as 1: 'compile (false -> 0)' against False)."""
    run = tmp_path / 'run'
    run.mkdir()
    recorded = dict(compile='regional', channels_last=True, ema_rampup=0.05)
    tl.training_loop(**loop_kwargs(str(run), tiny_zip, total_kimg=0.016, channels_last=1,
                                   state_extras=dict(train_options=json.dumps(recorded))))
    state_path = sorted(glob.glob(str(run / 'training-state-*.pt')))[-1]
    state = torch.load(state_path, weights_only=True)
    saved = json.loads(state['options'])
    assert saved['channels_last'] is True and saved['compile'] is False
    older = dict(state, options=json.dumps({k: v for k, v in saved.items() if k not in ('compile', 'channels_last')}))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert tl._resumes_exactly(older, state_path, dict(saved, compile='regional'), 8, None)
    with pytest.warns(UserWarning, match=r'with different compile \("regional" -> false\): the continuation'):
        assert not tl._resumes_exactly(older, state_path, saved, 8, None)
    assert (tl.compile_mode(0), tl.compile_mode(1), tl.compile_mode(True), tl.compile_mode('regional')) == \
        (False, True, True, 'regional')
    assert isinstance(tl.compile_network(torch.nn.Linear(2, 2), 1), torch._dynamo.eval_frame.OptimizedModule)
    with pytest.raises(ValueError, match="compile='blocks'"):
        tl.compile_mode('blocks')
    # A library caller's compile=0 resumes a state written with compile=False exactly.
    resumed = tmp_path / 'resumed'
    resumed.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        tl.training_loop(**loop_kwargs(str(resumed), tiny_zip, total_kimg=0.024, channels_last=True, compile=0,
                                       resume_state_dump=state_path))
    assert json.loads(_final_state(str(resumed))['options'])['compile'] is False


def test_a_resume_with_other_options_names_what_changed():
    # The warning named only the option ('loss_kwargs'); an SPD run resumed on other --data (fit=data refits Sigma0)
    # now reads which constants moved, and a long value is cut.
    state = dict(options=json.dumps(dict(loss_kwargs=dict(class_name='losses.spd.SPDLoss', c1=0.182, c2=0.5, m=2.0),
                                         seed=1, batch_size=64)), world_size=1)
    options = dict(loss_kwargs=dict(class_name='losses.spd.SPDLoss', c1=0.011, c2=0.5, m=2.5, fit_source='x' * 80),
                   seed=2, batch_size=64)
    with pytest.warns(UserWarning) as record:
        assert not tl._resumes_exactly(state, 'S.pt', options, 64, None)
    assert str(record[0].message) == (
        f'resuming from S.pt with different loss_kwargs (c1 0.182 -> 0.011, fit_source (absent) -> "{"x" * 56}..., '
        f'm 2.0 -> 2.5); seed (1 -> 2): the continuation will not be exact')
    many = tl._option_change('network_kwargs', dict(a=1, b=1, c=1, d=1, e=1), dict(a=2, b=2, c=2, d=2, e=2))
    assert many == 'network_kwargs (a 1 -> 2, b 1 -> 2, c 1 -> 2, d 1 -> 2, 1 more)'
    # A key one side lacks and the other holds as null: named, not an empty '()'.
    assert tl._option_change('loss_kwargs', dict(P_mean=-1.2, fit_source=None), dict(P_mean=-1.2)) == \
        'loss_kwargs (fit_source null -> (absent))'
